"""TEST TOOLING: ``ops/bench`` — the SAM measured side by side with the limits of the
parts it is built on, in one run, on one broker and queue type.

Baselines: raw SoftHSM signing with a persistent key, the stateless cycle (unwrap, sign,
destroy), an echo RPC through the same broker with the same message size, persistence
and confirms, and a bare signing worker (``bare_worker``: the request JWS check and the
stateless cycle behind the same RPC, nothing else). Then ``signatures.create`` end to end
through the SDK and ``key_pairs.create``; the broker's CPU per signature with 1, 2 and 4
workers; and, where ``sam_devtools.hsm_delay`` is there, one worker against an HSM that
answers each call after 1 or 3 ms, by number of HSM sessions. Every ratio is computed
from figures of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from sam_devtools.authorization_server import DevAuthorizationServer
from sam_devtools.bare_worker import (
    BARE_QUEUE,
    SIGN_OPERATION,
    answer_forever,
    make_bench_key,
    open_bench_session,
    serve,
    stateless_sign,
)
from sam_devtools.raw_client import RawSamClient
from sam_devtools.stack import Stack
from worker.client import ClientProfile, SamClient, SamRequestError
from worker.domain.contract import (
    HEADER_REQUEST_JWS,
    HEADER_SAD,
    HEADER_STATUS,
    DynamicConfiguration,
    KeyPairObject,
)
from worker.transport.amqp import connect

__all__ = ["main"]

EC_SHA256 = "1.2.840.10045.4.3.2"
RSA_SHA256 = "1.2.840.113549.1.1.11"
ECHO_QUEUE = "bench.echo"
# as long as a signature request's request JWS and SAD
ECHO_HEADERS = {HEADER_REQUEST_JWS: "x" * 400, HEADER_SAD: "x" * 900}
# the SAM workers the scale points run with; the instances the bench may start
SCALE_WORKERS = (1, 2, 4)
BENCH_WORKERS = tuple(f"bench-{n}" for n in range(1, max(SCALE_WORKERS) + 1))
LANE_WORKER = "bench-lane"
SCALE_PACED_RATE = 60.0  # requests per second: below what one worker does here
# HSM round trips (each delayed by the shim) per single-signature request: the stateless
# cycle. PKCS#11 needs four (C_UnwrapKey, C_SignInit, C_Sign, C_DestroyObject);
# python-pkcs11 0.10 makes seven, timed through the shim: C_UnwrapKey and two
# C_GetAttributeValue as it builds the key object, C_SignInit, C_Sign for the length and
# C_Sign, then C_DestroyObject (it made two more, reading the key's type before the first
# sign, until the worker set that from the unwrap template). The SAD and the key pair's
# seal are checked in software; the audit trail signs one checkpoint per batch of records,
# on a session of its own, not per request.
LANE_CALLS_PER_SIGNATURE = 7
LANE_LATENCIES_MS = (1.0, 3.0)
LANE_SESSIONS = (1, 4, 16)

# one row of the HSM-lane table: latency_ms, sessions, rate, bound
LaneRow = dict[str, float]


@dataclass
class Point:
    """One measurement: rate and latency percentiles at one concurrency and process count."""

    name: str
    concurrency: int
    processes: int
    requests: int
    seconds: float
    rate: float  # requests (or operations) per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    per_request: int = 1  # signatures per request
    # CPU time per request during the run, by part (broker, workers or echo servers,
    # load generator): on one machine the parts share the cores, so this is the profile
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)

    @property
    def signatures_per_second(self) -> float:
        return self.rate * self.per_request


@dataclass
class Results:
    """Everything one bench run measured, with the ratios and ceilings derived from it."""

    machine: dict[str, Any] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    # figures, and the HSM-lane table under "hsm_lane" when it was measured
    ratios: dict[str, float | list[LaneRow]] = field(default_factory=dict)
    ceilings: dict[str, float] = field(default_factory=dict)
    # by number of SAM workers (as a string, JSON's key): broker CPU per signature, rate
    scaling: dict[str, dict[str, float]] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    # keeping results for repeats, measured on the signing worker in this run
    repeats: dict[str, float] = field(default_factory=dict)

    def find(self, name: str, concurrency: int = 0, processes: int = 0) -> Point:
        for point in self.points:
            if (
                point.name == name
                and (not concurrency or point.concurrency == concurrency)
                and (not processes or point.processes == processes)
            ):
                return point
        raise KeyError((name, concurrency, processes))


def own_cpu_seconds() -> float:
    usage = os.times()
    return usage.user + usage.system


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its descendants (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    spent: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        spent[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, grew = {pid}, True
    while grew:
        grown = tree | {child for child, parent in parents.items() if parent in tree}
        grew, tree = grown != tree, grown
    return sum(spent.get(member, 0.0) for member in tree)


async def profiled_loop(
    call: Callable[[int], Awaitable[None]],
    concurrency: int,
    seconds: float,
    warmup: float,
    parts: dict[str, list[int]],
    rate: float | None = None,
) -> tuple[tuple[int, float, list[float]], dict[str, float]]:
    """``closed_loop`` (or ``paced_loop`` at ``rate``, with ``concurrency`` calls in flight
    at most) and the CPU milliseconds each part spent per call meanwhile."""
    calls = 0

    async def counted(n: int) -> None:
        nonlocal calls
        calls += 1
        await call(n)

    def snapshot() -> dict[str, float]:
        # the load generator alone: the workers and echo servers it started are its children
        return {
            name: own_cpu_seconds() if name == "load" else sum(tree_cpu_seconds(pid) for pid in pids)
            for name, pids in parts.items()
        }

    before = snapshot()
    if rate is None:
        result = await closed_loop(counted, concurrency, seconds, warmup)
    else:
        result = await paced_loop(counted, rate, concurrency, seconds, warmup)
    after = snapshot()
    return result, {name: round((after[name] - before[name]) * 1000 / max(calls, 1), 3) for name in parts}


async def paced_loop(
    call: Callable[[int], Awaitable[None]], rate: float, most: int, seconds: float, warmup: float
) -> tuple[int, float, list[float]]:
    """Calls started ``rate`` times a second whatever the answers (an open loop, at most
    ``most`` in flight): the work per call is then compared at one rate, not at whatever
    rate each setup reaches. Latencies of calls started after the warmup."""
    latencies: list[float] = []
    slots = asyncio.Semaphore(most)
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    pending: set[asyncio.Task[None]] = set()

    async def one(n: int, started: float) -> None:
        try:
            await call(n)
            if started >= measure_from:
                latencies.append(time.perf_counter() - started)
        finally:
            slots.release()

    n = 0
    while (now := time.perf_counter()) < stop_at:
        await slots.acquire()
        n += 1
        task = asyncio.get_running_loop().create_task(one(n, now))
        pending.add(task)
        task.add_done_callback(pending.discard)
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
    await asyncio.gather(*pending)
    return len(latencies), seconds, latencies


async def closed_loop(
    call: Callable[[int], Awaitable[None]], concurrency: int, seconds: float, warmup: float
) -> tuple[int, float, list[float]]:
    """``concurrency`` callers back to back; latencies of calls started after the warmup."""
    latencies: list[float] = []
    counter = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def caller() -> None:
        nonlocal counter
        while (now := time.perf_counter()) < stop_at:
            counter += 1
            await call(counter)
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), seconds, latencies


def _point(
    name: str, concurrency: int, processes: int, result: tuple[int, float, list[float]], per: int = 1
) -> Point:
    count, seconds, latencies = result
    latencies.sort()
    p50 = statistics.median(latencies) * 1000 if latencies else None
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else None
    return Point(name, concurrency, processes, count, seconds, count / seconds, p50, p99, per)


# --- HSM baselines (subprocesses, so processes run in parallel as workers do) -----------


def hsm_loop(kind: str, mode: str, seconds: float) -> None:
    """Print how many operations one process did in ``seconds``, and the CPU seconds it
    spent on them."""
    session, kek = open_bench_session()
    key, private = make_bench_key(session, kek, kind)
    data = key.hsm_input(b"\1" * 32)
    count, started, stop = 0, own_cpu_seconds(), time.perf_counter() + seconds
    while time.perf_counter() < stop:
        if mode == "persistent":
            private.sign(data, mechanism=key.mechanism)
        else:
            stateless_sign(kek, key, [data])
        count += 1
    print(count, own_cpu_seconds() - started)


def hsm_env(stack: Stack) -> dict[str, str]:
    """What a bench process with a session on the SAM's token needs (``open_bench_session``)."""
    return {
        **stack.worker_env(),
        "SAM_INFRASTRUCTURE_FILE": str(stack.infrastructure_file),
        "SAM_TOKEN_PIN_FILE": str(stack.path("secrets", "token-pin")),
    }


def hsm_rate(stack: Stack, kind: str, mode: str, processes: int, seconds: float, tries: int = 3) -> Point:
    """``processes`` hsm-loops side by side. SoftHSM now and then fails to open a token
    that other processes open at the same moment (NoSuchToken; SoftHSMv2 issue #757): a
    loop that failed would count as none, so the whole point is taken again."""
    command = [sys.executable, "-m", "sam_devtools.bench", "hsm-loop", kind, mode, str(seconds)]
    for _ in range(tries):
        children = [
            subprocess.Popen(command, env=hsm_env(stack), stdout=subprocess.PIPE, text=True)
            for _ in range(processes)
        ]
        outputs = [child.communicate()[0].split() for child in children]
        if all(child.returncode == 0 for child in children):
            total = sum(int(count) for count, _ in outputs)
            cpu = sum(float(spent) for _, spent in outputs)
            point = Point(f"hsm.{mode}.{kind}", 0, processes, total, seconds, total / seconds)
            point.cpu_ms_per_request = {"workers": round(cpu * 1000 / max(total, 1), 4)}
            return point
    raise RuntimeError(f"hsm-loop {kind} {mode} failed {tries} times (its error is above)")


# --- echo RPC baseline --------------------------------------------------------------------


async def echo_server(profile_file: Path, prefetch: int) -> None:
    """Consume bench.echo, answer on reply_to with confirms, ack after — as a worker does."""
    profile = ClientProfile.model_validate_json(profile_file.read_text())
    await answer_forever(profile, ECHO_QUEUE, prefetch, lambda message: (message.body, 200))


