"""TEST TOOLING: ``ops/chaos --audit-outages [--seconds N] [--kinds a,b]`` — one outage of
each kind of audit sink failure, measured from outside a real worker.

A stack of its own (a temporary folder, ports base 28671; the audit directory on a
16 MiB tmpfs where one can be mounted) with one supervised worker. For each kind: a few
signatures before; then the sink is broken for ``--seconds`` (default 60) while an SSA
sends two signatures a second (no SDK retries, so each answer is the worker's own);
then it is repaired and requests are sent until one succeeds. Measured per kind, from
``/proc`` and the worker's ``/metrics`` and log: the worker's CPU share of one core
during the outage (the process tree: the supervisor and every worker it ran), checkpoint
signatures made, the log lines written, the answers by status and the slowest
``audit_unavailable``, and the time to the first success after the repair. At the end,
over every audit file of the run: ``sam-admin audit verify``, and for every request
answered, how many records it has (must be exactly one) and whether its status is the
one its caller got.

Kinds: ``disk-full`` (tmpfs filled), ``unopenable`` (a directory where the file must be
opened, then SIGHUP), ``hung`` (a FIFO nobody reads, then SIGHUP), ``siem-rejects`` (the
SIEM's queue on ``sam.audit`` made to reject every publish by a policy, ``max-length 0`` /
``reject-publish``: now no failure at all), ``no-route`` (``sam.audit.archive`` deleted), ``broker-gone`` (the
broker stopped; the worker exits 75 and its supervisor starts it again; the SSA cannot
send either). A nack of the archive itself cannot be caused from outside any more (a
stream has no overflow setting); the unit tests play it (``test_audit_failure_path``).
Requests sent during an outage are answered (or not) once it is repaired: an SSA whose
broker is gone cannot send.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sam_devtools.authorization_server import DevAuthorizationServer
from sam_devtools.chaos import certified_key_pair, signature_request
from sam_devtools.raw_client import RawSamClient
from sam_devtools.stack import Stack, fill_filesystem, scratch_stack, verify_audit
from worker.client import SamClient, SamTimeout
from worker.domain.contract import DynamicConfiguration, KeyPairObject
from worker.transport.topology import VHOST, siem_queue

__all__ = ["KINDS", "OutageFigures", "main", "run"]

SIEM_REJECTS = "sam-outage-siem-rejects"
KINDS = ("disk-full", "unopenable", "hung", "siem-rejects", "no-route", "broker-gone")
INSTANCE = "worker-1"
RATE = 2.0  # requests per second during an outage
AUDIT_TIMEOUT = 5.0  # the default bound


@dataclass
class OutageFigures:
    """What one outage of one kind cost, seen from outside the worker."""

    kind: str
    seconds: float = 0.0
    requests: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    slowest_refusal_seconds: float = 0.0
    cpu_percent_of_a_core: float = 0.0
    checkpoint_signatures: int | None = None
    log_lines: int = 0
    log_samples: list[str] = field(default_factory=list)
    first_success_after_repair_seconds: float | None = None
    request_ids: dict[str, int] = field(default_factory=dict)  # request id → status the caller got

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "outage_seconds": round(self.seconds, 1),
            "requests": self.requests,
            "answers": dict(sorted(self.answers.items())),
            "slowest_audit_unavailable_seconds": round(self.slowest_refusal_seconds, 2),
            "worker_cpu_percent_of_one_core": round(self.cpu_percent_of_a_core, 2),
            "checkpoint_signatures": self.checkpoint_signatures,
            "log_lines": self.log_lines,
            "log": self.log_samples,
            "first_success_after_repair_seconds": (
                None
                if self.first_success_after_repair_seconds is None
                else round(self.first_success_after_repair_seconds, 2)
            ),
        }


def _tree_cpu_seconds(supervisor: int) -> float:
    """CPU seconds of the supervisor, the worker it runs now and every worker it ran."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(pid: int) -> list[str]:
        raw = Path(f"/proc/{pid}/stat").read_text()
        return raw[raw.rindex(")") + 2 :].split()

    fields = stat(supervisor)
    total = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    children = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True).stdout.split()
    for child in children:
        with contextlib.suppress(OSError):
            total += sum(int(v) for v in stat(int(child))[11:13])
    return total / tick


