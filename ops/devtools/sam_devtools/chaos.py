"""TEST TOOLING: ``ops/chaos [--full] [--cluster]`` — load through the SDK while workers
are killed (SIGKILL) or stopped beyond the SDK's timeout (SIGSTOP), the broker restarts,
the HSM goes away and the audit disk fills; with ``--cluster``, on a three-node RabbitMQ
cluster, one node after another is stopped and started again instead of the single
broker's restart. Then the report.

It runs a stack of its own (a temporary folder, ports base 27671) so it never disturbs
the demo stack. The short run (CI) lasts about a minute; ``--full`` several minutes.
At the end: requests sent, answered by outcome and error code, unanswered (must be 0),
duplicate replies absorbed by the SDK, retries, and ``sam-admin audit verify`` over
every audit file (must pass, with at least one record per answered request). Per
request id, what the SSA finally got is set against what the trail says: a request the
trail records as answered with a result while its SSA holds a refusal (or nothing) must
not exist.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sam_devtools.authorization_server import DevAuthorizationServer
from sam_devtools.raw_client import RawSamClient
from sam_devtools.stack import Stack, fill_filesystem, scratch_stack, verify_audit
from worker.client import SamClient, SamTimeout
from worker.domain.contract import DynamicConfiguration, KeyPairObject

__all__ = ["ChaosReport", "certified_key_pair", "main", "run", "signature_request"]

EC_SHA256 = "1.2.840.10045.4.3.2"
REPLY_TIMEOUT = 8  # the SDK's wait for a reply before it sends the request again
STOPPED_SECONDS = REPLY_TIMEOUT + 4  # a worker stopped for longer than that


@dataclass
class ChaosReport:
    """What a chaos run saw: requests and their outcomes, unanswered ones, SDK retries, the
    faults injected and whether the audit trail verified with a record per answer."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0
    late_or_duplicate_replies: int = 0  # replies the SDK got when nobody waited any more
    retries: int = 0
    faults: list[str] = field(default_factory=list)
    audit_ok: bool = False
    audit_summary: str = ""
    answered_without_record: int = 0
    decided_key_pair_invalid: int = 0  # records that blame the caller's key pair
    unchained_records: int = 0
    answered_request_ids: set[str] = field(default_factory=set)
    final: dict[str, str] = field(default_factory=dict)  # request id -> "ok" | code | "unknown"
    repeats_answered: int = 0  # final answers that were an earlier attempt's stored result
    taken_over: int = 0  # records of attempts a repeat took over (their result dropped)
    succeeded_while_ssa_holds_failure: int = 0
    queue_members: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests_sent": self.sent,
            "answered": dict(sorted(self.outcomes.items())),
            "answered_successfully": self.outcomes.get("ok", 0),
            "unanswered": self.unanswered,
            "late_or_duplicate_replies_absorbed": self.late_or_duplicate_replies,
            "sdk_retries": self.retries,
            "sdk_reconnects": self.reconnects,
            "members_per_queue": self.queue_members,
            "faults_injected": self.faults,
            "audit_verify_ok": self.audit_ok,
            "audit_verify": self.audit_summary,
            "answered_without_audit_record": self.answered_without_record,
            "records_deciding_key_pair_invalid": self.decided_key_pair_invalid,
            "records_kept_unchained": self.unchained_records,
            "final_answers_that_were_repeats": self.repeats_answered,
            "attempts_taken_over_by_a_repeat": self.taken_over,
            "recorded_as_success_while_the_ssa_holds_a_failure": self.succeeded_while_ssa_holds_failure,
        }


async def certified_key_pair(stack: Stack, client: SamClient, signer: str) -> KeyPairObject:
    """A P-256 key pair of ``client``'s, assigned to ``signer`` and certified by the dev CA."""
    created = await client.create_key_pair("ECDSA", named_curve="secp256r1")
    assigned = await client.assign_key_pair(created, signer, f"CN={signer}")
    request = await client.certification_request(assigned, EC_SHA256)
    return await client.update_key_pair(assigned, signer, certificate=stack.pki.issue_from_request(request))