class RpcClient:
    """The baselines' caller: RPCs to ``queue`` as large as a signature request, persistent,
    with confirms; ``call`` returns the reply's ``sam-status``."""

    def __init__(self, profile: ClientProfile, queue: str) -> None:
        self.profile, self.queue = profile, queue
        self.pending: dict[str, asyncio.Future[int]] = {}

    async def connect(self) -> None:
        self.connection = await connect(self.profile.url, self.profile.tls_files())
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.replies = await self.channel.declare_queue(f"bench.replies.{uuid.uuid4()}", exclusive=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            future = self.pending.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                status = (message.headers or {}).get(HEADER_STATUS)
                future.set_result(status if isinstance(status, int) else 0)

        await self.replies.consume(on_reply, no_ack=True)

    async def call(self, body: bytes, headers: dict[str, Any], message_id: str | None = None) -> int:
        correlation_id = str(uuid.uuid4())
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pending[correlation_id] = future
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body,
                correlation_id=correlation_id,
                reply_to=self.replies.name,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id or correlation_id,
                user_id=self.profile.user_id,
                headers=headers,
            ),
            routing_key=self.queue,
        )
        return await future


def baseline_server(stack: Stack, command: str, *args: str) -> subprocess.Popen[str]:
    """``python -m sam_devtools.bench command args`` (an echo or bare server), once it is
    consuming."""
    server = subprocess.Popen(
        [sys.executable, "-m", "sam_devtools.bench", command, *args],
        env=hsm_env(stack),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "ready", f"{command} failed"
    return server


def _stop(*processes: subprocess.Popen[Any]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(20)


# --- the SAM ------------------------------------------------------------------------------


class Workload:
    """Signature requests prepared ahead (bodies, request JWS, SADs), so the load generator
    spends its time sending, as the echo client does."""

    def __init__(
        self,
        client: RawSamClient,
        authority: DevAuthorizationServer,
        sam_id: str,
        key_pair: KeyPairObject,
        signer: str,
        algorithm: str,
        digests_per_request: int,
    ) -> None:
        self.client, self.authority, self.sam_id = client, authority, sam_id
        self.key_pair, self.signer, self.algorithm, self.per = (
            key_pair,
            signer,
            algorithm,
            digests_per_request,
        )
        self.prepared: list[tuple[str, bytes, str, str]] = []
        self.answered: list[tuple[str, bytes, str, str]] = []

    def prepare(self, count: int) -> None:
        for _ in range(count):
            self.prepared.append(self.one())

    def prepare_for(self, seconds: float, rate: float) -> None:
        """Enough for ``seconds`` at ``rate`` requests per second, and some; past that,
        requests are made as they are sent."""
        self.prepare(int(seconds * rate) + 200)

    def one(self) -> tuple[str, bytes, str, str]:
        message_id = str(uuid.uuid4())
        digests = [hashlib.sha256(f"{message_id}/{i}".encode()).digest() for i in range(self.per)]
        body = orjson.dumps(
            {
                "signature_algorithm": self.algorithm,
                "requests": [{"dtbs": base64.b64encode(d).decode()} for d in digests],
                "key_pair": self.key_pair.model_dump(mode="json", exclude_none=True),
                "signer": {"id": self.signer},
            }
        )
        assert self.key_pair.id is not None
        sad = self.authority.issue_sad(self.sam_id, self.signer, self.key_pair.id, digests, lifetime=280)
        return message_id, body, self.client.sign_request(body, message_id, SIGN_OPERATION), sad

    async def call(self, _: int) -> None:
        message_id, body, jws, sad = self.prepared.pop() if self.prepared else self.one()
        reply = await self.client.send(
            "signatures.create", body, sad=sad, request_jws=jws, message_id=message_id
        )
        if reply is None or reply.status != 200:
            raise RuntimeError(f"signature refused: {reply and reply.json()}")
        self.answered.append((message_id, body, jws, sad))

    async def repeat(self, n: int) -> None:
        """Send an answered request again: the SAM answers it from sam.results."""
        message_id, body, jws, sad = self.answered[n % len(self.answered)]
        reply = await self.client.send(
            "signatures.create", body, sad=sad, request_jws=jws, message_id=message_id
        )
        if reply is None or reply.status != 200 or not reply.repeat:
            raise RuntimeError(f"repeat not answered with the stored result: {reply and reply.json()}")


class BareWorkload:
    """Requests for the bare worker (``bare_worker``), prepared ahead: the body of one of
    ``sam``'s signature requests naming the bare worker's key ``key`` (``bare_key``), a
    request JWS by the same SSA over it, and a header as long as its SAD. The bare worker
    keeps no state, so the requests go round, as the echo client sends one payload."""

    def __init__(self, rpc: RpcClient, sam: Workload, key: str, count: int = 256) -> None:
        self.rpc = rpc
        self.requests: list[tuple[str, bytes, dict[str, Any]]] = []
        for _ in range(count):
            message_id, body, _, sad = sam.one()
            bare = orjson.dumps({**orjson.loads(body), "bare_key": key})
            jws = sam.client.sign_request(bare, message_id, SIGN_OPERATION, rpc.profile.user_id)
            self.requests.append((message_id, bare, {HEADER_REQUEST_JWS: jws, HEADER_SAD: "x" * len(sad)}))

    async def call(self, n: int) -> None:
        message_id, body, headers = self.requests[n % len(self.requests)]
        status = await self.rpc.call(body, headers, message_id)
        if status != 200:
            raise RuntimeError(f"the bare worker refused a request (status {status})")


async def certified(
    stack: Stack, client: SamClient, template: dict[str, Any], signer: str, pop: str
) -> KeyPairObject:
    created = await client.create_key_pair(**template)
    assigned = await client.assign_key_pair(created, signer, f"CN={signer}")
    request = await client.certification_request(assigned, pop)
    return await client.update_key_pair(assigned, signer, certificate=stack.pki.issue_from_request(request))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric_value(port: int, name: str) -> float | None:
    """One sample from a worker's /metrics (``name`` with its labels, if it has any, as
    Prometheus prints them: ``x_sum{operation="signatures.create"}``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[-1])
    return None


def repeat_costs(port: int) -> dict[str, float]:
    """From the signing worker's metrics: the mean time an acting request spent keeping its
    result for repeats (the sam.results confirm and the answered mark), beside the mean
    time of a signature request from delivery to reply, and their ratio."""
    stored = (metric_value(port, "sam_result_store_seconds_sum") or 0.0) / (
        metric_value(port, "sam_result_store_seconds_count") or 1.0
    )
    label = '{operation="signatures.create"}'
    request = (metric_value(port, f"sam_request_duration_seconds_sum{label}") or 0.0) / (
        metric_value(port, f"sam_request_duration_seconds_count{label}") or 1.0
    )
    return {
        "result_store_ms_mean": round(stored * 1000, 3),
        "signature_request_ms_mean": round(request * 1000, 3),
        "result_store_share_of_request_time": round(stored / request, 3) if request else 0.0,
    }


async def memory_run(
    worker: subprocess.Popen[bytes],
    metrics_port: int,
    load: Workload,
    total: int = 100_000,
    chunk: int = 10_000,
) -> dict[str, Any]:
    """Resident memory of one worker after every ``chunk`` of ``total`` requests (c=64),
    beside the size of its SAD-use window. It must level off: what grows with the rate is
    that window (each ``jti`` is kept until its SAD expires), bounded by rate x SAD
    lifetime — so memory follows the highest rate seen, not the number of requests."""
    load.prepare(5000)
    await closed_loop(load.call, 64, 3, 0)

    def window() -> int:
        return int(metric_value(metrics_port, "sam_sad_use_entries") or 0)

    series, windows, rates, sent = [rss_kb(worker.pid)], [window()], [], 0
    started = time.monotonic()
    while sent < total:
        load.prepare(chunk)
        count, seconds, _ = await _run_count(load, chunk, 64)
        sent += count
        series.append(rss_kb(worker.pid))
        windows.append(window())
        rates.append(round(count / seconds))
    return {
        "worker_rss_kb_start": series[0],
        "worker_rss_kb_end": series[-1],
        "worker_rss_kb_every_10k": series,
        "sad_use_entries_every_10k": windows,
        "requests_per_second_every_10k": rates,
        "requests": sent,
        "seconds": round(time.monotonic() - started),
    }


def lane_bound(sessions: int, latency_ms: float) -> float:
    """Signatures per second ``sessions`` HSM sessions allow when each call waits
    ``latency_ms`` and a signature makes ``LANE_CALLS_PER_SIGNATURE`` calls one after another."""
    return sessions / (LANE_CALLS_PER_SIGNATURE * latency_ms / 1000)


async def hsm_lane_rows(
    stack: Stack,
    workload: Callable[[], Workload],
    window: tuple[float, float],
    say: Callable[[str], None],
) -> list[LaneRow]:
    """P-256 signatures per second (c=64) of one SAM worker whose HSM answers each call
    after a delay (``sam_devtools.hsm_delay``), by delay and number of signing sessions,
    beside what the sessions allow. Empty, with a message, where the shim cannot be had."""
    try:
        # imported by name: the bench runs where the shim is not there (yet)
        hsm_delay: Any = importlib.import_module("sam_devtools.hsm_delay")
        module = hsm_delay.build(stack.path("hsm-delay"))
    except ImportError as exc:
        say(f"HSM lane: skipped, sam_devtools.hsm_delay cannot be imported ({type(exc).__name__})")
        return []
    except RuntimeError as exc:  # no compiler, or the shim does not compile
        say(f"HSM lane: skipped, the delaying PKCS#11 module cannot be built: {exc}")
        return []
    rows: list[LaneRow] = []
    for latency_ms in LANE_LATENCIES_MS:
        for sessions in LANE_SESSIONS:
            say(f"HSM lane: {latency_ms:g} ms per call, {sessions} session(s), P-256 x1, c=64, 1 worker")
            env = {
                **hsm_delay.environment(latency_ms),
                "SAM_PKCS11_MODULE": str(module),
                "SAM_HSM_LANE": "threads",  # sessions overlap only on the lane's threads
                "SAM_HSM_SESSIONS": str(sessions),
            }
            worker = stack.start_worker(LANE_WORKER, env=env)
            try:
                load = workload()
                load.prepare_for(sum(window), 60)
                count, seconds, _ = await closed_loop(load.call, 64, *window)
            finally:
                stack.stop_instance(LANE_WORKER)
                worker.wait(20)
            rows.append(
                {
                    "latency_ms": latency_ms,
                    "sessions": sessions,
                    "rate": round(count / seconds, 1),
                    "bound": round(lane_bound(sessions, latency_ms), 1),
                }
            )
    return rows


async def run(stack: Stack, quick: bool, out: Path, memory_only: bool = False, lane: bool = True) -> Results:
    seconds, warmup = (3.0, 1.0) if quick else (8.0, 2.0)
    # the scale and HSM-lane points only need a rate and a CPU share: shorter windows
    short = (2.0, 1.0) if quick else (5.0, 2.0)
    results = Results(machine={"cpus": os.cpu_count(), "python": platform.python_version(), "quick": quick})

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if not memory_only:
        say("baselines: SoftHSM")
        for kind in ("p256", "rsa2048"):
            for mode in ("persistent", "stateless"):
                for processes in (1, 2):
                    results.points.append(hsm_rate(stack, kind, mode, processes, seconds))

    # the workers of the stack make way for the measured ones
    stack.down_workers()
    bench_profile = stack.profile("bench")
    broker = int(stack.node_pid_file(1).read_text())

    async def measure(
        name: str,
        call: Callable[[int], Awaitable[None]],
        concurrency: int,
        processes: int,
        servers: list[subprocess.Popen[bytes]] | list[subprocess.Popen[str]],
        per_request: int = 1,
        window: tuple[float, float] = (seconds, warmup),
        rate: float | None = None,
    ) -> None:
        """One end-to-end point, with the CPU per request of broker, servers and load."""
        parts = {"broker": [broker], "workers": [s.pid for s in servers], "load": [os.getpid()]}
        outcome, cpu = await profiled_loop(call, concurrency, *window, parts, rate=rate)
        point = _point(name, concurrency, processes, outcome, per_request)
        point.cpu_ms_per_request = cpu
        results.points.append(point)

    body_size = 0
    lane_rows: list[LaneRow] = []
    async with RawSamClient.from_profile(stack.profile("ssa-1")) as client:
        try:
            say("setting up key pairs")
            worker = stack.start_worker("bench-1", metrics_port=stack.metrics_port(1))
            workers = [worker]
            static = json.loads(stack.path("config", "static_config.json").read_text())
            authority = DevAuthorizationServer("dev-as", stack.pki.jws_key("dev-as").read_bytes())
            async with SamClient.from_profile(stack.profile("admin-1")) as admin:
                config = DynamicConfiguration.model_validate_json(
                    stack.path("config", "dynamic_config.json").read_bytes()
                )
                try:
                    version = (await admin.get_configuration()).version + 1
                except SamRequestError as exc:
                    if exc.code != "configuration_missing":
                        raise
                    version = 1
                await admin.put_configuration(config.model_copy(update={"version": version}))
            ec = await certified(
                stack, client, {"algorithm": "ECDSA", "named_curve": "secp256r1"}, "bench-ec", EC_SHA256
            )
            rsa = await certified(stack, client, {"algorithm": "RSA", "size": 2048}, "bench-rsa", RSA_SHA256)
            kinds = (("p256", ec, "bench-ec", EC_SHA256), ("rsa2048", rsa, "bench-rsa", RSA_SHA256))

            def workload(key_pair: KeyPairObject, signer: str, algorithm: str, per: int = 1) -> Workload:
                return Workload(client, authority, static["sam_id"], key_pair, signer, algorithm, per)

            body_size = len(workload(ec, "bench-ec", EC_SHA256).one()[1])

            for processes in () if memory_only else (1, 2):
                if processes == 2:
                    workers.append(stack.start_worker("bench-2"))
                for label, key_pair, signer, algorithm in kinds:
                    for concurrency in (1, 16, 64):
                        load = workload(key_pair, signer, algorithm)
                        load.prepare_for(seconds + warmup, 60 if concurrency > 1 else 30)
                        say(f"SAM {label} x1, c={concurrency}, {processes} worker(s)")
                        await measure(f"sam.sign.{label}", load.call, concurrency, processes, workers)
                    if processes == 1 and label == "p256":
                        # what keeping results costs, read off the worker that just signed;
                        # then repeats of the requests it answered (c=16), from sam.results
                        results.repeats = repeat_costs(stack.metrics_port(1))
                        say(f"SAM {label} repeats of answered requests, c=16, 1 worker")
                        await measure(f"sam.repeat.{label}", load.repeat, 16, processes, workers)
                batch = workload(ec, "bench-ec", EC_SHA256, 100)
                batch.prepare(400)
                say(f"SAM p256 x100, c=8, {processes} worker(s)")
                await measure("sam.sign100.p256", batch.call, 8, processes, workers, per_request=100)
                for label, template in (
                    ("p256", {"algorithm": "ECDSA", "named_curve": "secp256r1"}),
                    ("rsa2048", {"algorithm": "RSA", "size": 2048}),
                ):
                    say(f"SAM key_pairs.create {label}, {processes} worker(s)")

                    async def create(_: int, template: dict[str, Any] = template) -> None:
                        await client.create_key_pair(**template)

                    # RSA key generation takes seconds in SoftHSM: give it a longer window
                    window = seconds * (4 if label == "rsa2048" else 1)
                    outcome = await closed_loop(create, 8, window, warmup)
                    results.points.append(_point(f"sam.create.{label}", 8, processes, outcome))

            # every worker reads every record of sam.sad-use (the single-use ledger), so
            # the broker's work per signature grows with the number of workers
            for count in () if memory_only else SCALE_WORKERS:
                while len(workers) > count:
                    _stop(workers.pop())
                while len(workers) < count:
                    workers.append(stack.start_worker(f"bench-{len(workers) + 1}"))
                load = workload(ec, "bench-ec", EC_SHA256)
                load.prepare_for(sum(short), 60)
                say(f"SAM p256 x1, c=64, {count} worker(s): broker CPU per signature")
                await measure("sam.scale.p256", load.call, 64, count, workers, window=short)
                # and at one rate for every count: the broker's CPU per request also
                # falls as its rate rises (fixed costs spread), which hides the readers
                load = workload(ec, "bench-ec", EC_SHA256)
                load.prepare_for(sum(short), SCALE_PACED_RATE)
                say(f"SAM p256 x1, {SCALE_PACED_RATE:g} req/s, {count} worker(s): broker CPU per signature")
                await measure(
                    "sam.scale_paced.p256", load.call, 64, count, workers, window=short, rate=SCALE_PACED_RATE
                )

            if memory_only or not quick:
                say("memory: 100,000 requests on one worker")
                while len(workers) > 1:
                    _stop(workers.pop())
                load = workload(ec, "bench-ec", EC_SHA256)
                results.memory = await memory_run(worker, stack.metrics_port(1), load)
        finally:
            for instance in BENCH_WORKERS:
                stack.stop_instance(instance)
        if lane and not memory_only:
            lane_rows = await hsm_lane_rows(stack, lambda: workload(ec, "bench-ec", EC_SHA256), short, say)
    if memory_only:
        stack.start_workers(2)
        return results

    servers: list[subprocess.Popen[str]] = []
    try:
        say("baseline: echo RPC")
        echo = RpcClient(ClientProfile.model_validate_json(bench_profile.read_text()), ECHO_QUEUE)
        await echo.connect()
        payload = os.urandom(body_size)

        async def call(_: int) -> None:
            await echo.call(payload, ECHO_HEADERS)

        for processes in (1, 2):
            servers.append(baseline_server(stack, "echo-server", str(bench_profile)))
            for concurrency in (1, 16, 64):
                say(f"echo c={concurrency}, {processes} server(s)")
                await measure("echo", call, concurrency, processes, servers)
        await echo.connection.close()
        _stop(*servers)
        servers.clear()

        say("baseline: a bare signing worker")
        bare = RpcClient(ClientProfile.model_validate_json(bench_profile.read_text()), BARE_QUEUE)
        await bare.connect()
        ssa_key = stack.pki.root / "ssa-1" / "jws-pub.pem"
        for processes in (1, 2):
            servers.append(baseline_server(stack, "bare-server", str(bench_profile), str(ssa_key)))
            for label, key_pair, signer, algorithm in kinds:
                for concurrency in (1, 16, 64):
                    bare_load = BareWorkload(bare, workload(key_pair, signer, algorithm), label)
                    say(f"bare {label} x1, c={concurrency}, {processes} server(s)")
                    await measure(f"bare.sign.{label}", bare_load.call, concurrency, processes, servers)
            bare_batch = BareWorkload(bare, workload(ec, "bench-ec", EC_SHA256, 100), "p256")
            say(f"bare p256 x100, c=8, {processes} server(s)")
            await measure("bare.sign100.p256", bare_batch.call, 8, processes, servers, per_request=100)
        await bare.connection.close()
    finally:
        _stop(*servers)
        stack.start_workers(2)

    results.ratios.update(ratios(results))
    if lane_rows:
        results.ratios["hsm_lane"] = lane_rows
    results.ceilings = ceilings(results)
    results.scaling = scaling(results)
    return results


async def _run_count(load: Workload, total: int, concurrency: int) -> tuple[int, float, list[float]]:
    done = 0

    async def caller() -> None:
        nonlocal done
        while done < total:
            done += 1
            await load.call(done)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done, time.perf_counter() - started, []


def bound(results: Results, kind: str) -> float:
    """The rate one machine allows when each request costs an echo RPC and a stateless HSM
    cycle (c=64, 2 processes): the broker and a software HSM share the cores, so costs add."""
    echo = results.find("echo", 64, 2).rate
    stateless = results.find(f"hsm.stateless.{kind}", processes=2).rate
    return 1 / (1 / echo + 1 / stateless)


def worker_overhead_ms(results: Results, kind: str = "p256") -> float:
    """CPU milliseconds a SAM worker spends per signature request (c=64, 2 workers) beyond
    an echo server's per request and one stateless HSM cycle: its own checks, streams and
    audit. The cycle's cost is the CPU the 1-process loop spent per cycle. That is
    1000 / its rate only while the loop has a core to itself; two loops, or anything
    else running, share the cores, and 1000 / rate would count the wait for one as cost."""
    sam = results.find(f"sam.sign.{kind}", 64, 2).cpu_ms_per_request.get("workers", 0.0)
    echo = results.find("echo", 64, 2).cpu_ms_per_request.get("workers", 0.0)
    cycle = results.find(f"hsm.stateless.{kind}", processes=1).cpu_ms_per_request["workers"]
    return sam - (echo + cycle)


def ratios(results: Results) -> dict[str, float]:
    sam_p256 = results.find("sam.sign.p256", 64, 2)
    return {
        "p256_single_vs_bound": sam_p256.rate / bound(results, "p256"),
        "rsa_single_vs_bound": results.find("sam.sign.rsa2048", 64, 2).rate / bound(results, "rsa2048"),
        "p256_batch_vs_raw_hsm": results.find("sam.sign100.p256", processes=2).signatures_per_second
        / results.find("hsm.persistent.p256", processes=2).rate,
        "p256_p50_vs_echo_p50": (results.find("sam.sign.p256", 1, 2).p50_ms or 0)
        / (results.find("echo", 1, 2).p50_ms or 1),
        "batch_scaling_2_vs_1_workers": results.find("sam.sign100.p256", processes=2).signatures_per_second
        / results.find("sam.sign100.p256", processes=1).signatures_per_second,
        "p256_repeat_vs_sign_c16": results.find("sam.repeat.p256", 16, 1).rate
        / results.find("sam.sign.p256", 16, 1).rate,
        "p256_single_vs_bare": sam_p256.rate / results.find("bare.sign.p256", 64, 2).rate,
        "rsa_single_vs_bare": results.find("sam.sign.rsa2048", 64, 2).rate
        / results.find("bare.sign.rsa2048", 64, 2).rate,
        "p256_batch_vs_bare": results.find("sam.sign100.p256", processes=2).signatures_per_second
        / results.find("bare.sign100.p256", processes=2).signatures_per_second,
        "worker_overhead_ms_p256": worker_overhead_ms(results),
        "broker_cpu_vs_echo": sam_p256.cpu_ms_per_request.get("broker", 0.0)
        / (results.find("echo", 64, 2).cpu_ms_per_request.get("broker", 0.0) or 1),
    }


def scaling(results: Results) -> dict[str, dict[str, float]]:
    """Broker CPU milliseconds per signature and signatures per second of the scale points,
    by number of SAM workers: at c=64 (each count at its own rate) and paced (one rate)."""

    def by_workers(name: str) -> list[Point]:
        return sorted((p for p in results.points if p.name == name), key=lambda p: p.processes)

    def broker(points: list[Point]) -> dict[str, float]:
        return {
            str(p.processes): round(p.cpu_ms_per_request.get("broker", 0.0) / p.per_request, 3)
            for p in points
        }

    closed, paced = by_workers("sam.scale.p256"), by_workers("sam.scale_paced.p256")
    figures = {
        "broker_cpu_ms_per_signature": broker(closed),
        "signatures_per_second": {str(p.processes): round(p.signatures_per_second, 1) for p in closed},
    }
    if paced:
        figures["paced_broker_cpu_ms_per_signature"] = broker(paced)
        figures["paced_signatures_per_second"] = {
            str(p.processes): round(p.signatures_per_second, 1) for p in paced
        }
    return figures


def ceilings(results: Results) -> dict[str, float]:
    """What each throughput ratio would be if the workers spent no CPU beyond what the
    echo servers and the HSM operations spend, with the broker and load-generator CPU per
    request measured for the SAM in this run: on one machine the parts share the cores,
    so this separates the cost of the worker's own checks from the cost of the broker
    traffic the design needs (stream appends, audit messages) and of the load generator."""
    cores = os.cpu_count() or 1
    echo = results.find("echo", 64, 2)
    echo_server_ms = echo.cpu_ms_per_request.get("workers", 0.0)

    def per_operation_ms(name: str) -> float:  # two processes, each a core's worth
        return 2 * 1000 / results.find(name, processes=2).rate

    def rate(point: Point, hsm_ms: float) -> float:
        cpu = point.cpu_ms_per_request
        return cores * 1000 / (cpu.get("broker", 0.0) + cpu.get("load", 0.0) + echo_server_ms + hsm_ms)

    figures: dict[str, float] = {}
    for kind, label in (("p256", "p256_single_vs_bound"), ("rsa2048", "rsa_single_vs_bound")):
        point = results.find(f"sam.sign.{kind}", 64, 2)
        figures[label] = rate(point, per_operation_ms(f"hsm.stateless.{kind}")) / bound(results, kind)
    batch = results.find("sam.sign100.p256", processes=2)
    hsm_ms = 100 * per_operation_ms("hsm.persistent.p256") + per_operation_ms("hsm.stateless.p256")
    figures["p256_batch_vs_raw_hsm"] = (
        rate(batch, hsm_ms) * batch.per_request / results.find("hsm.persistent.p256", processes=2).rate
    )
    return figures


def _bare_twin(results: Results, point: Point) -> Point | None:
    """The bare worker's point beside a SAM signing point (same request, c and processes)."""
    if not point.name.startswith("sam.sign"):
        return None
    try:
        return results.find("bare" + point.name.removeprefix("sam"), point.concurrency, point.processes)
    except KeyError:
        return None


def table(results: Results) -> str:
    header = f"{'measure':<22} {'c':>3} {'proc':>4} {'req/s':>9} {'sig/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    lines = [header + "  CPU ms/request: broker workers load | bare worker"]
    for p in results.points:
        p50 = f"{p.p50_ms:8.2f}" if p.p50_ms is not None else f"{'':>8}"
        p99 = f"{p.p99_ms:8.2f}" if p.p99_ms is not None else f"{'':>8}"
        rates = f"{p.rate:9.0f} {p.signatures_per_second:9.0f}"
        cpu = p.cpu_ms_per_request
        split = "".join(
            f" {cpu[part]:{width}.2f}" if part in cpu else " " * (width + 1)
            for part, width in (("broker", 7), ("workers", 7), ("load", 6))
        )
        twin = _bare_twin(results, p)
        if twin is not None:
            split += f"   {twin.cpu_ms_per_request.get('workers', 0.0):6.2f}"
        row = f"{p.name:<22} {p.concurrency or '':>3} {p.processes:>4} {rates} {p50} {p99}{split}"
        lines.append(row.rstrip())
    lines.append("")
    lines.append(f"{'ratio':<32} {'measured':>8} {'with a worker as cheap as echo + HSM':>38}")
    for name, value in results.ratios.items():
        if isinstance(value, list):
            continue  # the HSM-lane table, below
        ceiling = f" {results.ceilings[name]:38.2f}" if name in results.ceilings else ""
        lines.append(f"{name:<32} {value:8.2f}{ceiling}")
    if results.scaling:
        broker = results.scaling["broker_cpu_ms_per_signature"]
        rate = results.scaling["signatures_per_second"]
        lines.append(
            "broker CPU ms per signature (P-256, c=64) by SAM workers: "
            + ", ".join(f"{n}: {broker[n]:.2f} ({rate[n]:.0f} sig/s)" for n in broker)
        )
        paced = results.scaling.get("paced_broker_cpu_ms_per_signature")
        if paced:
            lines.append(
                f"broker CPU ms per signature (P-256, {SCALE_PACED_RATE:g} req/s) by SAM workers: "
                + ", ".join(f"{n}: {paced[n]:.2f}" for n in paced)
            )
    lane = results.ratios.get("hsm_lane")
    if isinstance(lane, list):
        columns = f"{'ms/call':>8} {'sessions':>8} {'sig/s':>8} {'bound':>8}"
        lines.append(f"HSM lane (1 worker, P-256, c=64): {columns}")
        lines += [
            f"{'':<34}{row['latency_ms']:8.1f} {row['sessions']:8.0f} {row['rate']:8.0f} {row['bound']:8.0f}"
            for row in lane
        ]
    if results.repeats:
        costs = results.repeats
        lines.append(
            f"keeping results for repeats (1 worker, P-256): {costs['result_store_ms_mean']:.2f} ms of a "
            f"{costs['signature_request_ms_mean']:.2f} ms signature request on average "
            f"({costs['result_store_share_of_request_time']:.0%})"
        )
    if results.memory:
        memory = results.memory
        lines.append(
            f"worker RSS: {memory['worker_rss_kb_start']} kB -> {memory['worker_rss_kb_end']} kB "
            f"over {memory['requests']} requests; every 10,000: {memory['worker_rss_kb_every_10k']}; "
            f"SAD-use entries: {memory['sad_use_entries_every_10k']}; "
            f"requests/s: {memory['requests_per_second_every_10k']}"
        )
    return "\n".join(lines)


def chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, processes in zip(axes, (1, 2), strict=True):
        for name, label in (
            ("echo", "echo RPC (bound by the broker)"),
            ("sam.sign.p256", "SAM P-256"),
            ("sam.sign.rsa2048", "SAM RSA-2048"),
        ):
            points = [p for p in results.points if p.name == name and p.processes == processes]
            axis.plot([p.concurrency for p in points], [p.rate for p in points], marker="o", label=label)
        for kind, label in (("p256", "HSM stateless P-256"), ("rsa2048", "HSM stateless RSA-2048")):
            rate = results.find(f"hsm.stateless.{kind}", processes=processes).rate
            axis.axhline(
                rate, linestyle="--", linewidth=1, label=label, color="grey" if kind == "p256" else "black"
            )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency (requests in flight)")
        axis.set_ylabel("requests per second")
        axis.set_title(f"{processes} worker process(es)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    """``ops/bench``: ``run`` the whole measurement (JSON, chart, table), or ``hsm-loop``,
    ``echo-server`` and ``bare-server``, the subprocesses a run starts."""
    parser = argparse.ArgumentParser(prog="ops/bench", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("run")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--memory-only", action="store_true", help="only the 100,000-request memory run")
    bench.add_argument("--no-lane", action="store_true", help="without the HSM-lane table (delayed HSM)")
    bench.add_argument("--out", type=Path, default=Path("bench-results.json"))
    bench.add_argument("--root", type=Path, default=Path(os.environ.get("SAM_STACK_DIR", ".stack")))
    bench.add_argument("--port-base", type=int, default=int(os.environ.get("SAM_STACK_PORT_BASE", "25671")))
    loop = sub.add_parser("hsm-loop")
    loop.add_argument("kind")
    loop.add_argument("mode")
    loop.add_argument("seconds", type=float)
    server = sub.add_parser("echo-server")
    server.add_argument("profile", type=Path)
    bare = sub.add_parser("bare-server")
    bare.add_argument("profile", type=Path)
    bare.add_argument("ssa_public_key", type=Path, help="PEM of the SSA whose request JWS it accepts")
    args = parser.parse_args(argv)
    if args.command == "hsm-loop":
        hsm_loop(args.kind, args.mode, args.seconds)
    elif args.command == "echo-server":
        asyncio.run(echo_server(args.profile, 16))
    elif args.command == "bare-server":
        serve(args.profile, args.ssa_public_key)
    else:
        stack = Stack(args.root.resolve(), args.port_base)
        results = asyncio.run(run(stack, args.quick, args.out, args.memory_only, not args.no_lane))
        document = {
            "machine": results.machine,
            "points": [
                {**asdict(p), "signatures_per_second": p.signatures_per_second} for p in results.points
            ],
            "ratios": results.ratios,
            "ceilings_with_a_worker_as_cheap_as_echo_and_hsm": results.ceilings,
            "scaling": results.scaling,
            "keeping_results_for_repeats": results.repeats,
            "memory": results.memory,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=2) + "\n")
        if results.points:
            chart(results, args.out.with_suffix(".png"))
        print(table(results))
        print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
