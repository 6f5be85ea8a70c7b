"""Two example tasks. Arguments and return values travel as JSON, so keep them JSON types."""

from __future__ import annotations


def word_count(text: str) -> dict[str, int]:
    """How often each (lower-cased) word occurs in `text`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    counts: dict[str, int] = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts


def collatz_steps(n: int) -> int:
    """Steps the Collatz sequence starting at `n` takes to reach 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError("n must be a positive integer")
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps
