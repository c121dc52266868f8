"""One suite for the ``ResultStore`` port, over ``MemoryResults`` and over
``StreamResultStore`` on a real RabbitMQ stream of the test session: a result comes back
as stored, found by its request and attempt among others; one never stored is
``ledger_unavailable`` within the bound, not a hang; a store that cannot take a result
says so (``ledger_unavailable``) rather than pretending. And one for the ``MarkReader``
of results kept in their answered marks, over ``MarkedResultsIn`` on a ``MemoryLedger``
and over ``MarkedResults`` on a ``StreamLedger``'s real stream, at the position the
replica's ``SadUseLog`` noted: the same two promises, among claims and marks without a
result; and a read costs the same however much of the log lies before the mark."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sam_devtools.stack import Stack
from tests.contract import bench_stream
from worker.domain.ledgers import RequestIdentity, SadUseLog
from worker.errors import ErrorCode, SamError
from worker.fakes import MarkedResultsIn, MemoryLedger, MemoryResults
from worker.ports import MarkReader, ResultStore, StoredResult
from worker.transport.ledger import StreamLedger
from worker.transport.results import MarkedResults, StreamResultStore

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


# --- results kept in their answered marks ------------------------------------------------

Append = Callable[[dict[str, Any]], Awaitable[object]]
Marks = tuple[Append, SadUseLog, MarkReader]


@contextlib.asynccontextmanager
async def _stream_marks(stack: Stack) -> AsyncIterator[tuple[Marks, Callable[..., MarkedResults]]]:
    """Marks on a fresh stream, and a maker of more readers of it (``timeout``, ...)."""
    async with bench_stream(stack, "marks") as (connection, _, name):
        consume, publish = await connection.channel(), await connection.channel(publisher_confirms=True)
        await consume.set_qos(prefetch_count=100)
        log = SadUseLog(30)
        ledger = StreamLedger(name, log, consume, publish, TIMEOUT)
        await ledger.start()

        def reader(timeout: float = TIMEOUT, **options: Any) -> MarkedResults:
            return MarkedResults(connection, timeout, stream=name, **options)

        try:
            yield (ledger.append, log, reader()), reader
            assert not connection.is_closed and not consume.is_closed
        finally:
            await ledger.stop()


@pytest.fixture(params=["memory", pytest.param("stream", marks=pytest.mark.integration)])
async def marks(request: pytest.FixtureRequest) -> AsyncIterator[Marks]:
    if request.param == "memory":
        log = SadUseLog(30)
        ledger = MemoryLedger(log)
        yield ledger.append, log, MarkedResultsIn(ledger.records)
        return
    async with _stream_marks(request.getfixturevalue("stack")) as (opened, _):
        yield opened


async def _answer(marks: Marks, n: int, with_result: bool = True) -> tuple[RequestIdentity, int | None]:
    """Request ``n`` claimed and answered, its result in the mark (or not); and where the
    replica's log says the mark is."""
    append, log, _ = marks
    identity = RequestIdentity.of("ssa-1", f"message-{n}", "signatures.create", b"%d" % n, None)
    now = int(time.time())
    await append(SadUseLog.claim(identity, now, now + 60))
    result = _result(n).as_record(identity.exact, 0) if with_result else None
    await append(SadUseLog.answered(identity, 0, now, now, result))
    answer = log.answer_of(identity, now)
    assert answer is not None
    return identity, answer.mark


async def test_a_result_in_its_mark_comes_back_as_kept_among_others(marks: Marks) -> None:
    answered = [await _answer(marks, n, with_result=n % 3 != 0) for n in range(9)]
    reader = marks[2]
    assert [mark is None for _, mark in answered] == [n % 3 == 0 for n in range(9)]
    for n in (4, 8, 1):
        identity, mark = answered[n]
        assert mark is not None
        assert await reader.read(mark, identity.exact, 0) == _result(n)


async def test_a_result_in_no_mark_is_unavailable_within_the_bound(marks: Marks) -> None:
    (without, _), (other, mark) = await _answer(marks, 3, with_result=False), await _answer(marks, 4)
    assert mark is not None
    started = time.monotonic()
    for position, request, attempt in (
        (mark, without.exact, 0),
        (mark, other.exact, 1),
        (mark + 10**6, other.exact, 0),
    ):
        with pytest.raises(SamError) as refused:
            await marks[2].read(position, request, attempt)
        assert refused.value.code is ErrorCode.ledger_unavailable
    assert time.monotonic() - started < 3 * TIMEOUT + 1


@pytest.mark.integration
async def test_reads_that_time_out_leave_the_reader_and_its_connection_whole(stack: Stack) -> None:
    """Many reads at once, each given up on almost at once (a consume RPC cancelled midway
    would make aiormq close the channel): each is the result or ``ledger_unavailable``,
    and a read afterwards still gets its result, the connection and channels whole."""
    async with _stream_marks(stack) as (marks, reader):
        answered = [await _answer(marks, n) for n in range(40)]
        hasty = reader(0.005, concurrent=4)
        outcomes = await asyncio.gather(
            *(hasty.read(mark or 0, identity.exact, 0) for identity, mark in answered),
            return_exceptions=True,
        )
        for outcome in outcomes:
            assert isinstance(outcome, StoredResult) or (
                isinstance(outcome, SamError) and outcome.code is ErrorCode.ledger_unavailable
            ), outcome
        await asyncio.sleep(0.5)  # the given-up reads' consumers are cancelled meanwhile
        identity, mark = answered[7]
        assert mark is not None and await marks[2].read(mark, identity.exact, 0) == _result(7)
