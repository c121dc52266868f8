"""One PKCS#11 session of the HSM lane (python-pkcs11; SoftHSM2 by default).

A ``Pkcs11Session`` is used by one thread at a time; ``lane.HsmLane`` holds several and
makes them the ``Hsm`` port. Provisioning the SAM's own keys lives in ``provisioning``,
the library's initialization for threads in ``library``, SoftHSM's process-level
workarounds in ``softhsm``, and the one translation of python-pkcs11's exceptions in
``pkcs11_errors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from worker.domain import algorithms
from worker.domain.algorithms import HsmMechanism, KeySpec, SignatureScheme
from worker.errors import ErrorCode, SamError
from worker.hsm import softhsm
from worker.hsm.pkcs11_errors import INPUT_REJECTED, translated
from worker.ports import GeneratedKeyPair, WrappedKey

__all__ = ["UNWRAP_TEMPLATE", "Pkcs11Session", "Token", "open_session", "spki_of"]

_WRAP_MECHANISMS = {"AES_KEY_WRAP_PAD": Mechanism.AES_KEY_WRAP_PAD}
_SIGN_MECHANISMS = {
    HsmMechanism.RSA_PKCS: Mechanism.RSA_PKCS,
    HsmMechanism.RSA_PSS: Mechanism.RSA_PKCS_PSS,
    HsmMechanism.ECDSA: Mechanism.ECDSA,
}
_PSS_HASHES = {
    "SHA-256": (Mechanism.SHA256, MGF.SHA256),
    "SHA-384": (Mechanism.SHA384, MGF.SHA384),
    "SHA-512": (Mechanism.SHA512, MGF.SHA512),
}

# SoftHSM refuses an unwrap template that carries these (AttributeTypeInvalid), so
# they are removed from python-pkcs11's defaults for a private key.
UNWRAP_TEMPLATE: dict[Any, Any] = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: pkcs11.DEFAULT,
    Attribute.VERIFY: pkcs11.DEFAULT,
    Attribute.WRAP: pkcs11.DEFAULT,
}


def open_session(module: str, token_label: str, pin: str) -> Any:
    """A read-write user session on the token ``token_label``; ``hsm_unavailable`` if
    the module, the token or the login fails."""
    with translated("login"):
        lib = pkcs11.lib(module)
        token = lib.get_token(token_label=token_label)
        session = token.open(user_pin=pin, rw=True)
    softhsm.clear_openssl_errors()  # left by SoftHSM's first initialization in this process
    return session


class Token:
    """The token the lane's sessions open on, logged in once for the process.

    PKCS#11 logs in an application, not a session: a second ``C_Login`` fails with
    UserAlreadyLoggedIn, and closing a session that logged in logs every session out.
    So one session is held only for the login, and the sessions that work are opened
    without a PIN (they see the user's objects as long as the login lasts). ``logout``
    ends it, before a renewal of the library or at the end."""

    def __init__(self, module: str, label: str, pin: str) -> None:
        self._module, self._label, self._pin = module, label, pin
        self._login: Any = None
        self._guard = threading.Lock()  # sessions are opened from several lane threads

    def open(self) -> Any:
        """A read-write session on the logged-in token; ``hsm_unavailable`` if the
        module, the token or the login fails."""
        with self._guard, translated("login"):
            token = pkcs11.lib(self._module).get_token(token_label=self._label)
            if self._login is None:
                self._login = token.open(user_pin=self._pin, rw=True)
            return token.open(rw=True)

    def logout(self) -> None:
        with self._guard:
            login, self._login = self._login, None
            if login is not None:
                with contextlib.suppress(PKCS11Error):
                    login.close()


def spki_of(public_key: Any, key_type: KeyType) -> bytes:
    """The DER SubjectPublicKeyInfo of a PKCS#11 public key object."""
    if key_type == KeyType.EC:
        return bytes(encode_ec_public_key(public_key))
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(public_key[Attribute.PUBLIC_EXPONENT], "big"),
        int.from_bytes(public_key[Attribute.MODULUS], "big"),
    )
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class _Keys:
    state: Any
    audit: Any
    factor: Any | None
    keks: dict[str, Any]


