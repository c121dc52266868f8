"""Run by test_hsm_sessions.py in a process of its own (SoftHSM and OpenSSL state stay
out of the test process): many stateless signatures through the HSM lane (four signing
sessions on threads, 16 signatures in flight) while a TLS connection to the broker stays
open; prints resident memory per round, the renewals, and whether the TLS connection
still works afterwards.

Usage: python -m tests.integration.hsm_probe INFRASTRUCTURE PIN_FILE PROFILE ROUNDS PER_ROUND
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import sys
from pathlib import Path

from sam_devtools.bench import rss_kb
from worker.domain.algorithms import KeyType, key_spec_from_template, signature_scheme
from worker.hsm.lane import open_lane
from worker.ports import WrappedKey
from worker.settings import Infrastructure, load_infrastructure, read_secret

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def main() -> None:
    infrastructure_file, pin_file, profile_file, rounds, per_round = sys.argv[1:6]
    infrastructure = load_infrastructure(Path(infrastructure_file))
    pin = read_secret(Path(pin_file))
    profile = json.loads(Path(profile_file).read_text())
    host, port = profile["url"].split("://", 1)[1].split("/", 1)[0].split(":")
    context = ssl.create_default_context(cafile=profile["ca_file"])
    context.load_cert_chain(profile["cert_file"], profile["key_file"])
    # an AMQP connection's first steps, kept open across the renewals
    connection = context.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host)
    connection.sendall(b"AMQP\x00\x00\x09\x01")
    connection.recv(4096)  # connection.start
    lost: list[bool] = []
    resident, renewals = asyncio.run(_sign_rounds(infrastructure, pin, lost, int(rounds), int(per_round)))
    connection.setblocking(False)
    try:
        connection.recv(16)
        tls = "ok"
    except ssl.SSLWantReadError:
        tls = "ok"  # nothing to read, and no stale error either
    except ssl.SSLError as error:
        tls = str(error)
    print(json.dumps({"resident_kib": resident, "renewals": renewals, "lost": lost, "tls": tls}))


async def _sign_rounds(
    infrastructure: Infrastructure, pin: str, lost: list[bool], rounds: int, per_round: int
) -> tuple[list[int], int]:
    hsm = await open_lane(
        MODULE, infrastructure.token_label, pin, infrastructure, lambda: lost.append(True), sessions=4
    )
    try:
        spec = key_spec_from_template("ECDSA", None, "secp256r1")
        generated = await hsm.generate_key_pair(spec)
        key = WrappedKey(spec, generated.wrapped_private_key, generated.kek_label, generated.wrap_mechanism)
        scheme = signature_scheme("1.2.840.10045.4.3.2", KeyType.EC)
        data = scheme.hsm_input(hashlib.sha256(b"flat").digest())
        resident = []
        for _ in range(rounds):
            for _ in range(per_round // 16):
                signed = await asyncio.gather(
                    *(hsm.sign_with_wrapped_key(key, scheme, [data]) for _ in range(16))
                )
                assert all(len(signature) == 64 for [signature] in signed)
            resident.append(rss_kb(os.getpid()))
        return resident, hsm.renewals
    finally:
        await hsm.close()


if __name__ == "__main__":
    main()
