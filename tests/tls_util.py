"""Throwaway certificates and TLS contexts for the TLS tests.

Why it exists: testing TLS and mutual TLS needs a small PKI (a CA, a server certificate the
clients accept for ``localhost`` and ``127.0.0.1``, a client certificate that CA signed) plus
one that must be refused (a second, unrelated "rogue" CA with its own client certificate).
Checked-in certificates expire and invite reuse of their keys; this module makes fresh ones
with the ``openssl`` command line in a temporary directory (EC P-256 keys: fast), once per
test session (the ``tls_files`` fixture in ``conftest.py``), and builds the
:class:`ssl.SSLContext` objects the tests hand to clients and fake servers.
"""

from __future__ import annotations

import secrets
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TLSFiles", "client_context", "have_openssl", "make_tls_files", "server_context"]

_DAYS = "2"
_CA_EXT = (
    "basicConstraints=critical,CA:TRUE\n"
    "keyUsage=critical,keyCertSign,cRLSign\n"
    "subjectKeyIdentifier=hash\n"
)
_SERVER_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid\n"
)
_CLIENT_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature\n"
    "extendedKeyUsage=clientAuth\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid\n"
)


@dataclass(frozen=True)
class TLSFiles:
    """Paths (as str) of the PEM files :func:`make_tls_files` wrote."""

    directory: str
    ca: str
    """The CA certificate that signed the server and client certificates."""
    server_cert: str
    """Certificate for ``localhost`` and IP ``127.0.0.1`` (subjectAltName), signed by :attr:`ca`."""
    server_key: str
    client_cert: str
    """A backend's client certificate (CN ``backend-1``), signed by :attr:`ca`."""
    client_key: str
    rogue_ca: str
    """A second CA, unrelated to :attr:`ca`."""
    rogue_client_cert: str
    """A client certificate signed by :attr:`rogue_ca`: a broker trusting :attr:`ca` refuses it."""
    rogue_client_key: str


def have_openssl() -> bool:
    """Whether the ``openssl`` command is on the PATH."""
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


def _new_key(cwd: Path, name: str) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name, cwd=cwd)


def _make_ca(cwd: Path, stem: str, common_name: str) -> None:
    _new_key(cwd, f"{stem}.key")
    (cwd / f"{stem}.ext").write_text(_CA_EXT)
    _openssl("req", "-new", "-key", f"{stem}.key", "-subj", f"/CN={common_name}", "-out", f"{stem}.csr", cwd=cwd)
    _openssl(
        "x509", "-req", "-in", f"{stem}.csr", "-signkey", f"{stem}.key", "-days", _DAYS, "-sha256",
        "-set_serial", str(secrets.randbits(63)), "-extfile", f"{stem}.ext", "-out", f"{stem}.pem",
        cwd=cwd,
    )  # fmt: skip


def _make_leaf(cwd: Path, stem: str, common_name: str, ca: str, ext: str) -> None:
    _new_key(cwd, f"{stem}.key")
    (cwd / f"{stem}.ext").write_text(ext)
    _openssl("req", "-new", "-key", f"{stem}.key", "-subj", f"/CN={common_name}", "-out", f"{stem}.csr", cwd=cwd)
    _openssl(
        "x509", "-req", "-in", f"{stem}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-days", _DAYS,
        "-sha256", "-set_serial", str(secrets.randbits(63)), "-extfile", f"{stem}.ext", "-out", f"{stem}.pem",
        cwd=cwd,
    )  # fmt: skip


def make_tls_files(directory: str | Path) -> TLSFiles:
    """Write a CA, a server certificate, a client certificate and a rogue CA with its own
    client certificate into ``directory`` (created if needed); needs the ``openssl`` command."""
    cwd = Path(directory)
    cwd.mkdir(parents=True, exist_ok=True)
    _make_ca(cwd, "ca", "PyStrands test CA")
    _make_leaf(cwd, "server", "localhost", "ca", _SERVER_EXT)
    _make_leaf(cwd, "client", "backend-1", "ca", _CLIENT_EXT)
    _make_ca(cwd, "rogue-ca", "Rogue test CA")
    _make_leaf(cwd, "rogue-client", "rogue-backend", "rogue-ca", _CLIENT_EXT)
    p = {name: str(cwd / name) for name in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key",
        "rogue-ca.pem", "rogue-client.pem", "rogue-client.key",
    )}  # fmt: skip
    return TLSFiles(
        directory=str(cwd),
        ca=p["ca.pem"],
        server_cert=p["server.pem"],
        server_key=p["server.key"],
        client_cert=p["client.pem"],
        client_key=p["client.key"],
        rogue_ca=p["rogue-ca.pem"],
        rogue_client_cert=p["rogue-client.pem"],
        rogue_client_key=p["rogue-client.key"],
    )


def client_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client context trusting only ``ca`` (hostname checked), presenting ``cert``/``key``
    when given (mutual TLS)."""
    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A server context (for the tests' fake brokers) serving ``cert``; with ``client_ca``,
    clients must present a certificate that CA signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
