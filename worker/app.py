"""Wiring of one worker process: settings → HSM session, broker channels, ledgers,
audit trail, service, consumers; then serve until SIGTERM (SIGHUP reopens audit files)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from prometheus_client import CollectorRegistry

from worker.audit_trail import ArchiveRefused, AuditTrail
from worker.domain.configuration import StaticConfiguration
from worker.domain.key_pair import KeyPairSealer
from worker.domain.keys import load_public_key
from worker.domain.ledgers import ConfigurationLog, KeyEventLog, SadUseLog
from worker.hsm.instrumented import InstrumentedHsm
from worker.hsm.lane import LaneMode, open_lane
from worker.metrics import Metrics
from worker.service import SamService
from worker.settings import (
    WorkerSettings,
    load_infrastructure,
    load_static_configuration,
    read_secret,
)
from worker.transport.amqp import connect, connect_worker, rotated
from worker.transport.consumer import RequestConsumer
from worker.transport.http import HealthServer
from worker.transport.ledger import StreamLedger
from worker.transport.results import MarkedResults, StreamResultStore
from worker.transport.topology import (
    AUDIT_ARCHIVE_STREAM,
    AUDIT_EXCHANGE,
    CONFIG_STREAM,
    KEY_EVENTS_STREAM,
    SAD_USE_STREAM,
)

__all__ = ["run_worker"]

log = logging.getLogger("sam.worker")


EXIT_RESTART = 75  # EX_TEMPFAIL (HSM or broker lost): the supervisor should start it again


async def run_worker(settings: WorkerSettings, ready_file: Path | None = None) -> int:
    """Serve until SIGTERM (exit status 0) or until the HSM is lost (``EXIT_RESTART``)."""
    infrastructure = load_infrastructure(settings.infrastructure_file)
    static = load_static_configuration(settings.static_config_file)
    pin = read_secret(settings.token_pin_file)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    stop = asyncio.Event()
    exit_status = 0

    def hsm_lost() -> None:
        nonlocal exit_status
        if exit_status == 0:
            log.critical("the HSM is lost to this process: draining, then exiting for a restart")
        exit_status = EXIT_RESTART
        stop.set()

    lane = await open_lane(  # SamError: cannot start
        settings.pkcs11_module,
        settings.token_label,
        pin,
        infrastructure,
        hsm_lost,
        mode=LaneMode(settings.hsm_lane),
        sessions=settings.hsm_sessions,
        generation_sessions=settings.hsm_generation_sessions,
        call_timeout=settings.hsm_timeout_seconds,
    )
    hsm = InstrumentedHsm(lane, metrics)
    sealer = KeyPairSealer(
        static.sam_id,
        infrastructure.state_key.label,
        load_public_key(infrastructure.state_key.public_key),
        hsm.sign_with_state_key,
    )
    try:
        connection = await connect_worker(
            settings.broker_urls, settings.tls, settings.broker_connect_patience_seconds, settings.instance
        )
    except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
        log.critical("cannot reach the broker (%s): exiting for a restart", type(exc).__name__)
        await lane.close()
        return EXIT_RESTART

    def lost(what: str) -> Callable[..., None]:
        def exit_for_restart(*_: object) -> None:
            nonlocal exit_status
            if not stop.is_set():
                log.critical("%s: exiting for a restart", what)
                exit_status = EXIT_RESTART
                stop.set()

        return exit_for_restart

    connection.close_callbacks.add(lost("the broker connection is lost"))
    closing: list[AbstractConnection] = []
    try:
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        ledger_channel = await connection.channel()
        await ledger_channel.set_qos(prefetch_count=1000)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=settings.prefetch)
        # a channel the broker closed (a channel error) is not opened again on this
        # connection: without it replies or ledger records can no longer be confirmed
        for channel in (publish_channel, ledger_channel, consume_channel):
            channel.close_callbacks.add(lost("a broker channel was closed"))
        # The live feed has a connection of its own (robust: it reconnects by itself), so
        # what SIEM queues do to it never touches requests, replies, ledgers or the
        # archive: a nack; the credit flow of fanning out to a thousand queues; RabbitMQ
        # 3.10 crashing the publishing channel, and with it the connection (541), when a
        # bound quorum queue is deleted mid-publish.
        feed_connection = await connect(
            ",".join(rotated(settings.broker_urls, settings.instance)), settings.tls
        )
        closing.append(feed_connection)
        feed_channel = await feed_connection.channel(publisher_confirms=True)
        feed_exchange = await feed_channel.get_exchange(AUDIT_EXCHANGE, ensure=False)

        async def archive_audit(body: bytes) -> None:
            # a whole batch, one entry per line (see AuditTrail), into the SAM's own stream
            message = aio_pika.Message(body, content_type="application/x-ndjson", delivery_mode=2)
            try:
                async with asyncio.timeout(settings.publish_timeout_seconds):
                    await publish_channel.default_exchange.publish(
                        message, routing_key=AUDIT_ARCHIVE_STREAM, mandatory=True
                    )
            except aio_pika.exceptions.DeliveryError as exc:  # nacked, or returned unroutable
                raise ArchiveRefused(type(exc).__name__) from exc

        async def feed_audit(body: bytes, routing_key: str) -> None:
            # not mandatory: with no SIEM bound, nobody is owed this copy
            message = aio_pika.Message(body, content_type="application/x-ndjson", delivery_mode=2)
            await feed_exchange.publish(message, routing_key=routing_key)

        state, ledgers = _ledgers(static, settings, ledger_channel, publish_channel)
        configuration, key_events, sad_use = state
        for ledger in ledgers.values():
            await ledger.start()
        audit = AuditTrail(
            infrastructure.node,
            settings.instance,
            settings.audit_dir,
            hsm.sign_audit_digest,
            archive_audit,
            settings.audit_timeout_seconds,
            metrics,
            feed=feed_audit,
            on_hung=lost("the audit trail's file I/O is hung"),
        )
        audit.start()
        results_channel = await connection.channel()  # read only when a repeat comes
        await results_channel.set_qos(prefetch_count=200)
        results_channel.close_callbacks.add(lost("a broker channel was closed"))
        results = StreamResultStore(publish_channel, results_channel, settings.ledger_timeout_seconds)
        # a channel of its own, reopened if closed: a repeat's read never ends the worker
        marks = MarkedResults(connection, settings.ledger_timeout_seconds)
        service = SamService(
            static,
            configuration,
            key_events,
            sad_use,
            dict(ledgers),
            hsm,
            sealer,
            audit,
            results,
            marks,
            metrics=metrics,
        )
        consumer = RequestConsumer(
            service.process, consume_channel, publish_channel, settings.publish_timeout_seconds
        )
        await consumer.start(settings.queues)

        def readiness() -> dict[str, bool]:
            # Not ready while a sink keeps failing past its bound, so an orchestrator stops
            # sending this worker work it can only answer with 503.
            return {
                "broker": not connection.is_closed and not consume_channel.is_closed,
                "hsm": lane.healthy,
                "configuration": True,  # the streams were replayed before the consumers started
                "audit": audit.writable() and audit.failing_for() <= settings.audit_timeout_seconds,
                "ledgers": all(
                    ledger.failing_for() <= settings.ledger_timeout_seconds for ledger in ledgers.values()
                ),
            }

        metrics.ready.set_function(lambda: float(all(readiness().values())))
        metrics.in_flight.set_function(lambda: consumer.in_flight)
        metrics.consumer_prefetch.set(settings.prefetch)
        metrics.config_version.set_function(lambda: configuration.state.version)
        metrics.key_events_position.set_function(lambda: ledgers["key_events"].position)
        metrics.sad_use_entries.set_function(lambda: len(sad_use))
        health = None
        if settings.metrics_port is not None:
            health = HealthServer(registry, readiness, settings.metrics_address, settings.metrics_port)
            await health.start()
        log.info(
            "worker %s ready: queues %s, configuration version %d",
            settings.instance,
            ",".join(settings.queues),
            configuration.state.version,
        )
        if ready_file is not None:
            await asyncio.to_thread(ready_file.write_text, settings.instance)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, audit.reopen)
        # what sam.sad-use remembers is forgotten as its records' times pass (see
        # SadUseLog), never by this worker's clock: replicas must hold the same claims
        await stop.wait()
        log.info("worker %s stopping", settings.instance)
        await consumer.stop()
        await results.stop()
        await audit.close()
        if health is not None:
            await health.stop()
        for ledger in ledgers.values():
            await ledger.stop()
    finally:
        for extra in closing:
            with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError):
                await extra.close()
        with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError):
            await connection.close()
        await lane.close()
    return exit_status


def _ledgers(
    static: StaticConfiguration,
    settings: WorkerSettings,
    consume_channel: AbstractChannel,
    publish_channel: AbstractChannel,
) -> tuple[tuple[ConfigurationLog, KeyEventLog, SadUseLog], dict[str, StreamLedger]]:
    """The replicated state and the stream ledgers that feed it (not started yet)."""
    configuration = ConfigurationLog(static)
    key_events = KeyEventLog()
    sad_use = SadUseLog(static.sad_policy.clock_skew_seconds)
    # A jti older than the longest SAD lifetime can no longer be replayed, nor a request
    # older than the request JWS's age limit repeated, so the SAD-use stream is read from
    # that horizon only.
    lifetime = max(static.sad_policy.max_lifetime_seconds, static.limits.request_max_age_seconds)
    horizon = lifetime + 2 * static.sad_policy.clock_skew_seconds
    timeout = settings.ledger_timeout_seconds
    ledgers = {
        "config": StreamLedger(CONFIG_STREAM, configuration, consume_channel, publish_channel, timeout),
        "key_events": StreamLedger(KEY_EVENTS_STREAM, key_events, consume_channel, publish_channel, timeout),
        "sad_use": StreamLedger(
            SAD_USE_STREAM,
            sad_use,
            consume_channel,
            publish_channel,
            timeout,
            start_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=horizon),
        ),
    }
    return (configuration, key_events, sad_use), ledgers
