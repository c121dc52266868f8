"""The CSC gateway (``sam-csc``) against the test session's SAM: a credential enrolled
through the SAM with the dev CA, then clients no one here wrote sign through it —
pyHanko's ``CSCSigner`` makes PAdES B-B and B-T (a local TSA) signatures that pyHanko
and poppler's ``pdfsig`` both validate. And what each bad call gets: no token, a token of another
gateway or without the ``service`` scope → 401/403 ``invalid_token``/``insufficient_scope``;
another user's ``credentialID`` → the same ``invalid_request`` as one that does not exist,
with nothing of it shown; a SAD for other hashes → ``invalid_request`` naming the SAD; a
signHash sent again after a lost response → the same signatures, not ``sad_replayed``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.timestamps.dummy_client import DummyTimeStamper
from pyhanko.sign.validation import async_validate_pdf_signature
from pyhanko_certvalidator import ValidationContext

from sam_devtools.csc_client import sign_pdf
from tests.conftest import PORT_BASE
from tests.integration.conftest import Harness
from worker.client import SamClient
from worker.csc import enrolment
from worker.csc.server import running
from worker.csc.settings import CscSettings
from worker.csc.store import Credential, SqliteCredentialStore
from worker.integrations.pdf import blank_pdf

pytestmark = pytest.mark.integration

GATEWAY = "csc-test-gateway"
PORT = PORT_BASE + 51
IDLE = 2.0  # seconds an idle connection may stay open


@pytest.fixture(scope="module")
async def gateway(
    harness: Harness, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Any]]:
    """The gateway on TLS with two enrolled users, alice and bob (both of dev-as)."""
    stack = harness.stack
    folder = tmp_path_factory.mktemp("csc")
    server = stack.pki.issue("csc-gateway", server=True)
    settings = CscSettings(
        gateway_id=GATEWAY,
        listen_port=PORT,
        tls_cert_file=server / "cert.pem",
        tls_key_file=server / "key.pem",
        sam_profile=stack.profile("ssa-1"),
        store_file=folder / "credentials.sqlite3",
        authorization_servers={"dev-as": stack.pki.jws_key("dev-as").parent / "jws-pub.pem"},
        idle_timeout_seconds=IDLE,
    )
    ca = x509.load_pem_x509_certificate(stack.pki.ca_file.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )

    async def certify(request: bytes) -> tuple[bytes, list[bytes]]:
        return stack.pki.issue_from_request(request), [ca]

    store = SqliteCredentialStore(settings.store_file)
    store.migrate()
    credentials: dict[str, Credential] = {}
    async with SamClient.from_profile(stack.profile("ssa-1")) as sam:
        for user in ("alice-csc", "bob-csc"):
            credentials[user] = await enrolment.enrol(
                sam,
                store,
                certify,
                issuer="dev-as",
                subject=user,
                signer=user,
                distinguished_name=f"CN={user},O=Example",
            )
    context = ssl.create_default_context(cafile=str(stack.pki.ca_file))
    async with (
        running(settings) as url,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
    ):
        yield {"url": url, "session": session, "credentials": credentials, "ca": ca, "store": store}


def _token(harness: Harness, user: str, **options: Any) -> str:
    return harness.dev_as.issue_service_token(GATEWAY, user, **options)


OPENAPI = yaml.safe_load((Path(__file__).resolve().parents[2] / "schemas" / "csc-openapi.yaml").read_text())


def conforms(path: str, status: int, document: Any) -> None:
    """``document``, answered with ``status`` at ``path``, is what schemas/csc-openapi.yaml says."""
    described = OPENAPI["paths"][path]["post"]["responses"][str(status)]
    schema = described["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": OPENAPI["components"]}).validate(document)


async def _post(gateway: dict[str, Any], path: str, body: Any, token: str | None) -> tuple[int, Any]:
    """A call, its answer held to the OpenAPI document."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{gateway['url']}/csc/v2/{path}"
    async with gateway["session"].post(url, json=body, headers=headers) as reply:
        status, document = reply.status, await reply.json()
    conforms(f"/csc/v2/{path}", status, document)
    return status, document


async def test_info_says_what_is_offered(gateway: dict[str, Any]) -> None:
    status, info = await _post(gateway, "info", {}, None)
    assert status == 200 and "signatures/signHash" in info["methods"] and info["specs"].startswith("2.")


