"""TEST TOOLING: ``ops/bench`` — the SAM measured side by side with the limits of the
parts it is built on, in one run, on one broker and queue type.

Baselines: raw SoftHSM signing with a persistent key, the stateless cycle (unwrap, sign,
destroy), and an echo RPC through the same broker with the same message size,
persistence and confirms. Then ``signatures.create`` end to end through the SDK and
``key_pairs.create``. Every ratio is computed from figures of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
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
from sam_devtools.raw_client import RawSamClient
from sam_devtools.stack import Stack
from worker.client import ClientProfile, SamClient, SamRequestError
from worker.domain.contract import DynamicConfiguration, KeyPairObject
from worker.settings import TlsFiles, load_infrastructure, read_secret
from worker.transport.amqp import connect

__all__ = ["main"]

EC_SHA256 = "1.2.840.10045.4.3.2"
RSA_SHA256 = "1.2.840.113549.1.1.11"
ECHO_QUEUE = "bench.echo"


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
    ratios: dict[str, float] = field(default_factory=dict)
    ceilings: dict[str, float] = field(default_factory=dict)
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
) -> tuple[tuple[int, float, list[float]], dict[str, float]]:
    """``closed_loop`` and the CPU milliseconds each part spent per call meanwhile."""
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
    result = await closed_loop(counted, concurrency, seconds, warmup)
    after = snapshot()
    return result, {name: round((after[name] - before[name]) * 1000 / max(calls, 1), 3) for name in parts}


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
    """Print how many operations one process did in ``seconds``."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    infrastructure = load_infrastructure(Path(os.environ["SAM_INFRASTRUCTURE_FILE"]))
    session = (
        pkcs11.lib(os.environ.get("SAM_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so"))
        .get_token(token_label=infrastructure.token_label)
        .open(user_pin=read_secret(Path(os.environ["SAM_TOKEN_PIN_FILE"])), rw=True)
    )
    template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}
    if kind == "p256":
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("1.2.840.10045.3.1.7")},
            local=True,
        )
        private: Any
        _, private = params.generate_keypair(store=False, private_template=template)
        key_type, mechanism, data = KeyType.EC, Mechanism.ECDSA, b"\1" * 32
    else:
        _, private = session.generate_keypair(KeyType.RSA, 2048, store=False, private_template=template)
        key_type, mechanism = KeyType.RSA, Mechanism.RSA_PKCS
        data = bytes.fromhex("3031300d060960864801650304020105000420") + b"\1" * 32
    kek: Any = session.get_key(object_class=ObjectClass.SECRET_KEY, label=infrastructure.kek_label)
    wrapped = kek.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    unwrap_template = {
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: pkcs11.DEFAULT,
        Attribute.VERIFY: pkcs11.DEFAULT,
        Attribute.WRAP: pkcs11.DEFAULT,
    }
    count, stop = 0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        if mode == "persistent":
            private.sign(data, mechanism=mechanism)
        else:
            key = kek.unwrap_key(
                ObjectClass.PRIVATE_KEY,
                key_type,
                wrapped,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                store=False,
                capabilities=MechanismFlag.SIGN,
                template=unwrap_template,
            )
            key.sign(data, mechanism=mechanism)
            key.destroy()
        count += 1
    print(count)


def hsm_rate(stack: Stack, kind: str, mode: str, processes: int, seconds: float) -> Point:
    env = {
        **stack.worker_env(),
        "SAM_INFRASTRUCTURE_FILE": str(stack.infrastructure_file),
        "SAM_TOKEN_PIN_FILE": str(stack.path("secrets", "token-pin")),
    }
    command = [sys.executable, "-m", "sam_devtools.bench", "hsm-loop", kind, mode, str(seconds)]
    children = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)
    ]
    total = sum(int((child.communicate()[0] or "0").strip().splitlines()[-1]) for child in children)
    return Point(f"hsm.{mode}.{kind}", 0, processes, total, seconds, total / seconds)


# --- echo RPC baseline --------------------------------------------------------------------


