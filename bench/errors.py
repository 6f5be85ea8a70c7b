"""Errors of the benchmark: each says which phase failed and what to look at."""

from __future__ import annotations


class BenchError(Exception):
    """A phase could not run (missing tool, a child process died); the message says what to do."""


class PhaseTimeout(BenchError):
    """Something the benchmark waited for never happened; the message names it."""
