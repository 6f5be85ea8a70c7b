"""Settings from one URL (broker) and from options + environment (agent), validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockercomp.agent.errors import ConfigError
from dockercomp.agent.settings import AgentSettings, container_id, default_worker_id, sanitize_name
from dockercomp.broker.defaults import KEEPALIVE_SECONDS, ROOT_TOPIC
from dockercomp.broker.errors import SettingsError
from dockercomp.broker.settings import BrokerSettings
from dockercomp.broker.topics import validate_name

CONTAINER = "3f2a9c1b7d0e" + "a" * 52  # 64 hex digits


# --- broker URL ------------------------------------------------------------------------------------


def test_plain_url_with_defaults() -> None:
    s = BrokerSettings.from_url("mqtt://broker.example")
    assert (s.host, s.port, s.tls, s.username, s.keepalive, s.root) == (
        "broker.example", 1883, False, None, KEEPALIVE_SECONDS, ROOT_TOPIC)


def test_tls_url_defaults_to_port_8883() -> None:
    s = BrokerSettings.from_url("mqtts://broker.example?ca=/etc/ca.pem")
    assert (s.port, s.tls, s.ca_file, s.insecure) == (8883, True, "/etc/ca.pem", False)


def test_credentials_are_url_decoded_and_masked_when_shown() -> None:
    s = BrokerSettings.from_url("mqtt://al%40ice:p%3Ass@127.0.0.1:1884")
    assert (s.username, s.password, s.port) == ("al@ice", "p:ss", 1884)
    assert s.url == "mqtt://al%40ice:***@127.0.0.1:1884"
    assert "p:ss" not in str(s)
    assert BrokerSettings.from_url(s.full_url) == s


def test_query_options_round_trip_through_the_url() -> None:
    s = BrokerSettings.from_url("mqtt://h:1?keepalive=3&root=lab&insecure=1")
    assert (s.keepalive, s.root, s.insecure) == (3, "lab", True)
    assert BrokerSettings.from_url(s.full_url) == s


def test_a_url_list_names_the_nodes_of_one_broker_in_order_and_round_trips() -> None:
    s = BrokerSettings.from_url("mqtt://ann:p%2Cw@n1:1883?keepalive=5, n2:1884,mqtt://ann:p%2Cw@[::1]:1885?keepalive=5")
    assert s.addresses == (("n1", 1883), ("n2", 1884), ("::1", 1885))
    assert (s.username, s.password, s.keepalive) == ("ann", "p,w", 5)  # the first URL's, for every node
    assert s.url == "mqtt://ann:***@n1:1883?keepalive=5,n2:1884,[::1]:1885"  # no password shown
    assert BrokerSettings.from_url(s.full_url) == s
    assert s.address_url(1) == "mqtt://n2:1884" and BrokerSettings.from_url("mqtt://h").addresses == (("h", 1883),)


@pytest.mark.parametrize("url, hint", [
    ("mqtt://n1,mqtts://n2", "differs from the first of the list in tls"),
    ("mqtt://n1?root=a,mqtt://n2", "in root"),
    ("mqtt://a:x@n1,mqtt://b:y@n2", "in credentials"),
    ("mqtt://n1,,n2", "empty entry"),
    ("mqtt://n1,n1:1883", "names a node twice"),
    ("mqtt://a:secret@n1,http://n2", "must start with mqtt://"),
])
def test_bad_url_lists_say_what_to_fix_without_the_password(url: str, hint: str) -> None:
    with pytest.raises(SettingsError) as caught:
        BrokerSettings.from_url(url)
    assert hint in str(caught.value) and "secret" not in str(caught.value)


@pytest.mark.parametrize("url, hint", [
    ("http://h:1883", "must start with mqtt://"),
    ("mqtt://", "names no host"),
    ("mqtt://h:notaport", "malformed"),
    ("mqtt://h?colour=red", "unknown option(s) colour"),
    ("mqtt://h?keepalive=soon", "whole number of seconds"),
    ("mqtt://h?keepalive=0", "between 1 and 65535"),
])
def test_bad_urls_say_what_to_fix(url: str, hint: str) -> None:
    with pytest.raises(SettingsError) as caught:
        BrokerSettings.from_url(url)
    assert hint in str(caught.value)


def test_environment_variable_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKERCOMP_BROKER", "mqtt://from-env:1999")
    assert BrokerSettings.from_env().host == "from-env"
    monkeypatch.delenv("DOCKERCOMP_BROKER")
    assert BrokerSettings.from_env("mqtt://fallback").host == "fallback"


def test_credentials_and_keepalive_can_be_overridden() -> None:
    s = BrokerSettings.from_url("mqtt://u:p@h").with_credentials("v", None).with_keepalive(2)
    assert (s.username, s.password, s.keepalive) == ("v", "p", 2)


# --- agent identity --------------------------------------------------------------------------------


def test_container_id_from_cgroup_v1(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(f"12:cpu:/docker/{CONTAINER}\n")
    assert container_id(cgroup, tmp_path / "none", tmp_path / "none", host="x") == CONTAINER[:12]


def test_container_id_from_mountinfo_under_cgroup_v2(tmp_path: Path) -> None:
    cgroup, mounts = tmp_path / "cgroup", tmp_path / "mountinfo"
    cgroup.write_text("0::/\n")
    mounts.write_text(f"512 500 254:0 /var/lib/docker/containers/{CONTAINER}/hostname /etc/hostname rw\n")
    assert container_id(cgroup, mounts, tmp_path / "none", host="x") == CONTAINER[:12]


def test_dockerenv_with_a_docker_style_hostname_is_a_container(tmp_path: Path) -> None:
    dockerenv = tmp_path / ".dockerenv"
    dockerenv.touch()
    none = tmp_path / "none"
    assert container_id(none, none, dockerenv, host="3f2a9c1b7d0e") == "3f2a9c1b7d0e"
    # A machine that merely has /.dockerenv but a chosen name is treated as a plain host.
    assert container_id(none, none, dockerenv, host="build-vm") is None
    assert container_id(none, none, none, host="3f2a9c1b7d0e") is None


def test_worker_id_is_the_hostname_in_a_container_and_unique_per_process_outside() -> None:
    assert default_worker_id("3f2a9c1b7d0e", "3f2a9c1b7d0e", 1) == "3f2a9c1b7d0e"
    assert default_worker_id("my laptop.local", None, 4242) == "my-laptop-local-4242"
    assert default_worker_id("laptop", None, 1) != default_worker_id("laptop", None, 2)


@pytest.mark.parametrize("host", ["", "---", "ünïcode-host", "a" * 300, "host/with+bad#chars"])
def test_any_hostname_gives_a_valid_worker_id(host: str) -> None:
    validate_name(default_worker_id(host, None, 4_194_304))
    validate_name(sanitize_name(host))


# --- agent settings --------------------------------------------------------------------------------


def agent_settings(**options: object) -> AgentSettings:
    defaults: dict[str, object] = {"host": "laptop", "container": None, "pid": 77, "environ": {}}
    return AgentSettings.from_options(str(options.pop("url", "mqtt://127.0.0.1:1883")), **{**defaults, **options})  # type: ignore[arg-type]


def test_agent_defaults() -> None:
    s = agent_settings()
    assert s.worker.key == "local/laptop-77"
    assert s.concurrency >= 1 and s.grace == 30.0
    assert s.health_file == Path("/tmp/dockercomp-agent-health.json")
    # volunteer/worker/TOKEN: readable in broker logs, but another account cannot guess it
    # (and take the connection over by connecting with the same id).
    prefix, token = s.client_id.rsplit("/", 1)
    assert prefix == "local/laptop-77" and len(token) >= 12
    assert agent_settings().client_id != s.client_id


def test_volunteer_defaults_to_the_broker_user_name() -> None:
    assert agent_settings(url="mqtt://alice:pw@h").worker.volunteer == "alice"
    assert agent_settings(url="mqtt://h", username="bob").worker.volunteer == "bob"
    assert agent_settings(url="mqtt://alice:pw@h", volunteer="carol").worker.volunteer == "carol"


def test_explicit_options_win() -> None:
    s = agent_settings(worker_id="w1", concurrency=3, keepalive=2, grace=1.5, health_file="/run/h.json",
                       environ={"DOCKERCOMP_IMAGE": "dockercomp/worker:1"})
    assert (s.worker.worker, s.concurrency, s.keepalive, s.grace) == ("w1", 3, 2, 1.5)
    assert s.health_file == Path("/run/h.json") and s.image == "dockercomp/worker:1"


def test_health_file_from_the_environment() -> None:
    assert agent_settings(environ={"DOCKERCOMP_HEALTH_FILE": "/x/h.json"}).health_file == Path("/x/h.json")


@pytest.mark.parametrize("options, option, hint", [
    ({"worker_id": "a/b"}, "--worker-id", "topic level"),
    ({"volunteer": "bad name"}, "--volunteer", "invalid volunteer name"),
    ({"url": "mqtt://not valid@h"}, "--volunteer", "pass --volunteer NAME"),
    ({"concurrency": 0}, "--concurrency", "at least 1"),
    ({"keepalive": 0}, "--keepalive", "between 1 and 65535"),
    ({"grace": -1}, "--grace", "must not be negative"),
    ({"url": "http://h"}, "--broker", "mqtt://"),
])
def test_bad_agent_options_name_the_option_and_the_fix(options: dict[str, object], option: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        agent_settings(**options)
    assert caught.value.option == option
    assert hint in str(caught.value)
