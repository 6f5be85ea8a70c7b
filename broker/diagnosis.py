"""Why a connection to the broker failed, in words a person can act on, and whether
retrying could ever help (a refused password or a protocol mismatch cannot)."""

from __future__ import annotations

import socket
import ssl

from dockercomp.broker.defaults import PROBE_TIMEOUT_SECONDS
from dockercomp.broker.errors import ConnectionRejected
from dockercomp.broker.settings import BrokerSettings
from dockercomp.exits import Exit


def describe_connect_error(exc: BaseException) -> str:
    """A cause a person can act on."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: is the broker running there? (`dockercomp broker serve` starts a local one)"
    if isinstance(exc, socket.gaierror):
        return "unknown host name: check the broker URL"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}): pass ?ca=/path/to/ca.pem in the URL"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason}): is that a TLS port, and mqtts:// the right scheme?"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "no answer (timed out): check host, port and firewall"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def ca_file_problem(settings: BrokerSettings, exc: BaseException) -> ConnectionRejected:
    """What is wrong with the ``?ca=`` file, naming it."""
    path = settings.ca_file or "(the system's trust store)"
    if isinstance(exc, FileNotFoundError):
        problem = f"the CA file {path} does not exist"
    elif isinstance(exc, PermissionError):
        problem = f"the CA file {path} cannot be read (permission denied)"
    elif isinstance(exc, ssl.SSLError):
        problem = f"the CA file {path} is not a PEM certificate ({exc.reason or exc})"
    else:
        problem = f"the CA file {path} cannot be read ({describe_connect_error(exc)})"
    return ConnectionRejected(settings.url, problem, "fix ?ca= in the broker URL: the path of the broker's CA "
                              "certificate (ca.crt, from `dockercomp broker certs init`)", exit_code=Exit.FILES)


def speaks(host: str, port: int, tls: bool, timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
    """Does ``host:port`` answer a TLS handshake (``tls``) or an MQTT CONNECT with a CONNACK?
    Asked once, after a connection failed in a way a protocol mismatch explains."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if tls:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                with context.wrap_socket(sock, server_hostname=host):
                    return True
            # MQTT 3.1.1 CONNECT, clean session, empty client id: any broker answers a CONNACK.
            sock.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x0a\x00\x00")
            return sock.recv(1) == b"\x20"
    except (OSError, ssl.SSLError):
        return False
