"""One suite for the ``Ledger`` port, run over the in-memory ledgers and over
``StreamLedger`` on a real RabbitMQ stream of the test session: verdicts come from the
reducer in log order, replicas racing on one log agree on one winner, ``read_to``
applies what another replica appended without writing, and a position the log never
reaches is ``ledger_unavailable``. ``MemoryLedger`` is one replica alone by design, so
the suites about two replicas run over the other two."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sam_devtools.stack import Stack
from tests.contract import bench_stream
from worker.domain.ledgers import KeyEvent, KeyEventLog
from worker.errors import ErrorCode, SamError
from worker.fakes import MemoryLedger, ReplicaLedger, SharedStream
from worker.ports import Ledger
from worker.transport.ledger import StreamLedger

TIMEOUT = 1.0
Replica = Callable[[KeyEventLog], Awaitable[Ledger]]


async def _stream_replicas(stack: Stack) -> AsyncIterator[tuple[Replica, Callable[[], Awaitable[int]]]]:
    async with bench_stream(stack, "ledger") as (connection, setup, name):
        started: list[StreamLedger] = []

        async def replica(reducer: KeyEventLog) -> Ledger:
            consume = await connection.channel()
            await consume.set_qos(prefetch_count=100)
            publish = await connection.channel(publisher_confirms=True)
            ledger = StreamLedger(name, reducer, consume, publish, TIMEOUT)
            await ledger.start()
            started.append(ledger)
            return ledger

        async def messages() -> int:
            queue = await setup.declare_queue(name, passive=True)
            return queue.declaration_result.message_count or 0

        try:
            yield replica, messages
        finally:
            for ledger in started:
                await ledger.stop()


Log = tuple[str, Replica, Callable[[], Awaitable[int]]]
STREAM = pytest.param("stream", marks=pytest.mark.integration)


async def _open_log(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Log]:
    """(kind, a factory of replicas on one fresh log, the log's message count)."""
    if kind == "stream":
        async for replica, messages in _stream_replicas(request.getfixturevalue("stack")):
            yield "stream", replica, messages
        return
    stream = SharedStream()

    async def count() -> int:
        return len(stream.records)

    if kind == "memory":
        made: list[MemoryLedger] = []

        async def alone(reducer: KeyEventLog) -> Ledger:
            assert not made, "a MemoryLedger is one replica alone"
            made.append(MemoryLedger(reducer))
            return made[0]

        yield "memory", alone, count
    else:

        async def replica(reducer: KeyEventLog) -> Ledger:
            return ReplicaLedger(stream, reducer)

        yield "replica", replica, count


@pytest.fixture(params=["memory", "replica", STREAM])
async def log(request: pytest.FixtureRequest) -> AsyncIterator[Log]:
    """Every ledger, one replica at a time."""
    async for opened in _open_log(request.param, request):
        yield opened


@pytest.fixture(params=["replica", STREAM])
async def shared_log(request: pytest.FixtureRequest) -> AsyncIterator[Log]:
    """The ledgers that several replicas share (a MemoryLedger is one replica alone)."""
    async for opened in _open_log(request.param, request):
        yield opened


def _assigned(key_pair: str, signer: str) -> dict[str, Any]:
    return KeyEventLog.event(KeyEvent.assigned, key_pair, 1, signer)


async def test_append_returns_the_reducers_verdict_and_advances(log: tuple[str, Replica, Any]) -> None:
    _, make, _ = log
    reducer = KeyEventLog()
    ledger = await make(reducer)
    before = ledger.position
    assert await ledger.append(_assigned("kp-1", "alice")) is None
    after_first = ledger.position
    assert after_first > before
    refused = await ledger.append(_assigned("kp-1", "bob"))
    assert isinstance(refused, SamError) and refused.code is ErrorCode.key_pair_already_assigned
    assert ledger.position > after_first
    assert reducer.history["kp-1"].signer == "alice"


async def test_replicas_racing_on_one_log_agree_on_one_winner(shared_log: Log) -> None:
    _, make, _ = shared_log
    first, second = KeyEventLog(), KeyEventLog()
    a, b = await make(first), await make(second)
    verdicts = await asyncio.gather(a.append(_assigned("kp-2", "alice")), b.append(_assigned("kp-2", "bob")))
    winners = [v for v in verdicts if v is None]
    losers = [v for v in verdicts if v is not None]
    assert len(winners) == 1 and len(losers) == 1
    assert isinstance(losers[0], SamError) and losers[0].code is ErrorCode.key_pair_already_assigned
    await a.read_to(b.position)
    await b.read_to(a.position)
    assert first.history["kp-2"] == second.history["kp-2"]


async def test_read_to_applies_another_replicas_records_without_writing(shared_log: Log) -> None:
    kind, make, messages = shared_log
    writer_state, reader_state = KeyEventLog(), KeyEventLog()
    writer, reader = await make(writer_state), await make(reader_state)
    assert await writer.append(_assigned("kp-3", "carol")) is None
    assert "kp-3" not in reader_state.history or kind == "stream"  # a stream tail may be quick
    written = await messages()
    await reader.read_to(writer.position)
    assert reader_state.history["kp-3"].signer == "carol"
    assert reader.position >= writer.position
    assert await messages() == written


async def test_a_position_the_log_never_reaches_is_ledger_unavailable(log: tuple[str, Replica, Any]) -> None:
    _, make, _ = log
    ledger = await make(KeyEventLog())
    assert await ledger.append(_assigned("kp-4", "dave")) is None
    with pytest.raises(SamError) as refused:
        await ledger.read_to(ledger.position + 10)
    assert refused.value.code is ErrorCode.ledger_unavailable
