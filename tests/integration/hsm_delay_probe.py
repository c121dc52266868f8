"""Run by test_hsm_delay.py in a process of its own (SoftHSM state stays out of the test
process): ECDSA P-256 signatures through the network-HSM model (sam_devtools.hsm_delay),
whose delay per call the environment sets. The library is initialized again with
CKF_OS_LOCKING_OK first, as threads share it. Prints, as one JSON line, the time of one
signature, the rate of one thread and of THREADS threads with a session each, and
whether every signature verifies.

Usage: python -m tests.integration.hsm_delay_probe MODULE INFRASTRUCTURE PIN_FILE SIGNATURES
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from worker.hsm import library as pkcs11_library
from worker.settings import load_infrastructure, read_secret

THREADS = 4
DIGEST = hashlib.sha256(b"data to be signed").digest()


def key_pair(session: Any) -> tuple[Any, ec.EllipticCurvePublicKey]:
    """A P-256 session key pair: the private key's handle, and the public key."""
    parameters = session.create_domain_parameters(
        pkcs11.KeyType.EC,
        {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
        local=True,
    )
    public, private = parameters.generate_keypair(store=False)
    public_key = load_der_public_key(encode_ec_public_key(public))
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return private, public_key


def sign(private: Any, count: int) -> list[bytes]:
    return [private.sign(DIGEST, mechanism=pkcs11.Mechanism.ECDSA) for _ in range(count)]


def verified(public_key: ec.EllipticCurvePublicKey, signatures: list[bytes]) -> bool:
    try:
        for signature in signatures:
            r, s = int.from_bytes(signature[:32]), int.from_bytes(signature[32:])
            public_key.verify(encode_dss_signature(r, s), DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


def main() -> None:
    module, infrastructure_file, pin_file, signatures = sys.argv[1:5]
    count = int(signatures)
    token_label = load_infrastructure(Path(infrastructure_file)).token_label
    library = pkcs11.lib(module)
    pkcs11_library.renew(module)  # the worker's own C_Finalize + C_Initialize(CKF_OS_LOCKING_OK)
    token = library.get_token(token_label=token_label)
    login = token.open(user_pin=read_secret(Path(pin_file)))  # the others see its login

    private, public_key = key_pair(login)
    started = time.perf_counter()
    one_thread = sign(private, count)
    one_thread_seconds = time.perf_counter() - started

    # each thread its own session and key pair; the clock runs once all have theirs
    barrier = threading.Barrier(THREADS + 1, timeout=30)

    def signer() -> tuple[ec.EllipticCurvePublicKey, list[bytes]]:
        with token.open() as session:
            private, public_key = key_pair(session)
            barrier.wait()
            return public_key, sign(private, count)

    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(signer) for _ in range(THREADS)]
        barrier.wait()
        started = time.perf_counter()
        results = [future.result() for future in futures]
        threads_seconds = time.perf_counter() - started
    login.close()

    print(
        json.dumps(
            {
                "per_signature_ms": one_thread_seconds / count * 1000,
                "one_thread_per_second": count / one_thread_seconds,
                "threads_per_second": THREADS * count / threads_seconds,
                "threads": THREADS,
                "verified": verified(public_key, one_thread)
                and all(verified(key, signed) for key, signed in results),
            }
        )
    )


if __name__ == "__main__":
    main()
