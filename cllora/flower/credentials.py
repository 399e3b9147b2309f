"""TLS certificates for a SuperLink and authentication keys for SuperNodes (``cryptography``).

Usage::

    from cllora.flower.credentials import write_tls, write_node_keys
    write_tls(Path("certs"), hosts=["127.0.0.1", "link.example.org"])
    # certs/ca.crt (every SuperNode and the coordinator verify with it), certs/server.pem,
    # certs/server.key (the SuperLink's; keep the key on the SuperLink's machine)
    write_node_keys(Path("keys"), "hospital-a")
    # keys/hospital-a (the node's private key: stays on its machine), keys/hospital-a.pub
    # (what the coordinator registers: `flwr supernode register keys/hospital-a.pub`)

The CA signs one server certificate whose subject alternative names are ``hosts`` (IP
addresses or DNS names, as the SuperNodes dial them). Node keys are ECDSA P-384 in OpenSSH
format, what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
read. For production, a site's own PKI can replace both; these are for tests and first trials.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAYS = 365


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _certificate(
    subject: str, issuer: str, public_key, signer, *, ca: bool, hosts: list[str] = ()
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def write_tls(directory: Path, hosts: list[str]) -> dict[str, Path]:
    """A CA and the SuperLink's certificate for ``hosts``: paths ``ca``, ``cert``, ``key``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("cllora flower CA", "cllora flower CA", ca_key.public_key(), ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(hosts[0], "cllora flower CA", key.public_key(), ca_key, ca=False,
                        hosts=hosts)  # fmt: skip
    paths = {"ca": directory / "ca.crt", "cert": directory / "server.pem",
             "key": directory / "server.key"}  # fmt: skip
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(_pem_key(key))
    paths["key"].chmod(0o600)
    return paths


def write_node_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair: (private key, public key) paths, ``name`` and ``name.pub``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public
