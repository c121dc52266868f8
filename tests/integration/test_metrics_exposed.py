"""The metrics the alert rules and the Grafana dashboard read are on a live worker's
/metrics: a rule over a name the worker does not export (or exports only after its first
increment) is silently empty, and never fires."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PORT_BASE
from tests.integration.conftest import EC_SHA256, Harness, key_id
from tests.unit.test_deployment_files import metric_names_used_by_rules_and_dashboard
from worker.client import SamClient, SamRequestError
from worker.metrics import HsmOperation

pytestmark = pytest.mark.integration

METRICS_PORT = PORT_BASE + 41  # test_operations' workers serve on + 40


def fetch_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


async def test_every_metric_the_rules_and_the_dashboard_read_is_exported(
    harness: Harness, ssa: SamClient
) -> None:
    async with harness.without_shared_workers():
        await asyncio.to_thread(harness.start_worker, "worker-exposed", metrics_port=METRICS_PORT)
        try:
            # a key pair (HSM time, request latency, an audit batch) and a refusal: the
            # labelled series that exist only once something happened
            key_pair = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
            digest = hashlib.sha256(b"exposed").digest()
            sad = harness.dev_as.issue_sad(harness.sam_id, "exposed", key_id(key_pair), [digest])
            with pytest.raises(SamRequestError) as refused:
                await ssa.sign(key_pair, "exposed", EC_SHA256, [digest], sad)
            assert refused.value.status < 500
            text = await asyncio.to_thread(fetch_metrics, METRICS_PORT)
        finally:
            await harness.stop_worker("worker-exposed")

    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    # series names, as the rules read them: a counter's _total, a histogram's _bucket
    exported = {sample.name for sample in samples}
    used = metric_names_used_by_rules_and_dashboard() - {"up"}  # up is Prometheus's own
    assert {
        "sam_hsm_errors_total",
        "sam_hsm_operation_seconds_bucket",
        "process_resident_memory_bytes",
    } <= used
    assert used - exported == set()
    # the HSM error counters are there at 0 before any error, so that the first one shows
    errors = {s.labels["operation"]: s.value for s in samples if s.name == "sam_hsm_errors_total"}
    assert errors == {str(operation): 0.0 for operation in HsmOperation}
