"""A key pair change confirmed on one replica holds on every other replica's next
signature, although signing writes nothing to ``sam.key-events``: the change's mark in
``sam.sad-use`` precedes the request's ``jti`` there, and reading that back tells the
signing replica how far to read key events first. Two replicas of the service on
shared in-memory streams; each reads a stream only when it appends or is told to."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import orjson

from tests.unit.test_hostile_input import EC_SHA256, World
from worker.domain.ledgers import KeyEventLog, SadUseLog
from worker.fakes import MarkedResultsIn, MemoryLedger, ReplicaLedger, SharedStream
from worker.ports import ResultStore
from worker.service import RESULT_IN_MARK_BYTES, SamService


class Replicas:
    """Two replicas of the service over shared in-memory streams (and ``results``, or the
    world's result store; ``sad_use_ledger`` makes each replica's view of sam.sad-use).
    ``result_in_mark_bytes``: the largest result kept in its answered mark."""

    def __init__(
        self,
        results: ResultStore | None = None,
        sad_use_ledger: Callable[[SharedStream, SadUseLog], ReplicaLedger] = ReplicaLedger,
        result_in_mark_bytes: int = RESULT_IN_MARK_BYTES,
    ) -> None:
        self.world = World()
        self.results = results or self.world.results
        self.key_events, self.sad_use = SharedStream(), SharedStream()
        self._sad_use_ledger, self._in_mark = sad_use_ledger, result_in_mark_bytes
        self.replicas = [self._replica() for _ in range(2)]

    def _replica(self) -> tuple[SamService, KeyEventLog]:
        world = self.world
        key_events, sad_use = KeyEventLog(), SadUseLog(30)
        service = SamService(
            world.service._static,
            world.configuration,
            key_events,
            sad_use,
            {
                "config": MemoryLedger(world.configuration),
                "key_events": ReplicaLedger(self.key_events, key_events),
                "sad_use": self._sad_use_ledger(self.sad_use, sad_use),
            },
            world.hsm,
            world.sealer,
            world.audit,
            self.results,
            MarkedResultsIn(self.sad_use.records),
            result_in_mark_bytes=self._in_mark,
        )
        return service, key_events

    def send(self, replica: int, operation: str, body: dict[str, Any], sad: str | None = None) -> Any:
        service, _ = self.replicas[replica]
        request = self.world.request(operation, orjson.dumps(body), sad=sad)
        reply = self.world.loop.run_until_complete(service.process(request))
        return reply.status, orjson.loads(reply.body) if reply.body else None

    def sign(self, replica: int, key_pair: dict[str, Any], text: bytes) -> Any:
        digest = hashlib.sha256(text).digest()
        body = {
            "signature_algorithm": EC_SHA256,
            "requests": [{"dtbs": base64.b64encode(digest).decode()}],
            "key_pair": key_pair,
            "signer": {"id": "alice"},
        }
        sad = self.world.authority.issue_sad("sam-1", "alice", key_pair["id"], [digest])
        return self.send(replica, "signatures.create", body, sad)


def test_a_deletion_on_one_replica_holds_on_the_other_at_once() -> None:
    replicas = Replicas()
    key_pair = replicas.world.key_pair
    assert replicas.sign(1, key_pair, b"before")[0] == 200
    lagging_position = replicas.replicas[1][1].history.get(key_pair["id"])
    status, _ = replicas.send(0, "key_pairs.delete", {"key_pair": key_pair, "signer": {"id": "alice"}})
    assert status == 200
    # replica 1 has not read the deletion yet ...
    assert replicas.replicas[1][1].history.get(key_pair["id"]) == lagging_position
    # ... and reads it before it signs
    status, document = replicas.sign(1, key_pair, b"after")
    assert (status, document["error"]["code"]) == (404, "key_pair_deleted")
    assert replicas.replicas[1][1].history[key_pair["id"]].deleted


def test_signing_writes_nothing_to_key_events() -> None:
    replicas = Replicas()
    for n in range(5):
        assert replicas.sign(n % 2, replicas.world.key_pair, f"document {n}".encode())[0] == 200
    assert replicas.key_events.records == []
    # per signature: its claim (spending the jti), then the mark that its result is stored
    assert [next(iter(r)) for r in replicas.sad_use.records] == ["claim", "answered"] * 5
