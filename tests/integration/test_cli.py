"""``sam`` and ``sam-admin`` as a new user meets them, against the test stack: each
failure is one line naming its real cause with the exit status of its class (1 refused,
2 bad input, 3 unreachable), and the flags and defaults that save reading the source."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import EC_SHA256, Harness
from worker.transport.topology import DEAD_LETTER_QUEUE

pytestmark = pytest.mark.integration


def cli(*args: str, module: str = "worker.cli.sam") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, check=False, timeout=120
    )


async def sam(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def profile_variant(harness: Harness, tmp_path: Path, user: str, **changes: str) -> Path:
    profile = json.loads(harness.stack.profile(user).read_text())
    profile.update(changes)
    path = tmp_path / f"{user}-variant.json"
    path.write_text(json.dumps(profile))
    return path


async def test_a_user_the_sam_does_not_know_is_refused_with_what_to_do(harness: Harness) -> None:
    result = await sam("--profile", str(harness.stack.profile("ssa-2")), "key-create", "--algorithm", "ECDSA")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("sam: refused: 401 unknown_user:") and "config-put" in line, line


async def test_a_certificate_for_another_user_id_is_named_before_connecting(
    harness: Harness, tmp_path: Path
) -> None:
    """It was a 25-line traceback ending in "no broker node reachable"."""
    profile = profile_variant(harness, tmp_path, "ssa-1", user_id="ssa-2")
    result = await sam("--profile", str(profile), "config-get")
    assert result.returncode == 2
    line = one_line(result)
    assert "is for CN=ssa-1, but the user id is 'ssa-2'" in line, line


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        ({"url_port": "1"}, "nothing accepts connections at 127.0.0.1:1"),
        ({"ca_file": "/etc/ssl/certs/ca-certificates.crt"}, "does not verify against ca_file"),
    ],
)
async def test_a_broker_out_of_reach_says_why(
    harness: Harness, tmp_path: Path, change: dict[str, str], cause: str
) -> None:
    profile = json.loads(harness.stack.profile("ssa-1").read_text())
    if "url_port" in change:
        profile["url"] = profile["url"].replace(f":{harness.stack.port_base}/", f":{change['url_port']}/")
    else:
        profile.update(change)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    result = await sam("--profile", str(path), "config-get")
    assert result.returncode == 3
    line = one_line(result)
    assert line.startswith("sam: no broker node reachable:") and cause in line, line


async def test_bad_input_files_are_one_line(harness: Harness, tmp_path: Path) -> None:
    profile = str(harness.stack.profile("ssa-1"))
    missing = await sam("--profile", profile, "key-rewrap", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "none.json: No such file or directory" in one_line(missing)
    (tmp_path / "kp.json").write_text('{"id": "x"}')
    invalid = await sam("--profile", profile, "key-rewrap", str(tmp_path / "kp.json"))
    assert invalid.returncode == 2 and "KeyPairObject is not valid: sealed: Field required" in one_line(
        invalid
    )
    no_profile = await sam("--profile", str(tmp_path / "nothing.json"), "config-get")
    assert no_profile.returncode == 2 and "cannot read the profile" in one_line(no_profile)


@pytest.mark.parametrize(
    ("queue", "line"),
    [
        # the broker answers a passive declare of any queue; reading it is what it refuses
        (
            DEAD_LETTER_QUEUE,
            "sam-admin: the broker refused access: ACCESS_REFUSED - access to queue "
            f"'{DEAD_LETTER_QUEUE}' in vhost 'sam' refused for user 'siem-1'",
        ),
        ("siem-9.audit", "sam-admin: queue 'siem-9.audit' cannot be read (NOT_FOUND"),
    ],
)
async def test_a_siem_queue_it_cannot_read_is_one_line(harness: Harness, queue: str, line: str) -> None:
    result = await asyncio.to_thread(
        cli,
        "audit",
        "tail",
        "--profile",
        str(harness.stack.profile("siem-1")),
        "--queue",
        queue,
        "--infrastructure",
        str(harness.stack.infrastructure_file),
        "--idle-timeout",
        "1",
        module="worker.cli.admin",
    )
    assert result.returncode == 1
    assert one_line(result).startswith(line), result.stderr


async def test_rsa_defaults_to_3072_and_ecdsa_to_p256(harness: Harness) -> None:
    profile = str(harness.stack.profile("ssa-1"))
    rsa = await sam("--profile", profile, "key-create", "--algorithm", "RSA")
    ec = await sam("--profile", profile, "key-create", "--algorithm", "ECDSA")
    assert rsa.returncode == 0 and ec.returncode == 0, rsa.stderr + ec.stderr
    assert json.loads(rsa.stdout)["size"] == 3072
    assert json.loads(ec.stdout)["named_curve"] == "secp256r1"


async def test_assign_with_a_pin_certify_without_enable_then_sign_by_algorithm_name(
    harness: Harness, tmp_path: Path
) -> None:
    """``key-assign --pin`` enrols the SAM-managed factor; ``key-update --certificate``
    alone certifies and enables (it used to insist on ``--enable``); ``sign`` takes the
    algorithm's name and the PIN."""
    profile = str(harness.stack.profile("ssa-1"))
    created = await sam("--profile", profile, "key-create", "--algorithm", "ECDSA")
    (tmp_path / "created.json").write_text(created.stdout)
    assigned = await sam(
        "--profile", profile, "key-assign", str(tmp_path / "created.json"),
        "--signer", "carol", "--subject", "CN=Carol,O=Example", "--pin", "2468",
    )  # fmt: skip
    assert assigned.returncode == 0, assigned.stderr
    (tmp_path / "assigned.json").write_text(assigned.stdout)
    assert json.loads(assigned.stdout)["sam_factor"] == "pin"
    csr = await sam("--profile", profile, "csr", str(tmp_path / "assigned.json"), "--algorithm", EC_SHA256)
    assert csr.returncode == 0, csr.stderr
    body = "".join(line for line in csr.stdout.splitlines() if not line.startswith("-----"))
    (tmp_path / "cert.der").write_bytes(harness.stack.pki.issue_from_request(base64.b64decode(body)))
    certified = await sam(
        "--profile", profile, "key-update", str(tmp_path / "assigned.json"),
        "--signer", "carol", "--certificate", str(tmp_path / "cert.der"),
    )  # fmt: skip
    assert certified.returncode == 0, certified.stderr
    assert json.loads(certified.stdout)["status"] == {"assigned": True, "certified": True, "enabled": True}
    (tmp_path / "certified.json").write_text(certified.stdout)
    key_pair_id = json.loads(certified.stdout)["id"]
    digest = hashlib.sha256(b"a document").digest()
    (tmp_path / "sad").write_text(harness.dev_as.issue_sad(harness.sam_id, "carol", key_pair_id, [digest]))
    signed = await sam(
        "--profile", profile, "sign", str(tmp_path / "certified.json"), "--signer", "carol",
        "--algorithm", "ecdsa-with-SHA256", "--dtbs", base64.b64encode(digest).decode(),
        "--sad-file", str(tmp_path / "sad"), "--pin", "2468",
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout)["signature_algorithm"] == EC_SHA256


async def test_a_user_that_may_not_publish_requests_is_told_at_once(harness: Harness, tmp_path: Path) -> None:
    """It waited out every retry (46 s) and ended in a traceback about a closed channel."""
    jws_key = json.loads(harness.stack.profile("ssa-1").read_text())["jws_key_file"]
    profile = profile_variant(harness, tmp_path, "bench", jws_key_file=jws_key)
    result = await sam("--profile", str(profile), "key-create", "--algorithm", "ECDSA")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("sam: the broker refused bench publishing to sam.requests (ACCESS_REFUSED"), line


async def test_a_password_in_the_url_is_never_printed(harness: Harness, tmp_path: Path) -> None:
    profile = json.loads(harness.stack.profile("ssa-1").read_text())
    profile["url"] = (
        profile["url"].replace("amqps://", "amqps://ssa-1:S3cretPassw0rd@").replace("auth=external&", "")
    )
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    result = await sam("--profile", str(path), "config-get")
    assert result.returncode == 3
    line = one_line(result)
    assert "S3cretPassw0rd" not in line and "it takes only EXTERNAL" in line, line
