"""The one translation of python-pkcs11's exceptions into the SAM's error tree.

python-pkcs11 raises exceptions without messages, so the translation names the
exception class; its text never reaches the wire otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pkcs11
from pkcs11.exceptions import PKCS11Error

from worker.errors import ErrorCode, SamError

__all__ = ["INPUT_REJECTED", "STALE", "translated"]

# Errors after which cached handles (or the session) cannot be trusted: SoftHSM, for one,
# hands out new object handles when its token store was away and came back.
STALE: tuple[type[PKCS11Error], ...] = (
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
# The only errors that can be the caller's: the wrapped key its sealed key pair carries
# failed the HSM's integrity check (SoftHSM says GeneralError for a failed AES-KWP check
# as well, and for a failing token: the adapter asks the HSM which). Every other error —
# a handle, session, device, memory, mechanism, template or function failure — is the
# HSM's, whatever the input: ``hsm_unavailable``.
INPUT_REJECTED: tuple[type[PKCS11Error], ...] = (
    pkcs11.exceptions.WrappedKeyInvalid,
    pkcs11.exceptions.WrappedKeyLenRange,
    pkcs11.exceptions.EncryptedDataInvalid,
    pkcs11.exceptions.EncryptedDataLenRange,
)


@contextmanager
def translated(
    action: str,
    *,
    on_stale: Callable[[], None] | None = None,
    blame: Callable[[PKCS11Error], tuple[ErrorCode, str]] | None = None,
) -> Iterator[None]:
    """Raise ``SamError`` for any PKCS#11 error inside: by default ``hsm_unavailable``,
    after ``on_stale`` for an error that means the HSM or the session went away.
    ``blame`` decides the code and message instead where the input may be at fault (a
    wrapped key that does not unwrap is the caller's key pair, not the HSM)."""
    try:
        yield
    except PKCS11Error as exc:
        if blame is not None:
            code, message = blame(exc)
            raise SamError(code, message) from exc
        if on_stale is not None and isinstance(exc, STALE):
            on_stale()
        raise SamError(ErrorCode.hsm_unavailable, f"HSM {action} failed ({type(exc).__name__})") from exc
