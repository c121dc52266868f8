"""Who is blamed when a wrapped key does not unwrap, over a stand-in PKCS#11 session: the
key pair (422) only when the error is about the input, or when SoftHSM's ambiguous
GeneralError comes from an HSM that still answers in a fresh session; the HSM (503)
when a session, handle or device went away. A good key pair is never called invalid
because the HSM failed under it."""

from __future__ import annotations

from typing import Any

import pkcs11.exceptions as pkcs11_errors
import pytest

from worker.domain.algorithms import key_spec_from_template
from worker.errors import ErrorCode, SamError
from worker.hsm.pkcs11_hsm import Pkcs11Session
from worker.ports import WrappedKey


class _Token:
    def __init__(self, error: type[Exception], reopens: bool) -> None:
        self.error, self.reopens = error, reopens
        self.opened = self.closed = 0

    def open(self) -> _Session:
        if self.opened and not self.reopens:
            raise SamError(ErrorCode.hsm_unavailable, "HSM login failed (TokenNotPresent)")
        self.opened += 1
        return _Session(self)


class _Session:
    def __init__(self, token: _Token) -> None:
        self.token = token

    def get_key(self, object_class: Any = None, label: str = "") -> _Key:
        return _Key(self.token, label)

    def close(self) -> None:
        self.token.closed += 1


class _Key:
    def __init__(self, token: _Token, label: str) -> None:
        self.token, self.label = token, label

    def __getitem__(self, attribute: Any) -> str:
        return self.label

    def unwrap_key(self, *args: Any, **kwargs: Any) -> Any:
        raise self.token.error()


@pytest.mark.parametrize(
    ("error", "reopens", "expected"),
    [
        (pkcs11_errors.WrappedKeyInvalid, True, "key_pair_invalid"),
        (pkcs11_errors.WrappedKeyLenRange, True, "key_pair_invalid"),
        (pkcs11_errors.EncryptedDataInvalid, True, "key_pair_invalid"),
        (pkcs11_errors.GeneralError, True, "key_pair_invalid"),  # SoftHSM: AES-KWP integrity check
        (pkcs11_errors.GeneralError, False, "hsm_unavailable"),
        (pkcs11_errors.SessionHandleInvalid, True, "hsm_unavailable"),
        (pkcs11_errors.SessionClosed, True, "hsm_unavailable"),
        (pkcs11_errors.KeyHandleInvalid, True, "hsm_unavailable"),
        (pkcs11_errors.ObjectHandleInvalid, True, "hsm_unavailable"),
        (pkcs11_errors.UnwrappingKeyHandleInvalid, True, "hsm_unavailable"),
        (pkcs11_errors.DeviceError, True, "hsm_unavailable"),
        (pkcs11_errors.DeviceRemoved, True, "hsm_unavailable"),
        (pkcs11_errors.TokenNotPresent, True, "hsm_unavailable"),
    ],
)
def test_an_unwrap_failure_is_blamed_on_who_caused_it(
    error: type[Exception], reopens: bool, expected: str
) -> None:
    token = _Token(error, reopens)
    lost: list[bool] = []
    hsm = Pkcs11Session(token.open, lambda: lost.append(True), "kek", "state", "audit", "factor")
    hsm.check()
    key = WrappedKey(key_spec_from_template("ECDSA", None, "secp256r1"), b"x" * 40, "kek", "AES_KEY_WRAP_PAD")
    with pytest.raises(SamError) as refused:
        hsm.rewrap(key)
    assert refused.value.code.name == expected
    assert error.__name__ in refused.value.message
    # at most one fresh session, and the old one closed when the HSM was asked again
    assert token.opened - token.closed <= 1 and token.opened <= 2
    assert lost == ([True] if not reopens else [])


class _KeylessSession:
    """A token that answers, without the SAM's own keys (their objects were taken away)."""

    def get_key(self, object_class: Any = None, label: str = "") -> Any:
        raise pkcs11_errors.NoSuchKey()

    def close(self) -> None:
        pass


def test_an_hsm_without_the_sams_own_keys_makes_the_worker_restart() -> None:
    """SoftHSM reads restored key objects only in a new process: a worker whose token
    lost them must exit for a restart, not refuse every request from then on."""
    lost: list[bool] = []
    with pytest.raises(SamError) as refused:
        Pkcs11Session(_KeylessSession, lambda: lost.append(True), "kek", "state", "audit", "factor").check()
    assert refused.value.code is ErrorCode.hsm_unavailable and lost == [True]
