"""The installer as a volunteer meets it without Docker: the CLI's error paths run for real in
a subprocess, because "no traceback" is about what a volunteer actually sees, and install_me.sh.
The logic (ids, specs, fleet, images) is unit-tested in tests/unit/test_installer_logic.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dockercomp.exits import Exit
from dockercomp.broker.settings import BrokerSettings
from dockercomp.installer.errors import BrokerUnreachable
from dockercomp.installer.preflight import check_broker
from tests.support import REPO_ROOT, free_port

BROKER = "mqtt://broker.example.org:1883"


# --- CLI ---------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dockercomp.installer", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), timeout=60, check=False)


@pytest.mark.parametrize("command", [["status"], ["up", "--broker", BROKER], ["down"], ["logs"]])
def test_an_unreachable_engine_gives_one_clear_message_and_the_docker_exit_code(command: list[str]) -> None:
    result = run_cli(*command, env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert result.returncode == Exit.DOCKER == 7
    assert "Traceback" not in result.stderr + result.stdout
    assert "error: the Docker engine is not running" in result.stderr
    assert "hint:" in result.stderr


def test_an_unreachable_broker_is_reported_before_anything_starts() -> None:
    with pytest.raises(BrokerUnreachable) as caught:
        check_broker(BrokerSettings.from_url(f"mqtt://127.0.0.1:{free_port()}"), timeout=2)
    assert "127.0.0.1" in caught.value.message and caught.value.exit_code == 5


# --- install_me.sh (the parts that need no Docker) ----------------------------------------

INSTALL_ME = REPO_ROOT / "installer" / "install_me.sh"


def run_install_me(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKERCOMP_")}
    env["DOCKERCOMP_HOME"] = str(home)
    return subprocess.run(["sh", str(INSTALL_ME), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_install_me_is_posix_sh() -> None:
    # dash is Debian's /bin/sh and rejects bash-only syntax.
    shell = "dash" if subprocess.run(["sh", "-c", "command -v dash"], capture_output=True, check=False).returncode == 0 else "sh"
    assert subprocess.run([shell, "-n", str(INSTALL_ME)], check=False).returncode == 0


def test_install_me_without_a_broker_fails_early_with_the_fix(tmp_path: Path) -> None:
    result = run_install_me("--yes", home=tmp_path / "home")
    assert result.returncode == 2
    assert "fix: pass --broker" in result.stderr
    assert not (tmp_path / "home").exists()


def test_install_me_with_an_unreachable_broker_fails_before_installing_anything(tmp_path: Path) -> None:
    result = run_install_me("--yes", "--broker", f"mqtt://127.0.0.1:{free_port()}", home=tmp_path / "home")
    assert result.returncode == 5
    assert "cannot reach the broker" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "home").exists()


def test_install_me_help_names_every_option(tmp_path: Path) -> None:
    result = run_install_me("--help", home=tmp_path)
    assert result.returncode == 0
    for option in ("--broker", "--yes", "--uninstall", "--workers", "--network"):
        assert option in result.stdout
