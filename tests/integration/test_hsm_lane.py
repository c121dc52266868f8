"""A worker stays responsive whatever its HSM does: while it generates RSA-4096 key pairs
(0.5-4 s each in SoftHSM here), the same worker keeps signing and answers ``/live``
within 100 ms. Before the HSM lane, each generation held its event loop for its whole
length: no signature, no stream read, no ``/live`` until it returned."""

from __future__ import annotations

import asyncio
import hashlib
import time
import urllib.request

import pytest

from tests.conftest import PORT_BASE
from tests.integration.conftest import EC_SHA256, Harness, key_id
from worker.client import SamClient

pytestmark = pytest.mark.integration

METRICS_PORT = PORT_BASE + 43  # test_operations' workers serve on + 40, test_metrics_exposed on + 41


def _live_seconds() -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/live", timeout=5) as response:
        assert response.status == 200
    return time.perf_counter() - started


async def test_rsa_4096_generation_holds_up_neither_signatures_nor_live(
    harness: Harness, ssa: SamClient
) -> None:
    key_pair = await harness.certified_key_pair(ssa, "lane-signer")
    async with harness.without_shared_workers():
        await asyncio.to_thread(harness.start_worker, "worker-lane", metrics_port=METRICS_PORT)
        try:
            generations = asyncio.gather(*(ssa.create_key_pair("RSA", size=4096) for _ in range(3)))
            await asyncio.sleep(0.2)  # the first generation is in the HSM
            signed: list[float] = []
            live: list[float] = []

            async def sign(n: int) -> None:
                digest = hashlib.sha256(f"lane {n}".encode()).digest()
                sad = harness.dev_as.issue_sad(harness.sam_id, "lane-signer", key_id(key_pair), [digest])
                started = time.perf_counter()
                await ssa.sign(key_pair, "lane-signer", EC_SHA256, [digest], sad)
                signed.append(time.perf_counter() - started)

            n = 0
            while not generations.done():
                live.append(await asyncio.to_thread(_live_seconds))
                await sign(n)
                n += 1
            created = await generations
        finally:
            await harness.stop_worker("worker-lane")
    assert [k.size for k in created] == [4096] * 3
    assert n >= 5, "the generations ended before the worker could be watched"
    # each signature waited for no generation (one generation takes seconds)
    assert max(signed) < 0.5, sorted(signed)[-5:]
    assert max(live) < 0.1, sorted(live)[-5:]
