"""Run by test_hsm_sessions.py in a process of its own (SoftHSM and OpenSSL state stay
out of the test process): many stateless signatures through ``Pkcs11Hsm`` while a TLS
connection to the broker stays open; prints resident memory per round, the renewals,
and whether the TLS connection still works afterwards.

Usage: python -m tests.integration.hsm_probe INFRASTRUCTURE PIN_FILE PROFILE ROUNDS PER_ROUND
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import sys
from pathlib import Path

from sam_devtools.bench import rss_kb
from worker.domain.algorithms import KeyType, key_spec_from_template, signature_scheme
from worker.hsm.pkcs11_hsm import Pkcs11Hsm, open_session
from worker.hsm.softhsm import renew_library
from worker.ports import WrappedKey
from worker.settings import load_infrastructure, read_secret

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
    hsm = Pkcs11Hsm(
        lambda: open_session(MODULE, infrastructure.token_label, pin),
        lambda: lost.append(True),
        infrastructure.kek_label,
        infrastructure.state_key.label,
        infrastructure.audit_key.label,
        infrastructure.factor_key_label,
        renew_library=lambda: renew_library(MODULE),
        objects_per_session=2000,
    )
    spec = key_spec_from_template("ECDSA", None, "secp256r1")
    generated = hsm.generate_key_pair(spec)
    key = WrappedKey(spec, generated.wrapped_private_key, generated.kek_label, generated.wrap_mechanism)
    scheme = signature_scheme("1.2.840.10045.4.3.2", KeyType.EC)
    data = scheme.hsm_input(hashlib.sha256(b"flat").digest())
    resident = []
    for _ in range(int(rounds)):
        for _ in range(int(per_round)):
            [signature] = hsm.sign_with_wrapped_key(key, scheme, [data])
            assert len(signature) == 64
        resident.append(rss_kb(os.getpid()))
    connection.setblocking(False)
    try:
        connection.recv(16)
        tls = "ok"
    except ssl.SSLWantReadError:
        tls = "ok"  # nothing to read, and no stale error either
    except ssl.SSLError as error:
        tls = str(error)
    print(json.dumps({"resident_kib": resident, "renewals": hsm.renewals, "lost": lost, "tls": tls}))


if __name__ == "__main__":
    main()
