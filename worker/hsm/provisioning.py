"""Creating and finding the SAM's own keys in a token, for ``sam-admin``.

``sam-admin create`` makes the KEK, the state (sealing) key, the audit key and the
factor MAC key inside the token — token objects, sensitive, never extractable — and
``sam-admin initialize`` / ``rotate-kek`` check for or add them. The worker itself only
uses them, through ``Pkcs11Hsm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from worker.domain import algorithms
from worker.errors import ErrorCode, SamError
from worker.hsm.pkcs11_errors import translated
from worker.hsm.pkcs11_hsm import spki_of

__all__ = ["ProvisionedKeys", "create_kek", "provision_sam_keys", "token_has", "token_public_key_pem"]

_P256 = algorithms.CURVES["secp256r1"].oid


def _spki_pem(spki_der: bytes) -> str:
    key = serialization.load_der_public_key(spki_der)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@dataclass(frozen=True)
class ProvisionedKeys:
    """The labels of the keys just created, and the public halves the configuration
    publishes (the state key opens seals, the audit key verifies checkpoints)."""

    kek_label: str
    state_key_label: str
    state_public_key_pem: str
    audit_key_label: str
    audit_public_key_pem: str
    factor_key_label: str


def _refuse_existing(session: Any, *labels: str) -> None:
    for label in labels:
        if list(session.get_objects({Attribute.LABEL: label})):
            raise SamError(ErrorCode.hsm_unavailable, f"the token already holds {label!r}")


def _secret_key(session: Any, key_type: KeyType, label: str, capabilities: MechanismFlag) -> None:
    """A 256-bit token secret key for ``capabilities`` only, sensitive, never extractable."""
    session.generate_key(
        key_type,
        256,
        label=label,
        store=True,
        capabilities=capabilities,
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
    )


def create_kek(session: Any, label: str) -> None:
    """A token AES-256 key that only wraps and unwraps, never extractable; refused if
    the label is taken."""
    with translated("KEK creation"):
        _refuse_existing(session, label)
        _secret_key(session, KeyType.AES, label, MechanismFlag.WRAP | MechanismFlag.UNWRAP)


def token_has(session: Any, label: str) -> bool:
    """Whether the token holds an object with ``label``."""
    with translated("key lookup"):
        return bool(list(session.get_objects({Attribute.LABEL: label})))


def token_public_key_pem(session: Any, label: str) -> str:
    """The PEM public key of the token's EC key pair ``label``."""
    with translated("public key lookup"):
        return _spki_pem(
            spki_of(session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label), KeyType.EC)
        )


def provision_sam_keys(session: Any, suffix: str) -> ProvisionedKeys:
    """Create the KEK, the state key, the audit key and the factor MAC key inside the
    token; refused if any label is taken. ``suffix`` keeps labels unique so a KEK
    rotation can add keys beside the old ones."""
    kek_label, state_label, audit_label, factor_label = (
        f"sam-{name}-{suffix}" for name in ("kek", "state", "audit", "factor")
    )
    _refuse_existing(session, kek_label, state_label, audit_label, factor_label)
    create_kek(session, kek_label)
    with translated("key provisioning"):
        _secret_key(session, KeyType.GENERIC_SECRET, factor_label, MechanismFlag.SIGN | MechanismFlag.VERIFY)
        pems = []
        for label in (state_label, audit_label):
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_P256)}, local=True
            )
            public, _ = params.generate_keypair(
                store=True,
                label=label,
                public_template={Attribute.VERIFY: True},
                private_template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                },
            )
            pems.append(_spki_pem(spki_of(public, KeyType.EC)))
    return ProvisionedKeys(kek_label, state_label, pems[0], audit_label, pems[1], factor_label)