async def echo_server(profile_file: Path, prefetch: int) -> None:
    """Consume bench.echo, answer on reply_to with confirms, ack after — as a worker does."""
    profile = ClientProfile.model_validate_json(profile_file.read_text())
    tls = TlsFiles(ca_file=profile.ca_file, cert_file=profile.cert_file, key_file=profile.key_file)
    connection = await connect(profile.url, tls)
    publish = await connection.channel(publisher_confirms=True)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=prefetch)
    queue = await consume.declare_queue(ECHO_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await publish.default_exchange.publish(
            aio_pika.Message(
                message.body, correlation_id=message.correlation_id, headers={"sam-status": 200}
            ),
            routing_key=message.reply_to or "",
            mandatory=False,
        )
        await message.ack()

    await queue.consume(on_message)
    print("ready", flush=True)
    await asyncio.Future()


class EchoClient:
    """The echo baseline's caller: RPCs as large as a signature request, with confirms."""

    def __init__(self, profile: ClientProfile) -> None:
        self.profile = profile
        self.pending: dict[str, asyncio.Future[None]] = {}

    async def connect(self) -> None:
        tls = TlsFiles(
            ca_file=self.profile.ca_file, cert_file=self.profile.cert_file, key_file=self.profile.key_file
        )
        self.connection = await connect(self.profile.url, tls)
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.replies = await self.channel.declare_queue(f"bench.replies.{uuid.uuid4()}", exclusive=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            future = self.pending.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(None)

        await self.replies.consume(on_reply, no_ack=True)

    async def call(self, body: bytes) -> None:
        correlation_id = str(uuid.uuid4())
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending[correlation_id] = future
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body,
                correlation_id=correlation_id,
                reply_to=self.replies.name,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=correlation_id,
                user_id=self.profile.user_id,
                headers={"sam-request-jws": "x" * 400, "sam-sad": "x" * 900},
            ),
            routing_key=ECHO_QUEUE,
        )
        await future


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
        return message_id, body, self.client.sign_request(body, message_id, "signatures.create"), sad

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


