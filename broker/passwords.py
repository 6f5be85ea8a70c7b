"""Mosquitto-compatible password files (``mosquitto_passwd`` format, PBKDF2-SHA512).

A line is ``user:$7$ITERATIONS$SALT_B64$HASH_B64``; Mosquitto 2.0 checks it natively, so the
coordinator can add and revoke volunteers without shelling out to ``mosquitto_passwd``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from dockercomp.broker.errors import SettingsError
from dockercomp.broker.topics import validate_name

# Mosquitto's own default for new hashes; raising it costs every connection at the broker.
PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12
_HASH_BYTES = 64


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        _, kind, iterations, salt_b64, hash_b64 = encoded.split("$")
        if kind != "7":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(hash_b64)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(iterations), len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


def new_password() -> str:
    """A random password that survives a URL and a shell unquoted."""
    return secrets.token_urlsafe(18)


class PasswordFile:
    """Read, change and atomically rewrite a Mosquitto password file."""

    def __init__(self, path: str | Path, *, mode: int = 0o640) -> None:
        self.path = Path(path)
        self.mode = mode  # permissions of the rewritten file

    def read(self) -> dict[str, str]:
        entries: dict[str, str] = {}
        if not self.path.exists():
            return entries
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, encoded = line.partition(":")
            if not sep:
                raise SettingsError(f"{self.path}:{number}: expected 'user:hash'")
            entries[user] = encoded
        return entries

    def write(self, entries: dict[str, str]) -> None:
        text = "".join(f"{user}:{encoded}\n" for user, encoded in sorted(entries.items()))
        atomic_write(self.path, text, mode=self.mode)

    def set(self, user: str, password: str) -> None:
        validate_name(user, "user name")
        entries = self.read()
        entries[user] = hash_password(password)
        self.write(entries)

    def remove(self, user: str) -> bool:
        entries = self.read()
        if entries.pop(user, None) is None:
            return False
        self.write(entries)
        return True

    def check(self, user: str, password: str) -> bool:
        encoded = self.read().get(user)
        return encoded is not None and verify_password(password, encoded)


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write via a temporary file and rename, so a reader (the broker reloading) never sees
    half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
