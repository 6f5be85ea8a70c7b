"""`kit build` with a scientist's task package, and `kit serve` over TLS and on loopback."""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dockercomp.broker.certs import init_certs
from dockercomp.broker.processes import free_port
from tests.support import REPO_ROOT
from tests.support.docker import build_installer_image, run_in_image


def dockercomp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dockercomp", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900, check=False)


@contextmanager
def serving(*args: str) -> Iterator[str]:
    """`kit serve ARGS` running; yields the line it printed on start."""
    server = subprocess.Popen([sys.executable, "-m", "dockercomp", "coordinator", "kit", "serve", *args],
                              cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        yield server.stderr.readline()
    finally:
        server.terminate()
        server.wait(30)


def test_kit_serve_speaks_tls_when_given_a_certificate_and_http_on_loopback_otherwise(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "kit.json").write_text(json.dumps({"url": "https://127.0.0.1", "sha256": "00"}))
    certs = init_certs(tmp_path / "config", ["127.0.0.1"])
    port = free_port()
    with serving("--dir", str(kit), "--port", str(port), "--cert", certs.server_cert, "--key", certs.server_key) as line:
        assert f"https://127.0.0.1:{port}/" in line
        context = ssl.create_default_context(cafile=certs.ca_cert)
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/kit.json", context=context, timeout=10) as answer:
            assert json.load(answer)["sha256"] == "00"
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/kit.json", timeout=10)
    port = free_port()
    with serving("--dir", str(kit), "--port", str(port)) as line:
        assert f"http://127.0.0.1:{port}/" in line  # loopback unless --host says otherwise
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/kit.json", timeout=10) as answer:
            assert answer.status == 200


def test_kit_serve_refuses_a_folder_without_a_kit(tmp_path: Path) -> None:
    refused = dockercomp("coordinator", "kit", "serve", "--dir", str(tmp_path), "--port", str(free_port()))
    assert refused.returncode == 2 and "kit build" in refused.stderr


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_kit_with_task_functions_ships_a_worker_image_that_offers_them(
    tmp_path: Path, docker_client: Any, worker_image: str
) -> None:
    build_installer_image()
    wheel = tmp_path / "dockercomp-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"a wheel")
    built = dockercomp("coordinator", "kit", "build", "--dir", str(tmp_path / "config"), "--url", "http://127.0.0.1:9",
                       "--tasks", str(REPO_ROOT / "examples" / "custom-tasks"), "--wheel", str(wheel), "--json")
    assert built.returncode == 0, built.stderr
    info = json.loads(built.stdout)
    sums = (Path(info["directory"]) / "SHA256SUMS").read_text()
    assert f"{hashlib.sha256(b'a wheel').hexdigest()}  {wheel.name}" in sums.splitlines()
    env = dict(line.split("=", 1) for line in (Path(info["directory"]) / "kit.env").read_text().splitlines())
    tasks_image = next(i for i in docker_client.images.list("dockercomp/worker") if any(
        t.startswith("dockercomp/worker:tasks-") for t in i.tags))
    tag = next(t for t in tasks_image.tags if t.startswith("dockercomp/worker:tasks-"))
    try:
        # The archive's worker is the task image (its kit tag names the image id) ...
        assert env["KIT_WORKER_IMAGE"] == f"dockercomp/worker:kit-{tasks_image.id.removeprefix('sha256:')[:12]}"
        assert env["KIT_ARCHIVE"] == "images.tar.gz" and "images.tar.gz" in info["files"]
        # ... which offers the example's functions beside the built-in ones.
        functions = run_in_image(tag, "agent", "functions", "--json", entrypoint="dockercomp")
        assert functions.returncode == 0, functions.stderr
        assert {"word_count", "collatz_steps", "add"} <= {f["name"] for f in json.loads(functions.stdout)}
    finally:
        docker_client.images.remove(tag)


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_the_installer_image_runs_dockercomp_installer_with_the_docker_sdk(docker_client: Any) -> None:
    image = build_installer_image()
    assert docker_client.images.get(image).attrs["Config"]["Entrypoint"] == ["dockercomp"]
    shown = run_in_image(image, "installer", "--help")
    assert shown.returncode == 0 and "status" in shown.stdout, shown.stderr
    sdk = run_in_image(image, "-c", "import docker, rich, dockercomp.installer.cli", entrypoint="python3")
    assert sdk.returncode == 0, sdk.stderr


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_a_registry_kit_needs_images_pushed_to_a_registry(tmp_path: Path, docker_client: Any, worker_image: str) -> None:
    build_installer_image()
    # Built here, never pushed: no digest a volunteer's Docker could verify a pull against.
    refused = dockercomp("coordinator", "kit", "build", "--out", str(tmp_path / "kit"), "--url", "https://example.org",
                         "--registry")
    assert refused.returncode == 8, refused.stderr
    assert "no registry digest" in refused.stderr and "docker push" in refused.stderr
    assert not (tmp_path / "kit" / "SHA256SUMS").exists()
