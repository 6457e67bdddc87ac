"""Throwaway certificates for testing TLS to RabbitMQ, made with the ``openssl`` command.

One CA signs a server certificate (for ``localhost`` and ``127.0.0.1``) and a client
certificate; a second CA, unrelated to the first, is there to be the wrong one.
Keys are EC P-256 (quick to make), unencrypted and readable by all: a broker in a
container runs as its own user and must read them. Never use these for anything real.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DAYS = 7
"""Long enough for any test run, short enough that a leaked file is soon worthless."""

_SUBJECT = """\
[req]
distinguished_name = subject
prompt = no
[subject]
CN = {common_name}
"""
_EXTENSIONS = {
    "ca": """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
""",
    "server": """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {alt_names}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
""",
    "client": """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
""",
}


@dataclass(frozen=True)
class Certificates:
    """Paths of PEM files. ``client_cert`` and ``client_key`` are None if none was asked for."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None
    client_key: Path | None
    other_ca_file: Path
    """A CA that signed nothing here: trusting only it must fail verification."""


def make_certificates(
    directory: Path,
    *,
    client: bool = True,
    hostnames: Sequence[str] = ("localhost",),
    addresses: Sequence[str] = ("127.0.0.1",),
) -> Certificates:
    """Makes a CA, a server certificate for ``hostnames`` and ``addresses`` signed by it,
    a client certificate (unless ``client`` is false) and an unrelated CA, in ``directory``.

    ``directory`` is created if need be and made readable by all, as are the files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    alt_names = ", ".join([f"DNS:{name}" for name in hostnames] + [f"IP:{a}" for a in addresses])

    ca = _make(directory, "ca", "ca", "puller test CA")
    other_ca_file, _ = _make(directory, "other-ca", "ca", "puller unrelated test CA")
    server_cert, server_key = _make(
        directory, "server", "server", "puller test broker", alt_names=alt_names, issuer=ca
    )
    client_cert = client_key = None
    if client:
        client_cert, client_key = _make(directory, "client", "client", "guest", issuer=ca)
    for path in directory.iterdir():
        path.chmod(0o644)
    return Certificates(
        ca_file=ca[0],
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca_file=other_ca_file,
    )


def _make(
    directory: Path,
    name: str,
    kind: str,
    common_name: str,
    *,
    alt_names: str = "",
    issuer: tuple[Path, Path] | None = None,
) -> tuple[Path, Path]:
    """Writes ``NAME.pem`` and ``NAME.key``: a certificate with the extensions of ``kind``,
    signed by ``issuer`` (its certificate and key), or self-signed if there is none."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    config, request = directory / f"{name}.cnf", directory / f"{name}.csr"
    config.write_text(
        _SUBJECT.format(common_name=common_name)
        + "[ext]\n"
        + _EXTENSIONS[kind].format(alt_names=alt_names)
    )
    new_key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    try:
        if issuer is None:
            _openssl(
                "req", "-x509", *new_key, "-keyout", key, "-out", cert, "-days", str(DAYS),
                "-config", config, "-extensions", "ext",
            )  # fmt: skip
        else:
            _openssl("req", "-new", *new_key, "-keyout", key, "-out", request, "-config", config)
            _openssl(
                "x509", "-req", "-in", request, "-CA", issuer[0], "-CAkey", issuer[1],
                "-set_serial", str(secrets.randbits(63)), "-days", str(DAYS), "-out", cert,
                "-extfile", config, "-extensions", "ext",
            )  # fmt: skip
    finally:
        config.unlink()
        request.unlink(missing_ok=True)
    return cert, key


def _openssl(*args: str | Path) -> None:
    answer = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False
    )
    if answer.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {answer.stderr.strip()}")
