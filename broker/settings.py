"""Connection settings from one URL: ``mqtt://user:pass@host:port`` or ``mqtts://`` for TLS.

Query parameters tune the rest: ``?ca=/path/ca.pem`` (TLS trust anchor), ``insecure=1``
(skip certificate verification; for testing only), ``keepalive=S``, ``root=TOPIC_ROOT``.

Several nodes of one broker cluster: a comma-separated list, ``mqtt://u:p@node1:1883,node2:1883``
or ``URL1,URL2`` with full URLs. The connection tries them in turn (broker/connection.py: the
next one when a node fails). They are one broker to us: the same scheme, CA, keepalive and
root; the credentials of the first serve all (a later URL may repeat them, not change them).
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
    # (host, port) of the further nodes of a URL list, tried after (host, port).
    others: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_url(cls, url: str) -> "BrokerSettings":
        """One URL, or a comma-separated list of one broker's nodes (see the module)."""
        pieces = [piece.strip() for piece in url.split(",")]
        if len(pieces) == 1:
            return cls._one(url)
        if not all(pieces):
            raise SettingsError(f"broker URL list {_masked(url)!r} has an empty entry; separate URLs by single commas")
        first = cls._one(pieces[0])
        scheme = pieces[0].strip().split("://", 1)[0]
        others = []
        for piece in pieces[1:]:
            node = cls._one(piece if "://" in piece else f"{scheme}://{piece}")
            mismatch = [name for name in ("tls", "ca_file", "insecure", "keepalive", "root")
                        if getattr(node, name) != getattr(first, name) and ("://" in piece or name == "tls")]
            if node.username is not None and (node.username, node.password) != (first.username, first.password):
                mismatch.append("credentials")
            if mismatch:
                raise SettingsError(f"broker URL {node.url} differs from the first of the list in {', '.join(mismatch)}: "
                                    "the URLs of a list are nodes of one broker (only host and port may differ)")
            others.append((node.host, node.port))
        if len(set([(first.host, first.port), *others])) != len(pieces):
            raise SettingsError(f"broker URL list {_masked(url)!r} names a node twice")
        return replace(first, others=tuple(others))

    @classmethod
    def _one(cls, url: str) -> "BrokerSettings":
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
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """Every node's (host, port), the first URL's first: the order connections try them."""
        return ((self.host, self.port), *self.others)

    def address_url(self, index: int) -> str:
        """``scheme://host:port`` of one node, without credentials or options (for logs)."""
        host, port = self.addresses[index % len(self.addresses)]
        return f"{'mqtts' if self.tls else 'mqtt'}://{_bracketed(host)}:{port}"

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
        host = _bracketed(self.host)
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
        # The further nodes as host:port: they share everything else with the first URL.
        nodes = "".join(f",{_bracketed(other)}:{port}" for other, port in self.others)
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{host}:{self.port}{suffix}{nodes}"

    def __str__(self) -> str:
        return self.url


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _masked(url: str) -> str:
    """A URL list as given, with every password replaced: for error messages."""
    masked = []
    for piece in url.split(","):
        try:
            parts = urlsplit(piece.strip())
            secret = parts.password
        except ValueError:
            secret = None
        masked.append(piece.replace(f":{secret}@", ":***@") if secret else piece)
    return ",".join(masked)
