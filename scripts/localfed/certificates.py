"""Certificates and keys for a local trial of the Flower deployment runtime.

Writes into one folder:

* ``ca.crt``, ``ca.key``: a self-signed certificate authority (the SuperNodes' and the ``flwr``
  CLI's ``root-certificates``);
* ``server.pem``, ``server.key``: the SuperLink's TLS certificate, signed by that CA, valid for
  the given host names and IP addresses (``localhost`` and ``127.0.0.1`` by default);
* ``<name>`` and ``<name>.pub`` for every SuperNode name: an EC P-384 key pair in OpenSSH
  format, the SuperNode's identity for SuperNode authentication (``flower-supernode
  --auth-supernode-private-key <name>``; the public key is registered with ``flwr supernode
  register <name>.pub``).

For real devices, use certificates from your own CA with the server's real host name; the key
pairs can be made on each device with ``ssh-keygen -t ecdsa -b 384 -N '' -f <name>``.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hetlora local trial"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_tls_certificates(
    folder: Path | str,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 30,
) -> Path:
    """A CA and a SuperLink certificate for ``hosts`` (names or IP addresses) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("hetlora local CA"))
        .issuer_name(_name("hetlora local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    (folder / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / "ca.key", _pem_key(ca_key))
    (folder / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / SERVER_KEY, _pem_key(server_key))
    return folder


def make_node_key(folder: Path | str, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair for SuperNode authentication: ``<name>`` and ``<name>.pub`` (OpenSSH)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = folder / name
    public = folder / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode()
    )
    return private, public


def make_trial_credentials(
    folder: Path | str,
    node_names: Sequence[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
) -> Path:
    """Everything a local trial needs: TLS certificates and one key pair per SuperNode."""
    folder = make_tls_certificates(folder, hosts)
    for name in node_names:
        make_node_key(folder, name)
    return folder
