"""Public keys registered with the SAM and the JWS algorithms each may use.

The allow-list is decided by the key, never by the token: an EC key verifies only
its curve's ES algorithm, an RSA key only RS*/PS*. ``none`` and HMAC algorithms are
never allowed, so an HMAC "signed" with a public key cannot pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey

__all__ = ["RegisteredKey", "load_public_key"]

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


@dataclass(frozen=True)
class RegisteredKey:
    """A parsed public key and the JWS algorithms it may verify."""

    jwk: ECKey | RSAKey
    algorithms: tuple[str, ...]


def load_public_key(pem: str) -> RegisteredKey:
    """Parse a PEM SubjectPublicKeyInfo; ``ValueError`` if unusable."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:  # cryptography's message is ours to drop
        raise ValueError(f"not a PEM public key ({type(exc).__name__})") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise ValueError(f"curve {key.curve.name} is not allowed")
        return RegisteredKey(ECKey.import_key(key), (alg,))
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError("RSA keys below 2048 bits are not allowed")
        return RegisteredKey(RSAKey.import_key(key), _RSA_ALGORITHMS)
    raise ValueError("only EC and RSA public keys are allowed")