@pytest.mark.parametrize("level", ["B-B", "B-T"])
async def test_pyhanko_signs_a_pdf_through_the_gateway_and_it_validates(
    harness: Harness, gateway: dict[str, Any], tmp_path: Path, level: str
) -> None:
    """PAdES B-B, and B-T with a local time-stamping authority (pyHanko's own, with a
    certificate of the dev CA)."""
    credential = gateway["credentials"]["alice-csc"]
    timestamper = None
    if level == "B-T":
        folder = harness.stack.pki.issue("csc-test-tsa", timestamping=True)
        tsa_key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), None)
        timestamper = DummyTimeStamper(
            asn1_x509.Certificate.load(
                x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes()).public_bytes(
                    serialization.Encoding.DER
                )
            ),
            asn1_keys.PrivateKeyInfo.load(
                tsa_key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            ),
        )
    signed = await sign_pdf(
        gateway["session"],
        gateway["url"],
        credential.credential_id,
        harness.dev_as,
        GATEWAY,
        harness.sam_id,
        "alice-csc",
        blank_pdf(f"signed through CSC ({level})"),
        timestamper,
    )

    root = asn1_x509.Certificate.load(gateway["ca"])
    status = await async_validate_pdf_signature(
        PdfFileReader(io.BytesIO(signed)).embedded_signatures[0],
        ValidationContext(trust_roots=[root], allow_fetching=False),
    )
    assert status.intact and status.valid and status.trusted
    if level == "B-T":
        assert status.timestamp_validity is not None and status.timestamp_validity.valid
        assert status.timestamp_validity.trusted
    path = tmp_path / "signed-csc.pdf"
    path.write_bytes(signed)
    pdfsig = await asyncio.to_thread(
        subprocess.run, ["pdfsig", str(path)], capture_output=True, text=True, check=False
    )
    assert "Signature Validation: Signature is Valid." in pdfsig.stdout, pdfsig.stdout + pdfsig.stderr


async def test_credentials_are_listed_and_described_for_their_user_only(
    harness: Harness, gateway: dict[str, Any]
) -> None:
    alice, bob = gateway["credentials"]["alice-csc"], gateway["credentials"]["bob-csc"]
    status, listed = await _post(gateway, "credentials/list", {}, _token(harness, "alice-csc"))
    assert (status, listed["credentialIDs"]) == (200, [alice.credential_id])
    status, listed = await _post(
        gateway, "credentials/list", {"credentialInfo": True, "certInfo": True}, _token(harness, "alice-csc")
    )
    assert status == 200 and listed["credentialInfos"][0]["cert"]["subjectDN"] == "CN=alice-csc,O=Example"
    status, info = await _post(
        gateway,
        "credentials/info",
        {"credentialID": alice.credential_id, "certificates": "chain"},
        _token(harness, "alice-csc"),
    )
    assert status == 200 and info["SCAL"] == "2" and info["multisign"] == 100
    assert info["key"]["status"] == "enabled" and info["key"]["curve"] == "1.2.840.10045.3.1.7"
    assert "1.2.840.10045.4.3.2" in info["key"]["algo"] and len(info["cert"]["certificates"]) == 2
    # bob's credential, asked for by alice: the same answer as for one that does not exist
    for credential_id in (bob.credential_id, "no-such-credential"):
        status, refused = await _post(
            gateway, "credentials/info", {"credentialID": credential_id}, _token(harness, "alice-csc")
        )
        assert (status, refused["error"], refused["error_description"]) == (
            400,
            "invalid_request",
            "Invalid parameter credentialID",
        )
    status, refused = await _post(
        gateway, "credentials/list", {"userID": "bob-csc"}, _token(harness, "alice-csc")
    )
    assert (status, refused["error"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, (401, "invalid_token")),
        ("not-a-jwt", (401, "invalid_token")),
        ("other-gateway", (401, "invalid_token")),
        ("expired", (401, "invalid_token")),
        ("other-as", (401, "invalid_token")),
        ("no-service-scope", (403, "insufficient_scope")),
    ],
)
async def test_a_call_without_a_good_service_token_is_refused(
    harness: Harness, gateway: dict[str, Any], token: str | None, expected: tuple[int, str]
) -> None:
    tokens = {
        "other-gateway": harness.dev_as.issue_service_token("another-gateway", "alice-csc"),
        "expired": harness.dev_as.issue_service_token(GATEWAY, "alice-csc", lifetime=-120),
        "other-as": harness.other_as.issue_service_token(GATEWAY, "alice-csc"),
        "no-service-scope": harness.dev_as.issue_service_token(GATEWAY, "alice-csc", scope="credential"),
    }
    status, refused = await _post(gateway, "credentials/list", {}, tokens.get(token or "", token))
    assert (status, refused["error"]) == expected
    assert "credentialIDs" not in refused


