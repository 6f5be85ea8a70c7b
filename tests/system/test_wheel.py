"""The built wheel, installed as a user would: alone in a fresh venv, beside PyPA's `installer`.

The base install (no extras) is what a volunteer's worker container holds, so it must run
the agent and must answer every other role with the pip command that adds its extra. The
venvs install from the package index (as CI does), through pip's usual cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_until
from tests.support.brokers import BrokerProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
# What setup.cfg builds from; copied so the build never reads or leaves a stale build/ in the checkout.
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "dockercomp", "broker", "agent", "coordinator", "installer")
# Packages of the other roles' extras: a worker container (the base install) holds none of them.
ROLE_ONLY_PACKAGES = ("amqtt", "peewee", "cryptography", "rich", "docker", "psycopg2", "PIL", "prometheus_client")
PIP_TIMEOUT = 600


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # Not in the checkout: `python -c` puts the working directory first on sys.path, where the
    # repository's own installer/ folder would shadow PyPA's `installer`.
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout, check=False,
                          cwd="/")


def loaded_role_packages(python: str | Path, code: str, env: dict[str, str] | None = None) -> list[str]:
    """Which ROLE_ONLY_PACKAGES are imported after `code` runs in a fresh interpreter."""
    probe = (f"import sys\n{code}\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(ROLE_ONLY_PACKAGES)!r}))")
    done = run(python, "-c", probe, env=env)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"')))


# --- import hygiene, in the development venv (where every extra is installed) ---------------


def test_the_agent_imports_nothing_of_the_other_roles() -> None:
    # When the agent's modules are imported and its commands run, with every extra installed
    code = ("from dockercomp.cli import main\n"
            "import dockercomp.agent, dockercomp.agent.cli, dockercomp.agent.agent, dockercomp.agent.runner\n"
            "for args in (['agent', 'functions'], ['agent', 'functions', '--json'], ['agent', 'check'],\n"
            "             ['agent', 'run', '--help']):\n"
            "    try:\n"
            "        main(args, standalone_mode=False)\n"
            "    except SystemExit:\n"
            "        pass\n")
    env = dict(os.environ, DOCKERCOMP_HEALTH_FILE="/nonexistent/health.json")
    # Then none of their packages was loaded (the image holds none of them)
    assert loaded_role_packages(sys.executable, code, env) == []


# --- the wheel ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make dist` in a copy of the sources, with this interpreter (`-o venv`: no venv of its own)."""
    source = tmp_path_factory.mktemp("source")
    for name in (*SOURCES, "Makefile"):
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(REPO_ROOT / name, source / name)
    built = run("make", "-C", source, "-o", "venv", "dist", f"BIN={Path(sys.executable).parent}", timeout=PIP_TIMEOUT)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    return source / "dist"


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (found,) = dist.glob("dockercomp-*.whl")
    return found


@pytest.mark.slow
def test_make_dist_builds_an_sdist_that_installs_and_runs_in_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    (sdist,) = dist.glob("dockercomp-*.tar.gz")
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    installed = run(bin_dir / "python", "-m", "pip", "install", "-q", sdist, timeout=PIP_TIMEOUT)
    assert installed.returncode == 0, installed.stderr
    assert run(bin_dir / "dockercomp", "--version").stdout.strip() == "dockercomp, version 0.1.0"
    functions = run(bin_dir / "dockercomp", "agent", "functions", "--json")
    assert functions.returncode == 0 and "add" in functions.stdout
    # The kit's installer script ships inside the package (kit build reads it from there).
    script = run(bin_dir / "python", "-c", "from importlib import resources\n"
                 "print((resources.files('dockercomp.installer') / 'install_me.sh').read_text()[:9])")
    assert script.stdout.strip() == "#!/bin/sh"


@pytest.fixture(scope="module")
def base_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel with no extra, and PyPA's `installer`."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    installed = run(python, "-m", "pip", "install", "-q", wheel, "installer", timeout=PIP_TIMEOUT)
    assert installed.returncode == 0, installed.stderr
    return root / "bin"


