"""TEST TOOLING: a throw-away CA with broker, worker, administrator, SSA and SIEM
certificates, plus the JWS keys the callers sign requests with."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevPki", "private_key_pem", "public_key_pem"]


def private_key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (test tooling: never for a real key)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    """The key's public half as a PEM SubjectPublicKeyInfo, as the configurations register it."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600 if secret else 0o644)


class DevPki:
    """Files under ``root``: ``ca.pem``, and per name ``<name>/cert.pem``, ``key.pem``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_file = root / "ca.pem"
        self._ca_key_file = root / "ca.key"

    def ensure_ca(self) -> None:
        if self.ca_file.exists():
            return
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sam-worker dev CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        _write(self._ca_key_file, private_key_pem(key), secret=True)
        _write(self.ca_file, cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, server: bool = False, timestamping: bool = False) -> Path:
        """A certificate with CN=``name`` (client, server for 127.0.0.1/localhost, or a
        time-stamping authority's)."""
        folder = self.root / name
        if (folder / "cert.pem").exists():
            return folder
        ca_key = serialization.load_pem_private_key(self._ca_key_file.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        # pyHanko's test TSA signs with RSA only
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
            rsa.generate_private_key(65537, 2048) if timestamping else ec.generate_private_key(ec.SECP256R1())
        )
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.TIME_STAMPING]
                    if timestamping
                    else [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=timestamping,  # RFC 3161: a TSA's extended key usage is critical
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(folder / "key.pem", private_key_pem(key), secret=True)
        _write(folder / "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
        return folder

    def issue_from_request(
        self, request_der: bytes, days: int = 365, *, valid_for: datetime.timedelta | None = None
    ) -> bytes:
        """Act as the dev CA: check a PKCS#10 request's signature and certify it (DER), for
        ``days`` or exactly ``valid_for`` from now."""
        request = x509.load_der_x509_csr(request_der)
        if not request.is_signature_valid:
            raise ValueError("the certification request's signature does not verify")
        ca_key = serialization.load_pem_private_key(self._ca_key_file.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(request.subject)
            .issuer_name(ca.subject)
            .public_key(request.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + (valid_for if valid_for is not None else datetime.timedelta(days=days)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, True, False, False, False, False, False, False, False), critical=True
            )
            .sign(ca_key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.DER)

    def jws_key(self, name: str) -> Path:
        """The key ``name`` signs requests (or SADs) with: ``<name>/jws-key.pem`` and ``jws-pub.pem``."""
        folder = self.root / name
        path = folder / "jws-key.pem"
        if not path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            _write(path, private_key_pem(key), secret=True)
            _write(folder / "jws-pub.pem", public_key_pem(key).encode())
        return path
