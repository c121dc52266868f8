"""More SAM nodes from one private configuration, and key encryption key rotation."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sam_devtools.stack import init_token, softhsm_config
from tests.integration.conftest import EC_SHA256, Harness, key_id
from worker.client import SamClient, SamRequestError
from worker.domain.contract import KeyPairObject

pytestmark = pytest.mark.integration


def sam_admin(
    harness: Harness, *args: str, softhsm_conf: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = harness.stack.worker_env()
    if softhsm_conf is not None:
        env["SOFTHSM2_CONF"] = str(softhsm_conf)
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.admin", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def softhsm_node(folder: Path, tokens_from: Path | None) -> Path:
    """A SoftHSM configuration of its own; with ``tokens_from``, a restored copy of that token
    (for SoftHSM, copying the token is how its keys are replicated to another node)."""
    if tokens_from is not None:
        shutil.copytree(tokens_from, folder / "tokens")
    return softhsm_config(folder)


async def test_second_node_signs_key_pairs_of_the_first(
    harness: Harness, ssa: SamClient, tmp_path: Path
) -> None:
    first_node_key = await harness.certified_key_pair(ssa, "pat")
    conf = softhsm_node(tmp_path / "node-2", harness.stack.path("softhsm", "tokens"))
    infrastructure = tmp_path / "node-2" / "sam_infrastructure.json"
    result = sam_admin(
        harness,
        "initialize",
        "--from",
        str(harness.stack.infrastructure_file),
        "--node",
        "node-2",
        "--pin-file",
        str(harness.stack.path("secrets", "token-pin")),
        "--out",
        str(infrastructure),
        softhsm_conf=conf,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(infrastructure.read_text())["node"] == "node-2"
    env = {
        "SOFTHSM2_CONF": str(conf),
        "SAM_INFRASTRUCTURE_FILE": str(infrastructure),
        "SAM_AUDIT_DIR": str(tmp_path / "node-2" / "audit"),
    }
    digest = hashlib.sha256(b"signed on node 2").digest()
    async with harness.without_shared_workers():
        await asyncio.to_thread(harness.start_worker, "node-2-worker", env=env)
        try:
            sad = harness.dev_as.issue_sad(harness.sam_id, "pat", key_id(first_node_key), [digest])
            assert len(await ssa.sign(first_node_key, "pat", EC_SHA256, [digest], sad)) == 1
            second_node_key = await harness.certified_key_pair(ssa, "quentin")
        finally:
            await harness.stop_worker("node-2-worker")
    node_2_records = [
        json.loads(line)
        for line in (tmp_path / "node-2" / "audit" / "node-2-worker" / "service.jsonl")
        .read_text()
        .splitlines()
    ]
    assert {r["node"] for r in node_2_records} == {"node-2"}
    assert any(r["key_pair"] == first_node_key.id and r["status"] == 200 for r in node_2_records)
    # and back on the first node's workers
    sad = harness.dev_as.issue_sad(harness.sam_id, "quentin", key_id(second_node_key), [digest])
    assert len(await ssa.sign(second_node_key, "quentin", EC_SHA256, [digest], sad)) == 1


def test_initialize_refuses_a_token_without_the_keys(harness: Harness, tmp_path: Path) -> None:
    conf = softhsm_node(tmp_path / "empty", None)
    pin = harness.stack.path("secrets", "token-pin")
    init_token(conf, pin.read_text(), "12345678")
    result = sam_admin(
        harness,
        "initialize",
        "--from",
        str(harness.stack.infrastructure_file),
        "--node",
        "node-x",
        "--pin-file",
        str(pin),
        "--out",
        str(tmp_path / "out.json"),
        softhsm_conf=conf,
    )
    assert result.returncode == 1 and "lacks" in result.stderr
    assert not (tmp_path / "out.json").exists()


async def test_kek_rotation_keeps_old_key_pairs_working(
    harness: Harness, ssa: SamClient, tmp_path: Path
) -> None:
    old = await harness.certified_key_pair(ssa, "rita")
    infrastructure = tmp_path / "sam_infrastructure.json"
    shutil.copy(harness.stack.infrastructure_file, infrastructure)
    result = sam_admin(
        harness,
        "rotate-kek",
        "--infrastructure",
        str(infrastructure),
        "--pin-file",
        str(harness.stack.path("secrets", "token-pin")),
    )
    assert result.returncode == 0, result.stderr
    rotated = json.loads(infrastructure.read_text())
    assert rotated["previous_kek_labels"] == [old.kek] and rotated["kek_label"] != old.kek

    def signature_sad(key_pair: KeyPairObject, text: bytes) -> tuple[list[bytes], str]:
        digest = hashlib.sha256(text).digest()
        return [digest], harness.dev_as.issue_sad(harness.sam_id, "rita", key_id(key_pair), [digest])

    async with harness.without_shared_workers():
        await asyncio.to_thread(
            harness.start_worker, "worker-rotated", env={"SAM_INFRASTRUCTURE_FILE": str(infrastructure)}
        )
        try:
            digests, sad = signature_sad(old, b"old KEK")
            assert len(await ssa.sign(old, "rita", EC_SHA256, digests, sad)) == 1
            fresh = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
            assert fresh.kek == rotated["kek_label"]
            rewrapped = await ssa.rewrap_key_pair(old)
            assert old.revision is not None
            assert rewrapped.kek == rotated["kek_label"] and rewrapped.revision == old.revision + 1
            assert rewrapped.public_key == old.public_key
            digests, sad = signature_sad(rewrapped, b"new KEK")
            assert len(await ssa.sign(rewrapped, "rita", EC_SHA256, digests, sad)) == 1
            digests, sad = signature_sad(old, b"old copy")
            with pytest.raises(SamRequestError) as refused:
                await ssa.sign(old, "rita", EC_SHA256, digests, sad)
            assert refused.value.code == "key_pair_outdated"
        finally:
            await harness.stop_worker("worker-rotated")
    # workers still on the old current KEK find the new one by its label
    digests, sad = signature_sad(rewrapped, b"back on the other workers")
    assert len(await ssa.sign(rewrapped, "rita", EC_SHA256, digests, sad)) == 1