async def test_sign_hash_maps_sam_refusals_and_answers_a_retry_with_the_same_signatures(
    harness: Harness, gateway: dict[str, Any]
) -> None:
    alice = gateway["credentials"]["alice-csc"]
    digest = hashlib.sha256(b"a document").digest()
    sad = harness.dev_as.issue_sad(harness.sam_id, "alice-csc", alice.credential_id, [digest])
    v1 = {  # the v1 names pyHanko sends
        "credentialID": alice.credential_id,
        "SAD": sad,
        "hash": [base64.b64encode(digest).decode()],
        "hashAlgo": "2.16.840.1.101.3.4.2.1",
        "signAlgo": "1.2.840.10045.4.3.2",
    }
    token = _token(harness, "alice-csc")
    first = await _post(gateway, "signatures/signHash", v1, token)
    again = await _post(gateway, "signatures/signHash", v1, token)  # the response was lost
    assert first[0] == 200 and again == first
    v2 = {
        "credentialID": alice.credential_id,
        "SAD": sad,
        "hashes": v1["hash"],
        "hashAlgorithmOID": v1["hashAlgo"],
        "signAlgo": v1["signAlgo"],
    }
    assert await _post(gateway, "signatures/signHash", v2, token) == first  # the same call in v2 names

    other = hashlib.sha256(b"another document").digest()
    status, refused = await _post(
        gateway, "signatures/signHash", {**v2, "hashes": [base64.b64encode(other).decode()]}, token
    )
    assert (status, refused["error"]) == (400, "invalid_request") and "SAD" in refused["error_description"]
    assert refused.get("request_id")  # the SAM's, to find its audit record
    status, refused = await _post(gateway, "signatures/signHash", {**v2, "hash": ["AAAA"]}, token)
    assert (status, refused["error"]) == (400, "invalid_request")  # the two spellings disagree
    bob = gateway["credentials"]["bob-csc"]
    status, refused = await _post(
        gateway, "signatures/signHash", {**v2, "credentialID": bob.credential_id}, token
    )
    assert (status, refused["error_description"]) == (400, "Invalid parameter credentialID")


