"""A starting worker replays a stream for as long as it keeps reading: the startup
bound is progress, not a total, because ``sam.key-events`` grows with the deployment."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from worker.errors import ErrorCode, SamError
from worker.transport.ledger import StreamLedger


class _Reducer:
    def __init__(self) -> None:
        self.applied = 0

    def apply(self, record: dict[str, Any], position: int = -1) -> SamError | None:
        self.applied += 1
        return None


class _Message:
    def __init__(self, body: bytes, offset: int) -> None:
        self.body = body
        self.headers = {"x-stream-offset": offset}

    async def ack(self) -> None:
        return None


class _Broker:
    """Stands in for one stream: a backlog delivered at a given pace, then whatever the
    ledger publishes (its sync marker) read back."""

    def __init__(self, backlog: int, pace: float) -> None:
        self.backlog, self.pace = backlog, pace
        self.published: list[bytes] = []
        self.callback: Any = None
        self.delivering: asyncio.Task[None] | None = None

    # the consume channel
    async def get_queue(self, name: str, ensure: bool = False) -> _Broker:
        return self

    async def consume(self, callback: Any, arguments: dict[str, Any]) -> None:
        self.callback = callback
        self.delivering = asyncio.get_running_loop().create_task(self._deliver())

    async def _deliver(self) -> None:
        offset = 0
        for _ in range(self.backlog):
            await asyncio.sleep(self.pace)
            await self.callback(_Message(orjson.dumps({"id": "old", "records": [{}]}), offset))
            offset += 1
        while True:  # then read back what the ledger appends
            await asyncio.sleep(0.001)
            while self.published:
                await self.callback(_Message(self.published.pop(0), offset))
                offset += 1

    # the publish channel
    @property
    def default_exchange(self) -> _Broker:
        return self

    async def publish(self, message: Any, routing_key: str) -> None:
        self.published.append(message.body)


async def _start(broker: _Broker, ledger_timeout: float) -> tuple[StreamLedger, _Reducer]:
    reducer = _Reducer()
    ledger = StreamLedger("sam.key-events", reducer, broker, broker, ledger_timeout)  # type: ignore[arg-type]
    try:
        await ledger.start()
    finally:
        await ledger.stop()
        if broker.delivering is not None:
            broker.delivering.cancel()
    return ledger, reducer


async def test_a_replay_longer_than_the_timeout_completes_while_it_progresses() -> None:
    # 40 messages 10 ms apart: 0.4 s in all, four times the 0.1 s timeout
    ledger, reducer = await _start(_Broker(backlog=40, pace=0.01), ledger_timeout=0.1)
    assert reducer.applied == 40
    assert ledger.position == 40  # the sync marker after the backlog


async def test_a_stream_that_stops_delivering_fails_the_start_after_the_timeout() -> None:
    # one message, then nothing for longer than the timeout
    with pytest.raises(SamError) as refused:
        await _start(_Broker(backlog=2, pace=0.3), ledger_timeout=0.1)
    assert refused.value.code is ErrorCode.ledger_unavailable


async def test_read_to_waits_for_the_tail_without_writing() -> None:
    broker = _Broker(backlog=5, pace=0.02)
    ledger = StreamLedger("sam.key-events", _Reducer(), broker, broker, 1.0)  # type: ignore[arg-type]
    await broker.consume(ledger._on_message, {})
    try:
        await ledger.read_to(3)
        assert ledger.position >= 3
        assert broker.published == []  # nothing was appended to get there
        idle = StreamLedger("sam.key-events", _Reducer(), broker, broker, 0.1)  # type: ignore[arg-type]
        with pytest.raises(SamError) as refused:  # a position it never reaches: refused after the timeout
            await idle.read_to(100)
        assert refused.value.code is ErrorCode.ledger_unavailable
    finally:
        if broker.delivering is not None:
            broker.delivering.cancel()