class Pkcs11Session:
    """The ``Hsm`` operations, synchronous, on one PKCS#11 session used by one thread at
    a time.

    Key handles are looked up lazily and forgotten after any error that may mean the
    HSM went away; the next call looks them up again in a new session. If no session
    can be opened any more, ``on_lost`` is called: the worker then drains and exits so
    that its supervisor starts it afresh (SoftHSM finds a restored token only after
    C_Finalize/C_Initialize). ``objects_made`` counts the session objects it created,
    for the lane's renewal of the library (see ``lane``).

    Refuses with ``hsm_unavailable`` when the module fails, ``key_pair_invalid`` when a
    wrapped key names a KEK or mechanism this HSM lacks or does not unwrap, and
    ``sam_factor_unavailable`` when the SAM has no factor key.
    """

    def __init__(
        self,
        open_session: Callable[[], Any],
        on_lost: Callable[[], None],
        current_kek_label: str,
        state_key_label: str,
        audit_key_label: str,
        factor_key_label: str | None = None,
        wrap_mechanism: str = "AES_KEY_WRAP_PAD",
    ) -> None:
        if wrap_mechanism not in _WRAP_MECHANISMS:
            raise ValueError(f"unknown wrap mechanism {wrap_mechanism}")
        self._open_session = open_session
        self._session: Any = None
        self._on_lost = on_lost
        self._kek_label = current_kek_label
        self._labels = (state_key_label, audit_key_label, factor_key_label)
        self._wrap_mechanism = wrap_mechanism
        self._resolved: _Keys | None = None
        self.objects_made = 0

    def check(self) -> None:
        """Open the session and find the SAM's keys and the current KEK: at start, so a
        worker fails then, not at its first request, if they are missing."""
        self._kek(self._kek_label)

    def _translated(self, action: str) -> Any:
        return translated(action, on_stale=self._forget_session)

    def _blame_wrapped_key(self, error: PKCS11Error) -> tuple[ErrorCode, str]:
        """Who is at fault when a wrapped key does not unwrap: the key pair only when the
        HSM rejected the wrapped key itself (``INPUT_REJECTED``), or answered SoftHSM's
        ambiguous GeneralError and then, asked in a fresh session, still answers with the
        SAM's keys; the HSM for anything else — a session, handle or device gone (the KEK
        handle gone stale is UnwrappingKeyHandleInvalid), memory, a mechanism, anything
        not in the list — and the session is renewed."""
        name = type(error).__name__
        if isinstance(error, INPUT_REJECTED):
            return ErrorCode.key_pair_invalid, f"wrapped key does not unwrap ({name})"
        self._forget_session()
        if isinstance(error, pkcs11.exceptions.GeneralError) and self.healthy():
            return ErrorCode.key_pair_invalid, f"wrapped key does not unwrap ({name})"
        return ErrorCode.hsm_unavailable, f"HSM unwrapping failed ({name})"

    def _forget_session(self) -> None:
        self._resolved = None
        if self._session is not None:
            with contextlib.suppress(PKCS11Error):
                self._session.close()
            self._session = None

    def _destroyed(self, *objects: Any) -> None:
        """Destroy session objects, counted: SoftHSM keeps each one's bookkeeping until
        the library is renewed."""
        self.objects_made += len(objects)
        with self._translated("session key destruction"):
            for item in objects:
                item.destroy()

    def _keys(self) -> _Keys:
        if self._resolved is None:
            with self._translated("key lookup"):
                if self._session is None:
                    try:
                        self._session = self._open_session()
                    except SamError:
                        # The token is gone from this process's view and a new session
                        # cannot bring it back; recovery is a clean process restart.
                        self._on_lost()
                        raise
                state_label, audit_label, factor_label = self._labels
                get = self._session.get_key
                try:
                    self._resolved = _Keys(
                        get(object_class=ObjectClass.PRIVATE_KEY, label=state_label),
                        get(object_class=ObjectClass.PRIVATE_KEY, label=audit_label),
                        get(object_class=ObjectClass.SECRET_KEY, label=factor_label)
                        if factor_label
                        else None,
                        {},
                    )
                except pkcs11.NoSuchKey as exc:
                    # The token answers without the SAM's own keys (its objects were taken
                    # away): SoftHSM reads them again only in a new process, so this one
                    # could only refuse everything — recovery is a clean restart.
                    self._forget_session()
                    self._on_lost()
                    raise SamError(
                        ErrorCode.hsm_unavailable, "the SAM's own keys are not in the HSM (NoSuchKey)"
                    ) from exc
        return self._resolved

    def _kek(self, label: str) -> Any:
        keys = self._keys()
        kek = keys.keks.get(label)
        if kek is None:
            with self._translated("KEK lookup"):
                try:
                    kek = self._session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
                except (pkcs11.NoSuchKey, pkcs11.MultipleObjectsReturned) as exc:
                    # The label comes from inside a seal this SAM made: a KEK this HSM
                    # lacks (lost, deleted, another token) is never the caller's fault.
                    raise SamError(
                        ErrorCode.hsm_unavailable, f"key encryption key {label!r} is not in this HSM"
                    ) from exc
            keys.keks[label] = kek
        return kek

    def healthy(self) -> bool:
        """Whether the HSM answers with the SAM's keys (a real call, for readiness)."""
        try:
            with self._translated("health check"):
                return bool(self._keys().state[Attribute.LABEL])
        except SamError:
            return False

    @property
    def current_kek_label(self) -> str:
        return self._kek_label

    def generate_key_pair(self, spec: KeySpec) -> GeneratedKeyPair:
        # Generated as session objects: extractable only so the KEK can wrap them,
        # and destroyed before this returns.
        private_template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}
        kek = self._kek(self._kek_label)
        with self._translated("key generation"):
            if spec.key_type is algorithms.KeyType.RSA:
                public, private = self._session.generate_keypair(
                    KeyType.RSA, spec.size, store=False, private_template=private_template
                )
                key_type = KeyType.RSA
            else:
                assert spec.curve is not None
                params = self._session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(spec.curve.oid)},
                    local=True,
                )
                public, private = params.generate_keypair(store=False, private_template=private_template)
                key_type = KeyType.EC
            try:
                wrapped = kek.wrap_key(private, mechanism=_WRAP_MECHANISMS[self._wrap_mechanism])
                spki = spki_of(public, key_type)
            finally:
                self._destroyed(private, public)
        return GeneratedKeyPair(spki, bytes(wrapped), self._kek_label, self._wrap_mechanism)

    def _unwrap(self, key: WrappedKey, extractable: bool = False) -> Any:
        wrap = _WRAP_MECHANISMS.get(key.wrap_mechanism)
        if wrap is None:
            raise SamError(ErrorCode.key_pair_invalid, f"unknown wrap mechanism {key.wrap_mechanism!r}")
        key_type = KeyType.RSA if key.spec.key_type is algorithms.KeyType.RSA else KeyType.EC
        kek = self._kek(key.kek_label)
        with translated("unwrapping", blame=self._blame_wrapped_key):
            private = kek.unwrap_key(
                ObjectClass.PRIVATE_KEY,
                key_type,
                key.wrapped,
                mechanism=wrap,
                store=False,
                capabilities=MechanismFlag.SIGN,
                template={**UNWRAP_TEMPLATE, Attribute.EXTRACTABLE: extractable},
            )
        # python-pkcs11 would ask the HSM for the key type (a cached property) before the
        # first signature; the template just set it. With an HSM on the network that is
        # two round trips of the nine a stateless signature makes.
        private.__dict__["key_type"] = key_type
        return private

    def sign_with_wrapped_key(
        self, key: WrappedKey, scheme: SignatureScheme, inputs: Sequence[bytes]
    ) -> list[bytes]:
        mechanism = _SIGN_MECHANISMS[scheme.mechanism]
        parameter = None
        if scheme.mechanism is HsmMechanism.RSA_PSS:
            hash_mechanism, mgf = _PSS_HASHES[scheme.hash_name]
            parameter = (hash_mechanism, mgf, scheme.pss_salt_length)
        private = self._unwrap(key)
        try:
            with self._translated("signing"):
                return [
                    bytes(private.sign(data, mechanism=mechanism, mechanism_param=parameter))
                    for data in inputs
                ]
        finally:
            self._destroyed(private)

    def rewrap(self, key: WrappedKey) -> WrappedKey:
        # Extractable only as a session object that lives for this call: the private
        # key leaves the HSM again only wrapped under the current KEK.
        private = self._unwrap(key, extractable=True)
        try:
            with self._translated("re-wrapping"):
                wrapped = self._kek(self._kek_label).wrap_key(
                    private, mechanism=_WRAP_MECHANISMS[self._wrap_mechanism]
                )
        finally:
            self._destroyed(private)
        return WrappedKey(key.spec, bytes(wrapped), self._kek_label, self._wrap_mechanism)

    def factor_mac(self, data: bytes) -> bytes:
        factor = self._keys().factor
        if factor is None:
            raise SamError(ErrorCode.sam_factor_unavailable)
        with self._translated("factor MAC"):
            return bytes(factor.sign(data, mechanism=Mechanism.SHA256_HMAC))

    def sign_with_state_key(self, data: bytes) -> bytes:
        key = self._keys().state
        with self._translated("seal signing"):
            return bytes(key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA))

    def sign_audit_digest(self, digest: bytes) -> bytes:
        key = self._keys().audit
        with self._translated("audit signing"):
            return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))

    def close(self) -> None:
        """Close the session (before a renewal of the library, and the worker's last step)."""
        self._forget_session()
