"""The one table of exit codes every `dockercomp` command uses, and the one way errors reach it.

Scripts tell failures apart by these codes, whichever role raised them, so each code has
one meaning everywhere. An error a user can cause or fix carries ``exit_code`` (one of
:class:`Exit`), ``hint`` (what to do next; ``fix`` for the installer's) and optionally
``message`` (the text without the hint); :func:`exit_on_error` turns it into one readable
line plus its hint on stderr, or, for a command run with ``--json``, into one JSON object::

    {"error": {"code": 3, "kind": "UnknownJob", "message": "no job 'x'", "hint": "known jobs: ..."}}

Anything else is a bug and keeps its traceback. No third-party imports: every role, the
worker image's agent included, imports this module.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import IO, Any, NoReturn, TypeVar


class Exit(IntEnum):
    """Process exit codes of every dockercomp command; ``meaning`` is the one-line description."""

    meaning: str

    def __new__(cls, code: int, meaning: str) -> Exit:
        member = int.__new__(cls, code)
        member._value_ = code
        member.meaning = meaning
        return member

    OK = 0, "success"
    FAILED = 1, "failed for another reason (`dockercomp agent check`: the agent is unhealthy; Docker reads only 0/1)"
    USAGE = 2, "the command line, an option, an input file or the environment must change"
    NOT_FOUND = 3, "no such job, task, account, worker or coordinator database"
    STORE = 4, "the coordinator's database cannot be opened, read or written"
    BROKER = 5, "the MQTT broker is unreachable or did not reload its files"
    FILES = 6, "a configuration file (accounts, certificates) cannot be read or written"
    DOCKER = 7, "the Docker engine is missing, stopped, or refuses this user"
    IMAGE = 8, "the worker image is not here and could not be pulled, loaded or built"
    CONFLICT = 9, "a name is taken by something dockercomp does not own"
    HALTED = 10, "a rolling upgrade stopped at a worker that did not become healthy"
    REFUSED = 11, "the MQTT broker refuses this client for good (credentials, TLS): retrying cannot help"
    JOB_FAILED = 12, "`coordinator status JOB --watch`: the job finished with failed tasks"
    TAMPERED = 13, "a download does not match the kit's checksums (SHA256SUMS): refused"
    INTERRUPTED = 130, "stopped by Ctrl-C or a second signal (128 + SIGINT)"


@dataclass(frozen=True)
class Failure:
    """One failure as a user sees it: code, kind (the error's class), message, hint."""

    code: int
    kind: str
    message: str
    hint: str = ""

    def as_json(self) -> str:
        return json.dumps({"error": asdict(self)})

    def as_text(self) -> str:
        return f"error: {self.message}" + (f"\nhint: {self.hint}" if self.hint else "")


# user:password@ in a URL; masked in every message, whatever raised it.
_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*):[^@\s]+@", re.IGNORECASE)


def mask(text: str) -> str:
    """``text`` with every URL's password replaced by ``***``: no secret is ever printed."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def failure_of(exc: BaseException) -> Failure | None:
    """The failure ``exc`` stands for, or None when it is a bug (no ``exit_code``)."""
    if isinstance(exc, KeyboardInterrupt):
        return Failure(Exit.INTERRUPTED, "Interrupted", "interrupted", "")
    code = getattr(exc, "exit_code", None)
    if not isinstance(code, int) or isinstance(code, bool) or code == 0:
        return None
    message = getattr(exc, "message", None)
    if not isinstance(message, str) or not message:
        # click.ClickException keeps its text in format_message(); others in str().
        formatter = getattr(exc, "format_message", None)
        message = formatter() if callable(formatter) else str(exc) or type(exc).__name__
    hint = getattr(exc, "hint", None) or getattr(exc, "fix", None) or ""
    return Failure(int(code), type(exc).__name__, mask(message), mask(str(hint)))


def fail(failure: Failure, *, as_json: bool = False, stream: IO[str] | None = None) -> NoReturn:
    """Writes ``failure`` to stderr (one JSON object with ``as_json``) and exits with its code."""
    out = stream or sys.stderr
    out.write((failure.as_json() if as_json else failure.as_text()) + "\n")
    out.flush()
    raise SystemExit(failure.code)


@contextmanager
def exit_on_error(as_json: bool = False,
                  translate: Callable[[BaseException], BaseException | None] | None = None) -> Iterator[None]:
    """Turns a user-facing error raised inside into :func:`fail`; bugs keep their traceback.

    ``translate`` lets a role turn a foreign exception (Docker's SDK, the embedded broker's)
    into one of its own errors first; it returns None for those it does not know.
    """
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:
        translated = translate(exc) if translate is not None else None
        failure = failure_of(translated or exc)
        if failure is None:
            raise
        fail(failure, as_json=as_json)


F = TypeVar("F", bound=Callable[..., Any])


def handled(func: F | None = None, *,
            translate: Callable[[BaseException], BaseException | None] | None = None) -> Any:
    """Decorator form of :func:`exit_on_error` for a command; its ``as_json`` argument (the
    ``--json`` flag, when the command has one) picks the format."""

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with exit_on_error(bool(kwargs.get("as_json")), translate):
                return command(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate
