"""Passwords and ACL for the embedded amqtt broker, from the same files Mosquitto reads.

``dockercomp broker serve --password-file passwd --acl-file acl`` loads the Mosquitto password file
(``$7$`` PBKDF2 hashes, broker/passwords.py) and ACL file (broker/acl.py) through the
``Guard`` below; the amqtt plugins ask it on every CONNECT, PUBLISH and delivery. SIGHUP
reloads both files and disconnects every client whose account was removed or whose password
changed, as Mosquitto does. ``broker/embedded.py`` wires this into its ``Broker`` subclass.

Where amqtt 0.12 differs from Mosquitto 2.0 with the same files (see also embedded.py):

- Retained messages: amqtt sends them on SUBSCRIBE (and to every new client, for every
  subscription anyone holds) without asking the topic plugins. ``SecureBroker`` in
  embedded.py filters them through the ACL; without it a volunteer would see other
  workers' retained presence.
- Wills: amqtt publishes a will without the PUBLISH check. ``Guard.authenticate`` drops a
  will the account may not write (Mosquitto accepts the connection and drops such a will
  when it fires: same outcome, the will never reaches anyone).
- Client-id takeover: amqtt deletes the existing session of a client id BEFORE it
  authenticates the new connection, so a client with a wrong password could cut a worker
  off its subscriptions. ``SecureBroker`` authenticates first, and refuses a connection
  that would take over a connected client id of ANOTHER account. Mosquitto 2.0.11 lets any
  authenticated account take over any client id (measured: user alice connecting as
  "bob/w1" disconnects bob's worker), so there a volunteer can kick another's workers off
  (they reconnect after backoff); it cannot read or write their topics.
- amqtt speaks no TLS here: expose it on loopback or a private network only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from dockercomp.broker.acl import Access, Acl
from dockercomp.broker.errors import SettingsError
from dockercomp.broker.passwords import PasswordFile, verify_password

log = logging.getLogger(__name__)

# Guards by key, so the plugins amqtt instantiates from a dotted path can find theirs.
_GUARDS: dict[str, Guard] = {}


class Guard:
    """The accounts and ACL one broker enforces; ``reload()`` rereads both files."""

    def __init__(self, password_file: str | Path, acl_file: str | Path | None = None,
                 *, allow_anonymous: bool = False) -> None:
        self.password_file = Path(password_file)
        self.acl_file = Path(acl_file) if acl_file is not None else None
        self.allow_anonymous = allow_anonymous
        self._lock = threading.Lock()
        self._hashes: dict[str, str] = {}
        self._acl: Acl | None = None
        self.reload()

    def reload(self) -> None:
        """Rereads both files; on any error the previous policy stays and SettingsError says why."""
        if not self.password_file.is_file():
            raise SettingsError(f"password file {self.password_file} does not exist "
                                "(create it with `dockercomp coordinator volunteers init`)")
        hashes = PasswordFile(self.password_file).read()
        acl = None
        if self.acl_file is not None:
            try:
                acl = Acl.parse(self.acl_file.read_text())
            except OSError as exc:
                raise SettingsError(f"cannot read ACL file {self.acl_file}: {exc.strerror}") from None
        with self._lock:
            self._hashes, self._acl = hashes, acl

    def check_password(self, username: str | None, password: str | None) -> bool:
        if username is None:
            return self.allow_anonymous
        with self._lock:
            encoded = self._hashes.get(username)
        return encoded is not None and password is not None and verify_password(password, encoded)

    def allows(self, username: str | None, client_id: str, topic: str, access: Access) -> bool:
        with self._lock:
            acl = self._acl
        if acl is None:  # no ACL file: authenticated clients may do anything (Mosquitto too)
            return True
        return acl.allows(username, client_id, topic, access)

    def authenticate(self, session: Session) -> bool:
        """CONNECT: the password must match; a will the account may not write is dropped."""
        username, client_id = session.username, session.client_id or ""
        if not self.check_password(username, _text(session.password)):
            log.warning("refused client %r: %s", client_id,
                        "anonymous clients are not allowed" if username is None
                        else f"wrong password or unknown user {username!r}")
            return False
        if session.will_flag and session.will_topic and not self.allows(
                username, client_id, session.will_topic, Access.WRITE):
            log.warning("dropped the will of client %r (user %r): it may not publish on %r",
                        client_id, username, session.will_topic)
            session.will_flag = False
        return True

    def register(self) -> str:
        key = f"guard-{id(self)}"
        _GUARDS[key] = self
        return key

    def unregister(self) -> None:
        for key in [k for k, guard in _GUARDS.items() if guard is self]:
            del _GUARDS[key]


def _text(value: Any) -> str | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _guard(key: str) -> Guard:
    try:
        return _GUARDS[key]
    except KeyError:
        raise SettingsError(f"no broker guard registered as {key!r}") from None


class PasswordAuthPlugin(BaseAuthPlugin):
    """amqtt auth plugin: the Mosquitto password file, through a Guard."""

    @dataclass
    class Config:
        guard: str = ""  # key of a registered Guard

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.guard = _guard(self._get_config_option("guard", ""))

    async def authenticate(self, *, session: Session) -> bool:
        return self.guard.authenticate(session)


class AclTopicPlugin(BaseTopicPlugin):
    """amqtt topic plugin: the Mosquitto ACL file, through a Guard.

    SUBSCRIBE is always granted, as Mosquitto does; each delivery is checked for ``read``.
    """

    @dataclass
    class Config:
        guard: str = ""  # key of a registered Guard

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.guard = _guard(self._get_config_option("guard", ""))

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if action == Action.SUBSCRIBE:
            return True
        if session is None or not topic:
            return False
        access = Access.WRITE if action == Action.PUBLISH else Access.READ
        allowed = self.guard.allows(session.username, session.client_id or "", topic, access)
        if not allowed and action == Action.PUBLISH:
            log.info("denied PUBLISH from %r (user %r) on %r", session.client_id, session.username, topic)
        return allowed