async def run(stack: Stack, quick: bool, out: Path, memory_only: bool = False) -> Results:
    seconds, warmup = (3.0, 1.0) if quick else (8.0, 2.0)
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
    ) -> None:
        """One end-to-end point, with the CPU per request of broker, servers and load."""
        parts = {"broker": [broker], "workers": [s.pid for s in servers], "load": [os.getpid()]}
        outcome, cpu = await profiled_loop(call, concurrency, seconds, warmup, parts)
        point = _point(name, concurrency, processes, outcome, per_request)
        point.cpu_ms_per_request = cpu
        results.points.append(point)

    body_size = 0
    try:
        async with RawSamClient.from_profile(stack.profile("ssa-1")) as client:
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
            body_size = len(
                Workload(client, authority, static["sam_id"], ec, "bench-ec", EC_SHA256, 1).one()[1]
            )

            for processes in () if memory_only else (1, 2):
                if processes == 2:
                    workers.append(stack.start_worker("bench-2"))
                for label, key_pair, signer, algorithm in (
                    ("p256", ec, "bench-ec", EC_SHA256),
                    ("rsa2048", rsa, "bench-rsa", RSA_SHA256),
                ):
                    for concurrency in (1, 16, 64):
                        load = Workload(client, authority, static["sam_id"], key_pair, signer, algorithm, 1)
                        load.prepare(
                            int(concurrency * (seconds + warmup) * (60 if concurrency > 1 else 30))
                            // max(concurrency, 1)
                            + 200
                        )
                        say(f"SAM {label} x1, c={concurrency}, {processes} worker(s)")
                        await measure(f"sam.sign.{label}", load.call, concurrency, processes, workers)
                    if processes == 1 and label == "p256":
                        # what keeping results costs, read off the worker that just signed;
                        # then repeats of the requests it answered (c=16), from sam.results
                        results.repeats = repeat_costs(stack.metrics_port(1))
                        say(f"SAM {label} repeats of answered requests, c=16, 1 worker")
                        await measure(f"sam.repeat.{label}", load.repeat, 16, processes, workers)
                batch = Workload(client, authority, static["sam_id"], ec, "bench-ec", EC_SHA256, 100)
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

            if memory_only or not quick:
                say("memory: 100,000 requests on one worker")
                for extra in workers[1:]:
                    extra.terminate()
                    extra.wait(20)
                load = Workload(client, authority, static["sam_id"], ec, "bench-ec", EC_SHA256, 1)
                results.memory = await memory_run(worker, stack.metrics_port(1), load)
    finally:
        for instance in ("bench-1", "bench-2"):
            stack.stop_instance(instance)
    if memory_only:
        stack.start_workers(2)
        return results

    say("baseline: echo RPC")
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "sam_devtools.bench", "echo-server", str(bench_profile)],
            env=stack.worker_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for server in servers:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        echo = EchoClient(ClientProfile.model_validate_json(bench_profile.read_text()))
        await echo.connect()
        payload = os.urandom(body_size)
        for processes in (1, 2):
            if processes == 1:
                servers[1].terminate()
                servers[1].wait(10)
            for concurrency in (1, 16, 64):
                say(f"echo c={concurrency}, {processes} server(s)")

                async def call(_: int) -> None:
                    await echo.call(payload)

                await measure("echo", call, concurrency, processes, servers[:processes])
            if processes == 1:
                servers[1] = subprocess.Popen(
                    [sys.executable, "-m", "sam_devtools.bench", "echo-server", str(bench_profile)],
                    env=stack.worker_env(),
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert servers[1].stdout is not None and servers[1].stdout.readline().strip() == "ready"
        await echo.connection.close()
    finally:
        for server in servers:
            server.terminate()
        stack.start_workers(2)

    results.ratios = ratios(results)
    results.ceilings = ceilings(results)
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


def ratios(results: Results) -> dict[str, float]:
    return {
        "p256_single_vs_bound": results.find("sam.sign.p256", 64, 2).rate / bound(results, "p256"),
        "rsa_single_vs_bound": results.find("sam.sign.rsa2048", 64, 2).rate / bound(results, "rsa2048"),
        "p256_batch_vs_raw_hsm": results.find("sam.sign100.p256", processes=2).signatures_per_second
        / results.find("hsm.persistent.p256", processes=2).rate,
        "p256_p50_vs_echo_p50": (results.find("sam.sign.p256", 1, 2).p50_ms or 0)
        / (results.find("echo", 1, 2).p50_ms or 1),
        "batch_scaling_2_vs_1_workers": results.find("sam.sign100.p256", processes=2).signatures_per_second
        / results.find("sam.sign100.p256", processes=1).signatures_per_second,
        "p256_repeat_vs_sign_c16": results.find("sam.repeat.p256", 16, 1).rate
        / results.find("sam.sign.p256", 16, 1).rate,
    }


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


def table(results: Results) -> str:
    header = f"{'measure':<22} {'c':>3} {'proc':>4} {'req/s':>9} {'sig/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    lines = [header + "  CPU ms/request: broker workers load"]
    for p in results.points:
        p50 = f"{p.p50_ms:8.2f}" if p.p50_ms is not None else f"{'':>8}"
        p99 = f"{p.p99_ms:8.2f}" if p.p99_ms is not None else f"{'':>8}"
        rates = f"{p.rate:9.0f} {p.signatures_per_second:9.0f}"
        cpu = p.cpu_ms_per_request
        split = f"  {cpu['broker']:6.2f} {cpu['workers']:6.2f} {cpu['load']:6.2f}" if cpu else ""
        lines.append(f"{p.name:<22} {p.concurrency or '':>3} {p.processes:>4} {rates} {p50} {p99}{split}")
    lines.append("")
    lines.append(f"{'ratio':<32} {'measured':>8} {'with a worker as cheap as echo + HSM':>38}")
    lines += [
        f"{name:<32} {value:8.2f} {results.ceilings[name]:38.2f}"
        if name in results.ceilings
        else f"{name:<32} {value:8.2f}"
        for name, value in results.ratios.items()
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
    """``ops/bench``: ``run`` the whole measurement (JSON, chart, table), or ``hsm-loop`` and
    ``echo-server``, the subprocesses a run starts."""
    parser = argparse.ArgumentParser(prog="ops/bench", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("run")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--memory-only", action="store_true", help="only the 100,000-request memory run")
    bench.add_argument("--out", type=Path, default=Path("bench-results.json"))
    bench.add_argument("--root", type=Path, default=Path(os.environ.get("SAM_STACK_DIR", ".stack")))
    bench.add_argument("--port-base", type=int, default=int(os.environ.get("SAM_STACK_PORT_BASE", "25671")))
    loop = sub.add_parser("hsm-loop")
    loop.add_argument("kind")
    loop.add_argument("mode")
    loop.add_argument("seconds", type=float)
    server = sub.add_parser("echo-server")
    server.add_argument("profile", type=Path)
    args = parser.parse_args(argv)
    if args.command == "hsm-loop":
        hsm_loop(args.kind, args.mode, args.seconds)
    elif args.command == "echo-server":
        asyncio.run(echo_server(args.profile, 16))
    else:
        stack = Stack(args.root.resolve(), args.port_base)
        results = asyncio.run(run(stack, args.quick, args.out, args.memory_only))
        document = {
            "machine": results.machine,
            "points": [
                {**asdict(p), "signatures_per_second": p.signatures_per_second} for p in results.points
            ],
            "ratios": results.ratios,
            "ceilings_with_a_worker_as_cheap_as_echo_and_hsm": results.ceilings,
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
