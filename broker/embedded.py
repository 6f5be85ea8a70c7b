"""An amqtt broker running inside this Python process, for laptops, demos and tests.

Production uses Mosquitto (see mosquitto.conf); this exists so `dockercomp broker serve` and the test
suite need nothing but pip. It speaks MQTT 3.1.1 only and is ~4x slower than Mosquitto.

amqtt 0.12 quirks, found in its source; [seen] = reproduced here with paho clients:

- [seen] Nothing survives a restart: `Broker.start()` and `Broker.shutdown()` both clear the
  retained messages, and there is no persistence. A "restart" is an empty broker.
- Messages are not queued for a disconnected *anonymous* client, even with
  clean_session=False and QoS 1 (`Broker._run_broadcast` skips `is_anonymous` sessions).
  Anonymous is all we allow today, so offline clients simply miss messages.
- [seen] On every CONNECT, the new client is sent the retained messages matching *every* topic
  filter any client is subscribed to (`_handle_client_session` loops over all of
  `self._subscriptions`), at QoS 0, before it subscribes to anything. A client must
  therefore ignore messages on topics it did not ask for.
- [seen] Delivery QoS is the subscription's QoS, not min(publish QoS, subscription QoS): a QoS 0
  publish reaches a QoS 1 subscriber as QoS 1. A will is delivered at the will's QoS.
- Publishing to a topic starting with "$" makes the broker close the connection.
- The default listener binds 0.0.0.0:1883 and the default plugins include a packet
  logger and a $SYS publisher; we always pass an explicit host and a minimal plugin set.
- Port 0 binds, but the real port is only reachable through private attributes, and a
  hostname such as "localhost" would bind port 0 separately on ::1 and 127.0.0.1 (two
  different ports). So for port=0 we pick a free port ourselves and retry on EADDRINUSE.
- A failed start logs "Broker startup failed" with a full traceback (ERROR) before it
  raises; we filter that record and raise our own error instead.
- `Broker.__init__` needs a running event loop, so the broker is built inside its loop.
- [seen] A TCP connection closed before CONNECT (a port probe) is never closed on the broker
  side: amqtt leaks that socket until garbage collection (ResourceWarning). Probe with a
  real MQTT client, not a bare connect.
- [seen] On shutdown the wills of still-connected clients are queued, then discarded with a
  warning "N messages not broadcasted": subscribers never see them.

Mended by ``KeptAliveBroker`` below (always used):

- [seen] amqtt never enforces keepalive: its read timeout handler does nothing, so a frozen
  client (SIGSTOP, a suspended laptop, a dead NAT path) stays connected forever and its will
  never fires. We close a connection that sent nothing for 1.5x its keepalive (rounded up to
  a whole second), the MQTT 3.1.1 rule Mosquitto follows; its will then fires.
- [seen] amqtt awaits inside loops over its subscription table (sending retained messages to
  a new client, broadcasting), so a client subscribing meanwhile raised "dictionary changed
  size during iteration" and killed that connection without its will (63 of 303 simultaneous
  connects). Every loop over that table now walks a copy.

Retained messages are NOT persisted (a restart forgets them all, see the first quirk), and
dockercomp does not need them to be: whenever the coordinator (re)connects it asks every worker
to announce itself again (a rebirth request, docs/protocol.md), so the presence a restarted
embedded broker forgot is announced again, and a worker that does not answer is marked lost.

Access control: with a ``Guard`` (``dockercomp broker serve --password-file F --acl-file F``) the broker
checks the same Mosquitto password and ACL files as production, through the plugins in
broker/amqtt_security.py, and ``SecureBroker`` closes three amqtt gaps (retained messages
sent without an ACL check, a session deleted before its replacement authenticates, client-id
takeover across accounts); that module lists what still differs from Mosquitto.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.logging_amqtt import PacketLoggerPlugin
from amqtt.session import Session

from dockercomp.broker.amqtt_security import AclTopicPlugin, Guard, PasswordAuthPlugin
from dockercomp.broker.errors import SettingsError

log = logging.getLogger(__name__)

# Seconds to wait for the listener to come up before giving up.
START_TIMEOUT = 10.0
# Seconds to wait for amqtt's shutdown (it waits up to 5 s for its broadcast loop).
STOP_TIMEOUT = 10.0
# Attempts at a free port when port=0 (another process may grab the one we picked).
PORT_ATTEMPTS = 20
# How often serve_forever checks whether a stop was requested, in seconds.
_POLL_INTERVAL = 0.2
# A client silent for this many times its keepalive is dropped (MQTT 3.1.1 section 3.1.2.10,
# what Mosquitto does), so its will fires.
KEEPALIVE_FACTOR = 1.5
# Shown in packet logs in place of a CONNECT's password.
MASK = "***"


class EmbeddedBrokerError(Exception):
    """The embedded broker could not start or stop; carries the address it was bound to."""

    def __init__(self, message: str, *, host: str, port: int) -> None:
        super().__init__(message)
        self.host = host
        self.port = port


class BindError(EmbeddedBrokerError):
    """host:port cannot be listened on; a different address or port is needed."""


class AddressInUseError(BindError):
    """Another process (often another broker) already listens on host:port."""


class _DropStartupTraceback(logging.Filter):
    """Drops amqtt's own "Broker startup failed" traceback: we raise a readable error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Broker startup failed"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Racy by nature: callers must retry on EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _plugin_path(plugin: type) -> str:
    return f"{plugin.__module__}.{plugin.__qualname__}"


