"""Broker topology (DESIGN.md §2) in one place, and the RabbitMQ definitions that
declare it with least-privilege users."""

from __future__ import annotations

import re
from typing import Any

from worker.domain.contract import QueueClass
from worker.domain.envelope import reply_queue_prefix

__all__ = [
    "AUDIT_ARCHIVE_STREAM",
    "AUDIT_EXCHANGE",
    "CONFIG_STREAM",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "DELIVERY_LIMIT",
    "KEY_EVENTS_STREAM",
    "REQUESTS_EXCHANGE",
    "RESULTS_STREAM",
    "SAD_USE_STREAM",
    "SIEM_QUEUE_EXPIRES_MS",
    "SIEM_QUEUE_MAX_BYTES",
    "SIEM_QUEUE_POLICY",
    "VHOST",
    "definitions",
    "reply_queue_prefix",
]

VHOST = "sam"
REQUESTS_EXCHANGE = "sam.requests"
AUDIT_EXCHANGE = "sam.audit"
# Every committed audit batch, one message each: what "confirmed" means for the trail, and
# where a SIEM reads back what its queue on sam.audit missed (a stream: read from any
# offset by any number of readers, none of whom can refuse or slow the writer).
AUDIT_ARCHIVE_STREAM = "sam.audit.archive"
AUDIT_ARCHIVE_RETENTION = "30D"
DEAD_LETTER_EXCHANGE = "sam.dead-letter"
DEAD_LETTER_QUEUE = "sam.dead"
CONFIG_STREAM = "sam.config"
KEY_EVENTS_STREAM = "sam.key-events"
# Single use of SAD jti across replicas. Kept apart from key events because it grows
# with every signature; retention only needs to outlive the longest SAD lifetime.
SAD_USE_STREAM = "sam.sad-use"
SAD_USE_RETENTION = "1h"
# Results kept for repeats of their request (see worker.transport.results): written once
# per acting request, read only when a repeat comes; kept as long as claims are.
RESULTS_STREAM = "sam.results"
RESULTS_RETENTION = SAD_USE_RETENTION
# the longest a SAD or a request JWS may live for the retention above to cover its repeats
REPEAT_WINDOW_SECONDS = 3600
DELIVERY_LIMIT = 3
# A SIEM's own queues on sam.audit (named "<siem user>.<anything>") are capped by an
# operator policy, which the queue's own arguments can lower but never raise: at most this
# many bytes of entries wait (the oldest go first — the SIEM sees a gap and reads it back
# from the archive), and a queue nobody has consumed from or declared for this long is
# deleted with its bindings. Both are far inside the archive's 30 days.
SIEM_QUEUE_POLICY = "sam-siem-queues"
SIEM_QUEUE_MAX_BYTES = 256 * 1024 * 1024
SIEM_QUEUE_EXPIRES_MS = 7 * 24 * 3600 * 1000


def _queue(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "vhost": VHOST, "durable": True, "auto_delete": False, "arguments": arguments}


def _exchange(name: str, kind: str) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": VHOST,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {},
    }


def _binding(source: str, destination: str, key: str) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": VHOST,
        "destination": destination,
        "destination_type": "queue",
        "routing_key": key,
        "arguments": {},
    }


def _permission(user: str, configure: str, write: str, read: str) -> dict[str, Any]:
    return {"user": user, "vhost": VHOST, "configure": configure, "write": write, "read": read}


def _exact(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def definitions(
    workers: list[str],
    admins: list[str],
    ssas: list[str],
    siems: list[str],
    benchmarks: list[str] | None = None,
) -> dict[str, Any]:
    """RabbitMQ definitions for vhost ``sam``: topology, users (no passwords — EXTERNAL
    only) and least-privilege permissions."""
    work_queue_args = {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-strategy": "at-most-once",
    }
    queues = [_queue(q.queue_name, work_queue_args) for q in QueueClass]
    queues += [
        _queue(DEAD_LETTER_QUEUE, {"x-queue-type": "quorum"}),
        _queue(AUDIT_ARCHIVE_STREAM, {"x-queue-type": "stream", "x-max-age": AUDIT_ARCHIVE_RETENTION}),
        _queue(CONFIG_STREAM, {"x-queue-type": "stream"}),
        _queue(KEY_EVENTS_STREAM, {"x-queue-type": "stream"}),
        _queue(SAD_USE_STREAM, {"x-queue-type": "stream", "x-max-age": SAD_USE_RETENTION}),
        _queue(RESULTS_STREAM, {"x-queue-type": "stream", "x-max-age": RESULTS_RETENTION}),
    ]
    exchanges = [
        _exchange(REQUESTS_EXCHANGE, "direct"),
        _exchange(AUDIT_EXCHANGE, "topic"),
        _exchange(DEAD_LETTER_EXCHANGE, "fanout"),
    ]
    bindings = [_binding(REQUESTS_EXCHANGE, q.queue_name, q.value) for q in QueueClass]
    bindings += [_binding(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, "")]
    users = [
        {"name": name, "password_hash": "", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}
        for name in [*workers, *admins, *ssas, *siems, *(benchmarks or [])]
    ]
    streams = (CONFIG_STREAM, KEY_EVENTS_STREAM, SAD_USE_STREAM)
    permissions = [
        _permission(
            w,
            configure="^$",
            # the default exchange carries replies and ledger appends
            write=_exact("amq.default", AUDIT_EXCHANGE),
            # sam.dead too: workers answer and audit what died in the request queues
            read=_exact(*(q.queue_name for q in QueueClass), DEAD_LETTER_QUEUE, *streams, RESULTS_STREAM),
        )
        for w in workers
    ]
    for caller in [*admins, *ssas]:
        own = "^" + re.escape(reply_queue_prefix(caller)) + ".*$"
        permissions.append(_permission(caller, configure=own, write=_exact(REQUESTS_EXCHANGE), read=own))
    for siem in siems:
        own = "^" + re.escape(f"{siem}.") + ".*$"
        permissions.append(
            # its own queues on sam.audit, and the archive to read back what they missed
            _permission(
                siem, configure=own, write=own, read=f"{own}|{_exact(AUDIT_EXCHANGE, AUDIT_ARCHIVE_STREAM)}"
            )
        )
    for bench in benchmarks or []:
        # the echo baseline of ops/bench: its own queues only, replies via amq.default
        own = "^" + re.escape(f"{bench}.") + ".*$"
        permissions.append(_permission(bench, configure=own, write=f"{own}|^amq\\.default$", read=own))
    parameters = []
    if siems:
        parameters.append(
            {
                "vhost": VHOST,
                "component": "operator_policy",
                "name": SIEM_QUEUE_POLICY,
                "value": {
                    "pattern": "^(" + "|".join(re.escape(s) for s in siems) + ")\\.",
                    "apply-to": "queues",
                    "priority": 0,
                    "definition": {
                        "max-length-bytes": SIEM_QUEUE_MAX_BYTES,
                        "expires": SIEM_QUEUE_EXPIRES_MS,
                    },
                },
            }
        )
    return {
        "rabbit_version": "3.10.8",
        "users": users,
        "vhosts": [{"name": VHOST}],
        "permissions": permissions,
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
        "policies": [],
        "parameters": parameters,
        "global_parameters": [],
        "topic_permissions": [],
    }
