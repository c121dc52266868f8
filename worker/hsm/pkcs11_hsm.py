"""PKCS#11 implementation of ``Hsm`` (python-pkcs11; SoftHSM2 by default).

Also provisions the SAM's own keys for ``sam-admin create``. python-pkcs11 raises
exceptions without messages, so every translation names the exception class.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
from worker.hsm.api import GeneratedKeyPair, WrappedKey

__all__ = [
    "Pkcs11Hsm",
    "ProvisionedKeys",
    "create_kek",
    "open_session",
    "provision_sam_keys",
    "renew_library",
    "token_has",
    "token_public_key_pem",
]

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
_P256 = algorithms.CURVES["secp256r1"].oid

# SoftHSM refuses an unwrap template that carries these (AttributeTypeInvalid), so
# they are removed from python-pkcs11's defaults for a private key.
_UNWRAP_TEMPLATE: dict[Any, Any] = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: pkcs11.DEFAULT,
    Attribute.VERIFY: pkcs11.DEFAULT,
    Attribute.WRAP: pkcs11.DEFAULT,
}


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except PKCS11Error as exc:
        raise SamError(ErrorCode.hsm_unavailable, f"HSM {action} failed ({type(exc).__name__})") from exc


def open_session(module: str, token_label: str, pin: str) -> Any:
    with _translated("login"):
        lib = pkcs11.lib(module)
        token = lib.get_token(token_label=token_label)
        return token.open(user_pin=pin, rw=True)


def renew_library(module: str) -> None:
    """C_Finalize + C_Initialize: what frees SoftHSM2's per-process object bookkeeping.
    Only with no session open (``Pkcs11Hsm`` closes its own first).

    SoftHSM2's OpenSSL backend leaves an error (``ENGINE: NO_SUCH_ENGINE``) on this
    thread's OpenSSL error queue when it initializes again; the next TLS read of the
    worker's broker connection, on the same thread, would report it as its own failure
    and drop the connection. So the queue is cleared right after."""
    pkcs11.lib(module).reinitialize()
    _clear_openssl_errors()
    _return_freed_memory()


def _clear_openssl_errors() -> None:
    name = ctypes.util.find_library("crypto")
    if name is not None:
        ctypes.CDLL(name).ERR_clear_error()


def _return_freed_memory() -> None:
    """glibc keeps what SoftHSM just freed in its heap, interleaved with live Python
    objects; without a trim the worker's resident size steps up by about one renewal's
    worth now and then. ``malloc_trim`` hands the free pages back (glibc only)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name is not None else None
    if trim is not None:
        trim(0)


def _spki_of(public_key: Any, key_type: KeyType) -> bytes:
    if key_type == KeyType.EC:
        return bytes(encode_ec_public_key(public_key))
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(public_key[Attribute.PUBLIC_EXPONENT], "big"),
        int.from_bytes(public_key[Attribute.MODULUS], "big"),
    )
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _spki_pem(spki_der: bytes) -> str:
    key = serialization.load_der_public_key(spki_der)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@dataclass(frozen=True)
class ProvisionedKeys:
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


def create_kek(session: Any, label: str) -> None:
    """A token AES-256 key that only wraps and unwraps, never extractable."""
    with _translated("KEK creation"):
        _refuse_existing(session, label)
        session.generate_key(
            KeyType.AES,
            256,
            label=label,
            store=True,
            capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )


def token_has(session: Any, label: str) -> bool:
    with _translated("key lookup"):
        return bool(list(session.get_objects({Attribute.LABEL: label})))


def token_public_key_pem(session: Any, label: str) -> str:
    with _translated("public key lookup"):
        return _spki_pem(
            _spki_of(session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label), KeyType.EC)
        )


