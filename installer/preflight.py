"""Checks made before any container is touched, so a volunteer learns of a problem at once."""

from __future__ import annotations

import socket

from dockercomp.broker.settings import BrokerSettings
from dockercomp.installer.defaults import BROKER_CHECK_SECONDS
from dockercomp.installer.errors import BrokerUnreachable


def check_broker(settings: BrokerSettings, timeout: float = BROKER_CHECK_SECONDS) -> None:
    """A TCP connection to the broker succeeds from here, or BrokerUnreachable with the fix.

    Only TCP: credentials are the agent's business, and an MQTT handshake here would
    duplicate its code. It still catches the usual mistakes: a typo in the host name, a
    wrong port, a firewall, or a broker that is not running.
    """
    try:
        with socket.create_connection((settings.host, settings.port), timeout=timeout):
            return
    except socket.gaierror:
        raise BrokerUnreachable(
            f"the broker host {settings.host!r} cannot be resolved",
            "check the host name in --broker (or use its IP address)",
        ) from None
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise BrokerUnreachable(
            f"cannot reach the broker at {settings.host}:{settings.port} ({reason})",
            "check --broker, that the broker is running, and that no firewall blocks the port; "
            "--skip-broker-check installs anyway",
        ) from None