def broker_config(host: str, port: int, *, ws_port: int | None = None, verbosity: int = 0,
                  guard_key: str | None = None) -> dict[str, Any]:
    """amqtt configuration: one TCP listener on host:port (and MQTT over WebSockets on
    host:ws_port if given); anonymous clients allowed, unless ``guard_key`` names a registered
    Guard (password file + ACL), which then applies to both listeners."""
    plugins: dict[str, Any]
    if guard_key is None:
        # Without an auth plugin that answers True, amqtt refuses every client.
        plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    else:
        plugins = {
            _plugin_path(PasswordAuthPlugin): {"guard": guard_key},
            _plugin_path(AclTopicPlugin): {"guard": guard_key},
        }
    if verbosity >= 1:
        plugins["amqtt.plugins.logging_amqtt.EventLoggerPlugin"] = {}
    if verbosity >= 2:
        # Not amqtt's own PacketLoggerPlugin: it logs each CONNECT with its clear-text password.
        plugins[_plugin_path(MaskedPacketLogger)] = {}
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
    if ws_port is not None:
        # For browsers (the dashboard): the same plugins, so the same accounts and ACL.
        listeners["ws"] = {"type": "ws", "bind": f"{host}:{ws_port}"}
    return {"listeners": listeners, "plugins": plugins}


def configure_logging(verbosity: int) -> None:
    """amqtt logs every connection at INFO; keep it at WARNING unless asked (-v, -vv)."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.getLogger("amqtt").setLevel(level)
    # transitions (amqtt's state machines) logs every state change at INFO.
    logging.getLogger("transitions").setLevel(max(level, logging.WARNING))


def _bind_error(exc: BaseException, host: str, port: int, ws_port: int | None = None) -> EmbeddedBrokerError:
    """Turns amqtt's BrokerError (wrapping an OSError) into one of ours."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if ws_port is not None and f", {ws_port})" in str(cause):  # the OSError names the address it failed on
        port = ws_port
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        return AddressInUseError(f"{host}:{port} is already in use", host=host, port=port)
    if isinstance(cause, OSError) and cause.errno == errno.EACCES:
        return BindError(
            f"not allowed to listen on {host}:{port} (ports below 1024 need root)",
            host=host,
            port=port,
        )
    if isinstance(cause, OSError) and cause.errno == errno.EADDRNOTAVAIL:
        return BindError(f"{host} is not an address of this machine", host=host, port=port)
    return EmbeddedBrokerError(f"cannot start on {host}:{port}: {cause}", host=host, port=port)


