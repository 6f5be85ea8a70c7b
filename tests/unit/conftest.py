"""The unit tier's rule, enforced: no processes, no sockets (so no broker or database server).
A test that needs one belongs in tests/system (or tests/contract, marked `real`)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pytest


def _refuse(what: str):  # noqa: ANN202 - a stand-in with any signature
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a unit test must not {what}: move it to tests/system")

    return refuse


@pytest.fixture(autouse=True)
def no_processes_or_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
    monkeypatch.setattr(os, "fork", _refuse("fork"))
    monkeypatch.setattr(socket.socket, "connect", _refuse("open a network connection"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("listen on a socket"))
    yield
