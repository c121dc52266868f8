"""The PKCS#11 library of a process, initialized so that several threads may call it.

python-pkcs11 calls ``C_Initialize(NULL)``: a module so initialized may assume that only
one thread calls it, and SoftHSM2 then runs without any locking (two threads at once
crash the process). The HSM lane calls the module from several threads, so the library
is initialized again, through the module's own function list, with
``CKF_OS_LOCKING_OK``: the module locks with the operating system's primitives.
python-pkcs11 keeps using the same function list and never learns of it (its own
``reinitialize`` would undo it, so the renewal below does the same dance).
"""

from __future__ import annotations

import ctypes
import threading

import pkcs11

from worker.errors import ErrorCode, SamError
from worker.hsm import softhsm

__all__ = ["initialize", "renew"]

_CKF_OS_LOCKING_OK = 0x2
_CKR_OK = 0x0
_CKR_CRYPTOKI_NOT_INITIALIZED = 0x190

_Call = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _InitializeArgs(ctypes.Structure):
    _fields_ = [
        ("create_mutex", ctypes.c_void_p),
        ("destroy_mutex", ctypes.c_void_p),
        ("lock_mutex", ctypes.c_void_p),
        ("unlock_mutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("reserved", ctypes.c_void_p),
    ]


class _FunctionListHead(ctypes.Structure):
    # CK_FUNCTION_LIST opens with the version, then C_Initialize and C_Finalize
    _fields_ = [
        ("version", ctypes.c_ubyte * 2),
        ("initialize", _Call),
        ("finalize", _Call),
    ]


_guard = threading.Lock()
_initialized: set[str] = set()


def _function_list(module: str) -> _FunctionListHead:
    # the same path gives the handle python-pkcs11 holds: one copy of the module
    library = ctypes.CDLL(module)
    head = ctypes.POINTER(_FunctionListHead)()
    if library.C_GetFunctionList(ctypes.byref(head)) != _CKR_OK or not head:
        raise SamError(ErrorCode.hsm_unavailable, f"{module} gives no function list")
    return head.contents


def _restart_with_locking(module: str) -> None:
    functions = _function_list(module)
    finalized = functions.finalize(None)
    if finalized not in (_CKR_OK, _CKR_CRYPTOKI_NOT_INITIALIZED):
        raise SamError(ErrorCode.hsm_unavailable, f"C_Finalize failed (CKR 0x{finalized:x})")
    arguments = _InitializeArgs(None, None, None, None, _CKF_OS_LOCKING_OK, None)
    started = functions.initialize(ctypes.cast(ctypes.pointer(arguments), ctypes.c_void_p))
    if started != _CKR_OK:
        raise SamError(ErrorCode.hsm_unavailable, f"C_Initialize with OS locking failed (CKR 0x{started:x})")
    softhsm.clear_openssl_errors()  # on this thread, where the module just initialized


def initialize(module: str) -> None:
    """Load ``module`` (python-pkcs11) and initialize it for use from several threads;
    once per process, before any session is opened. ``hsm_unavailable`` if it fails."""
    with _guard:
        if module in _initialized:
            return
        try:
            pkcs11.lib(module)
        except pkcs11.exceptions.PKCS11Error as exc:
            raise SamError(ErrorCode.hsm_unavailable, f"cannot load {module} ({type(exc).__name__})") from exc
        _restart_with_locking(module)
        _initialized.add(module)


def renew(module: str) -> None:
    """``C_Finalize`` and ``C_Initialize`` again, with OS locking, then SoftHSM's
    clean-ups (see ``softhsm``). Only with no session of this process open or in use:
    C_Finalize ends every session."""
    with _guard:
        _restart_with_locking(module)
        softhsm.return_freed_memory()
