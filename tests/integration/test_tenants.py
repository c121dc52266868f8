"""Tenant isolation on the real stack: a key pair belongs to the SSA that created it,
and from its assignment on its signer is (authorization server, subject). Another
registered SSA holding a copy of the seal — it crosses the broker in every request and
sits in the owner's database — can do nothing with it; a SAD from another AS the owner
may use does not activate it; only an administrator moves a key pair, and one sealed
before owners existed is refused until an administrator binds it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.integration.conftest import EC_SHA256, Harness, key_id
from worker.client import SamClient, SamRequestError
from worker.domain.contract import DynamicConfiguration, KeyPairObject
from worker.domain.key_pair import KeyPairSealer
from worker.domain.keys import load_public_key
from worker.settings import load_infrastructure

pytestmark = pytest.mark.integration

DIGEST = hashlib.sha256(b"a tenant's document").digest()


@pytest.fixture(scope="module")
async def tenants(harness: Harness, admin: SamClient) -> AsyncIterator[tuple[SamClient, SamClient]]:
    """ssa-2 registered beside ssa-1 for this module, and ssa-1 allowed both ASes."""
    config = json.loads(harness.stack.path("config", "dynamic_config.json").read_text())
    current = (await admin.get_configuration()).version
    for user in config["signing_service_privileged_users"]:
        user["allowed_authorization_servers"] = ["dev-as", "other-as"]
    config["version"] = current + 1
    await admin.put_configuration(DynamicConfiguration.model_validate(config))
    try:
        async with harness.client("ssa-1") as owner, harness.client("ssa-2") as other:
            yield owner, other
    finally:
        await admin.put_configuration(
            harness.base_config(version=(await admin.get_configuration()).version + 1)
        )


async def _refused(call: Awaitable[Any]) -> SamRequestError:
    with pytest.raises(SamRequestError) as refused:
        await call
    return refused.value


async def _certified(harness: Harness, client: SamClient, signer: str) -> KeyPairObject:
    return await harness.certified_key_pair(client, signer, authorization_server="dev-as")


async def test_another_ssa_holding_a_copy_can_do_nothing_with_it(
    harness: Harness, tenants: tuple[SamClient, SamClient]
) -> None:
    owner, other = tenants
    certified = await _certified(harness, owner, "alice")
    fresh = await owner.create_key_pair("ECDSA", named_curve="secp256r1")
    sad = harness.dev_as.issue_sad(harness.sam_id, "alice", key_id(certified), [DIGEST])
    attempts: dict[str, Callable[[], Awaitable[Any]]] = {
        "sign": lambda: other.sign(certified, "alice", EC_SHA256, [DIGEST], sad),
        "assign": lambda: other.assign_key_pair(
            fresh, "mallory", "CN=mallory", authorization_server="dev-as"
        ),
        "disable": lambda: other.update_key_pair(certified, "alice", enabled=False),
        "delete": lambda: other.delete_key_pair(certified, "alice"),
        "rewrap": lambda: other.rewrap_key_pair(certified),
    }
    for name, attempt in attempts.items():
        refused = await _refused(attempt())
        assert (refused.status, refused.code) == (403, "key_pair_not_owned"), name
        record = harness.audit_record(refused.request_id or "")
        assert (record["actor"], record["error_code"]) == ("ssa-2", "key_pair_not_owned"), name
    # nothing happened to the owner's key pairs: no newer revision, not deleted, still signs
    assert len(await owner.sign(certified, "alice", EC_SHA256, [DIGEST], sad)) == 1
    assigned = await owner.assign_key_pair(fresh, "bob", "CN=bob,O=Example", authorization_server="dev-as")
    assert assigned.owner == "ssa-1" and assigned.authorization_server == "dev-as"


async def test_only_the_authorization_server_bound_to_the_signer_activates_its_key_pair(
    harness: Harness, tenants: tuple[SamClient, SamClient]
) -> None:
    owner, _ = tenants
    certified = await _certified(harness, owner, "carol")
    # other-as is registered and allowed for ssa-1, and says it is carol: not carol's AS
    impostor = harness.other_as.issue_sad(harness.sam_id, "carol", key_id(certified), [DIGEST])
    refused = await _refused(owner.sign(certified, "carol", EC_SHA256, [DIGEST], impostor))
    assert (refused.status, refused.code) == (403, "sad_issuer_mismatch")
    genuine = harness.dev_as.issue_sad(harness.sam_id, "carol", key_id(certified), [DIGEST])
    assert len(await owner.sign(certified, "carol", EC_SHA256, [DIGEST], genuine)) == 1
    deletion = harness.other_as.issue_deletion_sad(harness.sam_id, "carol", key_id(certified))
    refused = await _refused(owner.delete_key_pair(certified, "carol", deletion))
    assert refused.code == "sad_issuer_mismatch"


async def test_assignment_binds_the_signer_to_one_authorization_server(
    harness: Harness, tenants: tuple[SamClient, SamClient]
) -> None:
    owner, _ = tenants
    created = await owner.create_key_pair("ECDSA", named_curve="secp256r1")
    assert created.owner == "ssa-1" and created.authorization_server is None
    # ssa-1 may use two ASes now: which one speaks for dave must be said
    refused = await _refused(owner.assign_key_pair(created, "dave", "CN=dave,O=Example"))
    assert (refused.status, refused.code) == (422, "authorization_server_required")
    # with a SKAD, its issuer is the one
    skad = harness.other_as.issue_skad(harness.sam_id, "dave", key_id(created))
    assigned = await owner.assign_key_pair(created, "dave", "CN=dave,O=Example", skad=skad)
    assert assigned.authorization_server == "other-as"


async def test_only_an_administrator_moves_a_key_pair_and_it_keeps_its_signers_as(
    harness: Harness, admin: SamClient, tenants: tuple[SamClient, SamClient]
) -> None:
    owner, other = tenants
    certified = await _certified(harness, owner, "erin")
    refused = await _refused(other.bind_key_pair(certified, "ssa-2"))
    assert refused.code == "operation_not_permitted"
    refused = await _refused(admin.bind_key_pair(certified, "ssa-2", "other-as"))
    assert refused.code == "binding_invalid"  # erin is dev-as's erin, not other-as's
    moved = await admin.bind_key_pair(certified, "ssa-2")
    assert (moved.owner, moved.authorization_server) == ("ssa-2", "dev-as")
    [record] = [
        r
        for r in harness.audit_records()
        if r["operation"] == "key_pairs.bind" and r["key_pair"] == certified.id and r["status"] == 200
    ]
    assert (record["log"], record["actor"]) == ("admin", "admin-1")
    sad = harness.dev_as.issue_sad(harness.sam_id, "erin", key_id(certified), [DIGEST])
    assert len(await other.sign(moved, "erin", EC_SHA256, [DIGEST], sad)) == 1
    sad = harness.dev_as.issue_sad(harness.sam_id, "erin", key_id(certified), [DIGEST])
    refused = await _refused(owner.sign(certified, "erin", EC_SHA256, [DIGEST], sad))
    assert refused.code in ("key_pair_outdated", "key_pair_not_owned")


async def _legacy_copy(harness: Harness, key_pair: KeyPairObject) -> KeyPairObject:
    """The same key pair sealed as the previous version did: no owner, no AS."""
    infrastructure = load_infrastructure(harness.stack.infrastructure_file)
    hsm = await harness.stack.hsm()
    try:
        sealer = KeyPairSealer(
            harness.sam_id,
            infrastructure.state_key.label,
            load_public_key(infrastructure.state_key.public_key),
            hsm.sign_with_state_key,
        )
        payload = sealer.open(key_pair.sealed)
        legacy = payload.model_copy(update={"v": 1, "owner": None, "authorization_server": None})
        return legacy.readable(await sealer.seal(legacy))
    finally:
        await hsm.close()


async def test_a_key_pair_sealed_before_owners_is_refused_until_an_administrator_binds_it(
    harness: Harness, admin: SamClient, tenants: tuple[SamClient, SamClient]
) -> None:
    owner, _ = tenants
    certified = await _certified(harness, owner, "frank")
    legacy = await _legacy_copy(harness, certified)
    sad = harness.dev_as.issue_sad(harness.sam_id, "frank", key_id(certified), [DIGEST])
    refused = await _refused(owner.sign(legacy, "frank", EC_SHA256, [DIGEST], sad))
    assert (refused.status, refused.code) == (409, "key_pair_unbound")
    refused = await _refused(admin.bind_key_pair(legacy, "ssa-1"))
    assert refused.code == "binding_invalid"  # an assigned key pair: whose signer is frank?
    bound = await admin.bind_key_pair(legacy, "ssa-1", "dev-as")
    assert (bound.owner, bound.authorization_server) == ("ssa-1", "dev-as")
    sad = harness.dev_as.issue_sad(harness.sam_id, "frank", key_id(certified), [DIGEST])
    assert len(await owner.sign(bound, "frank", EC_SHA256, [DIGEST], sad)) == 1
