"""What SoftHSM2 needs beyond PKCS#11 to run for long in one process.

SoftHSM2 keeps the bookkeeping of every session object it ever created, destroyed or
not, until ``C_Finalize`` (~190 bytes per stateless unwrap; closing the session does not
free it). ``library.renew`` finalizes and initializes the library again, then undoes
two side effects that would otherwise show elsewhere in the worker (see each helper).
The HSM lane calls it, with no session open, every so many session objects.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["clear_openssl_errors", "return_freed_memory"]


def clear_openssl_errors() -> None:
    """SoftHSM2's OpenSSL backend leaves an error (``ENGINE: NO_SUCH_ENGINE``) on this
    thread's OpenSSL error queue when it initializes; the next TLS operation on the same
    thread (the worker's broker connection, a client's handshake) would report it as its
    own failure."""
    name = ctypes.util.find_library("crypto")
    if name is not None:
        ctypes.CDLL(name).ERR_clear_error()


def return_freed_memory() -> None:
    """glibc keeps what SoftHSM just freed in its heap, interleaved with live Python
    objects; without a trim the worker's resident size steps up by about one renewal's
    worth now and then. ``malloc_trim`` hands the free pages back (glibc only)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name is not None else None
    if trim is not None:
        trim(0)
