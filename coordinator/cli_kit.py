"""`dockercomp coordinator kit`: build the volunteers' kit, and serve it for a try.

Registered on the `main` group of coordinator/cli.py (which imports this module).
"""

from __future__ import annotations

import json
import ssl
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click

from dockercomp.broker.defaults import BROKER_CONFIG_DIR, BROKER_CONFIG_ENV
from dockercomp.coordinator import defaults
from dockercomp.coordinator.cli import command_errors, main
from dockercomp.coordinator.kit import KIT_JSON, KitError, build_kit


@main.group()
def kit() -> None:
    """The kit volunteers install from: build it, then serve it (or copy it to any web server)."""


def _say(message: str) -> None:
    click.echo(f"kit: {message}", err=True)


@kit.command("build")
@click.option("--url", required=True, help="Where the kit will be served, e.g. https://example.org/kit.")
@click.option("--dir", "config_dir", envvar=BROKER_CONFIG_ENV, default=BROKER_CONFIG_DIR, show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Broker config directory: its certs/ca.crt goes into the kit, `volunteers add` reads the kit here.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help=f"Folder to write the kit to [default: DIR/{defaults.KIT_DIR}].")
@click.option("--image", default=defaults.KIT_WORKER_IMAGE, show_default=True, help="Worker image.")
@click.option("--installer-image", default=defaults.KIT_INSTALLER_IMAGE, show_default=True,
              help="Installer image (`make image` builds both).")
@click.option("--tasks", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="A task package folder (like examples/custom-tasks/) to add to the worker image.")
@click.option("--registry", is_flag=True,
              help="Ship registry references pinned by digest (push the images first) instead of an image archive.")
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The broker's CA certificate [default: DIR/certs/ca.crt when it exists].")
@click.option("--wheel", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A dockercomp wheel to ship too (`make dist`), for volunteers running agents without Docker.")
@click.option("--json", "as_json", is_flag=True, help="Print what was built as JSON.")
@command_errors
def kit_build(url: str, config_dir: Path, out: Path | None, image: str, installer_image: str, tasks: Path | None,
              registry: bool, ca_file: Path | None, wheel: Path | None, as_json: bool) -> None:
    """Assemble install_me.sh, the images, the CA certificate and SHA256SUMS into one folder."""
    from dockercomp.broker.certs import CertPaths

    if ca_file is None and CertPaths.under(config_dir).ca_cert.exists():
        ca_file = CertPaths.under(config_dir).ca_cert
    made = build_kit(out or config_dir / defaults.KIT_DIR, url, worker_image=image, installer_image=installer_image,
                     tasks=tasks, registry=registry, ca_file=ca_file, wheel=wheel, say=_say)
    if as_json:
        click.echo(json.dumps(dict(made.to_json(), directory=str(made.directory))))
        return
    click.echo(f"kit built in {made.directory} for {made.url}")
    for name, digest in made.files.items():
        size = (made.directory / name).stat().st_size
        click.echo(f"  {digest[:16]}  {size:>11,} B  {name}")
    click.echo(f"SHA256SUMS: {made.sums_sha256}")
    click.echo(f"next: serve {made.directory} at {made.url} (any static web server, or "
               f"`dockercomp coordinator kit serve --dir {made.directory}`); "
               "`dockercomp coordinator volunteers add NAME` then prints each volunteer's one line")


class _QuietHandler(SimpleHTTPRequestHandler):
    """One line per request on stderr; the paths hold no secrets (passwords travel in the line)."""

    def log_message(self, format: str, *args: Any) -> None:
        click.echo(f"kit: {self.address_string()} {format % args}", err=True)


def make_server(directory: Path, host: str, port: int, cert: Path | None = None,
                key: Path | None = None) -> ThreadingHTTPServer:
    """An HTTP(S) server of `directory`, bound but not yet serving (port 0 picks a free one)."""
    if not (directory / KIT_JSON).exists():
        raise KitError(f"{directory} holds no kit ({KIT_JSON} is missing)", "run `dockercomp coordinator kit build` first")
    server = ThreadingHTTPServer((host, port), partial(_QuietHandler, directory=str(directory)))
    if cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key) if key else None)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


@kit.command("serve")
@click.option("--dir", "kit_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=Path(BROKER_CONFIG_DIR) / defaults.KIT_DIR, show_default=True, help="The kit folder.")
@click.option("--host", default=defaults.KIT_SERVE_HOST, show_default=True,
              help="Address to listen on (loopback: only this machine; 0.0.0.0 for everyone).")
@click.option("--port", type=click.IntRange(0, 65535), default=defaults.KIT_SERVE_PORT, show_default=True)
@click.option("--cert", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="TLS certificate (PEM, may hold the key too): serve HTTPS instead of HTTP.")
@click.option("--key", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="TLS private key (PEM).")
@command_errors
def kit_serve(kit_dir: Path, host: str, port: int, cert: Path | None, key: Path | None) -> None:
    """Serve the kit folder over HTTP (HTTPS with --cert) until Ctrl-C."""
    if key is not None and cert is None:
        raise click.UsageError("--key needs --cert")
    server = make_server(kit_dir, host, port, cert, key)
    scheme = "https" if cert else "http"
    bound_host, bound_port = server.server_address[:2]
    click.echo(f"serving {kit_dir} at {scheme}://{bound_host}:{bound_port}/ (Ctrl-C to stop)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    finally:
        server.server_close()
