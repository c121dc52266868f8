"""Operator files run by their real tools, as shipped: logrotate with
``ops/logrotate/sam-worker`` (only its folder substituted) against a worker that runs as
the unit's ``sam`` account, under load; the dev stack's listeners, all on loopback; and
the SIEM's side of the broker as docs/INTEGRATION.md describes it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel

from tests.conftest import PORT_BASE
from tests.integration.conftest import Harness
from tests.integration.test_audit_trail import Signing, records_in, signing, verify
from worker.client import ClientProfile, RawReply
from worker.settings import TlsFiles
from worker.transport.amqp import connect
from worker.transport.topology import (
    AUDIT_EXCHANGE,
    SIEM_QUEUE_MAX_BYTES,
    SIEM_QUEUE_MAX_LENGTH,
    SIEM_QUEUE_POLICY,
    VHOST,
    siem_queue,
)

pytestmark = pytest.mark.integration

__all__ = ["signing"]  # the module's signing key pair, shared with the audit trail tests

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "sam"  # the unit's User= and the logrotate file's `create` owner
ROTATIONS = 4
METRICS_PORT = PORT_BASE + 42  # test_operations' workers serve on + 40, test_metrics_exposed's on + 41
# What the shipped postrotate runs; the stand-in below checks it gets exactly this.
POSTROTATE_CALL = "kill --kill-whom=main --signal=HUP sam-worker@*.service"


@pytest.fixture(scope="module")
def account() -> pwd.struct_passwd:
    """The system account the unit runs the worker as, made as the unit's comment says.
    Running a worker as another account (setpriv, chown) takes root, whether or not the
    account exists already: without it the test is skipped (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip(f"runs a worker as the {ACCOUNT!r} account: needs root")
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(ACCOUNT)
    subprocess.run(
        ["useradd", "--system", "--user-group", "--home-dir", "/nonexistent", "--no-create-home",
         "--shell", "/usr/sbin/nologin", ACCOUNT],
        check=True,
    )  # fmt: skip
    return pwd.getpwnam(ACCOUNT)


def systemctl_stand_in(folder: Path, pid: int) -> Path:
    """A ``systemctl`` first on logrotate's PATH: there is no systemd here, so this does
    what ``systemctl kill --kill-whom=main`` does to the one instance, and only when
    called exactly as the shipped postrotate calls it; every call is logged."""
    folder.mkdir()
    script = folder / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {folder / "calls"}\n'
        f'[ "$*" = "{POSTROTATE_CALL}" ] || exit 1\n'
        f"exec kill -HUP {pid}\n"
    )
    script.chmod(0o755)
    return folder


