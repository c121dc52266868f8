"""The integration session: one RabbitMQ node and one SoftHSM token for the whole run
(started here, in a folder and on ports of their own), two worker processes, and
clients for an administrator, a registered SSA and an unregistered one."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from sam_devtools.authorization_server import DevAuthorizationServer
from sam_devtools.raw_client import RawSamClient
from sam_devtools.stack import Stack
from worker.client import SamClient
from worker.domain.contract import DynamicConfiguration, KeyPairObject

pytestmark = pytest.mark.integration

EC_SHA256 = "1.2.840.10045.4.3.2"
RSA_SHA256 = "1.2.840.113549.1.1.11"


def wire(model: BaseModel) -> dict[str, Any]:
    """A contract model as the SDK sends it (JSON types, no null fields), for raw bodies."""
    return model.model_dump(mode="json", exclude_none=True)


def key_id(key_pair: KeyPairObject) -> str:
    """The id of a key pair copy the SAM returned (every one has it)."""
    assert key_pair.id is not None, key_pair
    return key_pair.id


def certificate_der(key_pair: KeyPairObject) -> bytes:
    """The DER certificate of a certified key pair copy the SAM returned."""
    assert key_pair.certificate is not None, key_pair
    return base64.b64decode(key_pair.certificate)


def public_key_der(key_pair: KeyPairObject) -> bytes:
    """The DER SubjectPublicKeyInfo of a key pair copy the SAM returned."""
    assert key_pair.public_key is not None, key_pair
    return base64.b64decode(key_pair.public_key)


class Harness:
    """What the tests need of the running stack."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.static = json.loads(stack.path("config", "static_config.json").read_text())
        self.sam_id: str = self.static["sam_id"]
        self.dev_as = DevAuthorizationServer("dev-as", stack.pki.jws_key("dev-as").read_bytes())
        self.other_as = DevAuthorizationServer("other-as", stack.pki.jws_key("other-as").read_bytes())
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def base_configuration(self) -> dict[str, Any]:
        """The demo configuration less ssa-2, which the tests use as the unregistered SSA
        (a document, for tests to change; ``base_config`` is it as the model)."""
        config = json.loads(self.stack.path("config", "dynamic_config.json").read_text())
        config["signing_service_privileged_users"] = [
            u for u in config["signing_service_privileged_users"] if u["id"] == "ssa-1"
        ]
        return copy.deepcopy(config)

    def base_config(self, **changes: Any) -> DynamicConfiguration:
        """``base_configuration`` with ``changes`` (e.g. ``version``), as the model."""
        return DynamicConfiguration.model_validate({**self.base_configuration(), **changes})

    def client(self, user: str) -> RawSamClient:
        """An unconnected client of ``user``'s (with the test tooling's ``send``)."""
        return RawSamClient.from_profile(self.stack.profile(user))

    async def certified_key_pair(
        self,
        client: SamClient,
        signer: str,
        template: dict[str, Any] | None = None,
        *,
        pop_algorithm: str | None = None,
        pop_parameters: bytes | None = None,
        **assign_options: Any,
    ) -> KeyPairObject:
        """The whole path to a usable key pair: create, assign, PoP, dev CA, update."""
        template = template or {"algorithm": "ECDSA", "named_curve": "secp256r1"}
        created = await client.create_key_pair(**template)
        assigned = await client.assign_key_pair(created, signer, f"CN={signer},O=Example", **assign_options)
        if pop_algorithm is None:
            pop_algorithm = EC_SHA256 if template["algorithm"] == "ECDSA" else RSA_SHA256
        request = await client.certification_request(assigned, pop_algorithm, pop_parameters)
        certificate = self.stack.pki.issue_from_request(request)
        return await client.update_key_pair(assigned, signer, certificate=certificate)

    def audit_entries(self) -> list[dict[str, Any]]:
        """Every entry (records and checkpoints) of every audit file, file by file."""
        entries = []
        for path in sorted(self.stack.path("audit").glob("*/*.jsonl")):
            entries += [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
        return entries

    def audit_records(self) -> list[dict[str, Any]]:
        return [entry for entry in self.audit_entries() if entry["type"] == "record"]

    async def queue_drained(self, name: str, seconds: float = 15) -> bool:
        """Whether ``name`` shows no message within ``seconds`` (RabbitMQ refreshes the
        statistics behind ``list_queues`` every few seconds)."""
        for _ in range(int(seconds / 0.25)):
            if self.queue_depths()[name] == (0, 0):
                return True
            await asyncio.sleep(0.25)
        return False

    def dead_letter_records(self) -> set[tuple[str, str, int]]:
        """The chain positions of records of requests that died unprocessed in a request
        queue (answered from sam.dead): tests compare them before and after."""
        codes = ("request_expired", "request_undeliverable")
        return {(r["instance"], r["log"], r["seq"]) for r in self.audit_records() if r["error_code"] in codes}

    def audit_record(self, request_id: str) -> dict[str, Any]:
        found = [r for r in self.audit_records() if r["request_id"] == request_id]
        assert len(found) == 1, f"expected one audit record for {request_id}, found {len(found)}"
        return found[0]

    def start_worker(self, instance: str, **options: Any) -> subprocess.Popen[bytes]:
        process = self.stack.start_worker(instance, **options)
        self.workers[instance] = process
        return process

    async def stop_worker(self, instance: str) -> None:
        process = self.workers.pop(instance)
        process.terminate()
        await asyncio.to_thread(process.wait, 20)

    @contextlib.asynccontextmanager
    async def without_shared_workers(self) -> AsyncIterator[None]:
        """Stop worker-1 and worker-2 (gracefully) so a test's own worker serves alone."""
        for instance in ("worker-1", "worker-2"):
            await self.stop_worker(instance)
        try:
            yield
        finally:
            for instance in ("worker-1", "worker-2"):
                await asyncio.to_thread(self.start_worker, instance)

    def queue_depths(self) -> dict[str, tuple[int, int]]:
        out = self.stack.rabbitmqctl(
            "list_queues",
            "-p",
            "sam",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--no-table-headers",
            "-q",
        ).stdout
        depths = {}
        for line in out.splitlines():
            name, ready, unacked = line.split("\t")
            depths[name] = (int(ready), int(unacked))
        return depths


@pytest.fixture(scope="session")
async def harness(stack: Stack) -> AsyncIterator[Harness]:
    harness = Harness(stack)
    harness.start_worker("worker-1")
    harness.start_worker("worker-2")
    async with harness.client("admin-1") as admin:
        await admin.put_configuration(harness.base_config())
    yield harness
    for process in harness.workers.values():
        if process.poll() is None:
            process.terminate()
    for process in harness.workers.values():
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
async def admin(harness: Harness) -> AsyncIterator[RawSamClient]:
    async with harness.client("admin-1") as client:
        yield client


@pytest.fixture(scope="session")
async def ssa(harness: Harness) -> AsyncIterator[RawSamClient]:
    async with harness.client("ssa-1") as client:
        yield client


@pytest.fixture(scope="session")
async def unregistered_ssa(harness: Harness) -> AsyncIterator[RawSamClient]:
    async with harness.client("ssa-2") as client:
        yield client