def provision_sam_keys(session: Any, suffix: str) -> ProvisionedKeys:
    """Create the KEK, the state (sealing) key, the audit key and the factor MAC key
    inside the token.

    All are token objects, sensitive and never extractable. ``suffix`` keeps labels
    unique so a KEK rotation can add keys beside the old ones.
    """
    kek_label, state_label, audit_label, factor_label = (
        f"sam-{name}-{suffix}" for name in ("kek", "state", "audit", "factor")
    )
    _refuse_existing(session, kek_label, state_label, audit_label, factor_label)
    create_kek(session, kek_label)
    with _translated("key provisioning"):
        session.generate_key(
            KeyType.GENERIC_SECRET,
            256,
            label=factor_label,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )
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
            pems.append(_spki_pem(_spki_of(public, KeyType.EC)))
    return ProvisionedKeys(kek_label, state_label, pems[0], audit_label, pems[1], factor_label)


# Errors after which cached handles (or the session) cannot be trusted: SoftHSM, for one,
# hands out new object handles when its token store was away and came back.
_STALE = (
    pkcs11.exceptions.ObjectHandleInvalid,
    pkcs11.exceptions.KeyHandleInvalid,
    pkcs11.exceptions.SessionHandleInvalid,
    pkcs11.exceptions.SessionClosed,
    pkcs11.exceptions.DeviceRemoved,
    pkcs11.exceptions.TokenNotPresent,
    pkcs11.exceptions.DeviceError,
    pkcs11.exceptions.GeneralError,
    pkcs11.exceptions.NoSuchKey,
)


@dataclass
class _Keys:
    state: Any
    audit: Any
    factor: Any | None
    keks: dict[str, Any]


# SoftHSM2 keeps the bookkeeping of every session object it ever created, destroyed or
# not, until C_Finalize (closing the session does not free it): ~190 bytes per unwrap,
# which made a worker grow by ~2.4 MB per 10,000 signatures. After this many session
# objects the adapter closes its session and, where the module needs it, re-initializes
# the library (``renew_library``); the next call opens a new session. A renewal blocks
# the worker for ~5 ms: every 2,000 signatures that is ~3 µs each, and what is held
# between two renewals stays under 0.4 MB.
SESSION_OBJECTS_BEFORE_RENEWAL = 2_000


