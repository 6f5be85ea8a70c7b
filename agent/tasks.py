"""The task functions a worker offers: the built-ins plus installed entry points.

A scientist's package registers functions under the entry-point group ``dockercomp.tasks``::

    [options.entry_points]
    dockercomp.tasks =
        render = mypackage.render:render_tile

The registry is loaded once when the agent starts. A task message only ever *names* a
function; the name is looked up here and nothing named in a message is ever imported.
Each function is known by its ``module:attr`` target, which the runner's processes import
at start-up from this same table.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from dockercomp.agent.defaults import ENTRY_POINT_GROUP
from dockercomp.agent.errors import BadArguments, UnknownFunction

log = logging.getLogger(__name__)

# Always offered, even when the package runs from a source tree without entry points.
BUILTINS: dict[str, str] = {
    "add": "dockercomp.agent.builtins:add",
    "sum": "dockercomp.agent.builtins:sum_numbers",
    "sleep": "dockercomp.agent.builtins:sleep",
    "sha256": "dockercomp.agent.builtins:sha256",
    "count_primes": "dockercomp.agent.builtins:count_primes",
    "noop": "dockercomp.agent.builtins:noop",
    "mandelbrot_tile": "dockercomp.agent.builtins:mandelbrot_tile",
}

BUILTIN_SOURCE = "built-in"

# Argument counts above this are checked every time instead of remembered (bounds the memory).
_MAX_REMEMBERED_ARITY = 64


def resolve(target: str) -> Callable[..., Any]:
    """Import ``module:attr`` (attr may be dotted). Only for targets from the registry."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"task function target {target!r} must look like 'module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


@dataclass(frozen=True)
class TaskFunction:
    """One function a task may name."""

    name: str
    target: str  # "module:attr", imported by every task process
    source: str  # "built-in" or the distribution that registered it
    func: Callable[..., Any]

    @functools.cached_property
    def signature(self) -> inspect.Signature | None:
        """Worked out once: with eval_str it evaluates every annotation, far too slow per task."""
        try:
            return inspect.signature(self.func, eval_str=True)
        except NameError:  # an annotation that does not resolve: show it as written
            return inspect.signature(self.func)
        except (TypeError, ValueError):  # some C functions have none
            return None

    @property
    def summary(self) -> str:
        """The docstring's first paragraph, on one line."""
        doc = (inspect.getdoc(self.func) or "").strip()
        return " ".join(doc.split("\n\n")[0].split())


class Registry:
    """Name -> TaskFunction, fixed for the life of the agent."""

    def __init__(self, functions: Iterable[TaskFunction] = ()) -> None:
        self._functions: dict[str, TaskFunction] = {f.name: f for f in functions}
        # (name, number of arguments) -> why they do not fit, or None: arguments are always
        # positional, so whether they bind depends only on how many there are.
        self._fits: dict[tuple[str, int], str | None] = {}

    @classmethod
    def from_targets(cls, targets: Mapping[str, str], source: str = "configured") -> Registry:
        """A registry of explicit ``name -> module:attr`` targets (tests, embedding)."""
        return cls(TaskFunction(name, target, source, resolve(target)) for name, target in targets.items())

    @classmethod
    def load(cls, group: str = ENTRY_POINT_GROUP, include_builtins: bool = True) -> Registry:
        """Built-ins, then every entry point of ``group``. A broken entry point is logged and
        skipped, so one bad task package does not stop the worker serving the others."""
        functions: dict[str, TaskFunction] = {}
        if include_builtins:
            for name, target in BUILTINS.items():
                functions[name] = TaskFunction(name, target, BUILTIN_SOURCE, resolve(target))
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            source = ep.dist.name if ep.dist is not None else "unknown package"
            known = functions.get(ep.name)
            if known is not None:
                if known.target != ep.value:
                    log.warning("task function %r from %s ignored: the name is taken by %s (%s)",
                                ep.name, source, known.target, known.source)
                continue
            try:
                func = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure of a plugin
                log.warning("task function %r (%s from %s) cannot be loaded and is not offered: %s: %s",
                            ep.name, ep.value, source, type(exc).__name__, exc)
                continue
            if not callable(func):
                log.warning("task function %r (%s from %s) is not callable; not offered", ep.name, ep.value, source)
                continue
            functions[ep.name] = TaskFunction(ep.name, ep.value, source, func)
        return cls(functions.values())

    @property
    def names(self) -> list[str]:
        return sorted(self._functions)

    @property
    def targets(self) -> dict[str, str]:
        return {name: f.target for name, f in self._functions.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __len__(self) -> int:
        return len(self._functions)

    def get(self, name: str) -> TaskFunction:
        try:
            return self._functions[name]
        except KeyError:
            raise UnknownFunction(name, self.names) from None

    def __iter__(self) -> Iterator[TaskFunction]:
        return iter(sorted(self._functions.values(), key=lambda f: f.name))

    def check(self, name: str, args: list[Any]) -> TaskFunction:
        """The function a task names, if ``args`` fit its signature; else UnknownFunction or
        BadArguments (both answered with a ``rejected`` result)."""
        function = self.get(name)
        key = (name, len(args))
        if key in self._fits:
            problem = self._fits[key]
        else:
            problem = None
            signature = function.signature
            if signature is not None:
                try:
                    signature.bind(*args)
                except TypeError as exc:
                    problem = f"{exc}; signature is {name}{signature}"
            if len(args) <= _MAX_REMEMBERED_ARITY:
                self._fits[key] = problem
        if problem is not None:
            raise BadArguments(name, problem)
        return function
