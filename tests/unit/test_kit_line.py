"""The one line `volunteers add` prints, with and without a kit, and the kit's baked installer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dockercomp.broker.accounts import install_command
from dockercomp.coordinator.kit import KitError, _repository, build_kit, install_script

URL = "mqtts://alice:s3cret@broker.example.org:8883"


def write_kit(directory: Path, url: str = "https://example.org/kit", sha: str = "ab" * 32) -> Path:
    directory.mkdir()
    (directory / "kit.json").write_text(json.dumps({"url": url, "sha256": sha}))
    return directory


def test_with_a_kit_the_line_downloads_install_me_and_pins_the_kits_checksums(tmp_path: Path) -> None:
    kit = write_kit(tmp_path / "kit", url="https://example.org/kit/")
    assert install_command(URL, "/etc/broker/certs/ca.crt", kit) == (
        "curl -fsSL https://example.org/kit/install_me.sh | sh -s -- "
        f"--kit-sha256 {'ab' * 32} --broker {URL} --yes")


def test_without_a_kit_the_line_runs_a_handed_over_install_me(tmp_path: Path) -> None:
    assert install_command(URL, "/etc/broker/certs/ca.crt", tmp_path / "no-kit") == (
        f"sh install_me.sh --broker {URL} --ca-file ca.crt --yes")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "kit.json").write_text("{not json")
    assert install_command(URL, None, tmp_path / "broken").startswith("sh install_me.sh")


def test_a_broker_on_loopback_gets_host_networking(tmp_path: Path) -> None:
    line = install_command("mqtt://bob:pw@127.0.0.1:1883", None, write_kit(tmp_path / "kit"))
    assert line.endswith("--broker mqtt://bob:pw@127.0.0.1:1883 --network host --yes")


def test_the_kits_install_me_has_the_kit_url_as_its_default() -> None:
    script = install_script("https://example.org/kit")
    assert 'KIT_URL="${DOCKERCOMP_KIT_URL:-https://example.org/kit}"' in script
    assert script.startswith("#!/bin/sh")


def test_a_kit_url_must_be_http(tmp_path: Path) -> None:
    with pytest.raises(KitError, match="not http"):
        build_kit(tmp_path / "kit", "ftp://example.org/kit")
    assert not (tmp_path / "kit").exists()


@pytest.mark.parametrize(("name", "repository"), [
    ("dockercomp/worker:latest", "dockercomp/worker"),
    ("registry.example.org:5000/lab/worker", "registry.example.org:5000/lab/worker"),
    ("registry.example.org:5000/lab/worker:1.2", "registry.example.org:5000/lab/worker"),
    ("lab/worker@sha256:" + "0" * 64, "lab/worker"),
])
def test_kit_tags_keep_the_images_repository(name: str, repository: str) -> None:
    assert _repository(name) == repository
