"""Task functions every worker offers, registered in setup.cfg under ``dockercomp.tasks``.

Pure Python and deliberately CPU-bound where the name says so: they are the workloads of
the demos and benchmarks, and the examples a scientist's own task package follows. Each
checks its arguments and raises TypeError/ValueError with a readable message, which the
worker reports as an ``error`` result.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from numbers import Real
from typing import Any, cast

from dockercomp.agent.defaults import MAX_PRIME_RANGE, MAX_SHA256_ROUNDS, MAX_TILE_PIXELS

# Numbers of primes below each segment are found with a sieve over this many integers at once.
_SEGMENT = 1 << 18


def _number(name: str, value: Any) -> float | int:
    # bool is an int in Python, but True + 1 is never what a scientist meant.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite")
    return cast("float | int", value)  # ints stay ints: add(2, 3) is 5, not 5.0


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    return value


def add(a: float, b: float) -> float:
    """a + b."""
    return _number("a", a) + _number("b", b)


def sum_numbers(numbers: list[float]) -> float:
    """The sum of a list of numbers (registered as ``sum``)."""
    if not isinstance(numbers, list):
        raise TypeError(f"numbers must be a list, got {type(numbers).__name__}")
    return sum(_number(f"numbers[{i}]", n) for i, n in enumerate(numbers))


def sleep(seconds: float) -> float:
    """Sleep, then return ``seconds``: a stand-in for a task that takes time."""
    seconds = _number("seconds", seconds)
    if seconds < 0:
        raise ValueError("seconds must not be negative")
    time.sleep(seconds)
    return seconds


def sha256(text: str, rounds: int = 1) -> str:
    """Hex SHA-256 of ``text`` (UTF-8), hashed ``rounds`` times: each round hashes the previous
    round's 32-byte digest, so rounds=1 is the plain ``sha256(text)``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    rounds = _integer("rounds", rounds)
    if not 1 <= rounds <= MAX_SHA256_ROUNDS:
        raise ValueError(f"rounds must be between 1 and {MAX_SHA256_ROUNDS}")
    data = text.encode("utf-8")
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()


def _small_primes(limit: int) -> list[int]:
    """Primes <= limit (plain sieve; limit is at most sqrt(hi))."""
    if limit < 2:
        return []
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for p in range(2, math.isqrt(limit) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, limit + 1, p)))
    return [i for i in range(limit + 1) if sieve[i]]


def count_primes(lo: int, hi: int) -> int:
    """How many primes p satisfy lo <= p < hi (segmented sieve of Eratosthenes)."""
    lo, hi = _integer("lo", lo), _integer("hi", hi)
    if lo < 0 or hi < lo:
        raise ValueError("need 0 <= lo <= hi")
    if hi - lo > MAX_PRIME_RANGE:
        raise ValueError(f"range hi - lo must be at most {MAX_PRIME_RANGE}; split it into more tasks")
    lo = max(lo, 2)
    if hi <= lo:
        return 0
    primes = _small_primes(math.isqrt(hi - 1))
    count = 0
    for start in range(lo, hi, _SEGMENT):
        end = min(start + _SEGMENT, hi)
        segment = bytearray([1]) * (end - start)
        for p in primes:
            if p * p >= end:
                break
            first = max(p * p, (start + p - 1) // p * p)
            if first < end:
                segment[first - start :: p] = bytes(len(range(first, end, p)))
        count += segment.count(1)
    return count


def noop() -> None:
    """Does nothing: measures the per-task overhead of the whole system."""
    return None


def mandelbrot_tile(
    x_min: float, y_min: float, x_max: float, y_max: float, width: int, height: int, max_iter: int = 200
) -> dict[str, Any]:
    """Escape times of a width x height grid over [x_min, x_max] x [y_min, y_max].

    Pixel (column i, row j) samples c = x + iy with x = x_min + i*(x_max-x_min)/(width-1) and
    y = y_max - j*(y_max-y_min)/(height-1): column 0 is x_min, row 0 is the TOP (y_max), and
    both edges are included (a 1-pixel axis samples x_min or y_max). Each byte is the escape
    iteration n scaled to 0..254 (n * 254 // max_iter); 255 marks a point still bounded after
    max_iter iterations (inside the set). Returns {"width", "height", "max_iter", "data"}
    with ``data`` the base64 of width*height bytes, row-major.
    """
    x_min, y_min = _number("x_min", x_min), _number("y_min", y_min)
    x_max, y_max = _number("x_max", x_max), _number("y_max", y_max)
    width, height, max_iter = _integer("width", width), _integer("height", height), _integer("max_iter", max_iter)
    if width < 1 or height < 1:
        raise ValueError("width and height must be at least 1")
    if width * height > MAX_TILE_PIXELS:
        raise ValueError(f"a tile of {width}x{height} exceeds {MAX_TILE_PIXELS} pixels "
                         "(the result must fit one message); use smaller tiles")
    if not 1 <= max_iter <= 1_000_000:
        raise ValueError("max_iter must be between 1 and 1000000")
    dx = (x_max - x_min) / (width - 1) if width > 1 else 0.0
    dy = (y_max - y_min) / (height - 1) if height > 1 else 0.0
    out = bytearray(width * height)
    pos = 0
    for j in range(height):
        cy = y_max - j * dy
        for i in range(width):
            cx = x_min + i * dx
            zx = zy = 0.0
            n = 0
            # Written out (no complex numbers): this loop is the whole cost of the task.
            while n < max_iter:
                zx2, zy2 = zx * zx, zy * zy
                if zx2 + zy2 > 4.0:
                    break
                zy = 2.0 * zx * zy + cy
                zx = zx2 - zy2 + cx
                n += 1
            out[pos] = 255 if n >= max_iter else n * 254 // max_iter
            pos += 1
    return {"width": width, "height": height, "max_iter": max_iter, "data": base64.b64encode(bytes(out)).decode("ascii")}