class MaskedPacketLogger(PacketLoggerPlugin):
    """amqtt's packet logger (-vv) with the password of every CONNECT masked."""

    async def on_mqtt_packet_received(self, *, packet: Any, session: Session | None = None) -> None:
        if self.context.logger.isEnabledFor(logging.DEBUG):
            who = f"{session.client_id} " if session is not None else ""
            self.context.logger.debug("%s<-in-- %s", who, masked_packet(packet))


def masked_packet(packet: Any) -> str:
    """repr(packet), with a CONNECT's password replaced by MASK."""
    text = repr(packet)
    password = packet.password if isinstance(packet, ConnectPacket) else None
    if password:
        text = text.replace(f"password={password})", f"password={MASK})").replace(password, MASK)
    return text


class _Snapshots(dict[str, Any]):
    """amqtt's subscription table; every loop over it walks a copy, because amqtt awaits inside
    those loops and a client subscribing meanwhile made them raise "dictionary changed size
    during iteration" (the connection then died without its will)."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().__iter__()))

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(super().keys())

    def values(self) -> list[Any]:  # type: ignore[override]
        return list(super().values())

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return list(super().items())


class KeptAliveBroker(Broker):
    """amqtt's Broker with keepalive enforced and its subscription loops made safe against
    concurrent subscribes (private methods overridden: amqtt is pinned below 0.13 in
    setup.cfg for this reason too). See this module's docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _Snapshots()

    async def _handle_client_session(self, reader: Any, writer: Any, client_session: Session,
                                     handler: Any, server: Any, listener_name: str) -> None:
        enforce_keepalive(handler, client_session)
        await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        # amqtt loops over the live retained table while it creates tasks; ask the topic
        # plugins too (SecureBroker's ACL: amqtt sends retained messages unchecked).
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter) and await self._topic_filtering(session, topic, Action.RECEIVE):
                sends.append(asyncio.ensure_future(
                    handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)))
        if sends:
            await asyncio.wait(sends)


def enforce_keepalive(handler: BrokerProtocolHandler, session: Session) -> None:
    """Makes the handler drop a client silent for KEEPALIVE_FACTOR x its keepalive.

    amqtt's reader already waits at most ``session.keep_alive`` seconds for each packet and
    then calls ``handle_read_timeout``, which does nothing; widening the wait to 1.5x and
    aborting the connection there makes the broker publish the will as for any lost client.
    """
    if session.keep_alive <= 0:  # keepalive 0: the client asked never to be timed out
        return
    keepalive = session.keep_alive
    session.keep_alive = math.ceil(keepalive * KEEPALIVE_FACTOR)

    def timed_out() -> None:
        log.info("client %r sent nothing for %d s (keepalive %d s): closing its connection",
                 session.client_id, session.keep_alive, keepalive)
        # Abort, not close: a frozen client reads nothing, so a close would first wait forever
        # for the messages queued to it to drain. The reader then sees the connection gone, as
        # for a killed client, and the broker publishes the will.
        transport = getattr(getattr(handler.writer, "_writer", None), "transport", None)
        if isinstance(transport, asyncio.BaseTransport):
            transport.abort()
        else:  # not a TCP stream (amqtt's websocket adapter): end the session directly
            asyncio.ensure_future(handler.handle_connection_closed())

    # On the instance: amqtt builds its handler itself, so a subclass would not be used.
    setattr(handler, "handle_read_timeout", timed_out)


