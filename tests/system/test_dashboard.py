"""`dockercomp coordinator dashboard` in a real headless Chromium (Debian's `chromium`, driven by
Playwright; Playwright never downloads a browser here): the page connects to the broker over
MQTT on WebSockets by itself and shows the run live.

- embedded broker (`dockercomp broker serve --ws-port`), `coordinator serve`, two agents: a
  job's progress reaches 100 %, a killed agent shows as lost within 10 s, a screenshot is saved;
- the shipped mosquitto.conf (secure: passwords, ACL, wss): the page asks for an observer
  account, says so clearly when refused, then sees the status but nothing on worker topics;
- every request the page makes goes to the server that served it or to the broker;
- the demo (`make demo`, here with --keep) serves the page it prints: README's screenshot.

Set DOCKERCOMP_UPDATE_SCREENSHOT=1 to refresh docs/dashboard.png (README, Observers) too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dockercomp.broker.acl import Role
from dockercomp.broker.processes import AmqttProcess, free_port
from tests.support import REPO_ROOT, missing, require, wait_until
from tests.support.processes import Processes
from tests.support.security import SecureBroker, make_config

pytestmark = [pytest.mark.real, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"
expect: Any = None  # playwright.sync_api.expect, imported by the `browser` fixture (playwright may be missing)
# Seconds the page gets to show a killed agent as lost (the bound).
LOST_WITHIN = 10.0


class WebSocketAmqtt(AmqttProcess):
    """`dockercomp broker serve --ws-port N`: the embedded broker with its WebSockets listener."""

    def __init__(self, workdir: Path, security_dir: Path | None = None) -> None:
        super().__init__(workdir, security_dir=security_dir)
        self.ws_port = free_port(self.host)

    def _command(self, port: int) -> list[str]:
        return [*super()._command(port), "--ws-port", str(self.ws_port)]

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.ws_port}/mqtt"


def mqtt_client(port: int, username: str | None = None, password: str | None = None,
                transport: str = "websockets") -> tuple[Any, list[str], str]:
    """A paho client, by default over WebSockets (path /mqtt); returns it, the topics it
    receives, and the CONNACK's reason ("Success" or why it was refused)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{transport}-{time.monotonic_ns()}",
                         transport=transport)  # type: ignore[arg-type]
    if transport == "websockets":
        client.ws_set_options(path="/mqtt")
    if username is not None:
        client.username_pw_set(username, password)
    received: list[str] = []
    answered: list[str] = []
    client.on_message = lambda c, u, message: received.append(message.topic)
    client.on_connect = lambda c, u, flags, reason, props: answered.append(str(reason))
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    wait_until(lambda: answered, timeout=10)
    return client, received, answered[0]


def test_broker_serve_ws_port_applies_the_same_accounts_and_acl(tmp_path: Path) -> None:
    # Given the embedded broker with a password file, ACL and a WebSockets listener
    accounts, coordinator = make_config(tmp_path / "broker-config")
    watcher = accounts.add("watcher", Role.OBSERVER)
    broker = WebSocketAmqtt(tmp_path / "amqtt", security_dir=accounts.directory).start()
    clients = []
    try:
        assert f"and ws://127.0.0.1:{broker.ws_port}/mqtt" in broker.log()
        # Then over WebSockets an anonymous client and a wrong password are refused ...
        for username, password in ((None, None), (watcher.name, "wrong")):
            client, _, reason = mqtt_client(broker.ws_port, username, password)
            clients.append(client)
            assert reason != "Success", (username, reason)
        # ... and the observer reads status, never a worker's topics
        sender, _, reason = mqtt_client(broker.port, coordinator.name, coordinator.password, transport="tcp")
        clients.append(sender)
        assert reason == "Success"
        observer, received, reason = mqtt_client(broker.ws_port, watcher.name, watcher.password)
        clients.append(observer)
        assert reason == "Success"
        observer.subscribe([("dockercomp/workers/#", 1), ("dockercomp/status/#", 1)])
        # Retained, so each arrives whenever the subscription takes effect, if the ACL lets it.
        sender.publish("dockercomp/workers/alice/w1/tasks", b"task", qos=1).wait_for_publish(5)
        sender.publish("dockercomp/workers/alice/w1/presence", b"presence", qos=1, retain=True).wait_for_publish(5)
        sender.publish("dockercomp/status/summary", b"{}", qos=1, retain=True).wait_for_publish(5)
        wait_until(lambda: "dockercomp/status/summary" in received, timeout=10)
        assert [t for t in received if t.startswith("dockercomp/workers/")] == []
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        broker.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"  # never fetch a browser from the internet
    require(Path(CHROMIUM).exists(), "Debian's chromium", "apt-get install -y chromium (or run `make system`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright", "pip install -e '.[test]' (or run `make venv`)")
    global expect
    from playwright.sync_api import expect as playwright_expect
    expect = playwright_expect
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Recorded:
    """A page with every HTTP request and WebSocket it opened recorded."""

    def __init__(self, browser: Any, **context: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1200, "height": 900}, **context)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("websocket", lambda socket: self.requests.append(socket.url))

    def text(self, selector: str) -> str:
        return str(self.page.locator(selector).inner_text())

    def hosts(self) -> set[str]:
        """host:port of every request but inline data."""
        hosts = set()
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme != "data":
                hosts.add(f"{parts.hostname}:{parts.port}")
        return hosts

    def assert_asked_only(self, page_url: str, broker_host: str, ws_port: int) -> None:
        """Every request went to the server that served the page or to the broker."""
        served_by = f"{urlsplit(page_url).hostname}:{urlsplit(page_url).port}"
        assert self.hosts() == {served_by, f"{broker_host}:{ws_port}"}, self.requests