def _checkpoints(port: int) -> int | None:
    """Checkpoint signatures the worker's current process made (None: not answering)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    match = re.search(
        r'sam_hsm_operation_seconds_count\{mechanism="ECDSA",operation="audit_checkpoint"\} (\S+)', text
    )
    return int(float(match.group(1))) if match else 0


class _Sender:
    """An SSA sending signatures with one certified key pair."""

    def __init__(self, stack: Stack, client: RawSamClient, key_pair: KeyPairObject) -> None:
        static = json.loads(stack.path("config", "static_config.json").read_text())
        self._sam_id = static["sam_id"]
        self._authority = DevAuthorizationServer("dev-as", stack.pki.jws_key("dev-as").read_bytes())
        self._client, self._key_pair = client, key_pair

    async def sign(self, reply_timeout: float = 20) -> tuple[str, str, float, int]:
        """(request id, outcome, seconds, status): the outcome is ``ok``, an error code or
        ``no answer``; the status is the reply's (-1: no answer)."""
        message_id = str(uuid.uuid4())
        body, sad = signature_request(self._authority, self._sam_id, self._key_pair, "outage", message_id)
        started = time.monotonic()
        try:
            reply = await self._client.send(
                "signatures.create",
                body,
                sad=sad,
                message_id=message_id,
                reply_timeout=reply_timeout,
                retries=0,
            )
        except (SamTimeout, ConnectionError, OSError):
            return message_id, "no answer", time.monotonic() - started, -1
        assert reply is not None
        outcome = "ok" if reply.status < 400 else reply.json()["error"]["code"]
        return message_id, outcome, time.monotonic() - started, reply.status