class Pkcs11Hsm:
    """One PKCS#11 session per process, used from one thread only.

    Key handles are looked up lazily and forgotten after any error that may mean the
    HSM went away; the next call looks them up again in a new session. If no session
    can be opened any more, ``on_lost`` is called: the worker then drains and exits so
    that its supervisor starts it afresh. The session is also renewed after
    ``objects_per_session`` session objects (see ``SESSION_OBJECTS_BEFORE_RENEWAL``).
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
        renew_library: Callable[[], None] | None = None,
        objects_per_session: int = SESSION_OBJECTS_BEFORE_RENEWAL,
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
        self._session_objects = 0
        self._renew_library = renew_library
        self._objects_per_session = objects_per_session
        self.renewals = 0
        self._keys()  # fail at start, not at the first request, if the keys are missing
        self._kek(current_kek_label)

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except PKCS11Error as exc:
            if isinstance(exc, _STALE):
                self._forget(session=True)
            raise SamError(ErrorCode.hsm_unavailable, f"HSM {action} failed ({type(exc).__name__})") from exc

    def _forget(self, session: bool) -> None:
        self._resolved = None
        if session and self._session is not None:
            with contextlib.suppress(PKCS11Error):
                self._session.close()
            self._session = None
            self._session_objects = 0

    def _destroyed(self, *objects: Any) -> None:
        """Destroy session objects; renew the session once it has made enough of them."""
        with self._guard("session key destruction"):
            for item in objects:
                item.destroy()
        self._session_objects += len(objects)
        if self._session_objects >= self._objects_per_session:
            self._forget(session=True)
            self.renewals += 1
            if self._renew_library is not None:
                # a failure shows at the next session open, which then reports the HSM lost
                with contextlib.suppress(PKCS11Error):
                    self._renew_library()

    def _keys(self) -> _Keys:
        if self._resolved is None:
            with self._guard("key lookup"):
                if self._session is None:
                    try:
                        self._session = self._open_session()
                    except SamError:
                        # The token is gone from this process's view and a new session
                        # cannot bring it back: SoftHSM finds a restored token only after
                        # C_Finalize/C_Initialize, and a failed C_Initialize leaves its
                        # OpenSSL state (and so our TLS) broken. Recovery is a clean
                        # process restart by the supervisor; tell the worker.
                        self._on_lost()
                        raise
                state_label, audit_label, factor_label = self._labels
                get = self._session.get_key
                self._resolved = _Keys(
                    get(object_class=ObjectClass.PRIVATE_KEY, label=state_label),
                    get(object_class=ObjectClass.PRIVATE_KEY, label=audit_label),
                    get(object_class=ObjectClass.SECRET_KEY, label=factor_label) if factor_label else None,
                    {},
                )
        return self._resolved

    def _kek(self, label: str) -> Any:
        keys = self._keys()
        kek = keys.keks.get(label)
        if kek is None:
            try:
                kek = self._session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
            except (pkcs11.NoSuchKey, pkcs11.MultipleObjectsReturned) as exc:
                if not self.healthy():
                    raise SamError(
                        ErrorCode.hsm_unavailable, "HSM KEK lookup failed (the HSM is away)"
                    ) from exc
                # the HSM answers and has the SAM's own keys, but not this KEK
                raise SamError(
                    ErrorCode.key_pair_invalid, f"key encryption key {label!r} is not in this HSM"
                ) from exc
            except PKCS11Error as exc:
                with self._guard("KEK lookup"):
                    raise exc
            keys.keks[label] = kek
        return kek

    def healthy(self) -> bool:
        """Whether the HSM answers with the SAM's keys (a real call, for readiness)."""
        try:
            with self._guard("health check"):
                return bool(self._keys().state[Attribute.LABEL])
        except SamError:
            return False

    def generate_key_pair(self, spec: KeySpec) -> GeneratedKeyPair:
        # Generated as session objects: extractable only so the KEK can wrap them,
        # and destroyed before this returns.
        private_template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}
        kek = self._kek(self._kek_label)
        with self._guard("key generation"):
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
                spki = _spki_of(public, key_type)
            finally:
                self._destroyed(private, public)
        return GeneratedKeyPair(spki, bytes(wrapped), self._kek_label, self._wrap_mechanism)

    def _unwrap(self, key: WrappedKey, extractable: bool = False) -> Any:
        wrap = _WRAP_MECHANISMS.get(key.wrap_mechanism)
        if wrap is None:
            raise SamError(ErrorCode.key_pair_invalid, f"unknown wrap mechanism {key.wrap_mechanism!r}")
        key_type = KeyType.RSA if key.spec.key_type is algorithms.KeyType.RSA else KeyType.EC
        kek = self._kek(key.kek_label)
        try:
            return kek.unwrap_key(
                ObjectClass.PRIVATE_KEY,
                key_type,
                key.wrapped,
                mechanism=wrap,
                store=False,
                capabilities=MechanismFlag.SIGN,
                template={**_UNWRAP_TEMPLATE, Attribute.EXTRACTABLE: extractable},
            )
        except _STALE as exc:
            with self._guard("unwrapping"):
                raise exc
            raise  # unreachable: the guard always raises
        except PKCS11Error as exc:
            raise SamError(
                ErrorCode.key_pair_invalid, f"wrapped key does not unwrap ({type(exc).__name__})"
            ) from exc

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
            with self._guard("signing"):
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
            with self._guard("re-wrapping"):
                wrapped = self._kek(self._kek_label).wrap_key(
                    private, mechanism=_WRAP_MECHANISMS[self._wrap_mechanism]
                )
        finally:
            self._destroyed(private)
        return WrappedKey(key.spec, bytes(wrapped), self._kek_label, self._wrap_mechanism)

    @property
    def current_kek_label(self) -> str:
        return self._kek_label

    def factor_mac(self, data: bytes) -> bytes:
        factor = self._keys().factor
        if factor is None:
            raise SamError(ErrorCode.sam_factor_unavailable)
        with self._guard("factor MAC"):
            return bytes(factor.sign(data, mechanism=Mechanism.SHA256_HMAC))

    def sign_with_state_key(self, data: bytes) -> bytes:
        key = self._keys().state
        with self._guard("seal signing"):
            return bytes(key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA))

    def sign_audit_digest(self, digest: bytes) -> bytes:
        key = self._keys().audit
        with self._guard("audit signing"):
            return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))

    def close(self) -> None:
        self._forget(session=True)