@pytest.mark.slow
def test_the_wheel_holds_only_the_dockercomp_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"dockercomp", wheel.name.split("-py")[0] + ".dist-info"}
    # And every role is in it, under the namespace
    for role in ("broker", "agent", "coordinator", "installer", "demo"):
        assert f"dockercomp/{role}/__init__.py" in names
    assert "dockercomp/installer/install_me.sh" in names
    # The dashboard's page and its vendored library, with the licence and checksum (issue 13)
    for name in ("index.html", "app.js", "style.css", "vendor/mqtt.min.js", "vendor/mqtt.LICENSE.md",
                 "vendor/SHA256SUMS", "vendor/README.md"):
        assert f"dockercomp/coordinator/web/{name}" in names


@pytest.mark.slow
def test_the_wheel_installs_and_imports_beside_pypas_installer(base_venv: Path) -> None:
    python = base_venv / "python"
    both = run(python, "-c", "import installer, installer.sources, dockercomp, dockercomp.installer, dockercomp.agent\n"
                             "print(installer.__file__); print(dockercomp.installer.__file__)")
    assert both.returncode == 0, both.stderr
    pypa, ours = both.stdout.split()
    assert Path(pypa).parent.name == "installer" and Path(ours).parent.parent.name == "dockercomp"
    assert run(python, "-m", "installer", "--help").returncode == 0
    version = run(base_venv / "dockercomp", "--version")
    assert version.returncode == 0 and version.stdout.strip() == "dockercomp, version 0.1.0"


@pytest.mark.slow
def test_the_base_install_holds_none_of_the_other_roles_packages(base_venv: Path) -> None:
    code = "import importlib.util as u\nprint([p for p in %r if u.find_spec(p)])" % (ROLE_ONLY_PACKAGES,)
    found = run(base_venv / "python", "-c", code)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr


@pytest.mark.slow
def test_the_base_install_runs_the_agents_commands(base_venv: Path, tmp_path: Path) -> None:
    dockercomp = base_venv / "dockercomp"
    assert run(dockercomp, "agent", "--help").returncode == 0
    listed = run(dockercomp, "agent", "functions")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("7 task functions") and "count_primes(lo: int, hi: int) -> int" in listed.stdout
    health = tmp_path / "none.json"
    checked = run(dockercomp, "agent", "check", env=dict(os.environ, DOCKERCOMP_HEALTH_FILE=str(health)))
    assert checked.returncode == 1 and "no health file" in checked.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command, extra", [
    (["coordinator", "status"], "coordinator"),
    (["broker", "serve"], "broker"),
    (["installer", "status"], "installer"),
])
def test_a_role_without_its_extra_names_the_pip_command(base_venv: Path, command: list[str], extra: str) -> None:
    done = run(base_venv / "dockercomp", *command)
    assert done.returncode == 2
    assert f"pip install 'dockercomp[{extra}]'" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def base_agent(base_venv: Path, mosquitto: BrokerProcess, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    health = tmp_path / "health.json"
    env = dict(os.environ, DOCKERCOMP_BROKER=mosquitto.url, DOCKERCOMP_WORKER_ID="wheel1",
               DOCKERCOMP_HEALTH_FILE=str(health), DOCKERCOMP_CONCURRENCY="1")
    with open(tmp_path / "agent.log", "wb") as log:
        process = subprocess.Popen([str(base_venv / "dockercomp"), "agent", "run"], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/")
    try:
        yield process, health
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_the_base_install_runs_an_agent_against_a_real_broker(
    base_venv: Path, base_agent: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    process, health = base_agent
    env = dict(os.environ, DOCKERCOMP_HEALTH_FILE=str(health))
    wait_until(lambda: process.poll() is not None or run(base_venv / "dockercomp", "agent", "check", env=env).returncode == 0,
               timeout=30, interval=0.5)
    assert process.poll() is None, (tmp_path / "agent.log").read_text()
    # The agent drains on SIGTERM and exits cleanly
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, (tmp_path / "agent.log").read_text()
