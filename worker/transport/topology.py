"""Broker topology (README: *The message contract*) in one place, and the RabbitMQ definitions that
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
    "SIEM_QUEUE_MAX_BYTES",
    "SIEM_QUEUE_MAX_LENGTH",
    "SIEM_QUEUE_POLICY",
    "VHOST",
    "definitions",
    "reply_queue_prefix",
    "siem_queue",
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
# Each SIEM user reads one queue the operator declares for it, "<siem user>.audit", bound
# to sam.audit with "#", and the archive; it may declare, bind and publish nothing. (A SIEM
# that may bind its own queues needs write on them, and RabbitMQ's write permission does
# not tell queues from exchanges: it could publish without bound into an exchange of its
# own, and streams it declared escape every queue limit.) An operator policy, which queue
# arguments can lower but never raise, caps what waits in any queue named after a SIEM:
# once the cap is reached the oldest entries go — the SIEM's verifier sees a gap and reads
# it back from the archive — so a SIEM that stops reading cannot fill the broker.
SIEM_QUEUE_POLICY = "sam-siem-queues"
SIEM_QUEUE_MAX_BYTES = 256 * 1024 * 1024
SIEM_QUEUE_MAX_LENGTH = 1_000_000  # entries are small; bounds the per-message overhead too


def siem_queue(siem: str) -> str:
    """The queue the definitions declare for a SIEM user on sam.audit."""
    return f"{siem}.audit"


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
    # the arguments `sam-admin audit tail` declared these queues with before the
    # definitions did, so that importing them onto an existing broker succeeds
    queues += [_queue(siem_queue(siem), {"x-queue-type": "quorum"}) for siem in siems]
    bindings = [_binding(REQUESTS_EXCHANGE, q.queue_name, q.value) for q in QueueClass]
    bindings += [_binding(AUDIT_EXCHANGE, siem_queue(siem), "#") for siem in siems]
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
        # its queue on sam.audit, and the archive to read back what the queue missed
        permissions.append(
            _permission(siem, configure="^$", write="^$", read=_exact(siem_queue(siem), AUDIT_ARCHIVE_STREAM))
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
                        "max-length": SIEM_QUEUE_MAX_LENGTH,
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
