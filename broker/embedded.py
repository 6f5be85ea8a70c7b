"""An amqtt broker running inside this Python process, for laptops, demos and tests.

Production uses Mosquitto (see mosquitto.conf); this exists so `broker serve` and the test
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
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from amqtt.broker import Broker

log = logging.getLogger(__name__)

# Seconds to wait for the listener to come up before giving up.
START_TIMEOUT = 10.0
# Seconds to wait for amqtt's shutdown (it waits up to 5 s for its broadcast loop).
STOP_TIMEOUT = 10.0
# Attempts at a free port when port=0 (another process may grab the one we picked).
PORT_ATTEMPTS = 20
# How often serve_forever checks whether a stop was requested, in seconds.
_POLL_INTERVAL = 0.2


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


def broker_config(host: str, port: int, *, verbosity: int = 0) -> dict[str, Any]:
    """amqtt configuration: one TCP listener on host:port, anonymous clients allowed."""
    plugins: dict[str, Any] = {
        # Without an auth plugin that answers True, amqtt refuses every client.
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
    }
    if verbosity >= 1:
        plugins["amqtt.plugins.logging_amqtt.EventLoggerPlugin"] = {}
    if verbosity >= 2:
        plugins["amqtt.plugins.logging_amqtt.PacketLoggerPlugin"] = {}
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": plugins,
    }


def configure_logging(verbosity: int) -> None:
    """amqtt logs every connection at INFO; keep it at WARNING unless asked (-v, -vv)."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.getLogger("amqtt").setLevel(level)
    # transitions (amqtt's state machines) logs every state change at INFO.
    logging.getLogger("transitions").setLevel(max(level, logging.WARNING))


def _bind_error(exc: BaseException, host: str, port: int) -> EmbeddedBrokerError:
    """Turns amqtt's BrokerError (wrapping an OSError) into one of ours."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
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


class EmbeddedBroker:
    """amqtt in a background thread with its own event loop.

    >>> with EmbeddedBroker() as b:   # port=0: a free port is picked
    ...     connect_to(b.url)         # "mqtt://127.0.0.1:PORT"
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, verbosity: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self.verbosity = verbosity
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
        self._port = None

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
        self._started.set()
        try:
            await self._stop_requested.wait()
        finally:
            await broker.shutdown()

    async def _start_broker(self) -> Broker:
        """Binds the requested port, or for port 0 a free one, retrying if it gets taken."""
        attempts = PORT_ATTEMPTS if self._requested_port == 0 else 1
        amqtt_log = logging.getLogger("amqtt.broker")
        quiet = _DropStartupTraceback()
        amqtt_log.addFilter(quiet)
        try:
            for attempt in range(attempts):
                port = self._requested_port or free_port(self.host)
                broker = Broker(broker_config(self.host, port, verbosity=self.verbosity))
                try:
                    await broker.start()
                except Exception as exc:
                    await broker.plugins_manager.close()
                    error = _bind_error(exc, self.host, port)
                    if isinstance(error, AddressInUseError) and attempt + 1 < attempts:
                        continue
                    raise error from exc
                self._port = port
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
    on_ready: Callable[[EmbeddedBroker], None] | None = None,
) -> None:
    """Runs the broker until SIGINT/SIGTERM. Must run in the main thread (signal handlers).

    The first signal stops cleanly (clients disconnected, listener closed); a second one
    while stopping exits at once. Raises EmbeddedBrokerError if it cannot start.
    """
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # Handlers only set a flag; the loop below does the work.
        if stop_requested.is_set():
            raise SystemExit(128 + signum)
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(host, port, verbosity=verbosity) as embedded:
            if on_ready is not None:
                on_ready(embedded)
            while not stop_requested.is_set() and embedded.running:
                # A timeout, not a bare wait(): the signal handler must get a chance to run.
                stop_requested.wait(_POLL_INTERVAL)
            if not embedded.running and not stop_requested.is_set():
                raise EmbeddedBrokerError("amqtt stopped unexpectedly", host=host, port=port)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