def content(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


@contextlib.asynccontextmanager
async def worker_as(harness: Harness, instance: str, audit_dir: Path, user: str) -> AsyncIterator[int]:
    # the account owns its token store, as the README says: SoftHSM locks each object file
    # when several threads use it, and a store the worker can only read fails at start
    tokens = harness.stack.path("softhsm", "tokens")
    owned = [tokens, *tokens.rglob("*")]
    for path in owned:
        shutil.chown(path, user, user)
    try:
        async with _started_as(harness, instance, audit_dir, user) as pid:
            yield pid
    finally:
        for path in owned:
            shutil.chown(path, "root", "root")


@contextlib.asynccontextmanager
async def _started_as(harness: Harness, instance: str, audit_dir: Path, user: str) -> AsyncIterator[int]:
    async with harness.without_shared_workers():
        process = await asyncio.to_thread(
            harness.start_worker, instance, env={"SAM_AUDIT_DIR": str(audit_dir)}, user=user
        )
        try:
            yield process.pid
        finally:
            if instance in harness.workers:
                await harness.stop_worker(instance)


@pytest.fixture
def log_folder() -> Iterator[Path]:
    """A folder as /var/log is: open to every account on the way down (logrotate works
    in it as ``sam``: its ``su``), unlike pytest's own temporary folders."""
    folder = Path(tempfile.mkdtemp(prefix="sam-test-log-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_shipped_logrotate_file_rotates_a_non_root_worker_under_load(
    harness: Harness, signing: Signing, account: pwd.struct_passwd, tmp_path: Path, log_folder: Path
) -> None:
    audit_dir, instance = log_folder / "sam-worker", "worker-as-sam"
    audit_dir.mkdir(mode=0o750)
    os.chown(audit_dir, account.pw_uid, account.pw_gid)  # systemd's LogsDirectory= does this
    shipped = (ROOT / "ops" / "logrotate" / "sam-worker").read_text()
    config = tmp_path / "logrotate.conf"
    config.write_text(shipped.replace("AUDIT_DIR", str(audit_dir)))
    current = audit_dir / instance / "service.jsonl"
    replies: list[tuple[str, RawReply]] = []
    # each rotated file as it was once the worker had written into the new file: from then
    # on, nothing may be added to it (it is compressed next time, then only kept)
    frozen: dict[str, bytes] = {}
    async with worker_as(harness, instance, audit_dir, account.pw_name) as pid:
        stand_in = systemctl_stand_in(tmp_path / "bin", pid)
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                replies.extend(await asyncio.gather(*(signing.send() for _ in range(6))))

        loader = asyncio.create_task(load())
        try:
            for _ in range(ROTATIONS):
                await written_into(current)
                await asyncio.sleep(1.1)  # dated names carry seconds: one rotation a second
                result = await asyncio.to_thread(
                    subprocess.run,
                    ["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"), str(config)],
                    env={**os.environ, "PATH": f"{stand_in}:{os.environ['PATH']}"},
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert result.returncode == 0, result.stdout + result.stderr
                new = current.stat()
                # the bug this file had: a root-owned new file the worker could not open
                assert (new.st_uid, new.st_gid, new.st_mode & 0o777) == (
                    account.pw_uid,
                    account.pw_gid,
                    0o640,
                ), new
                await written_into(current)
                for moved in current.parent.glob("service.jsonl-*"):
                    frozen.setdefault(moved.name.removesuffix(".gz"), content(moved))
        finally:
            stop.set()
            await loader
    calls = (stand_in / "calls").read_text().splitlines()
    assert calls == [POSTROTATE_CALL] * ROTATIONS
    rotated = sorted(current.parent.glob("service.jsonl-*"))
    assert len(rotated) == ROTATIONS, rotated
    assert all(re.fullmatch(r"service\.jsonl-\d{8}-\d{10}(\.gz)?", p.name) for p in rotated), rotated
    assert sum(p.suffix == ".gz" for p in rotated) == ROTATIONS - 1  # delaycompress
    for path in rotated:
        assert content(path) == frozen[path.name.removesuffix(".gz")], f"written into {path.name}"
    files = [current, *rotated]
    result = verify(harness, files)
    assert result.returncode == 0, result.stdout
    assert len(replies) > 30
    assert all(reply.status == 200 for _, reply in replies), [
        r.json() for _, r in replies if r.status != 200
    ][:3]
    per_request = Counter(r["request_id"] for r in records_in(files))
    assert all(per_request[request_id] == 1 for request_id, _ in replies)
    assert set(per_request) == {request_id for request_id, _ in replies}


async def written_into(path: Path, seconds: float = 20) -> None:
    """Until the worker has written a batch into ``path`` (logrotate leaves an empty file
    alone: ``notifempty``)."""
    deadline = time.monotonic() + seconds
    while not has_content(path):
        assert time.monotonic() < deadline, f"nothing written into {path}"
        await asyncio.sleep(0.05)


def has_content(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def listening_sockets(pids: set[int], ports: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket the processes listen on, or that listens
    on one of ``ports`` (epmd is started by the node and lives on its own) — from ``ss``."""
    listed = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in listed.splitlines():
        fields = line.split()
        local, users = fields[3], " ".join(fields[5:])
        address, _, port = local.rpartition(":")
        for pid in map(int, re.findall(r"pid=(\d+)", users)):
            if pid in pids or int(port) in ports:
                found.append((address.strip("[]"), int(port), pid))
    return found


async def test_every_listener_of_the_dev_stack_is_on_loopback(harness: Harness) -> None:
    """The README says the dev node is on 127.0.0.1: AMQPS, epmd and the Erlang
    distribution port (which accepts any peer holding the cookie) included, and a
    worker's /metrics as the stack starts it."""
    if shutil.which("ss") is None:
        pytest.fail("ss (iproute2) is needed to list listening sockets")
    stack = harness.stack
    await asyncio.to_thread(harness.start_worker, "worker-listening", metrics_port=METRICS_PORT)
    try:
        sockets = await asyncio.to_thread(stack_sockets, harness)
    finally:
        await harness.stop_worker("worker-listening")
    ports = {port for _, port, _ in sockets}
    assert {stack.node_amqps_port(1), stack.node_dist_port(1), stack.epmd_port, METRICS_PORT} <= ports, (
        sockets
    )
    exposed = [s for s in sockets if s[0] not in ("127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"


def stack_sockets(harness: Harness) -> list[tuple[str, int, int]]:
    """What the node (and its children), epmd and the workers listen on."""
    stack = harness.stack
    pids = {int(stack.node_pid_file(1).read_text())} | {p.pid for p in harness.workers.values()}
    children = subprocess.run(
        ["pgrep", "-P", ",".join(map(str, pids))], capture_output=True, text=True, check=False
    ).stdout.split()
    pids |= set(map(int, children))
    return listening_sockets(pids, {stack.epmd_port})


async def test_a_siem_reads_its_queue_and_the_archive_and_declares_nothing(
    harness: Harness, signing: Signing
) -> None:
    """The SIEM contract of docs/INTEGRATION.md §6. The definitions declare the SIEM's
    queue, bound to sam.audit with ``#``, and cap it with the operator policy (an abandoned
    queue cannot fill the broker). The SIEM reads it; it may declare no queue (no stream
    beyond every cap), no exchange to publish into without bound, bind nothing, publish
    nowhere."""
    stack = harness.stack
    queue_name = siem_queue("siem-1")
    lookup = f'rabbit_amqqueue:lookup(rabbit_misc:r(<<"{VHOST}">>, queue, <<"{queue_name}">>))'
    policies = "{amqqueue:get_operator_policy(Q), rabbit_policy:effective_definition(Q)}"
    # rabbitmqctl 3.10 lists no effective policy: ask the node (its own API)
    shown = await asyncio.to_thread(stack.rabbitmqctl, "eval", f"{{ok, Q}} = {lookup}, {policies}.")
    compact = re.sub(r"\s+", "", shown.stdout)
    assert f'{{name,<<"{SIEM_QUEUE_POLICY}">>}}' in compact, shown.stdout
    effective = compact.rpartition("#{")[2]  # the effective definition, last
    assert f'<<"max-length-bytes">>=>{SIEM_QUEUE_MAX_BYTES}' in effective, shown.stdout
    assert f'<<"max-length">>=>{SIEM_QUEUE_MAX_LENGTH}' in effective, shown.stdout

    profile = ClientProfile.model_validate_json(stack.profile("siem-1").read_text())
    tls = TlsFiles(ca_file=profile.ca_file, cert_file=profile.cert_file, key_file=profile.key_file)
    connection = await connect(profile.url, tls)
    try:

        async def own_queue(channel: AbstractChannel) -> None:
            await channel.declare_queue("siem-1.mine", arguments={"x-queue-type": "classic"})

        async def own_stream(channel: AbstractChannel) -> None:
            await channel.declare_queue("siem-1.stream", durable=True, arguments={"x-queue-type": "stream"})

        async def own_exchange(channel: AbstractChannel) -> None:
            await channel.declare_exchange("siem-1.fanout", aio_pika.ExchangeType.FANOUT)

        async def binding(channel: AbstractChannel) -> None:
            queue = await channel.declare_queue(queue_name, passive=True)
            await queue.bind(AUDIT_EXCHANGE, routing_key="service.#")

        async def into_its_queue(channel: AbstractChannel) -> None:
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue_name)

        async def into_the_feed(channel: AbstractChannel) -> None:
            exchange = await channel.get_exchange(AUDIT_EXCHANGE, ensure=False)
            await exchange.publish(aio_pika.Message(b"x"), routing_key="service.x.success")

        attempts = [own_queue, own_stream, own_exchange, binding, into_its_queue, into_the_feed]
        refused = []
        for attempt in attempts:
            channel = await connection.channel(publisher_confirms=True)
            try:
                await attempt(channel)
            except aiormq.exceptions.ChannelAccessRefused:
                refused.append(attempt.__name__)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        assert refused == [attempt.__name__ for attempt in attempts]

        # and reads what the definitions bound for it: a refusal's record, by its key
        await asyncio.to_thread(stack.rabbitmqctl, "purge_queue", "-p", VHOST, queue_name)
        request_id = str(uuid.uuid4())
        reply = await signing.ssa.send("signatures.create", b"{}", message_id=request_id)
        assert reply is not None and reply.status == 400
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        deadline, keys = time.monotonic() + 10, set()
        while time.monotonic() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            keys.add(message.routing_key)
            if request_id.encode() in message.body:
                assert message.routing_key == "service.signatures.create.failure"
                break
        else:
            pytest.fail(f"no record of the refusal in {queue_name}; routing keys seen: {keys}")
    finally:
        await connection.close()
