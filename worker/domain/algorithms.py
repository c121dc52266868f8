"""Key templates and signature algorithms the SAM supports, as pure data.

A signature algorithm is named by OID as in the CSC API. Choosing one yields a frozen
``SignatureScheme`` that says which key type it needs, which hash the DTBS/R must
come from and how the HSM is to be driven (``HsmMechanism``); the HSM adapter maps
that to PKCS#11 mechanisms.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from asn1crypto import algos
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from worker.domain.wire import decode_base64
from worker.errors import ErrorCode, SamError

__all__ = [
    "CURVES",
    "RSA_SIZES",
    "SIGNATURE_ALGORITHMS",
    "SUPPORTED_SIGNATURE_ALGORITHMS",
    "HsmMechanism",
    "KeySpec",
    "KeyType",
    "SignatureScheme",
    "ecdsa_signature_der",
    "key_spec_from_template",
    "pss_parameters",
    "signature_scheme",
]


class KeyType(StrEnum):
    """The key types of a key pair; the value is the ``key_template.algorithm`` spelling."""

    RSA = "RSA"
    EC = "ECDSA"


class HsmMechanism(StrEnum):
    """How the HSM signs a prepared input (see ``SignatureScheme.hsm_input``)."""

    RSA_PKCS = "RSA_PKCS"  # raw PKCS#1 v1.5 over a DigestInfo
    RSA_PSS = "RSA_PSS"  # RSASSA-PSS over the hash, MGF1 with the same hash
    ECDSA = "ECDSA"  # ECDSA over the hash, raw r||s out


@dataclass(frozen=True)
class Curve:
    """A supported EC curve: its canonical SEC name and its OID."""

    name: str
    oid: str


# The X9.62 aliases (prime256v1 …) name the same curves; the canonical name is the SEC one.
_P256 = Curve("secp256r1", "1.2.840.10045.3.1.7")
_P384 = Curve("secp384r1", "1.3.132.0.34")
_P521 = Curve("secp521r1", "1.3.132.0.35")
CURVES: dict[str, Curve] = {
    "secp256r1": _P256,
    "prime256v1": _P256,
    "secp384r1": _P384,
    "prime384v1": _P384,
    "secp521r1": _P521,
    "prime521v1": _P521,
}
RSA_SIZES = (2048, 3072, 4096)


@dataclass(frozen=True)
class KeySpec:
    """What ``key_pairs.create`` makes: RSA with ``size`` or EC on ``curve``."""

    key_type: KeyType
    size: int | None = None
    curve: Curve | None = None

    @property
    def description(self) -> str:
        if self.key_type is KeyType.RSA:
            return f"RSA-{self.size}"
        assert self.curve is not None
        return f"ECDSA-{self.curve.name}"


def key_spec_from_template(algorithm: str, size: int | None, named_curve: str | None) -> KeySpec:
    """Validate a ``key_template`` and return what to generate."""
    if algorithm == KeyType.RSA:
        if size not in RSA_SIZES:
            raise SamError(
                ErrorCode.unsupported_algorithm,
                f"RSA size must be one of {', '.join(map(str, RSA_SIZES))}",
            )
        return KeySpec(KeyType.RSA, size=size)
    if algorithm == KeyType.EC:
        curve = CURVES.get(named_curve or "")
        if curve is None:
            raise SamError(
                ErrorCode.unsupported_algorithm,
                f"named_curve must be one of {', '.join(CURVES)}",
            )
        return KeySpec(KeyType.EC, curve=curve)
    raise SamError(ErrorCode.unsupported_algorithm, "algorithm must be RSA or ECDSA")


@dataclass(frozen=True)
class _Hash:
    name: str
    oid: str
    size: int
    digest_info_prefix: bytes


_SHA256 = _Hash(
    "SHA-256",
    "2.16.840.1.101.3.4.2.1",
    32,
    bytes.fromhex("3031300d060960864801650304020105000420"),
)
_SHA384 = _Hash(
    "SHA-384",
    "2.16.840.1.101.3.4.2.2",
    48,
    bytes.fromhex("3041300d060960864801650304020205000430"),
)
_SHA512 = _Hash(
    "SHA-512",
    "2.16.840.1.101.3.4.2.3",
    64,
    bytes.fromhex("3051300d060960864801650304020305000440"),
)


@dataclass(frozen=True)
class SignatureScheme:
    """A supported signature algorithm, chosen by OID: the key type it needs, the hash the
    DTBS/R must come from and how the HSM signs. ``check_dtbs`` refuses a DTBS/R of the
    wrong length (``invalid_dtbs``)."""

    oid: str
    name: str
    key_type: KeyType
    hash: _Hash
    mechanism: HsmMechanism
    pss_salt_length: int | None = None
    parameters: bytes | None = None  # DER, as they go into an AlgorithmIdentifier

    @property
    def hash_name(self) -> str:
        return self.hash.name

    @property
    def hash_oid(self) -> str:
        return self.hash.oid

    @property
    def digest_size(self) -> int:
        return self.hash.size

    def check_dtbs(self, dtbs: bytes) -> None:
        if len(dtbs) != self.hash.size:
            raise SamError(
                ErrorCode.invalid_dtbs,
                f"{self.name} needs a {self.hash.size}-byte {self.hash.name} DTBS/R, got {len(dtbs)}",
            )

    def digest(self, data: bytes) -> bytes:
        """Hash ``data`` with this scheme's hash (for data the SAM itself must hash)."""
        return hashlib.new(self.hash.name.replace("-", "").lower(), data).digest()

    def hsm_input(self, dtbs: bytes) -> bytes:
        """What the HSM mechanism signs for this DTBS/R (a hash)."""
        if self.mechanism is HsmMechanism.RSA_PKCS:
            return self.hash.digest_info_prefix + dtbs
        return dtbs


