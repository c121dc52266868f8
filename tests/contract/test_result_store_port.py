"""One suite for the ``ResultStore`` port, over ``MemoryResults`` and over
``StreamResultStore`` on a real RabbitMQ stream of the test session: a result comes back
as stored, found by its request and attempt among others; one never stored is
``ledger_unavailable`` within the bound, not a hang; a store that cannot take a result
says so (``ledger_unavailable``) rather than pretending."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from sam_devtools.stack import Stack
from tests.contract import bench_stream
from worker.errors import ErrorCode, SamError
from worker.fakes import MemoryResults
from worker.ports import ResultStore, StoredResult
from worker.transport.results import StreamResultStore

TIMEOUT = 2.0


async def _stream_store(stack: Stack) -> AsyncIterator[ResultStore]:
    async with bench_stream(stack, "results") as (connection, _, name):
        publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
        read = await connection.channel()
        await read.set_qos(prefetch_count=200)
        yield StreamResultStore(publish, read, TIMEOUT, stream=name)


@pytest.fixture(params=["memory", pytest.param("stream", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ResultStore]:
    if request.param == "memory":
        yield MemoryResults()
        return
    async for opened in _stream_store(request.getfixturevalue("stack")):
        yield opened


def _result(n: int) -> StoredResult:
    return StoredResult(200, b'{"signatures": [%d]}' % n, {"key_pair": f"kp-{n}", "dtbs_sha256": ["ab"]})


async def test_a_result_comes_back_as_stored_among_others(store: ResultStore) -> None:
    now = int(time.time())
    for n in range(20):
        await store.put(f"request-{n % 5}", n // 5, _result(n))
    assert await store.get("request-3", 2, now) == _result(13)
    assert await store.get("request-0", 0, now) == _result(0)


async def test_a_result_never_stored_is_unavailable_within_the_bound(store: ResultStore) -> None:
    await store.put("request-1", 0, _result(1))
    started = time.monotonic()
    with pytest.raises(SamError) as refused:
        await store.get("request-1", 1, int(time.time()))
    assert refused.value.code is ErrorCode.ledger_unavailable
    assert time.monotonic() - started < TIMEOUT + 1


@pytest.mark.integration
async def test_a_store_without_its_stream_refuses_to_take_a_result(stack: Stack) -> None:
    async for opened in _stream_store(stack):
        assert isinstance(opened, StreamResultStore)
        missing = StreamResultStore(opened._channel, opened._reader, TIMEOUT, stream="bench.no-such-stream")
        with pytest.raises(SamError) as refused:
            await missing.put("request-1", 0, _result(1))
        assert refused.value.code is ErrorCode.ledger_unavailable
