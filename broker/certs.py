"""TLS for a self-hosted broker: a private CA and a server certificate it signs.

``dockercomp broker certs init --host broker.example.org`` writes, into ``broker-config/certs/``::

    ca.crt       the CA certificate: give it to volunteers (agents verify the broker with it)
    ca.key       the CA's private key: only needed to issue server certificates; keep it here
    server.crt   the broker's certificate, valid for every --host (DNS names and IP addresses)
    server.key   the broker's private key (mosquitto.conf: certfile / keyfile)

Running it again keeps an existing CA (so volunteers' ca.crt stays valid) and issues a new
server certificate, e.g. for another host name. A broker with a certificate from a public CA
(Let's Encrypt) needs none of this: point certfile/keyfile at it; agents then verify it
against the system's trust store (no ``?ca=`` in their URL).

Agents verify by default: ``mqtts://user:pass@host:8883?ca=/path/ca.crt`` checks the chain
AND that the host name is in the certificate (broker/connection.py).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dockercomp.broker.defaults import CA_DAYS, SERVER_CERT_DAYS
from dockercomp.broker.errors import CertificateError
from dockercomp.broker.passwords import atomic_write
from dockercomp.exits import Exit

# Sub-directory of the broker's config directory holding the files below.
CERTS_SUBDIR = "certs"


@dataclass(frozen=True)
class CertPaths:
    """Where `certs init` puts each file."""

    directory: Path

    @classmethod
    def under(cls, config_dir: str | Path) -> CertPaths:
        return cls(Path(config_dir) / CERTS_SUBDIR)

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"


@dataclass(frozen=True)
class IssuedCerts:
    """What `init_certs` did, for the CLI's report."""

    ca_cert: str
    server_cert: str
    server_key: str
    hosts: tuple[str, ...]
    ca_created: bool
    expires: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in "/:@ ") or host.startswith("."):
                raise CertificateError(f"{host!r} is neither a host name nor an IP address",
                                       "give each --host as a DNS name or an IP address") from None
            names.append(x509.DNSName(host))
    return names


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dockercomp"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "dockercomp broker CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _load_ca(paths: CertPaths) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CertificateError(f"{exc.filename} is missing", "restore it, or start over with --new-ca "
                               "(volunteers then need the new ca.crt)", exit_code=Exit.FILES) from None
    except ValueError as exc:
        raise CertificateError(f"cannot read the CA in {paths.directory}: {exc}", "restore it, or use --new-ca",
                               exit_code=Exit.FILES) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{paths.ca_key} is not an EC key made by `certs init`", "use --new-ca",
                               exit_code=Exit.FILES)
    return key, cert


def _server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str],
                 days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def init_certs(config_dir: str | Path, hosts: Sequence[str], *, new_ca: bool = False,
               ca_days: int = CA_DAYS, server_days: int = SERVER_CERT_DAYS) -> IssuedCerts:
    """Makes (or keeps) the CA and issues a server certificate for ``hosts``."""
    hosts = list(dict.fromkeys(h.strip() for h in hosts if h.strip()))
    if not hosts:
        raise CertificateError("no host name given", "name at least one --host: the name volunteers use to "
                               "reach the broker")
    _subject_names(hosts)  # reject bad names before touching any file
    paths = CertPaths.under(config_dir)
    created = new_ca or not paths.ca_cert.exists()
    if created:
        ca_key, ca_cert = _make_ca(ca_days)
        # The CA key signs server certificates only: owner-only.
        atomic_write(paths.ca_key, _key_pem(ca_key), mode=0o600)
        atomic_write(paths.ca_cert, _cert_pem(ca_cert), mode=0o644)
    else:
        ca_key, ca_cert = _load_ca(paths)
    key, cert = _server_cert(ca_key, ca_cert, hosts, server_days)
    # Mosquitto 2.0 loads keyfile AFTER dropping to its own user (2.0.11 with a root-only key:
    # "Unable to load server key file ... Permission denied"), and in the eclipse-mosquitto
    # image that user (uid 1883) is not the host user who owns the file: so 0644, in a
    # directory only the scientist can write. On a shared host: chown 1883 + chmod 600.
    atomic_write(paths.server_key, _key_pem(key), mode=0o644)
    atomic_write(paths.server_cert, _cert_pem(cert) + _cert_pem(ca_cert), mode=0o644)
    return IssuedCerts(str(paths.ca_cert), str(paths.server_cert), str(paths.server_key), tuple(hosts),
                       created, cert.not_valid_after_utc.date().isoformat())


def certificate_hosts(path: str | Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*names.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]