_SCHEMES = {
    s.oid: s
    for s in (
        SignatureScheme(
            "1.2.840.113549.1.1.11", "sha256WithRSAEncryption", KeyType.RSA, _SHA256, HsmMechanism.RSA_PKCS
        ),
        SignatureScheme(
            "1.2.840.113549.1.1.12", "sha384WithRSAEncryption", KeyType.RSA, _SHA384, HsmMechanism.RSA_PKCS
        ),
        SignatureScheme(
            "1.2.840.113549.1.1.13", "sha512WithRSAEncryption", KeyType.RSA, _SHA512, HsmMechanism.RSA_PKCS
        ),
        SignatureScheme("1.2.840.10045.4.3.2", "ecdsa-with-SHA256", KeyType.EC, _SHA256, HsmMechanism.ECDSA),
        SignatureScheme("1.2.840.10045.4.3.3", "ecdsa-with-SHA384", KeyType.EC, _SHA384, HsmMechanism.ECDSA),
        SignatureScheme("1.2.840.10045.4.3.4", "ecdsa-with-SHA512", KeyType.EC, _SHA512, HsmMechanism.ECDSA),
    )
}
_HASHES_BY_NAME = {"sha256": _SHA256, "sha384": _SHA384, "sha512": _SHA512}
RSASSA_PSS = "1.2.840.113549.1.1.10"
# OID → name of every signature algorithm the SAM signs with, for help texts and refusals
SIGNATURE_ALGORITHMS = {
    **{oid: scheme.name for oid, scheme in _SCHEMES.items()},
    RSASSA_PSS: "RSASSA-PSS (SHA-256/384/512, with its parameters)",
}
SUPPORTED_SIGNATURE_ALGORITHMS = ", ".join(f"{oid} {name}" for oid, name in SIGNATURE_ALGORITHMS.items())


def _pss_scheme(parameters_b64: str | None) -> SignatureScheme:
    """RSASSA-PSS with explicit parameters (CSC ``signAlgoParams``): the hash and the
    MGF1 hash must be the same SHA-2, the salt as long as the hash, trailer field 1."""
    if not parameters_b64:
        # the ASN.1 defaults would be SHA-1: refuse rather than assume
        raise SamError(ErrorCode.invalid_algorithm_parameters, "RSASSA-PSS needs explicit parameters")
    try:
        der = decode_base64(parameters_b64, ErrorCode.invalid_algorithm_parameters, "RSASSA-PSS-params")
        params = algos.RSASSAPSSParams.load(der, strict=True)
        hash_name = params["hash_algorithm"]["algorithm"].native
        mgf = params["mask_gen_algorithm"]
        mgf_hash = mgf["parameters"]["algorithm"].native
        salt = int(params["salt_length"].native)
        trailer = params["trailer_field"].native
    except (ValueError, TypeError, KeyError) as exc:
        raise SamError(
            ErrorCode.invalid_algorithm_parameters, f"RSASSA-PSS-params do not parse ({type(exc).__name__})"
        ) from exc
    digest = _HASHES_BY_NAME.get(str(hash_name))
    if digest is None or mgf["algorithm"].native != "mgf1" or mgf_hash != hash_name:
        raise SamError(
            ErrorCode.invalid_algorithm_parameters, "RSASSA-PSS needs SHA-2 with MGF1 of the same hash"
        )
    if salt != digest.size or trailer not in ("trailer_field_bc", 1):
        raise SamError(ErrorCode.invalid_algorithm_parameters, "RSASSA-PSS salt must be as long as the hash")
    return SignatureScheme(
        RSASSA_PSS, f"RSASSA-PSS-{digest.name}", KeyType.RSA, digest, HsmMechanism.RSA_PSS, salt, der
    )


def pss_parameters(hash_name: str) -> bytes:
    """DER RSASSA-PSS-params for SHA-256/384/512 (``"sha256"`` …), as a caller sends them."""
    digest = _HASHES_BY_NAME[hash_name]
    der: bytes = algos.RSASSAPSSParams(
        {
            "hash_algorithm": {"algorithm": hash_name},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": hash_name}},
            "salt_length": digest.size,
            "trailer_field": "trailer_field_bc",
        }
    ).dump()
    return der


def signature_scheme(oid: str, key_type: KeyType, parameters_b64: str | None = None) -> SignatureScheme:
    """The scheme for ``oid``, refused if unknown or not fit for ``key_type``."""
    scheme = _pss_scheme(parameters_b64) if oid == RSASSA_PSS else _SCHEMES.get(oid)
    if scheme is None:
        raise SamError(
            ErrorCode.unsupported_algorithm,
            f"signature algorithm {oid!r} is not supported; supported: {SUPPORTED_SIGNATURE_ALGORITHMS}",
        )
    if scheme.key_type is not key_type:
        raise SamError(
            ErrorCode.algorithm_key_mismatch,
            f"{scheme.name} does not fit a {key_type.value} key pair",
        )
    return scheme


def ecdsa_signature_der(raw: bytes) -> bytes:
    """The DER ECDSA-Sig-Value of a raw r‖s signature (as PKCS#11 ``CKM_ECDSA`` and JWS
    ES256 have it), for X.509, CMS and the CSC API."""
    half = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
