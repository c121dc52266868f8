"""Running it like a TSP: metrics that count right, readiness that follows the HSM and
the broker, graceful rolling restarts under load, and queue classes kept apart."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sam_devtools.stack import verify_audit
from tests.conftest import PORT_BASE
from tests.integration.conftest import EC_SHA256, Harness, key_id
from worker.client import SamClient, SamRequestError
from worker.domain.contract import KeyPairObject

pytestmark = pytest.mark.integration

METRICS_PORT = PORT_BASE + 40


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def ready(port: int) -> tuple[int, dict[str, Any]]:
    try:
        response = urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5)
        return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())
    except (urllib.error.URLError, ConnectionError) as error:  # not listening: not ready
        return 0, {"ready": False, "unreachable": str(error)}


async def wait_ready(port: int, want: bool, seconds: float = 30) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        status, document = await asyncio.to_thread(ready, port)
        if (status == 200) == want:
            return document
        assert asyncio.get_running_loop().time() < deadline, document
        await asyncio.sleep(0.2)


async def sign(
    harness: Harness, ssa: SamClient, key_pair: KeyPairObject, signer: str, text: bytes
) -> list[bytes]:
    digest = hashlib.sha256(text).digest()
    sad = harness.dev_as.issue_sad(harness.sam_id, signer, key_id(key_pair), [digest])
    return await ssa.sign(key_pair, signer, EC_SHA256, [digest], sad)


async def test_metrics_count_what_happened(harness: Harness, ssa: SamClient, admin: SamClient) -> None:
    key_pair = await harness.certified_key_pair(ssa, "metrics-signer")
    async with harness.without_shared_workers():
        await asyncio.to_thread(harness.start_worker, "worker-metrics", metrics_port=METRICS_PORT)
        try:
            before = await asyncio.to_thread(scrape, METRICS_PORT)
            for n in range(5):
                await sign(harness, ssa, key_pair, "metrics-signer", bytes([n]))
            digest = hashlib.sha256(b"replayed").digest()
            sad = harness.dev_as.issue_sad(harness.sam_id, "metrics-signer", key_id(key_pair), [digest])
            await ssa.sign(key_pair, "metrics-signer", EC_SHA256, [digest], sad)
            with pytest.raises(SamRequestError):
                await ssa.sign(key_pair, "metrics-signer", EC_SHA256, [digest], sad)
            version = (await admin.get_configuration()).version
            after = await asyncio.to_thread(scrape, METRICS_PORT)
        finally:
            await harness.stop_worker("worker-metrics")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    signatures = {"operation": "signatures.create"}
    assert delta("sam_requests_total", **signatures, outcome="success", code="ok") == 6
    assert delta("sam_requests_total", **signatures, outcome="failure", code="sad_replayed") == 1
    assert delta("sam_rejections_total", reason="sad_replayed") == 1
    assert delta("sam_request_duration_seconds_count", **signatures) == 7
    assert delta("sam_hsm_operation_seconds_count", operation="unwrap_sign_destroy", mechanism="ECDSA") == 6
    assert delta("sam_audit_batch_records_sum") == 8  # 7 service records and the admin get
    assert delta("sam_audit_failures_total") == 0
    assert value(after, "sam_config_version") == version
    assert value(after, "sam_ready") == 1


async def test_readiness_follows_the_hsm(harness: Harness, ssa: SamClient) -> None:
    key_pair = await harness.certified_key_pair(ssa, "hsm-readiness")
    tokens = harness.stack.path("softhsm", "tokens")
    away = tokens.with_name("tokens-away")
    async with harness.without_shared_workers():
        # supervised as in production: a worker that lost its HSM drains, exits with 75
        # and is started again until the HSM is back
        await asyncio.to_thread(
            harness.start_worker, "worker-hsm", metrics_port=METRICS_PORT, supervised=True
        )
        try:
            await wait_ready(METRICS_PORT, True)
            tokens.rename(away)
            retries, ssa.retries = ssa.retries, 0  # the 503 itself, not the SDK asking again
            try:
                with pytest.raises(SamRequestError) as refused:
                    await sign(harness, ssa, key_pair, "hsm-readiness", b"while the HSM is away")
                assert refused.value.code in ("hsm_unavailable", "audit_unavailable")
                document = await wait_ready(METRICS_PORT, False)
                assert document.get("unreachable") or document["checks"]["hsm"] is False
                await asyncio.sleep(3)  # the worker restarts meanwhile and stays unready
                assert (await asyncio.to_thread(ready, METRICS_PORT))[0] != 200
            finally:
                away.rename(tokens)
                ssa.retries = retries
            await wait_ready(METRICS_PORT, True, seconds=60)
            assert len(await sign(harness, ssa, key_pair, "hsm-readiness", b"the HSM is back")) == 1
        finally:
            await harness.stop_worker("worker-hsm")


async def test_readiness_follows_the_broker(harness: Harness, ssa: SamClient) -> None:
    key_pair = await harness.certified_key_pair(ssa, "broker-readiness")
    async with harness.without_shared_workers():
        # supervised: a worker that lost the broker exits and is started again
        await asyncio.to_thread(
            harness.start_worker, "worker-broker", metrics_port=METRICS_PORT, supervised=True
        )
        try:
            await wait_ready(METRICS_PORT, True)
            listing = harness.stack.rabbitmqctl(
                "list_connections", "user", "pid", "--no-table-headers", "-q"
            ).stdout
            pids = [line.split("\t")[1] for line in listing.splitlines() if line.startswith("sam-worker\t")]
            assert pids
            for pid in pids:
                harness.stack.rabbitmqctl("close_connection", pid, "readiness test")
            document = await wait_ready(METRICS_PORT, False, seconds=10)
            # not ready: either still up and saying the broker is gone, or restarting
            assert document.get("unreachable") or document["checks"]["broker"] is False
            await wait_ready(METRICS_PORT, True, seconds=60)
            assert len(await sign(harness, ssa, key_pair, "broker-readiness", b"reconnected")) == 1
        finally:
            await harness.stop_worker("worker-broker")


async def test_rolling_restart_under_load_loses_nothing(harness: Harness, ssa: SamClient) -> None:
    key_pair = await harness.certified_key_pair(ssa, "rolling")
    outcomes: list[int] = []
    stop = asyncio.Event()

    async def load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await sign(harness, ssa, key_pair, "rolling", f"{worker}/{n}".encode())
                outcomes.append(200)
            except SamRequestError as error:
                outcomes.append(error.status)

    loaders = [asyncio.create_task(load(i)) for i in range(8)]
    await asyncio.sleep(1)
    for instance in ("worker-1", "worker-2"):
        await harness.stop_worker(instance)  # SIGTERM: finish what is in hand, flush, exit
        await asyncio.to_thread(harness.start_worker, instance)
        await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*loaders)  # every request answered (a lost one would time out here)
    assert len(outcomes) > 50 and set(outcomes) == {200}, sorted(set(outcomes))
    files = sorted(harness.stack.path("audit").glob("worker-[12]/*.jsonl"))
    result = await asyncio.to_thread(verify_audit, harness.stack.infrastructure_file, files)
    assert result.returncode == 0, result.stdout


async def test_key_generation_never_holds_up_signing_replicas(harness: Harness, ssa: SamClient) -> None:
    key_pair = await harness.certified_key_pair(ssa, "classes")
    async with harness.without_shared_workers():
        await asyncio.to_thread(harness.start_worker, "worker-signatures", queues="signatures")
        await asyncio.to_thread(harness.start_worker, "worker-keys", queues="admin,keys")
        try:
            # RSA-4096 generation runs for seconds and blocks the keys worker's HSM lane; six
            # of them, queued, keep it busy for far longer than ten signatures take
            keys_client = harness.client("ssa-1")
            keys_client.timeout = 120
            await keys_client.connect()
            keygens = [asyncio.create_task(keys_client.create_key_pair("RSA", size=4096)) for _ in range(6)]
            await asyncio.sleep(0.2)
            for n in range(10):
                await sign(harness, ssa, key_pair, "classes", f"while keys are generated {n}".encode())
            assert not all(task.done() for task in keygens), "signing finished only after key generation"
            created = await asyncio.gather(*keygens)
            await keys_client.close()
        finally:
            await harness.stop_worker("worker-signatures")
            await harness.stop_worker("worker-keys")
    records = harness.audit_records()
    signing = [r for r in records if r["key_pair"] == key_pair.id and r["operation"] == "signatures.create"]
    assert {r["instance"] for r in signing} == {"worker-signatures"}
    generating = [r for r in records if r["key_pair"] in {k.id for k in created}]
    assert {r["instance"] for r in generating} == {"worker-keys"}