def close(request: pytest.FixtureRequest, page: Recorded | None, *groups: Processes) -> None:
    """Closes the page and stops the processes; their logs are printed if the test failed."""
    if page is not None:
        page.context.close()
    for group in groups:
        if getattr(getattr(request.node, "report_call", None), "failed", False):
            print(group.log())
        group.stop_all()


def start_dashboard(procs: Processes, ws_url: str) -> str:
    """`dockercomp coordinator dashboard --port 0 --json`; returns the page's URL."""
    procs.start("dashboard", ["dockercomp.coordinator", "dashboard", "--port", "0", "--ws-url", ws_url, "--json"])
    line = wait_until(lambda: next((l for l in procs.log("dashboard").splitlines() if l.startswith("{")), None))
    url = json.loads(line)["url"]
    assert isinstance(url, str)
    return url


def write_tasks(path: Path, count: int, seconds: float) -> Path:
    path.write_text("".join(f"[{seconds}]\n" for _ in range(count)))
    return path


def test_the_page_follows_a_job_to_100_percent_and_shows_a_killed_agent_lost(
        browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    broker = WebSocketAmqtt(tmp_path / "amqtt").start()
    procs = Processes(broker.url, tmp_path / "logs")
    page = None
    try:
        db = str(tmp_path / "coordinator.db")
        procs.serve(db)
        procs.agent("w1")
        procs.agent("w2")
        url = start_dashboard(procs, broker.ws_url)
        page = Recorded(browser)
        page.page.goto(url)
        expect(page.page.locator("#online")).to_have_text("2", timeout=20_000)
        assert page.text("#coordinator") == "up"
        assert page.page.locator("#login").is_hidden()  # the embedded broker lets anyone in: no form

        procs.cli("submit", "sleep", str(write_tasks(tmp_path / "naps.jsonl", 40, 0.1)), "--job", "naps", "--db", db)
        job = page.page.locator("#jobs tbody tr", has_text="naps")
        job.locator(".pct", has_text="100 %").wait_for(timeout=60_000)
        assert "done" in job.inner_text()
        assert job.locator("td").nth(4).inner_text() == "40"  # done
        assert "job 1 (naps) done" in page.text("#events")
        # Volunteers' credit, from the retained status/volunteers/{volunteer}: a replicated job
        # (both workers are volunteer "local": replicas go to distinct workers) validates values.
        procs.cli("submit", "sleep", str(write_tasks(tmp_path / "checked.jsonl", 10, 0.1)), "--job", "checked",
                  "--replicas", "2", "--quorum", "2", "--distinct", "worker", "--db", db)
        credit = page.page.locator("#volunteers tbody tr", has_text="local")
        expect(credit.locator("td").nth(2)).to_have_text("20", timeout=60_000)  # validated values
        assert float(credit.locator("td").nth(1).inner_text()) >= 1.0  # 20 x 0.1 CPU-seconds of sleep
        procs.kill("w2")
        killed = time.monotonic()
        lost_row = page.page.locator("#workers tbody tr.lost", has_text="w2")
        lost_row.wait_for(timeout=LOST_WITHIN * 1000)
        assert time.monotonic() - killed < LOST_WITHIN
        assert "lost" in page.text("#events")
        expect(page.page.locator("#lost")).to_have_text("1", timeout=5_000)
        # Sortable: clicking "State" puts the lost worker first, clicking again last.
        page.page.click("#workers th[data-key=state]")
        assert page.page.locator("#workers tbody tr").first.get_attribute("class") == "lost"
        page.page.click("#workers th[data-key=state]")
        assert page.page.locator("#workers tbody tr").last.get_attribute("class") == "lost"
        page.page.click("#workers th[data-key=state]")

        shot = tmp_path / "dashboard.png"
        page.page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        page.assert_asked_only(url, broker.host, broker.ws_port)
    finally:
        close(request, page, procs)
        broker.stop()


def test_an_observer_on_the_shipped_mosquitto_sees_status_but_no_worker_topic(
        browser: Any, secure_mosquitto: SecureBroker, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    secure = secure_mosquitto
    alice = secure.add("alice")
    watcher = secure.add("watcher", Role.OBSERVER)
    mosquitto = secure.process
    ws_url = f"wss://{mosquitto.host}:{mosquitto.ws_port}/mqtt"  # mosquitto.conf's listener 8884, moved
    db = str(tmp_path / "coordinator.db")
    coordinator = Processes(secure.url(secure.coordinator), tmp_path / "logs")
    agents = Processes(secure.url(alice), tmp_path / "logs")
    page = None
    try:
        coordinator.serve(db)
        agents.agent("w1")
        url = start_dashboard(coordinator, ws_url)
        # The test CA is not one Chromium knows; the certificate itself is test_security's business.
        page = Recorded(browser, ignore_https_errors=True)
        page.page.goto(url)

        # Anonymous first: the broker wants an account, and the page asks for one.
        page.page.locator("#login").wait_for(timeout=20_000)
        assert "observer account" in page.text("#login-why")
        page.page.fill("#username", watcher.name)
        page.page.fill("#password", "not-the-password")
        page.page.click("#login button")
        page.page.locator("#message", has_text="refused").wait_for(timeout=20_000)
        assert "wrong user name or password" in page.text("#message") or "not authorized" in page.text("#message")
        assert page.page.locator("#login").is_visible()

        page.page.fill("#password", watcher.password)
        page.page.click("#login button")
        page.page.locator("#connection", has_text=f"connected as {watcher.name}").wait_for(timeout=20_000)
        page.page.locator("#workers tbody tr", has_text="alice/w1").wait_for(timeout=20_000)
        assert page.text("#coordinator") == "up"

        # From the page's own connection: the worker topics deliver nothing (Mosquitto grants
        # the SUBSCRIBE and filters every message by the ACL), though the worker's presence is
        # retained there and its tasks flow once a job runs.
        granted = page.page.evaluate("dashboard.probe('dockercomp/workers/#')")
        assert granted == [1]
        coordinator.cli("submit", "sleep", str(write_tasks(tmp_path / "naps.jsonl", 10, 0.05)), "--job", "naps",
                        "--db", db)
        job = page.page.locator("#jobs tbody tr", has_text="naps")
        job.locator(".pct", has_text="100 %").wait_for(timeout=60_000)
        assert page.page.evaluate("dashboard.probes['dockercomp/workers/#']") == []
        # The same probe on a topic the ACL lets observers read gets its retained message at once.
        assert page.page.evaluate("dashboard.probe('dockercomp/status/workers/+/+')") == [1]
        wait_until(lambda: page.page.evaluate("dashboard.probes['dockercomp/status/workers/+/+']")
                   == ["dockercomp/status/workers/alice/w1"])
        assert page.page.evaluate("dashboard.probes['dockercomp/workers/#']") == []

        page.assert_asked_only(url, mosquitto.host, mosquitto.ws_port)
    finally:
        close(request, page, agents, coordinator)


def test_the_demo_serves_its_dashboard_and_the_page_shows_the_run(
        browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # Given `make demo` with --keep (broker, coordinator, agents and page stay up after the job)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "120"}
    demo = subprocess.Popen([sys.executable, "-m", "dockercomp.demo", "--out", str(tmp_path / "out"), "--keep"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    page = None
    output = ""
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # bounded by the module's timeout
            output += line
            if "Ctrl-C stops everything" in line:
                break
        # When the scientist opens the page the demo printed
        found = re.search(r"dashboard (http://\S+/)", output.replace("\n", " "))
        assert found, output
        page = Recorded(browser)
        page.page.goto(found.group(1))
        # Then it shows the demo's job done, its workers online and the coordinator up
        job = page.page.locator("#jobs tbody tr", has_text="mandelbrot")
        job.locator(".pct", has_text="100 %").wait_for(timeout=30_000)
        expect(page.page.locator("#online")).to_have_text(re.compile(r"[1-9]"), timeout=10_000)
        assert page.text("#coordinator") == "up"
        shot = tmp_path / "dashboard.png"
        page.page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("DOCKERCOMP_UPDATE_SCREENSHOT"):
            shutil.copyfile(shot, SCREENSHOT)  # README, Observers
    finally:
        if page is not None:
            page.context.close()
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
        if getattr(getattr(request.node, "report_call", None), "failed", False):
            print(output + rest)
    assert demo.returncode == 0, output + rest