def signature_request(
    authority: DevAuthorizationServer, sam_id: str, key_pair: KeyPairObject, signer: str, message_id: str
) -> tuple[bytes, str]:
    """The body and SAD of a one-digest ECDSA P-256 signature request (the digest: of the
    message id, so every request signs something of its own)."""
    digest = hashlib.sha256(message_id.encode()).digest()
    body = orjson.dumps(
        {
            "signature_algorithm": EC_SHA256,
            "requests": [{"dtbs": base64.b64encode(digest).decode()}],
            "key_pair": key_pair.model_dump(mode="json", exclude_none=True),
            "signer": {"id": signer},
        }
    )
    assert key_pair.id is not None
    return body, authority.issue_sad(sam_id, signer, key_pair.id, [digest], lifetime=280)


async def _load(
    stack: Stack,
    client: RawSamClient,
    authority: DevAuthorizationServer,
    sam_id: str,
    key_pair: KeyPairObject,
    stop: asyncio.Event,
    report: ChaosReport,
) -> None:
    while not stop.is_set():
        message_id = str(uuid.uuid4())
        if report.sent % 10 == 9:  # one key request in ten
            operation = "key_pairs.create"
            body = b'{"key_template": {"algorithm": "ECDSA", "named_curve": "secp256r1"}}'
            sad = None
        else:
            operation = "signatures.create"
            body, sad = signature_request(authority, sam_id, key_pair, "chaos", message_id)
        report.sent += 1
        try:
            reply = await client.send(
                operation, body, sad=sad, message_id=message_id, reply_timeout=REPLY_TIMEOUT, retries=4
            )
        except (SamTimeout, Exception) as error:
            report.unanswered += 1
            report.final[message_id] = "unknown"
            report.faults.append(f"unanswered {message_id}: {type(error).__name__}")
            continue
        assert reply is not None
        answer = "ok" if reply.status < 400 else str(reply.code)
        report.outcomes[answer] += 1
        report.final[message_id] = answer
        report.repeats_answered += reply.repeat
        report.answered_request_ids.add(message_id)


async def _chaos(stack: Stack, full: bool, stop: asyncio.Event, report: ChaosReport) -> None:
    """The fault schedule; each fault is undone before the next."""
    tokens = stack.path("softhsm", "tokens")
    audit = stack.path("audit")
    if stack.cluster > 1:
        # node 1 first: the SDK and some workers are connected to it, and it leads the
        # queues declared first; then another node, so the cluster loses a member twice
        steps = ["kill", "node-1", "hsm", "kill", "audit", "node-2", "kill"] * (3 if full else 1)
    else:
        steps = ["kill", "hsm", "stop", "kill", "audit", "broker", "kill"] * (3 if full else 1)
    for step in steps:
        await asyncio.sleep(4)
        if step == "kill":
            children = _worker_processes(stack, "worker-1")
            for child in children:
                os.kill(child, signal.SIGKILL)
            report.faults.append(f"SIGKILL worker-1 ({', '.join(map(str, children))})")
        elif step == "stop":
            children = _worker_processes(stack, "worker-2")
            for child in children:
                os.kill(child, signal.SIGSTOP)
            report.faults.append(
                f"SIGSTOP worker-2 for {STOPPED_SECONDS} s (the SDK waits {REPLY_TIMEOUT} s)"
            )
            await asyncio.sleep(STOPPED_SECONDS)
            for child in children:
                os.kill(child, signal.SIGCONT)
        elif step == "hsm":
            tokens.rename(tokens.with_name("tokens-away"))
            report.faults.append("HSM token store away for 4 s")
            await asyncio.sleep(4)
            tokens.with_name("tokens-away").rename(tokens)
        elif step == "audit":
            filler = audit / "filler"
            mounted = subprocess.run(["mountpoint", "-q", str(audit)], check=False).returncode == 0
            if mounted:
                fill_filesystem(filler)
                report.faults.append("audit disk full for 4 s")
                await asyncio.sleep(4)
                filler.unlink()
            else:
                report.faults.append("audit disk full: skipped (no small filesystem could be mounted)")
        elif step == "broker":
            await asyncio.to_thread(stack.stop_node, 1)
            report.faults.append("broker stopped and started again")
            await asyncio.to_thread(stack._rabbitmq)
        elif step.startswith("node-"):
            node = int(step.removeprefix("node-"))
            await asyncio.to_thread(stack.stop_node, node)
            report.faults.append(f"cluster node {node} stopped for 6 s, then started again")
            await asyncio.sleep(6)
            await asyncio.to_thread(stack.start_node, node)
    await asyncio.sleep(4)
    stop.set()


