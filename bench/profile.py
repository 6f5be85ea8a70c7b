"""Where the coordinator spends its time: a summary of py-spy's collapsed stacks.

py-spy (``record --format raw --threads``) writes one line per distinct stack:
``thread (tid): name;frame;frame;... count``, each frame ``function (file:line)``. We
report, over all samples of all threads, the share of samples in which a function is on
the stack (inclusive) and at the top (self), and the share per thread.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Frames every stack shares (thread start-up, the CLI): on the stack 100 % of the time, saying nothing.
_PLUMBING = ("(threading.py)", "(<frozen runpy>)", "(click/", "(coordinator/cli.py)",
             "(agent/cli.py)", "(multiprocessing/spawn.py)", "(multiprocessing/process.py)")
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_LOCATION = re.compile(r" \((?P<file>[^():]+)(?::\d+)?\)$")


@dataclass(frozen=True)
class Share:
    name: str
    percent: float


@dataclass(frozen=True)
class ProfileSummary:
    samples: int
    threads: list[Share]
    self_time: list[Share]
    inclusive: list[Share]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _function(frame: str) -> str:
    """``Dispatcher._open (coordinator/dispatch.py:335)`` -> ``Dispatcher._open (coordinator/dispatch.py)``:
    lines differ inside one function; the function is what a reader acts on."""
    match = _LOCATION.search(frame)
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            path = path.split("/", 1)[1] if marker.startswith("lib/") and "/" in path else path
    return f"{frame[:match.start()].strip()} ({path})"


def summarize(path: Path, top: int = 15) -> ProfileSummary:
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line.strip())
        if not match:
            continue
        count = int(match.group("count"))
        frames = match.group("stack").split(";")
        thread = re.sub(r"^thread \(\w+\): ?", "", frames[0]) or "main"
        calls = [_function(frame) for frame in frames[1:]]
        total += count
        threads[thread] += count
        if calls:
            own[calls[-1]] += count
        for name in set(calls):
            if not any(marker in name for marker in _PLUMBING):
                inclusive[name] += count

    def shares(counter: Counter[str]) -> list[Share]:
        return [Share(name, round(100.0 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return ProfileSummary(total, shares(threads), shares(own), shares(inclusive))
