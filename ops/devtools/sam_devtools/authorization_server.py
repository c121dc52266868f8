"""TEST TOOLING: a development authorization server that issues SADs.

It signs whatever it is asked to, which is exactly what a real IdP/AS must not do;
it exists so tests and the demo can produce SADs shaped like CSC v2 / OAuth2 RAR
access tokens. Installed as the ``sam-dev-as`` command (``sam-dev-as --help``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from joserfc import jws
from joserfc.jwk import ECKey

__all__ = ["DevAuthorizationServer", "main"]


class DevAuthorizationServer:
    """TEST TOOLING: an authorization server that signs (ES256) any SAD, SKAD or deletion SAD
    it is asked for, with ``kid`` and ``iss`` its id."""

    def __init__(self, server_id: str, private_key_pem: bytes) -> None:
        self.id = server_id
        self._key = ECKey.import_key(private_key_pem.decode())
        if not self._key.is_private or self._key.curve_name != "P-256":
            raise ValueError("the key must be an EC P-256 private key (it signs ES256)")

    def sign_claims(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        protected = {"alg": "ES256", "typ": "JWT", "kid": self.id, **(header or {})}
        return jws.serialize_compact(protected, orjson.dumps(claims), self._key)

    def sad_claims(
        self,
        audience: str,
        signer: str,
        key_pair_id: str,
        digests: Sequence[bytes],
        hash_oid: str = "2.16.840.1.101.3.4.2.1",
        lifetime: int = 120,
        amr: Sequence[str] = ("pwd", "otp"),
        detail_type: str = "credential",
    ) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": self.id,
            "aud": audience,
            "sub": signer,
            "iat": now,
            "exp": now + lifetime,
            "jti": str(uuid.uuid4()),
            "amr": list(amr),
            "authorization_details": [
                {
                    "type": detail_type,
                    "credentialID": key_pair_id,
                    "hashAlgorithmOID": hash_oid,
                    "documentDigests": [
                        {"hash": base64.b64encode(d).decode(), "label": f"document {i + 1}"}
                        for i, d in enumerate(digests)
                    ],
                    "numSignatures": len(digests),
                }
            ],
        }

    def issue_sad(
        self, audience: str, signer: str, key_pair_id: str, digests: Sequence[bytes], **options: Any
    ) -> str:
        return self.sign_claims(self.sad_claims(audience, signer, key_pair_id, digests, **options))

    def issue_service_token(
        self, audience: str, user: str, lifetime: int = 600, scope: str = "service", **claims: Any
    ) -> str:
        """A CSC service access token (scope ``service``) for ``user`` at ``audience`` (a
        CSC gateway's id)."""
        now = int(time.time())
        return self.sign_claims(
            {
                "iss": self.id,
                "aud": audience,
                "sub": user,
                "iat": now,
                "exp": now + lifetime,
                "jti": str(uuid.uuid4()),
                "scope": scope,
                **claims,
            }
        )

    def issue_skad(self, audience: str, signer: str, key_pair_id: str, **options: Any) -> str:
        """The signer's consent to have ``key_pair_id`` assigned to them."""
        claims = self.sad_claims(
            audience, signer, key_pair_id, [], detail_type="sam_key_assignment", **options
        )
        return self.sign_claims(claims)

    def issue_deletion_sad(self, audience: str, signer: str, key_pair_id: str, **options: Any) -> str:
        """The signer's own request to delete ``key_pair_id``."""
        claims = self.sad_claims(audience, signer, key_pair_id, [], detail_type="sam_key_deletion", **options)
        return self.sign_claims(claims)


_EXAMPLE = """\
example (the local stack of ./ops/stack up; the SAM id is in .stack/config/static_config.json):
  sam-dev-as --id dev-as --key .stack/pki/dev-as/jws-key.pem --audience sam-dev \\
      --signer alice --key-pair-id KEY_PAIR_ID --file contract.pdf > sad.jwt
  sam --profile .stack/clients/ssa-1.json sign key-pair.json --signer alice \\
      --algorithm 1.2.840.10045.4.3.2 --file contract.pdf --sad-file sad.jwt

A real authorization server authenticates the signer (two factors, CSC/OAuth2 RAR) before
it issues any of these; this one signs whatever it is asked, so it exists only in the test
tooling (sam-worker-devtools), never in a deployment.
"""


def main(argv: list[str] | None = None) -> None:
    """``sam-dev-as``: print a SAD (or a SKAD, or a deletion SAD) for a signer and a key pair."""
    parser = argparse.ArgumentParser(
        prog="sam-dev-as",
        description="TEST TOOLING: print a SAD signed by the development authorization server, "
        "which vouches for any signer",
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--id", required=True, help="the authorization server's registered id (kid, iss)")
    parser.add_argument("--key", type=Path, required=True, help="its private JWS key (PEM, EC P-256)")
    parser.add_argument("--audience", required=True, help="the SAM id (sam_id of its static configuration)")
    parser.add_argument("--signer", required=True, help="the signer (sub)")
    parser.add_argument("--key-pair-id", required=True, help="the key pair's id (credentialID)")
    parser.add_argument(
        "--kind",
        choices=["sad", "skad", "deletion"],
        default="sad",
        help="sad: authorizes signing the DTBS/R given (default); skad: the signer's consent to an "
        "assignment (key-assign --skad); deletion: the signer's request to delete the key pair",
    )
    parser.add_argument("--dtbs", action="append", default=[], help="base64 DTBS/R (repeatable)")
    parser.add_argument(
        "--file", type=Path, action="append", default=[], help="a document to hash with SHA-256 (repeatable)"
    )
    parser.add_argument("--hash-oid", default="2.16.840.1.101.3.4.2.1", help="default: SHA-256")
    parser.add_argument("--lifetime", type=int, default=120, help="seconds (default 120)")
    args = parser.parse_args(argv)
    try:
        digests = [base64.b64decode(d, validate=True) for d in args.dtbs] + [
            hashlib.sha256(f.read_bytes()).digest() for f in args.file
        ]
        key = args.key.read_bytes()
    except (OSError, ValueError) as exc:  # binascii.Error is a ValueError
        parser.exit(2, f"sam-dev-as: {exc}\n")
    try:
        server = DevAuthorizationServer(args.id, key)
    except Exception as exc:  # joserfc's and cryptography's refusals of a key that is none
        parser.exit(2, f"sam-dev-as: {args.key} is not an EC private key in PEM ({type(exc).__name__})\n")
    if args.lifetime <= 0:
        parser.error("--lifetime must be positive")
    if args.kind == "sad" and not digests:
        parser.error("a SAD needs at least one --dtbs or --file")
    if args.kind == "skad":
        token = server.issue_skad(args.audience, args.signer, args.key_pair_id, lifetime=args.lifetime)
    elif args.kind == "deletion":
        token = server.issue_deletion_sad(
            args.audience, args.signer, args.key_pair_id, lifetime=args.lifetime
        )
    else:
        token = server.issue_sad(
            args.audience,
            args.signer,
            args.key_pair_id,
            digests,
            hash_oid=args.hash_oid,
            lifetime=args.lifetime,
        )
    sys.stdout.write(token + "\n")


if __name__ == "__main__":
    main()
