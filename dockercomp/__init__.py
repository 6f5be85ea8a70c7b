"""dockercomp: volunteer computing over MQTT.

One import namespace for the four roles, each in its own sub-package (their sources live in
the repository's top-level folders of the same names, mapped here by setup.cfg):

- ``dockercomp.broker``: topics, messages, the MQTT transport, the embedded broker and the
  broker's administration (accounts, ACLs, certificates);
- ``dockercomp.agent``: the worker that runs in a volunteer's container;
- ``dockercomp.coordinator``: the scientist's store, engine, CLI and Python API;
- ``dockercomp.installer``: starts and manages worker containers on a volunteer's machine.

The one console command is ``dockercomp`` (``dockercomp.cli``).
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("dockercomp")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
