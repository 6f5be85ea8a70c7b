"""The repository's shape, checked statically over the sources (no imports, no processes).

The four role folders install as dockercomp.broker, .agent, .coordinator and .installer
(setup.cfg's package_dir), so a bare `import broker` works only in a source checkout and
breaks in every installed wheel; the agent runs on volunteers' machines without the
coordinator's dependencies, so the two never import each other; tests are not shipped.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLES = ("broker", "agent", "coordinator", "installer")
# Every folder of Python that is not a test: the shipped package and the benchmark.
NON_TEST_FOLDERS = ("dockercomp", *ROLES, "bench")
MAX_LINES = 600


def files(folder: str, pattern: str = "*.py") -> list[Path]:
    return sorted(p for p in (REPO_ROOT / folder).rglob(pattern) if "__pycache__" not in p.parts and p.is_file())


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every absolute import, and of import_module("...") string literals."""
    source = path.read_text()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
    for match in re.finditer(r"import_module\(\s*['\"]([\w.]+)['\"]", source):
        yield source.count("\n", 0, match.start()) + 1, match.group(1)


def offenders(folders: tuple[str, ...], forbidden: re.Pattern[str]) -> list[str]:
    return [f"{path.relative_to(REPO_ROOT)}:{line}: {name}"
            for folder in folders for path in files(folder)
            for line, name in imported_modules(path) if forbidden.fullmatch(name)]


@pytest.mark.parametrize("role", ROLES)
def test_no_file_of_a_role_folder_is_over_600_lines(role: str) -> None:
    sources = files(role, "*")
    assert sources, f"{role}/ has no files: the test would check nothing"
    too_long = {str(p.relative_to(REPO_ROOT)): n for p in sources if (n := len(p.read_bytes().splitlines())) > MAX_LINES}
    assert too_long == {}


def test_the_agent_and_the_coordinator_never_import_each_other() -> None:
    assert offenders(("agent",), re.compile(r"dockercomp\.coordinator(\..*)?")) == []
    assert offenders(("coordinator",), re.compile(r"dockercomp\.agent(\..*)?")) == []


@pytest.mark.parametrize("folder", NON_TEST_FOLDERS)
def test_nothing_outside_tests_imports_tests(folder: str) -> None:
    assert offenders((folder,), re.compile(r"tests(\..*)?")) == []


@pytest.mark.parametrize("folder", ("dockercomp", *ROLES))
def test_shipped_modules_import_the_roles_only_through_the_dockercomp_namespace(folder: str) -> None:
    assert files(folder), f"{folder}/ has no Python files: the test would check nothing"
    assert offenders((folder,), re.compile(rf"({'|'.join(ROLES)})(\..*)?")) == []


def test_the_checks_see_imports_in_every_form(tmp_path: Path) -> None:
    # Given a module importing in each of the ways the checks above must catch
    module = tmp_path / "m.py"
    module.write_text("import broker.topics\nfrom agent import cli\nimport os, tests.support\n"
                      "def f():\n    from coordinator.store import Store\n"
                      "importlib.import_module('installer.cli')\nfrom . import sibling\n")
    # Then every bare role import and the tests import are found, with their lines
    assert sorted(imported_modules(module)) == [
        (1, "broker.topics"), (2, "agent"), (3, "os"), (3, "tests.support"), (5, "coordinator.store"),
        (6, "installer.cli")]