class _Breakage:
    """How each kind is caused and undone, on the stack's worker."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.folder = stack.path("audit", INSTANCE)
        self.service = self.folder / "service.jsonl"

    def _hup(self) -> None:
        supervisor = int(self.stack.path("run", f"{INSTANCE}.pid").read_text())
        for child in subprocess.run(
            ["pgrep", "-P", str(supervisor)], capture_output=True, text=True
        ).stdout.split():
            os.kill(int(child), signal.SIGHUP)

    def _rotate(self) -> None:
        if self.service.exists():
            self.service.rename(self.folder / f"service.jsonl.{int(time.time() * 1000)}")

    async def breaks(self, kind: str) -> None:
        if kind == "disk-full":
            await asyncio.to_thread(fill_filesystem, self.stack.path("audit", "filler"))
        elif kind == "unopenable":
            self._rotate()
            self.service.mkdir()
            self._hup()
        elif kind == "hung":
            self._rotate()
            os.mkfifo(self.service)
            self._hup()
        elif kind == "siem-rejects":
            pattern = f"^{re.escape(siem_queue('siem-1'))}$"
            definition = '{"max-length": 0, "overflow": "reject-publish"}'
            self.stack.rabbitmqctl(
                "set_policy", "-p", VHOST, "--apply-to", "queues", SIEM_REJECTS, pattern, definition
            )
        elif kind == "no-route":
            self.stack.rabbitmqctl("delete_queue", "-p", "sam", "sam.audit.archive")
        elif kind == "broker-gone":
            await asyncio.to_thread(self.stack.stop_node, 1)

    async def repair(self, kind: str) -> None:
        if kind == "disk-full":
            self.stack.path("audit", "filler").unlink()
        elif kind == "unopenable":
            self.service.rmdir()
            self._hup()
        elif kind == "hung":
            hung = self.folder / "service.fifo"
            self.service.rename(hung)
            self._hup()

            def drain() -> None:
                with hung.open("rb") as fifo:
                    fifo.read()

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            await asyncio.to_thread(reader.join, 10)
            hung.unlink(missing_ok=True)
        elif kind == "siem-rejects":
            self.stack.rabbitmqctl("clear_policy", "-p", VHOST, SIEM_REJECTS)
        elif kind == "no-route":
            self.stack.rabbitmqctl("import_definitions", str(self.stack.path("rabbitmq", "definitions.json")))
        elif kind == "broker-gone":
            await asyncio.to_thread(self.stack._rabbitmq)


async def _outage(
    stack: Stack, sender: _Sender, breakage: _Breakage, kind: str, seconds: float
) -> OutageFigures:
    figures = OutageFigures(kind)
    for _ in range(3):
        await sender.sign()
    supervisor = int(stack.path("run", f"{INSTANCE}.pid").read_text())
    log_file = stack.path("logs", f"{INSTANCE}.log")
    log_start = log_file.stat().st_size
    port = stack.metrics_port(1)
    checkpoints_before = _checkpoints(port)
    cpu_before, started = _tree_cpu_seconds(supervisor), time.monotonic()
    await breakage.breaks(kind)
    tasks = []
    while time.monotonic() - started < seconds:
        tasks.append(asyncio.create_task(sender.sign()))
        await asyncio.sleep(1 / RATE)
    figures.seconds = time.monotonic() - started
    figures.cpu_percent_of_a_core = 100 * (_tree_cpu_seconds(supervisor) - cpu_before) / figures.seconds
    checkpoints_after = _checkpoints(port)
    if (
        checkpoints_before is not None
        and checkpoints_after is not None
        # a process started again during the outage counts from zero: no figure then
        and checkpoints_after >= checkpoints_before
    ):
        figures.checkpoint_signatures = checkpoints_after - checkpoints_before
    await breakage.repair(kind)
    repaired = time.monotonic()
    for _ in range(60):
        # every answer counts with its status: a 503 just after the repair is an answer
        request_id, outcome, _, status = await sender.sign()
        figures.request_ids[request_id] = status
        if outcome == "ok":
            figures.first_success_after_repair_seconds = time.monotonic() - repaired
            break
        await asyncio.sleep(0.5)
    answers = await asyncio.gather(*tasks)
    figures.requests = len(answers)
    for request_id, outcome, took, status in answers:
        figures.answers[outcome] += 1
        figures.request_ids[request_id] = status
        if outcome == "audit_unavailable":
            figures.slowest_refusal_seconds = max(figures.slowest_refusal_seconds, took)
    with log_file.open("rb") as handle:
        handle.seek(log_start)
        lines = handle.read().decode(errors="replace").splitlines()
    figures.log_lines = len(lines)
    figures.log_samples = [line[:240] for line in lines[:12]]
    return figures


def _tally(files: list[Path], everything: dict[str, int]) -> dict[str, int]:
    """Per request answered: records in the files, and whether their status matches."""
    records: dict[str, list[int]] = {}
    for path in files:
        for line in path.read_bytes().splitlines():
            entry = orjson.loads(line)
            if entry.get("type") == "record":
                records.setdefault(entry.get("request_id"), []).append(entry["status"])
    tally: Counter[str] = Counter()
    for request_id, status in everything.items():
        mine = records.get(request_id, [])
        if status < 0:  # no answer at the SSA (the broker was gone): what does the trail say?
            said = ",".join(str(s) for s in sorted(mine)) or "none"
            tally[f"unanswered: records {said}"] += 1
        elif len(mine) == 1 and mine[0] == status:
            tally["exactly one record, status as answered"] += 1
        elif len(mine) == 1:
            tally["one record, status differs"] += 1
        else:
            tally[f"{len(mine)} records"] += 1
    return dict(tally)


async def run(seconds: float = 60, kinds: tuple[str, ...] = KINDS, port_base: int = 28671) -> dict[str, Any]:
    """Start a stack of its own, measure one outage of each kind, verify the trail; the
    stack is stopped and its folder removed whatever happens."""
    with scratch_stack("sam-outages-", port_base) as (stack, mounted):
        stack.up(workers=1)
        async with SamClient.from_profile(stack.profile("admin-1")) as admin:
            config = stack.path("config", "dynamic_config.json").read_bytes()
            await admin.put_configuration(DynamicConfiguration.model_validate_json(config))
        client = RawSamClient.from_profile(stack.profile("ssa-1"))
        await client.connect()
        sender = _Sender(stack, client, await certified_key_pair(stack, client, "outage"))
        breakage = _Breakage(stack)
        results, everything = [], {}
        for kind in kinds:
            if kind == "disk-full" and not mounted:
                results.append({"kind": kind, "skipped": "no small filesystem could be mounted"})
                continue
            figures = await _outage(stack, sender, breakage, kind, seconds)
            results.append(figures.as_dict())
            everything.update(figures.request_ids)
            print(json.dumps(figures.as_dict()), flush=True)
        await client.close()
        stack.down()
        files = sorted(p for p in stack.path("audit").glob("*/service.jsonl*") if p.is_file())
        verified = verify_audit(stack.infrastructure_file, files)
        return {
            "outages": results,
            "audit_verify": (verified.stdout.strip().splitlines() or [verified.stderr])[-1],
            "audit_verify_ok": verified.returncode == 0,
            "records_per_request": _tally(files, everything),
        }


def main(argv: list[str] | None = None) -> None:
    """Print (and with ``--out`` write) the figures; exit 1 if the trail does not verify or a
    request answered has other than exactly one record with the status it got."""
    parser = argparse.ArgumentParser(prog="ops/chaos --audit-outages", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds: {sorted(unknown)}")
    report = asyncio.run(run(args.seconds, kinds))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    tally = report["records_per_request"]
    # an unanswered request may have no record (it never reached a worker) or one saying
    # why it got no answer; a success record for it would be a signature the SSA never got
    wrong = {
        k: v
        for k, v in tally.items()
        if not k.startswith("exactly one") and not (k.startswith("unanswered") and "200" not in k)
    }
    raise SystemExit(0 if report["audit_verify_ok"] and not wrong else 1)