@pytest.mark.parametrize(
    ("path", "data", "content_type", "expected"),
    [
        ("credentials/list", b"{not json", "application/json", 400),
        ("credentials/list", b"[1, 2]", "application/json", 400),
        ("credentials/list", b"{}", "text/plain", 400),
        ("credentials/list", b'{"a": "' + b"x" * 1_100_000 + b'"}', "application/json", 413),
        ("credentials/list", b'{"maxResults": "ten"}', "application/json", 400),
        ("signatures/signDoc", b"{}", "application/json", 404),  # not offered
        ("credentials/list", b"{}", "gzip", 400),  # says gzip, is not
    ],
)
async def test_a_malformed_call_gets_a_csc_error_document(
    harness: Harness, gateway: dict[str, Any], path: str, data: bytes, content_type: str, expected: int
) -> None:
    headers = {"Authorization": f"Bearer {_token(harness, 'alice-csc')}", "Content-Type": content_type}
    if content_type == "gzip":
        headers |= {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with gateway["session"].post(
        f"{gateway['url']}/csc/v2/{path}", data=data, headers=headers
    ) as reply:
        document = await reply.json(content_type=None)
        assert reply.status == expected
    assert document["error"] == "invalid_request" and document["error_description"]
    if path != "signatures/signDoc":
        conforms(f"/csc/v2/{path}", expected, document)


def _curl_examples() -> list[str]:
    """The ``sh`` blocks of docs/CSC.md's "Try it with curl", in order."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "CSC.md").read_text()
    section = text.split("### Try it with curl", 1)[1].split("\n## ", 1)[0]
    return [
        block.split("\n", 1)[1] for block in section.split("```sh")[1:] for block in [block.split("```")[0]]
    ]


async def test_the_curl_examples_in_the_docs_work_as_written(
    harness: Harness, gateway: dict[str, Any]
) -> None:
    alice = gateway["credentials"]["alice-csc"]
    digest = hashlib.sha256(b"a document for curl").digest()
    environment = {
        "PATH": os.environ["PATH"],
        "CSC": gateway["url"],
        "CA": str(harness.stack.pki.ca_file),
        "TOKEN": _token(harness, "alice-csc"),
        "CREDENTIAL": alice.credential_id,
        "SAD": harness.dev_as.issue_sad(harness.sam_id, "alice-csc", alice.credential_id, [digest]),
        "HASH": base64.b64encode(digest).decode(),
    }
    answers = []
    for block in _curl_examples():
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-euo", "pipefail", "-c", block],
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        answers.append(json.loads(done.stdout))
    info, listed, described, signed, refused = answers
    assert info["specs"].startswith("2.") and listed["credentialIDs"] == [alice.credential_id]
    assert described["SCAL"] == "2" and len(signed["signatures"]) == 1
    assert refused == {"error": "invalid_token", "error_description": "no bearer token"}


async def test_an_operator_enrols_a_credential_with_the_cli_and_any_ca(
    harness: Harness, tmp_path: Path
) -> None:
    """``sam-csc enrol`` writes the request, a CA (here the dev CA, from outside the
    gateway) certifies it, ``sam-csc finish`` enables it; ``finish`` of a credential that
    awaits nothing is refused (exit 2)."""
    stack = harness.stack
    server = stack.pki.issue("csc-gateway", server=True)
    config = tmp_path / "csc.toml"
    config.write_text(
        f'gateway_id = "{GATEWAY}"\ntls_cert_file = "{server / "cert.pem"}"\n'
        f'tls_key_file = "{server / "key.pem"}"\nsam_profile = "{stack.profile("ssa-1")}"\n'
        f'store_file = "{tmp_path / "store.sqlite3"}"\n'
    )
    sam_csc = str(Path(sys.executable).parent / "sam-csc")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sam_csc, "--config", str(config), *args], capture_output=True, text=True, check=False
        )

    enrolled = await asyncio.to_thread(
        run,
        "enrol",
        "--user",
        "erin",
        "--issuer",
        "dev-as",
        "--dn",
        "CN=erin,O=Example",
        "--request-out",
        str(tmp_path / "erin.csr"),
    )
    assert enrolled.returncode == 0, enrolled.stderr
    credential = enrolled.stdout.strip()
    certificate = x509.load_der_x509_certificate(
        stack.pki.issue_from_request((tmp_path / "erin.csr").read_bytes())
    )
    (tmp_path / "erin.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    finished = await asyncio.to_thread(
        run, "finish", credential, str(tmp_path / "erin.pem"), str(stack.pki.ca_file)
    )
    assert finished.returncode == 0, finished.stderr
    listed = await asyncio.to_thread(run, "credentials", "--user", "erin", "--issuer", "dev-as")
    assert listed.stdout.split("\t")[:3] == [credential, "enabled", "secp256r1"]
    again = await asyncio.to_thread(run, "finish", credential, str(tmp_path / "erin.pem"))
    assert again.returncode == 2 and "awaits" in again.stderr


async def test_a_connection_that_sends_no_whole_request_is_closed(
    harness: Harness, gateway: dict[str, Any]
) -> None:
    """A client that finishes TLS and then sends nothing, or trickles a header, is cut off
    after ``idle_timeout_seconds``, so held connections cannot pile up (slowloris)."""
    context = ssl.create_default_context(cafile=str(harness.stack.pki.ca_file))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", PORT, ssl=context, server_hostname="localhost"
    )
    trickler_reader, trickler = await asyncio.open_connection(
        "127.0.0.1", PORT, ssl=context, server_hostname="localhost"
    )
    started = asyncio.get_running_loop().time()

    async def trickle() -> None:
        for byte in b"POST /csc/v2/info HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            trickler.write(bytes([byte]))
            await trickler.drain()
            await asyncio.sleep(0.5)

    trickling = asyncio.ensure_future(trickle())
    try:
        async with asyncio.timeout(IDLE * 5):
            assert await reader.read() == b""  # closed by the gateway
            assert await trickler_reader.read() == b""
    finally:
        trickling.cancel()
        writer.close()
        trickler.close()
    assert asyncio.get_running_loop().time() - started >= IDLE * 0.9
