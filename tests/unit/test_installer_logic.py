"""The installer's logic without a Docker engine or any process: ids, specs, converging,
draining, ownership, images, and the CLI in process. Fleet runs against FakeDocker
(tests/support/docker.py). The CLI's error paths as a volunteer sees them run in
tests/system/test_installer.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dockercomp.agent.defaults import CONCURRENCY_ENV, PASSWORD_ENV, WORKER_ID_ENV
from dockercomp.broker.defaults import BROKER_URL_ENV
from dockercomp.broker.topics import validate_name
from dockercomp.installer import cli
from dockercomp.installer import defaults as d
from dockercomp.installer.engine import diagnose
from dockercomp.installer.errors import (
    ConfigError,
    ImageUnavailable,
    NameConflict,
    UpgradeHalted,
)
from dockercomp.installer.fleet import Fleet
from dockercomp.installer.identity import (
    container_name,
    host_label,
    machine_tag,
    worker_id,
    worker_prefix,
)
from dockercomp.installer.image import ensure_image
from dockercomp.installer.spec import CONTAINER_CA, WorkerSpec, cpu_plan, parse_broker, read_ca
from dockercomp.installer.usage import Counters, usage_of
from tests.support import REPO_ROOT
from tests.support.docker import FakeDocker

BROKER = "mqtt://broker.example.org:1883"
IMAGE = "dockercomp/worker:latest"
PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


def fleet_of(client: FakeDocker, instance: str = "default") -> Fleet:
    return Fleet(client, instance, prefix="host-abc123")


def spec(**changes: object) -> WorkerSpec:
    return WorkerSpec(broker=BROKER, grace=7).with_changes(**changes)


def names(client: FakeDocker) -> list[str]:
    return sorted(c.name for c in client.containers.records.values())


# --- identity ----------------------------------------------------------------------------


def test_worker_ids_are_stable_unique_per_slot_and_valid_topic_levels() -> None:
    prefix = worker_prefix("default", hostname="Lab-PC.example.org", tag="0a1b2c")
    ids = [worker_id(prefix, slot) for slot in range(1, 5)]
    assert ids == ["Lab-PC-0a1b2c-w1", "Lab-PC-0a1b2c-w2", "Lab-PC-0a1b2c-w3", "Lab-PC-0a1b2c-w4"]
    assert worker_id(prefix, 1) == ids[0]  # the same slot is the same worker after a restart
    for value in ids:
        validate_name(value, "worker id")


def test_worker_ids_tell_apart_machines_with_the_same_hostname(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_text("4c4c4544003\n")
    two.write_text("9f9f9f9f001\n")
    assert machine_tag((str(one),)) != machine_tag((str(two),))
    assert machine_tag((str(one),)) == machine_tag((str(one),))
    assert len(machine_tag((str(tmp_path / "absent"),))) == 6  # falls back to the MAC address


def test_hostnames_are_reduced_to_safe_bounded_topic_levels() -> None:
    assert host_label("my host/with+odd#chars") == "my-host-with-odd-chars"
    assert host_label("...") == "host"
    long_id = worker_id(worker_prefix("named", hostname="x" * 200, tag="abcdef"), 12345)
    assert len(long_id) <= 64 and long_id.endswith("-w12345")
    validate_name(long_id, "worker id")


def test_named_instances_get_their_own_names_and_ids() -> None:
    assert container_name("default", 2) == "dockercomp-worker-2"
    assert container_name("lab", 2) == "dockercomp-lab-worker-2"
    assert worker_prefix("lab", hostname="pc", tag="aaaaaa") != worker_prefix("default", hostname="pc", tag="aaaaaa")


# --- spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"broker": "http://x"}, "mqtt://"),
        ({"broker": "mqtt://127.0.0.1:1883", "network": "bridge"}, "--network host"),
        ({"cpus": 64.0}, "at most 4"),
        ({"memory": "lots"}, "512m"),
        ({"instance": "Bad Name"}, "lowercase"),
        # RabbitMQ's MQTT plugin turns '.' into a topic level separator: refused, not rewritten.
        ({"instance": "lab.1"}, "'-' and '_'"),
        ({"volunteer": "lab.1"}, "--volunteer"),
        ({"broker": "mqtt://ann.b:pw@10.0.0.1:1883"}, "letters, digits, '_' and '-'"),
    ],
)
def test_impossible_options_are_refused_with_the_fix(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        spec(**changes).validate(host_cpus=4)
    assert fragment in caught.value.message + caught.value.fix


def test_a_loopback_broker_is_fine_with_host_networking() -> None:
    spec(broker="mqtt://127.0.0.1:1883", network="host").validate(host_cpus=4)


def test_spec_label_keeps_the_password_out_but_the_container_still_gets_it() -> None:
    secret = spec(username="alice", password="s3cret")
    client = FakeDocker()
    fleet_of(client).up(secret, 1)
    (container,) = client.containers.records.values()
    assert "s3cret" not in container.labels[d.LABEL_SPEC]
    assert container.environment[PASSWORD_ENV] == "s3cret"
    assert WorkerSpec.from_container(container.attrs) == secret


def test_a_password_in_the_broker_url_stays_out_of_labels_and_reruns_change_nothing() -> None:
    url, _ = parse_broker("mqtts://alice:pa%3Ass@broker.example.org")
    client = FakeDocker()
    fleet = fleet_of(client)
    fleet.up(spec(broker=url), 1)
    (container,) = client.containers.records.values()
    assert "pa%3Ass" not in container.labels[d.LABEL_SPEC]
    assert container.environment[BROKER_URL_ENV] == "mqtts://alice:pa%3Ass@broker.example.org:8883"
    assert WorkerSpec.from_container(container.attrs).broker == url
    assert fleet.up(spec(broker=url), 1).kept == ["dockercomp-worker-1"]


def test_a_private_ca_is_copied_into_each_container_before_it_starts(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text(PEM)
    # Either form the scientist hands out: ?ca= in the URL, or --ca-file beside it.
    for url, ca_file in ((f"mqtts://bob:pw@broker.example.org:8883?ca={ca}", None),
                         ("mqtts://bob:pw@broker.example.org:8883", ca)):
        broker, ca_pem = parse_broker(url, ca_file)
        client = FakeDocker()
        fleet_of(client).up(spec(broker=broker, ca_pem=ca_pem), 1)
        (container,) = client.containers.records.values()
        assert container.files[CONTAINER_CA] == PEM.encode()
        assert container.environment[BROKER_URL_ENV].endswith(f"?ca={CONTAINER_CA}")
        order = [call[0] for call in client.calls]
        assert order.index("put_archive") < order.index("start")
        assert WorkerSpec.from_container(container.attrs).ca_pem == PEM


def test_a_missing_or_bogus_ca_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        parse_broker("mqtts://broker.example.org", tmp_path / "absent.crt")
    (tmp_path / "x.crt").write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM"):
        read_ca(tmp_path / "x.crt")


# --- fleet: up, scale, down --------------------------------------------------------------


def test_up_creates_exactly_n_labelled_limited_workers_with_unique_ids() -> None:
    client = FakeDocker()
    changes = fleet_of(client).up(spec(cpus=0.5, memory="256m", concurrency=2), 3)
    assert changes.created == ["dockercomp-worker-1", "dockercomp-worker-2", "dockercomp-worker-3"]
    records = list(client.containers.records.values())
    assert {c.status for c in records} == {"running"}
    assert len({c.environment[WORKER_ID_ENV] for c in records}) == 3
    for c in records:
        assert c.labels[d.LABEL_MANAGED_BY] == "installer"
        assert c.labels[d.LABEL_WORKER_ID] == c.environment[WORKER_ID_ENV]
        assert c.environment[BROKER_URL_ENV] == BROKER and c.environment[CONCURRENCY_ENV] == "2"
        assert c.host_config["restart_policy"] == {"Name": "unless-stopped"}
        assert c.host_config["nano_cpus"] == 500_000_000 and c.host_config["mem_limit"] == "256m"
        assert c.stop_timeout == 7


def test_running_up_again_changes_nothing() -> None:
    client = FakeDocker()
    fleet = fleet_of(client)
    fleet.up(spec(), 2)
    before = dict(client.containers.records)
    client.calls.clear()
    changes = fleet.up(spec(), 2)
    assert changes.kept == ["dockercomp-worker-1", "dockercomp-worker-2"]
    assert client.calls == [] and client.containers.records == before


def test_a_smaller_n_drains_the_extras_with_their_grace_and_keeps_the_rest() -> None:
    client = FakeDocker()
    fleet = fleet_of(client)
    fleet.up(spec(), 4)
    kept = {c.id for c in client.containers.records.values() if c.name in ("dockercomp-worker-1", "dockercomp-worker-2")}
    client.calls.clear()
    changes = fleet.up(spec(), 2)
    assert sorted(changes.drained) == ["dockercomp-worker-3", "dockercomp-worker-4"]
    assert {c.id for c in client.containers.records.values()} == kept
    for name in ("dockercomp-worker-3", "dockercomp-worker-4"):
        # docker stop = SIGTERM, then SIGKILL only after the grace period; removed afterwards.
        assert ("stop", name, 7) in client.calls
        assert client.calls.index(("stop", name, 7)) < client.calls.index(("remove", name))


def test_stopped_workers_are_started_and_changed_settings_recreate_them() -> None:
    client = FakeDocker()
    fleet = fleet_of(client)
    fleet.up(spec(), 2)
    client.containers.get("dockercomp-worker-1").status = "exited"
    assert fleet.up(spec(), 2).started == ["dockercomp-worker-1"]
    old_ids = set(client.containers.records)
    changes = fleet.up(spec(memory="2g"), 2)
    assert sorted(changes.replaced) == ["dockercomp-worker-1", "dockercomp-worker-2"]
    assert not old_ids & set(client.containers.records)
    assert {c.host_config["mem_limit"] for c in client.containers.records.values()} == {"2g"}


def test_down_and_scaling_never_touch_other_containers() -> None:
    client = FakeDocker()
    foreign = [
        client.containers.add_foreign("postgres"),
        # Looks like a worker, but was not made by the installer.
        client.containers.add_foreign("lookalike", {d.LABEL_ROLE: "worker", d.LABEL_SLOT: "1"}),
        # Made by the installer, but for another instance.
        client.containers.add_foreign("other-instance", {d.LABEL_MANAGED_BY: "installer", d.LABEL_ROLE: "worker",
                                                         d.LABEL_INSTANCE: "lab", d.LABEL_SLOT: "1"}),
    ]
    fleet = fleet_of(client)
    fleet.up(spec(), 3)
    fleet.up(spec(), 1)
    assert fleet.down() == ["dockercomp-worker-1"]
    assert names(client) == sorted(c.name for c in foreign)
    touched = {call[1] for call in client.calls if call[0] in ("stop", "remove", "start")}
    assert not touched & {c.name for c in foreign}


def test_a_foreign_container_holding_a_workers_name_is_reported_not_removed() -> None:
    client = FakeDocker()
    client.containers.add_foreign("dockercomp-worker-1")
    with pytest.raises(NameConflict) as caught:
        fleet_of(client).up(spec(), 1)
    assert "docker rm dockercomp-worker-1" in caught.value.fix
    assert names(client) == ["dockercomp-worker-1"]


# --- fleet: upgrade ----------------------------------------------------------------------


def test_upgrade_replaces_only_workers_on_an_old_image_one_by_one() -> None:
    client = FakeDocker()
    fleet = fleet_of(client)
    fleet.up(spec(), 2)
    ids_before = {c.labels[d.LABEL_WORKER_ID] for c in client.containers.records.values()}
    new = client.images.add(IMAGE)  # a rebuilt image under the same name
    client.calls.clear()
    assert fleet.upgrade(new, health_timeout=1) == ["dockercomp-worker-1", "dockercomp-worker-2"]
    assert {c.image_id for c in client.containers.records.values()} == {new.id}
    assert {c.labels[d.LABEL_WORKER_ID] for c in client.containers.records.values()} == ids_before
    # Rolling: worker 1 is replaced (stopped, removed, created, started) before worker 2 stops.
    order = [(call[0], call[1]) for call in client.calls]
    assert order.index(("start", "dockercomp-worker-1")) < order.index(("stop", "dockercomp-worker-2"))
    assert fleet.upgrade(new, health_timeout=1) == []


def test_upgrade_halts_at_the_first_unhealthy_worker() -> None:
    client = FakeDocker()
    fleet = fleet_of(client)
    fleet.up(spec(), 3)
    bad = client.images.add(IMAGE)
    client.health_after_start = lambda c: "unhealthy"
    with pytest.raises(UpgradeHalted) as caught:
        fleet.upgrade(bad, health_timeout=1)
    assert caught.value.container == "dockercomp-worker-1"
    untouched = [c for c in client.containers.records.values() if c.image_id != bad.id]
    assert sorted(c.name for c in untouched) == ["dockercomp-worker-2", "dockercomp-worker-3"]


# --- image -------------------------------------------------------------------------------


def test_a_missing_unpullable_image_says_how_to_get_one() -> None:
    client = FakeDocker(images=())
    with pytest.raises(ImageUnavailable) as caught:
        ensure_image(client, "lab/worker:1", allow_build=False)
    assert "--image-archive" in caught.value.fix and "make image" in caught.value.fix


def test_a_pullable_image_is_pulled_and_a_present_one_is_not() -> None:
    client = FakeDocker(images=())
    client.images.pullable.add("lab/worker:1")
    assert ensure_image(client, "lab/worker:1", allow_build=False).tags == ["lab/worker:1"]
    client.images.pullable.clear()
    assert ensure_image(client, "lab/worker:1", allow_build=False).tags == ["lab/worker:1"]  # present: no pull needed


def test_a_custom_image_is_never_rebuilt_from_dockercomp_sources() -> None:
    # In a checkout, upgrade may rebuild dockercomp/worker, but never a scientist's image.
    client = FakeDocker(images=("lab/worker:1",))
    before = client.images.get("lab/worker:1").id
    assert ensure_image(client, "lab/worker:1", refresh=True, checkout=REPO_ROOT).id == before


# --- CLI, in process, against the fake engine ----------------------------------------


def test_engine_problems_map_to_their_fixes() -> None:
    denied = diagnose(PermissionError(13, "Permission denied"), environ={})
    assert "usermod -aG docker" in denied.fix
    refused = diagnose(ConnectionRefusedError(111, "Connection refused"), environ={})
    assert "systemctl start docker" in refused.fix or "install" in refused.fix


def test_cli_up_and_status_against_the_fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeDocker()
    monkeypatch.setattr(cli, "connect", lambda: client)
    monkeypatch.setattr(cli, "check_broker", lambda settings: None)
    counted = Counters(workers={}, volunteer={"credit": 12.5}, reached=True)
    monkeypatch.setattr(cli, "coordinator_counters", lambda spec, ids: counted)
    runner = CliRunner()
    first = runner.invoke(cli.main, ["up", "--broker", BROKER, "--workers", "2"])
    assert first.exit_code == 0, first.output
    assert "created: dockercomp-worker-1, dockercomp-worker-2" in first.output
    # Re-running without --broker or --workers keeps the current settings and count.
    again = runner.invoke(cli.main, ["up"])
    assert again.exit_code == 0 and "unchanged: dockercomp-worker-1, dockercomp-worker-2" in again.output
    status = runner.invoke(cli.main, ["status", "--json"])
    rows = json.loads(status.output)
    assert [r["name"] for r in rows] == ["dockercomp-worker-1", "dockercomp-worker-2"]
    assert rows[0]["tasks_done"] is None  # the coordinator has not counted these workers
    assert {r["state"] for r in rows} == {"running"} and {r["health"] for r in rows} == {"healthy"}
    counted.workers = {rows[1]["worker_id"]: {"done": 7, "failed": 1, "credit": 3.5}}
    table = runner.invoke(cli.main, ["status"])
    assert "dockercomp-worker-2" in table.output and "your credit: 12.5" in table.output
    row_two = next(line for line in table.output.splitlines() if "dockercomp-worker-2" in line)
    assert "│ 7 " in row_two and "│ 1 " in row_two and "│ 3.5 " in row_two
    logs = runner.invoke(cli.main, ["logs", "2"])
    assert logs.output == "dockercomp-worker-2 says hello\n"
    down = runner.invoke(cli.main, ["down"])
    assert down.exit_code == 0 and "removed 2" in down.output


def test_cli_first_up_without_a_broker_asks_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "connect", lambda: FakeDocker())
    monkeypatch.delenv("DOCKERCOMP_BROKER", raising=False)
    result = CliRunner().invoke(cli.main, ["up"])
    assert result.exit_code == 2 and "--broker" in result.output


# --- volunteer controls and what the machine is doing ---------------------------------------


@pytest.mark.parametrize(
    ("host", "total", "per_worker", "workers", "expected"),
    [
        (8, None, None, None, (4, 1.0)),  # half the machine by default, one CPU each
        (2, None, None, None, (1, 1.0)),
        (1, None, None, None, (1, 1.0)),  # never less than one worker
        (8, None, None, 2, (2, 1.0)),
        (8, 3.0, None, 4, (4, 0.75)),  # --cpus is split evenly between the workers
        (8, 6.0, 2.0, None, (3, 2.0)),
        (4, 1.5, None, None, (1, 1.0)),
    ],
)
def test_the_cpu_budget_defaults_to_a_safe_share(host: int, total: float | None, per_worker: float | None,
                                                workers: int | None, expected: tuple[int, float]) -> None:
    assert cpu_plan(host, total, per_worker, workers) == expected


def test_a_cpu_budget_beyond_the_machine_is_refused() -> None:
    with pytest.raises(ConfigError, match="not possible"):
        cpu_plan(4, 6.0, None, None)


def test_workers_run_at_low_priority_unless_asked() -> None:
    _, host = spec().create_args(1, "host-abc123")
    assert host["cpu_shares"] == d.LOW_CPU_SHARES and host["oom_score_adj"] == d.LOW_OOM_SCORE_ADJ
    _, normal = spec(priority="normal").create_args(1, "host-abc123")
    assert "cpu_shares" not in normal and "oom_score_adj" not in normal


def test_docker_stats_become_cpu_percent_and_memory() -> None:
    raw = {"cpu_stats": {"cpu_usage": {"total_usage": 3_000}, "system_cpu_usage": 20_000, "online_cpus": 2},
           "precpu_stats": {"cpu_usage": {"total_usage": 1_000}, "system_cpu_usage": 10_000},
           "memory_stats": {"usage": 300 * 2**20, "limit": 2**30, "stats": {"inactive_file": 100 * 2**20}}}
    assert usage_of(raw) == {"cpu_percent": 40.0, "memory_bytes": 200 * 2**20, "memory_limit": 2**30}
    assert usage_of({}) is None  # a stopped container's empty sample


def test_a_broker_url_list_reaches_every_container_whole() -> None:
    # The nodes of a broker cluster: each agent fails over between them (broker/connection.py).
    listed = spec(broker="mqtt://alice:pw@10.0.0.1:1883,10.0.0.2:1884", network="host").validate(host_cpus=4)
    url = listed.environment("w1")[BROKER_URL_ENV]
    assert url == "mqtt://alice:pw@10.0.0.1:1883,10.0.0.2:1884"
    assert "pw" not in listed.to_label() and "10.0.0.2:1884" in listed.to_label()