class SecureBroker(KeptAliveBroker):
    """KeptAliveBroker with the access-control gaps of amqtt 0.12 closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_deletes: set[str] = set()

    async def _delete_session(self, client_id: str) -> None:
        # Called for a clean-session CONNECT before it is authenticated: postpone until it is.
        self._pending_deletes.add(client_id)

    async def _handle_client_session(self, reader: Any, writer: Any, client_session: Session,
                                     handler: Any, server: Any, listener_name: str) -> None:
        client_id = client_session.client_id or ""
        pending = client_id in self._pending_deletes
        self._pending_deletes.discard(client_id)
        refuse = not await self._authenticate(client_session, self.listeners_config[listener_name])
        current = self._sessions.get(client_id, (None, None))[0]
        if not refuse and current is not None and current.transitions.is_connected() \
                and current.username != client_session.username:
            log.warning("refused client %r (user %r): that client id is connected as user %r",
                        client_id, client_session.username, current.username)
            refuse = True
        if refuse:
            # Answer and close without touching the session table: the connected client with
            # that id keeps its session and subscriptions.
            handler.attach(client_session, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            return
        if pending:
            await Broker._delete_session(self, client_id)
        await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)

    async def disconnect_revoked(self, guard: Guard) -> int:
        """Closes the connection of every client the guard no longer lets in; returns how many.
        Their wills fire, as for any lost connection."""
        closed = 0
        for client_id, (session, handler) in list(self._sessions.items()):
            if not session.transitions.is_connected() or handler is None or handler.writer is None:
                continue
            if session.username is None and guard.allow_anonymous:
                continue
            if not guard.check_password(session.username, _password(session)):
                log.warning("disconnecting client %r: account %r was removed or its password changed",
                            client_id, session.username)
                await handler.writer.close()
                closed += 1
        return closed


def _password(session: Session) -> str | None:
    value = session.password
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else None


class EmbeddedBroker:
    """amqtt in a background thread with its own event loop.

    >>> with EmbeddedBroker() as b:   # port=0: a free port is picked
    ...     connect_to(b.url)         # "mqtt://127.0.0.1:PORT"

    With ``guard`` (broker.amqtt_security.Guard) it enforces a Mosquitto password file and
    ACL; ``reload()`` rereads them and disconnects revoked accounts.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, verbosity: int = 0,
                 guard: Guard | None = None, ws_port: int | None = None) -> None:
        self.host = host
        self._requested_port = port
        self._requested_ws_port = ws_port  # None: no WebSockets listener; 0: a free port
        self._ws_port: int | None = None
        self.verbosity = verbosity
        self.guard = guard
        self._broker: Broker | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def port(self) -> int:
        """The port actually listened on (differs from the requested one when that was 0)."""
        if self._port is None:
            raise RuntimeError("the embedded broker is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str | None:
        """MQTT over WebSockets for browsers, when started with a ws_port."""
        return None if self._ws_port is None else f"ws://{self.host}:{self._ws_port}/mqtt"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._port is not None

    def start(self) -> EmbeddedBroker:
        """Starts listening; returns once connections are accepted. Raises EmbeddedBrokerError."""
        if self._thread is not None:
            raise RuntimeError("the embedded broker is already started")
        configure_logging(self.verbosity)
        self._started.clear()
        self._start_error = None
        self._thread = threading.Thread(
            target=self._run_loop, name=f"amqtt-{self.host}:{self._requested_port}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(START_TIMEOUT):
            raise EmbeddedBrokerError(
                f"amqtt did not start within {START_TIMEOUT:.0f} s",
                host=self.host,
                port=self._requested_port,
            )
        if self._start_error is not None:
            self._thread.join(STOP_TIMEOUT)
            self._thread = None
            raise self._start_error
        return self

    def stop(self) -> None:
        """Disconnects every client and closes the listener. Safe to call twice."""
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None:
            return
        if loop is not None and stop_requested is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_requested.set)
            except RuntimeError:  # the loop closed between the check and the call
                pass
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            # A daemon thread: it dies with the process. Say so rather than hang the caller.
            log.warning("amqtt did not stop within %.0f s; abandoning its thread", STOP_TIMEOUT)
        self._thread = None
        self._port = self._ws_port = None
        if self.guard is not None:
            self.guard.unregister()

    def reload(self, timeout: float = STOP_TIMEOUT) -> int:
        """Rereads the password and ACL files, then disconnects clients whose account is gone
        or whose password changed; returns how many. SettingsError if a file is unreadable
        (the previous policy stays in force)."""
        if self.guard is None:
            raise SettingsError("this broker runs without a password file: nothing to reload")
        self.guard.reload()
        loop, broker = self._loop, self._broker
        if loop is None or not isinstance(broker, SecureBroker) or loop.is_closed():
            return 0
        future = asyncio.run_coroutine_threadsafe(broker.disconnect_revoked(self.guard), loop)
        return future.result(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            if self._started.is_set():  # start() has returned: nobody else will see it
                log.error("amqtt stopped with an error: %s", exc)
            else:  # re-raised by start()
                self._start_error = exc
        finally:
            self._started.set()  # unblock start() whatever happened
            _cancel_leftovers(loop)
            loop.close()

    async def _serve(self) -> None:
        self._stop_requested = asyncio.Event()
        broker = await self._start_broker()
        self._broker = broker
        self._started.set()
        try:
            await self._stop_requested.wait()
        finally:
            self._broker = None
            await broker.shutdown()

    async def _start_broker(self) -> Broker:
        """Binds the requested port, or for port 0 a free one, retrying if it gets taken."""
        attempts = PORT_ATTEMPTS if 0 in (self._requested_port, self._requested_ws_port) else 1
        amqtt_log = logging.getLogger("amqtt.broker")
        quiet = _DropStartupTraceback()
        amqtt_log.addFilter(quiet)
        guard_key = self.guard.register() if self.guard is not None else None
        try:
            for attempt in range(attempts):
                port = self._requested_port or free_port(self.host)
                ws_port = self._requested_ws_port
                if ws_port == 0:
                    ws_port = free_port(self.host)
                broker_class = SecureBroker if guard_key is not None else KeptAliveBroker
                broker = broker_class(broker_config(self.host, port, ws_port=ws_port, verbosity=self.verbosity,
                                                    guard_key=guard_key))
                try:
                    await broker.start()
                except Exception as exc:
                    await broker.plugins_manager.close()
                    error = _bind_error(exc, self.host, port, ws_port)
                    if isinstance(error, AddressInUseError) and attempt + 1 < attempts:
                        continue
                    raise error from exc
                self._port, self._ws_port = port, ws_port
                return broker
        finally:
            amqtt_log.removeFilter(quiet)
        raise AssertionError("unreachable: the last attempt raises")


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancels tasks amqtt left behind, so closing the loop prints no 'Task was destroyed'."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


def serve_forever(
    host: str,
    port: int,
    *,
    verbosity: int = 0,
    guard: Guard | None = None,
    on_ready: Callable[[EmbeddedBroker], None] | None = None,
    ws_port: int | None = None,
) -> None:
    """Runs the broker until SIGINT/SIGTERM. Must run in the main thread (signal handlers).

    The first signal stops cleanly (clients disconnected, listener closed); a second one
    while stopping exits at once. With a ``guard``, SIGHUP rereads the password and ACL files
    and disconnects removed accounts, as Mosquitto does. Raises EmbeddedBrokerError if it
    cannot start.
    """
    stop_requested = threading.Event()
    reload_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # Handlers only set a flag; the loop below does the work.
        if stop_requested.is_set():
            raise SystemExit(128 + signum)
        stop_requested.set()

    def request_reload(signum: int, frame: FrameType | None) -> None:
        reload_requested.set()

    handlers = {signal.SIGINT: request_stop, signal.SIGTERM: request_stop, signal.SIGHUP: request_reload}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        with EmbeddedBroker(host, port, verbosity=verbosity, guard=guard, ws_port=ws_port) as embedded:
            if on_ready is not None:
                on_ready(embedded)
            while not stop_requested.is_set() and embedded.running:
                # A timeout, not a bare wait(): the signal handler must get a chance to run.
                stop_requested.wait(_POLL_INTERVAL)
                if reload_requested.is_set():
                    reload_requested.clear()
                    _reload(embedded)
            if not embedded.running and not stop_requested.is_set():
                raise EmbeddedBrokerError("amqtt stopped unexpectedly", host=host, port=port)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reload(embedded: EmbeddedBroker) -> None:
    """SIGHUP: a bad file must not stop a running broker, so errors are logged, not raised."""
    if embedded.guard is None:
        log.warning("SIGHUP ignored: this broker runs without --password-file")
        return
    try:
        closed = embedded.reload()
    except SettingsError as exc:
        log.error("reload failed, keeping the previous accounts and ACL: %s", exc)
        return
    log.warning("reloaded %s and %s; disconnected %d client(s) of removed accounts",
                embedded.guard.password_file, embedded.guard.acl_file or "(no ACL file)", closed)
