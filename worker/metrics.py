"""Prometheus metrics of one worker process (prefix ``sam_``).

Instruments take the registry as an argument (tests use their own); label values come
from closed sets (operation names, error codes, mechanisms), never from request input,
so a hostile ``type`` cannot blow up the series count.
"""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from worker.domain.contract import Operation

__all__ = ["HsmOperation", "Metrics", "RepeatAnswer", "operation_label"]


class HsmOperation(StrEnum):
    """What the HSM was asked to do (the ``operation`` label of ``sam_hsm_*``)."""

    generate = "generate"
    unwrap_sign_destroy = "unwrap_sign_destroy"
    rewrap = "rewrap"
    factor = "factor"
    seal = "seal"
    audit_checkpoint = "audit_checkpoint"


class RepeatAnswer(StrEnum):
    """What a repeat of a request got (the ``answer`` label of ``sam_repeats_total``)."""

    stored_result = "stored_result"  # the result an earlier attempt stored
    takeover = "takeover"  # no attempt had answered: this one took the request over
    taken_over = "taken_over"  # counted on the slow attempt whose result was dropped


_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_KNOWN = {str(operation) for operation in Operation}


def operation_label(operation: str | None) -> str:
    """The operation as a label value: a known operation's name, else ``unknown``."""
    return operation if operation in _KNOWN else "unknown"


class Metrics:
    """Every instrument of one worker process, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # process_resident_memory_bytes, CPU seconds, open files: memory must stay flat
        ProcessCollector(registry=registry)
        self.requests = Counter(
            "sam_requests",
            "Requests answered, by operation, outcome and error code",
            ["operation", "outcome", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "sam_request_duration_seconds",
            "Time from delivery to reply, by operation",
            ["operation"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.rejections = Counter(
            "sam_rejections",
            "Refused requests by reason (request checks and SAD checks)",
            ["reason"],
            registry=registry,
        )
        self.hsm_seconds = Histogram(
            "sam_hsm_operation_seconds",
            "Time in the HSM, by operation and mechanism",
            ["operation", "mechanism"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.hsm_errors = Counter("sam_hsm_errors", "HSM calls that failed", ["operation"], registry=registry)
        # A labelled series exists only from its first increment, and increase() needs a
        # sample before it: started at 0, the first error of an operation raises SamHsmErrors.
        for hsm_operation in HsmOperation:
            self.hsm_errors.labels(hsm_operation)
        self.result_store_seconds = Histogram(
            "sam_result_store_seconds",
            "Keeping an acting request's result for its repeats: the sam.results confirm, then the "
            "answered mark read back from sam.sad-use",
            buckets=_LATENCY,
            registry=registry,
        )
        self.repeats = Counter(
            "sam_repeats", "Repeats of a request, by what they got", ["answer"], registry=registry
        )
        self.audit_flush_seconds = Histogram(
            "sam_audit_flush_seconds",
            "From the start of an audit batch's write to its commit (fsynced and confirmed by the archive)",
            buckets=_LATENCY,
            registry=registry,
        )
        self.audit_confirm_seconds = Histogram(
            "sam_audit_confirm_seconds",
            "From the start of an audit batch's write to the archive's confirm",
            buckets=_LATENCY,
            registry=registry,
        )
        self.audit_batch_records = Histogram(
            "sam_audit_batch_records",
            "Records per audit batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.audit_failures = Counter(
            "sam_audit_failures",
            "Audit batches tried and not committed (each one checkpoint signature; tries back off)",
            registry=registry,
        )
        self.audit_withheld = Counter(
            "sam_audit_withheld_replies",
            "Replies turned into audit_unavailable because their audit record was not committed in time",
            registry=registry,
        )
        self.audit_feed_failures = Counter(
            "sam_audit_feed_failures",
            "Committed audit batches the live feed (sam.audit) did not take; the archive holds them",
            registry=registry,
        )
        self.in_flight = Gauge("sam_in_flight_requests", "Requests being processed", registry=registry)
        self.consumer_prefetch = Gauge(
            "sam_consumer_prefetch",
            "Deliveries each request consumer may hold unacknowledged (SAM_PREFETCH): in-flight "
            "requests near it for long mean a queue class this worker cannot keep up with",
            registry=registry,
        )
        self.config_version = Gauge(
            "sam_config_version", "Dynamic configuration version in force", registry=registry
        )
        self.key_events_position = Gauge(
            "sam_key_events_position", "Offset of the last sam.key-events record applied", registry=registry
        )
        self.sad_use_entries = Gauge(
            "sam_sad_use_entries",
            "SAD jti remembered until their SAD expires: grows with request rate x SAD lifetime",
            registry=registry,
        )
        self.ready = Gauge("sam_ready", "1 when the worker is ready to serve", registry=registry)

    def observe(self, operation: str | None, status: int, error_code: str | None, seconds: float) -> None:
        """Count one answered request and its latency; refusals (4xx) also by reason."""
        label = operation_label(operation)
        outcome = "success" if status < 400 else "failure"
        self.requests.labels(label, outcome, error_code or "ok").inc()
        self.request_seconds.labels(label).observe(seconds)
        if 400 <= status < 500 and error_code:
            self.rejections.labels(error_code).inc()
