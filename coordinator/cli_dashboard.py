"""`dockercomp coordinator dashboard`: serve the observers' live page (coordinator/dashboard.py).

Registered on the `main` group of coordinator/cli.py (which imports this module).
"""

from __future__ import annotations

import json
import logging

import click

from dockercomp.broker.defaults import ROOT_TOPIC
from dockercomp.coordinator import defaults
from dockercomp.coordinator.cli import command_errors, json_option, main


@main.command(short_help="Serve the live dashboard page for observers.")
@click.option("--host", default=defaults.DASHBOARD_HOST, show_default=True,
              help="Address the page is served on (0.0.0.0: every interface).")
@click.option("--port", default=defaults.DASHBOARD_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="HTTP port of the page; 0 picks a free one.")
@click.option("--ws-url", metavar="URL",
              help="The broker's MQTT-over-WebSockets URL the browser connects to, e.g. ws://127.0.0.1:9001/mqtt "
                   "(`dockercomp broker serve --ws-port 9001`). Default: wss://<this page's host>:"
                   f"{defaults.DASHBOARD_WS_PORT}/mqtt, the shipped mosquitto.conf's listener.")
@click.option("--root", default=ROOT_TOPIC, show_default=True, help="Topic root of the status topics.")
@json_option
@command_errors
def dashboard(host: str, port: int, ws_url: str | None, root: str, as_json: bool) -> None:
    """Serve one static page that shows the run live: workers, jobs, credit, events.

    The browser subscribes to the broker's retained status topics itself (MQTT over
    WebSockets); this command only serves the page, so it needs no database and no broker
    account. When the broker wants one, the page asks for an observer account
    (`dockercomp coordinator volunteers add NAME --role observer`). Ctrl-C stops it.
    """
    from dockercomp.coordinator.dashboard import Dashboard, DashboardSettings

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Dashboard(DashboardSettings(host=host, port=port, ws_url=ws_url, root=root))
    broker = ws_url or f"wss://<page host>:{defaults.DASHBOARD_WS_PORT}/mqtt"
    if as_json:
        click.echo(json.dumps({"url": server.url, "ws_url": ws_url, "root": root}))
    else:
        click.echo(f"dashboard on {server.url} (the browser connects to {broker}) — Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
