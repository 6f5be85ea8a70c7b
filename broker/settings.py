"""Connection settings from one URL: ``mqtt://user:pass@host:port`` or ``mqtts://`` for TLS.

Query parameters tune the rest: ``?ca=/path/ca.pem`` (TLS trust anchor), ``insecure=1``
(skip certificate verification; for testing only), ``keepalive=S``, ``root=TOPIC_ROOT``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, quote, unquote, urlsplit

from dockercomp.broker.defaults import (
    BROKER_URL_ENV,
    DEFAULT_BROKER_URL,
    KEEPALIVE_SECONDS,
    MQTT_PORT,
    MQTTS_PORT,
    ROOT_TOPIC,
)
from dockercomp.broker.errors import SettingsError

_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = MQTT_PORT
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    insecure: bool = False
    keepalive: int = KEEPALIVE_SECONDS
    root: str = ROOT_TOPIC

    @classmethod
    def from_url(cls, url: str) -> "BrokerSettings":
        try:
            parts = urlsplit(url.strip())
            port_in_url = parts.port
        except ValueError as exc:
            raise SettingsError(f"broker URL {url!r} is malformed: {exc}") from None
        if parts.scheme not in _SCHEMES:
            raise SettingsError(
                f"broker URL {url!r} must start with mqtt:// or mqtts:// (e.g. {DEFAULT_BROKER_URL})"
            )
        if not parts.hostname:
            raise SettingsError(f"broker URL {url!r} names no host (e.g. {DEFAULT_BROKER_URL})")
        tls = _SCHEMES[parts.scheme]
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"ca", "insecure", "keepalive", "root"}
        if unknown:
            raise SettingsError(f"broker URL has unknown option(s) {', '.join(sorted(unknown))}; "
                                "known: ca, insecure, keepalive, root")
        try:
            keepalive = int(query.get("keepalive", KEEPALIVE_SECONDS))
        except ValueError:
            raise SettingsError("keepalive in the broker URL must be a whole number of seconds") from None
        if not 1 <= keepalive <= 65535:
            raise SettingsError("keepalive must be between 1 and 65535 seconds")
        return cls(
            host=parts.hostname,
            port=port_in_url or (MQTTS_PORT if tls else MQTT_PORT),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ca_file=query.get("ca"),
            insecure=query.get("insecure", "0").lower() in ("1", "true", "yes"),
            keepalive=keepalive,
            root=query.get("root", ROOT_TOPIC),
        )

    @classmethod
    def from_env(cls, default: str = DEFAULT_BROKER_URL) -> "BrokerSettings":
        return cls.from_url(os.environ.get(BROKER_URL_ENV) or default)

    def with_credentials(self, username: str | None, password: str | None) -> "BrokerSettings":
        return replace(self, username=username or self.username, password=password or self.password)

    def with_keepalive(self, keepalive: int) -> "BrokerSettings":
        return replace(self, keepalive=keepalive)

    @property
    def url(self) -> str:
        """The URL with the password masked: safe to print and log."""
        return self._url(mask=True)

    @property
    def full_url(self) -> str:
        """The URL including the password (to hand to a child process)."""
        return self._url(mask=False)

    def _url(self, mask: bool) -> str:
        auth = ""
        if self.username:
            secret = "***" if mask else quote(self.password or "", safe="")
            auth = quote(self.username, safe="") + (f":{secret}" if self.password else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = []
        if self.ca_file:
            query.append(f"ca={quote(self.ca_file)}")
        if self.insecure:
            query.append("insecure=1")
        if self.keepalive != KEEPALIVE_SECONDS:
            query.append(f"keepalive={self.keepalive}")
        if self.root != ROOT_TOPIC:
            query.append(f"root={quote(self.root, safe='')}")
        suffix = ("?" + "&".join(query)) if query else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{host}:{self.port}{suffix}"

    def __str__(self) -> str:
        return self.url
