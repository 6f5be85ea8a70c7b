"""The task functions an agent runs: the registry (built-ins and installed entry points) and
the built-ins themselves, called in this process."""

from __future__ import annotations

import base64
import hashlib
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockercomp.agent.builtins import add, count_primes, mandelbrot_tile, noop, sha256, sleep, sum_numbers
from dockercomp.agent.errors import BadArguments, UnknownFunction
from dockercomp.agent.tasks import Registry


def install_plugin(root: Path, module: str, source: str, entry_points: str) -> None:
    """What `pip install` of a task package leaves on sys.path: a module and its dist-info."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist = root / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_registry_offers_built_ins_and_installed_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install_plugin(tmp_path, "sciencepkg", """
        def render(x, y=0):
            \"\"\"Render one thing.\"\"\"
            return x + y

        def add(a, b):
            return 0
    """, """
        [dockercomp.tasks]
        render = sciencepkg:render
        add = sciencepkg:add
        broken = sciencepkg:does_not_exist
        missing = no_such_module:f
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry.load()

    assert {"add", "sum", "sleep", "sha256", "count_primes", "noop", "mandelbrot_tile", "render"} <= set(registry.names)
    assert registry.get("render").source == "sciencepkg" and registry.get("render").summary == "Render one thing."
    assert registry.get("add").target == "dockercomp.agent.builtins:add"  # a package cannot take over a built-in name
    assert "broken" not in registry and "missing" not in registry  # logged and skipped, the rest still served
    assert "'broken'" in caplog.text and "'missing'" in caplog.text and "name is taken" in caplog.text


def test_registry_checks_names_and_arguments_before_anything_runs() -> None:
    registry = Registry.load()
    assert registry.check("sha256", ["x"]).name == "sha256"
    assert registry.check("sha256", ["x", 3]).name == "sha256"
    with pytest.raises(UnknownFunction) as unknown:
        registry.check("os.system", ["rm -rf /"])
    assert "it offers: add," in unknown.value.message
    with pytest.raises(BadArguments) as bad:
        registry.check("add", [1])
    assert "missing a required argument: 'b'" in bad.value.message
    with pytest.raises(BadArguments):
        registry.check("noop", [1])


@pytest.mark.parametrize("lo, hi, expected", [(0, 0, 0), (0, 2, 0), (0, 3, 1), (2, 3, 1), (0, 100, 25), (0, 1_000_000, 78498),
                                              (10**9, 10**9 + 1000, 49), (7919, 7920, 1), (7918, 7919, 0)])
def test_count_primes_known_values(lo: int, hi: int, expected: int) -> None:
    assert count_primes(lo, hi) == expected


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 3000))
def test_count_primes_matches_trial_division(lo: int, width: int) -> None:
    def is_prime(n: int) -> bool:
        return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))
    assert count_primes(lo, lo + width) == sum(map(is_prime, range(lo, lo + width)))


def test_sha256_rounds_chain_digests() -> None:
    assert sha256("dockercomp") == hashlib.sha256(b"dockercomp").hexdigest()
    assert sha256("dockercomp", 2) == hashlib.sha256(hashlib.sha256(b"dockercomp").digest()).hexdigest()


def test_mandelbrot_tile_layout_row_zero_is_the_top() -> None:
    tile = mandelbrot_tile(-1.0, 0.0, 0.5, 1.0, 4, 2, 100)
    data = base64.b64decode(tile["data"])
    assert (tile["width"], tile["height"], tile["max_iter"], len(data)) == (4, 2, 100, 8)
    top, bottom = data[:4], data[4:]
    assert bottom[0] == 255  # (-1, 0) is inside the set: bottom row is y_min = 0
    assert top[0] < 255  # (-1, 1) escapes: top row is y_max = 1
    assert top[0] == 3 * 254 // 100  # it escapes after 3 iterations


def test_mandelbrot_tile_documented_example() -> None:
    tile = mandelbrot_tile(-2.0, -1.0, 0.5, 1.0, 4, 3, 50)
    assert tile == {"width": 4, "height": 3, "max_iter": 50, "data": "BQ8ZCv///xkFDxkK"}


@pytest.mark.parametrize("call, error", [
    (lambda: add("1", 2), TypeError), (lambda: add(True, 2), TypeError), (lambda: sum_numbers([1, "2"]), TypeError),
    (lambda: sleep(-1), ValueError), (lambda: sha256("x", 0), ValueError), (lambda: count_primes(5, 1), ValueError),
    (lambda: mandelbrot_tile(0, 0, 1, 1, 1000, 1000), ValueError), (lambda: mandelbrot_tile(0, 0, 1, 1, 0, 1), ValueError),
])
def test_built_ins_refuse_bad_arguments_with_a_readable_error(call: Callable[[], object], error: type[Exception]) -> None:
    with pytest.raises(error):
        call()


def test_built_ins_compute() -> None:
    assert add(2, 40) == 42 and sum_numbers([1, 2.5, 3]) == 6.5 and sum_numbers([]) == 0
    assert sleep(0) == 0 and noop() is None
