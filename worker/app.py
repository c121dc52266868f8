"""Wiring of one worker process: settings → HSM session, broker channels, ledgers,
audit trail, service, consumers; then serve until SIGTERM (SIGHUP reopens audit files)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import signal
import time
from pathlib import Path

import aio_pika

from worker.audit_trail import AuditTrail
from worker.domain.key_pair import KeyPairSealer
from worker.domain.keys import load_public_key
from worker.domain.ledgers import ConfigurationLog, KeyEventLog, SadUseLog
from worker.hsm.pkcs11_hsm import Pkcs11Hsm, open_session
from worker.service import SamService
from worker.settings import (
    WorkerSettings,
    load_infrastructure,
    load_static_configuration,
    read_secret,
)
from worker.transport.amqp import connect
from worker.transport.consumer import RequestConsumer
from worker.transport.ledger import StreamLedger
from worker.transport.topology import AUDIT_EXCHANGE, CONFIG_STREAM, KEY_EVENTS_STREAM, SAD_USE_STREAM

__all__ = ["run_worker"]

log = logging.getLogger("sam.worker")


async def run_worker(settings: WorkerSettings, ready_file: Path | None = None) -> None:
    infrastructure = load_infrastructure(settings.infrastructure_file)
    static = load_static_configuration(settings.static_config_file)
    session = open_session(settings.pkcs11_module, settings.token_label, read_secret(settings.token_pin_file))
    hsm = Pkcs11Hsm(
        session,
        infrastructure.kek_label,
        infrastructure.state_key.label,
        infrastructure.audit_key.label,
        infrastructure.factor_key_label,
        infrastructure.wrap_mechanism,
    )
    sealer = KeyPairSealer(
        static.sam_id,
        infrastructure.state_key.label,
        load_public_key(infrastructure.state_key.public_key),
        hsm.sign_with_state_key,
    )
    connection = await connect(settings.broker_url, settings.tls)
    try:
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        ledger_channel = await connection.channel()
        await ledger_channel.set_qos(prefetch_count=1000)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=settings.prefetch)
        audit_exchange = await publish_channel.get_exchange(AUDIT_EXCHANGE, ensure=False)

        async def publish_audit(body: bytes, routing_key: str) -> None:
            message = aio_pika.Message(body, content_type="application/json", delivery_mode=2)
            await audit_exchange.publish(message, routing_key=routing_key, mandatory=True)

        configuration = ConfigurationLog(static)
        key_events = KeyEventLog()
        sad_use = SadUseLog(static.sad_policy.clock_skew_seconds)
        # A jti older than the longest SAD lifetime can no longer be replayed, so
        # the SAD-use stream is read from that horizon only.
        horizon = static.sad_policy.max_lifetime_seconds + 2 * static.sad_policy.clock_skew_seconds
        ledgers = {
            "config": StreamLedger(
                CONFIG_STREAM, configuration, ledger_channel, publish_channel, settings.ledger_timeout_seconds
            ),
            "key_events": StreamLedger(
                KEY_EVENTS_STREAM,
                key_events,
                ledger_channel,
                publish_channel,
                settings.ledger_timeout_seconds,
            ),
            "sad_use": StreamLedger(
                SAD_USE_STREAM,
                sad_use,
                ledger_channel,
                publish_channel,
                settings.ledger_timeout_seconds,
                start_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=horizon),
            ),
        }
        for ledger in ledgers.values():
            await ledger.start()
        audit = AuditTrail(
            infrastructure.node,
            settings.instance,
            settings.audit_dir,
            hsm.sign_audit_digest,
            publish_audit,
            settings.audit_timeout_seconds,
        )
        audit.start()
        service = SamService(static, configuration, key_events, sad_use, dict(ledgers), hsm, sealer, audit)
        consumer = RequestConsumer(
            service.process, consume_channel, publish_channel, settings.publish_timeout_seconds
        )
        await consumer.start(settings.queues)
        log.info(
            "worker %s ready: queues %s, configuration version %d",
            settings.instance,
            ",".join(settings.queues),
            configuration.state.version,
        )
        if ready_file is not None:
            await asyncio.to_thread(ready_file.write_text, settings.instance)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, audit.reopen)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=60)
            sad_use.forget_expired(int(time.time()))
        log.info("worker %s stopping", settings.instance)
        await consumer.stop()
        await audit.close()
        for ledger in ledgers.values():
            await ledger.stop()
    finally:
        await connection.close()
        session.close()
