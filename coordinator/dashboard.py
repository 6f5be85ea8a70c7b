"""`dockercomp coordinator dashboard`: one static page for observers, live from the broker.

This server only hands out files: the page (``coordinator/web/``) and a ``config.json`` naming
the broker's WebSockets URL and topic root. The browser then talks MQTT over WebSockets to
the broker itself, so no status passes through this process, nothing is stored, and the
broker's ACL decides what each observer sees (an observer account reads the status topics and
nothing else). The MQTT client library is vendored (``web/vendor/``, pinned, with its licence
and checksum): the page needs no internet and asks no other host for anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any
from urllib.parse import urlsplit

from dockercomp.broker.defaults import ROOT_TOPIC
from dockercomp.broker.topics import InvalidName, Topics
from dockercomp.coordinator import defaults
from dockercomp.coordinator.errors import CoordinatorError, SettingsError
from dockercomp.exits import Exit

log = logging.getLogger(__name__)

# URL path -> (file under web/, content type). Nothing else is served: no directory listing,
# no path from the request ever touches the file system.
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/vendor/mqtt.min.js": ("vendor/mqtt.min.js", "text/javascript; charset=utf-8"),
    "/vendor/mqtt.LICENSE.md": ("vendor/mqtt.LICENSE.md", "text/plain; charset=utf-8"),
    "/vendor/README.md": ("vendor/README.md", "text/plain; charset=utf-8"),
}
# The browser may load scripts, styles and data only from here, and open WebSockets to a broker:
# a second guard (after the page's own code) that it asks no other host for anything.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class DashboardError(CoordinatorError):
    """The dashboard cannot start: its files are missing or damaged."""

    hint = "reinstall dockercomp (pip install --force-reinstall 'dockercomp[coordinator]')"


class DashboardAddressError(CoordinatorError):
    """The dashboard cannot listen on the address asked for."""

    exit_code = Exit.USAGE
    hint = "pick another --port (0 picks a free one) or --host"


@dataclass(frozen=True)
class DashboardSettings:
    host: str = defaults.DASHBOARD_HOST
    port: int = defaults.DASHBOARD_PORT
    ws_url: str | None = None  # None: wss://<the page's host>:DASHBOARD_WS_PORT/mqtt, decided by the browser
    root: str = ROOT_TOPIC

    def __post_init__(self) -> None:
        if self.ws_url is not None:
            parts = urlsplit(self.ws_url)
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                raise SettingsError(f"--ws-url must be ws://HOST:PORT/PATH or wss://HOST:PORT/PATH, got {self.ws_url!r}")
            if parts.username or parts.password:
                # The page is public to whoever reaches it: a password in its config is a leak.
                raise SettingsError("--ws-url must not carry a user name or password: the page asks the observer")
        try:
            Topics(self.root)
        except InvalidName as exc:
            raise SettingsError(str(exc)) from exc

    def page_config(self) -> dict[str, Any]:
        return {"ws_url": self.ws_url, "root": self.root, "default_ws_port": defaults.DASHBOARD_WS_PORT}


def load_assets(web: Traversable | None = None) -> dict[str, bytes]:
    """Every file the page needs (from ``web``, by default the installed package's), read once;
    DashboardError if one is missing or the vendored library does not match its recorded
    checksum (a damaged or tampered install)."""
    web = web if web is not None else resources.files("dockercomp.coordinator") / "web"
    files: dict[str, bytes] = {}
    try:
        for name, _ in ASSETS.values():
            files[name] = (web / name).read_bytes()
        sums = (web / "vendor" / "SHA256SUMS").read_text()
    except OSError as exc:
        raise DashboardError(f"the dashboard's files are missing from this install: {exc}") from exc
    for line in sums.splitlines():
        digest, _, name = line.partition("  ")
        path = f"vendor/{name.strip()}"
        if path not in files or hashlib.sha256(files[path]).hexdigest() != digest.strip():
            raise DashboardError(f"{path} does not match its sha256 in vendor/SHA256SUMS")
    return files


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        path = urlsplit(self.path).path
        if path == "/config.json":
            self._send(HTTPStatus.OK, json.dumps(self.server.settings.page_config()).encode(),
                       "application/json")
        elif path in ASSETS:
            name, content_type = ASSETS[path]
            self._send(HTTPStatus.OK, self.server.files[name], content_type)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        # One line per request is noise on a terminal showing the URL; -v shows them.
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a browser keeping a connection open must not hold up the exit

    def __init__(self, settings: DashboardSettings, files: dict[str, bytes]) -> None:
        self.settings = settings
        self.files = files
        try:
            super().__init__((settings.host, settings.port), _Handler)
        except OSError as exc:
            raise DashboardAddressError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc


class Dashboard:
    """The page's web server. ``start()`` serves in a thread (tests, the demo);
    ``serve_forever()`` in the calling one (the CLI)."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings
        self._server = _Server(settings, load_assets())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        shown = host if isinstance(host, str) and host not in ("0.0.0.0", "") else "127.0.0.1"
        return f"http://{shown}:{port}/"

    def start(self) -> Dashboard:
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
