"""The coordinator's side of revoking a volunteer: marking its workers lost.

Accounts, passwords, the ACL and reloads are the broker's (dockercomp.broker.accounts);
`dockercomp coordinator volunteers` (coordinator/cli.py) drives them. What stays here needs
the coordinator's account and its view of the workers: once the broker has reloaded and cut
a revoked volunteer off, its workers' offline presence is published as the coordinator, so
their tasks go to other workers at once instead of when their leases expire.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from dockercomp.broker.accounts import Accounts, Reloader, coordinator_broker
from dockercomp.broker.connection import MqttConnection
from dockercomp.broker.defaults import BROKER_PID_FILE_ENV, BROKER_RELOAD_ENV, RELOAD_TIMEOUT
from dockercomp.broker.errors import BrokerError, DecodeError
from dockercomp.broker.messages import OfflineReason, Presence, PresenceState
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import Topics
from dockercomp.coordinator.defaults import REVOKE_SETTLE_SECONDS
from dockercomp.exits import mask


def mark_workers_lost(broker: BrokerSettings, volunteer: str, *, settle: float = REVOKE_SETTLE_SECONDS,
                      timeout: float = RELOAD_TIMEOUT) -> list[str]:
    """Publishes, as the coordinator, the will each online worker of ``volunteer`` left behind.

    Mosquitto 2.0 publishes NO will for a connection it closes because the account was removed
    or its password changed (verified on 2.0.11), so the coordinator would go on believing
    those workers online, sending them tasks nobody can read until each lease runs out. The
    offline presence carries the worker's own seq and reason "lost", exactly as its will would.
    Returns the workers marked ("volunteer/worker"); raises BrokerError if unreachable.
    """
    topics = Topics(broker.root)
    seen: dict[str, bytes] = {}
    last = [time.monotonic()]

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        seen[topic] = payload  # the network thread only records
        last[0] = time.monotonic()

    connection = MqttConnection(broker, f"dockercomp-revoke-{volunteer}-{os.getpid()}")
    connection.on_message = on_message
    connection.subscribe(f"{topics.root}/workers/{volunteer}/+/presence")
    connection.start()
    try:
        connection.wait_connected(timeout)
        last[0] = time.monotonic()
        deadline = time.monotonic() + timeout
        # Retained presences arrive right after the subscription; stop once they stop coming.
        while time.monotonic() - last[0] < settle and time.monotonic() < deadline:
            time.sleep(0.05)
        marked = []
        for topic, payload in sorted(seen.items()):
            try:
                presence = Presence.decode(payload)
            except DecodeError:
                continue
            if presence.state is not PresenceState.ONLINE or presence.volunteer != volunteer:
                continue
            lost = replace(presence, state=PresenceState.OFFLINE, reason=OfflineReason.LOST)
            connection.publish(topic, lost.encode(), qos=1, retain=True)
            marked.append(f"{presence.volunteer}/{presence.worker}")
        connection.flush(timeout)
        return marked
    finally:
        connection.close(timeout=2)


def reload_broker(pid_file: Path | None, reload_command: str | None, warn: Callable[[str], None], *,
                  quiet: bool = False) -> str | None:
    """Makes the broker reload its files if told how (ReloadError if that fails); else warns
    how to. Returns what it did, None when it did nothing."""
    reloader = Reloader(pid_file, reload_command)
    if not reloader.configured:
        warn("note: the broker has NOT reloaded yet, so this is not in force: run "
             "`docker-compose kill -s HUP mosquitto` (or kill -HUP the broker), or pass "
             f"--pid-file / --reload-command [env {BROKER_PID_FILE_ENV} / {BROKER_RELOAD_ENV}]")
        return None
    done = reloader.reload()
    if not quiet:
        warn(f"broker reloaded: {done}")
    return done


def mark_revoked_lost(config_dir: Path, volunteer: str, broker_url: str | None,
                      warn: Callable[[str], None]) -> list[str] | None:
    """After ``volunteer`` was revoked and the broker reloaded: marks its workers lost, as the
    coordinator account of ``config_dir`` (or ``broker_url``). A failure only delays their
    tasks (until their leases expire), so it is a warning; returns None then."""
    try:
        return mark_workers_lost(coordinator_broker(Accounts(config_dir), broker_url), volunteer)
    except BrokerError as exc:
        # mask(): a malformed coordinator.env URL is quoted whole in the error, password included.
        warn(f"warning: could not mark {volunteer}'s workers lost ({mask(str(exc))}); their tasks return to the "
             "queue only when their leases expire")
        return None