def _worker_processes(stack: Stack, instance: str) -> list[int]:
    """The worker processes its supervisor started for ``instance``."""
    supervisor = int(stack.path("run", f"{instance}.pid").read_text())
    children = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True).stdout
    return [int(child) for child in children.split()]


async def run(full: bool = False, port_base: int = 27671, cluster: int = 1) -> ChaosReport:
    """Start a stack of its own and load it while faults are injected, then verify its audit
    trail; the stack is stopped and its folder removed whatever happens."""
    report = ChaosReport()
    with scratch_stack("sam-chaos-", port_base, cluster) as (stack, _):
        stack.up(workers=2)
        report.queue_members = stack.queue_members()
        static = json.loads(stack.path("config", "static_config.json").read_text())
        authority = DevAuthorizationServer("dev-as", stack.pki.jws_key("dev-as").read_bytes())
        async with SamClient.from_profile(stack.profile("admin-1")) as admin:
            config = stack.path("config", "dynamic_config.json").read_bytes()
            await admin.put_configuration(DynamicConfiguration.model_validate_json(config))
        client = RawSamClient.from_profile(stack.profile("ssa-1"))
        await client.connect()
        key_pair = await certified_key_pair(stack, client, "chaos")
        stop = asyncio.Event()
        loaders = [
            asyncio.create_task(_load(stack, client, authority, static["sam_id"], key_pair, stop, report))
            for _ in range(8)
        ]
        await _chaos(stack, full, stop, report)
        await asyncio.gather(*loaders)
        report.late_or_duplicate_replies = sum(client.unmatched_replies.values())
        report.retries = client.retried
        report.reconnects = client.reconnects
        await client.close()
        stack.down()
        files = sorted(stack.path("audit").glob("*/*.jsonl"))
        result = verify_audit(stack.infrastructure_file, files)
        report.audit_ok = result.returncode == 0
        report.audit_summary = result.stdout.strip().splitlines()[-1] if result.stdout else result.stderr
        recorded = set()
        succeeded = set()  # request ids the trail records as answered with a result
        for path in files:
            for line in path.read_bytes().splitlines():
                entry = orjson.loads(line)
                if entry.get("type") == "record":
                    recorded.add(entry.get("request_id"))
                    if entry.get("outcome") == "success":
                        succeeded.add(entry.get("request_id"))
                    report.taken_over += entry.get("error_code") == "request_taken_over"
                    # the HSM taken away must never read as the caller's key pair being bad,
                    # neither as the answer nor as the decision behind a withheld reply
                    said = f"{entry.get('error_code')} {entry.get('detail') or ''}"
                    report.decided_key_pair_invalid += "key_pair_invalid" in said
        report.succeeded_while_ssa_holds_failure = sum(
            1 for request_id in succeeded if report.final.get(request_id, "ok") != "ok"
        )
        # records a worker could not chain before it exited (HSM lost) are kept beside the logs
        side_files = sorted(stack.path("audit").glob("*/*.unwritten-*"))
        for path in side_files:
            recorded |= {orjson.loads(line).get("request_id") for line in path.read_bytes().splitlines()}
        report.unchained_records = sum(len(p.read_bytes().splitlines()) for p in side_files)
        report.answered_without_record = len(report.answered_request_ids - recorded)
        return report


def main(argv: list[str] | None = None) -> None:
    """``ops/chaos``: print (and with ``--out`` write) the report; exit 1 if a request went
    unanswered, an answer has no audit record or the audit trail does not verify."""
    argv = sys.argv[1:] if argv is None else argv
    if "--audit-outages" in argv:  # one outage of each kind of audit sink failure, measured
        from sam_devtools import audit_outages

        audit_outages.main([a for a in argv if a != "--audit-outages"])
        return
    parser = argparse.ArgumentParser(prog="ops/chaos", description=__doc__)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--cluster", action="store_true", help="a three-node RabbitMQ cluster")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    # connections cut by the faults are expected: the report counts what matters
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
    started = time.monotonic()
    report = asyncio.run(run(args.full, cluster=3 if args.cluster else 1))
    document = {**report.as_dict(), "seconds": round(time.monotonic() - started)}
    text = json.dumps(document, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    good = (
        report.unanswered == 0
        and report.audit_ok
        and report.answered_without_record == 0
        and report.decided_key_pair_invalid == 0
        and report.succeeded_while_ssa_holds_failure == 0
    )
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
