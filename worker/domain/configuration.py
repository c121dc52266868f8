"""Static and dynamic configuration as the domain sees them.

The static configuration is the node operator's file (SAM id, administrators, SAD
policy, limits). The dynamic configuration is set by administrators at run time and
replayed by every worker from the ``sam.config`` stream; ``DynamicState`` holds the
current one with its keys parsed once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field

from worker.domain.certification import load_trust_anchors
from worker.domain.contract import DynamicConfiguration, Identifier, Pem
from worker.domain.keys import RegisteredKey, load_public_key
from worker.errors import ErrorCode, SamError

__all__ = [
    "Administrator",
    "DynamicState",
    "Limits",
    "SadPolicy",
    "StaticConfiguration",
    "parse_dynamic",
]


class Administrator(BaseModel):
    """An administrator of this SAM: the certificate CN it connects with (= AMQP user_id) and
    the PEM public key its request JWS must verify with."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Identifier
    public_key: Pem


class SadPolicy(BaseModel):
    """How strict SAD checks are: lifetime and clock skew (``sad_expired``), distinct factors
    (``sad_authentication_insufficient``), and whether an assignment needs a SKAD."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # at most 50 minutes: sam.sad-use and sam.results keep an hour, and a spent jti or a
    # claimed request must outlive every SAD that could still be presented (plus the skew)
    max_lifetime_seconds: int = Field(default=300, ge=1, le=3000)
    clock_skew_seconds: int = Field(default=30, ge=0, le=600)
    min_authentication_factors: int = Field(
        default=2, ge=1, le=5, description="distinct `amr` values the SAD must carry (SCAL2: 2)"
    )
    assignment_skad: Literal["required", "optional"] = Field(
        default="optional", description="whether signers.key_pairs.assign needs the signer's SKAD"
    )


class Limits(BaseModel):
    """Per-request bounds: body size (``message_too_large``), DTBS/R per request
    (``too_many_digests``) and request JWS age (``request_signature_invalid``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_body_bytes: int = Field(default=262_144, ge=1024)
    max_digests_per_request: int = Field(default=100, ge=1, le=10_000)
    # bounded as SAD lifetimes are: a repeat of a request is recognised while its JWS is fresh
    request_max_age_seconds: int = Field(default=300, ge=1, le=3000)


class StaticConfiguration(BaseModel):
    """The operator's file: who administers this SAM and how strict it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sam_id: Identifier = Field(description="The audience every SAD must name")
    administrators: list[Administrator] = Field(min_length=1)
    sad_policy: SadPolicy = SadPolicy()
    limits: Limits = Limits()


@dataclass(frozen=True)
class _Ssa:
    key: RegisteredKey
    allowed_authorization_servers: frozenset[str]
    trust_anchors: tuple[x509.Certificate, ...] = ()  # the global ones and its own


@dataclass(frozen=True)
class DynamicState:
    """The current dynamic configuration with every key parsed."""

    config: DynamicConfiguration | None = None
    authorization_servers: dict[str, RegisteredKey] = field(default_factory=dict)
    ssas: dict[str, _Ssa] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.config.version if self.config else 0

    def ssa(self, user_id: str) -> _Ssa | None:
        return self.ssas.get(user_id)

    def allowed_authorization_servers(self) -> dict[str, frozenset[str]]:
        """Each registered SSA and the authorization servers it may use."""
        return {user: ssa.allowed_authorization_servers for user, ssa in self.ssas.items()}


def parse_dynamic(config: DynamicConfiguration) -> DynamicState:
    """Check a dynamic configuration for consistency and parse its keys."""
    servers: dict[str, RegisteredKey] = {}
    for server in config.authorization_servers:
        if server.id in servers:
            raise SamError(ErrorCode.configuration_invalid, f"authorization server {server.id!r} twice")
        servers[server.id] = _key(server.public_key, f"authorization server {server.id!r}")
    shared_anchors = load_trust_anchors(config.trust_anchors)
    ssas: dict[str, _Ssa] = {}
    for user in config.signing_service_privileged_users:
        if user.id in ssas:
            raise SamError(ErrorCode.configuration_invalid, f"SSA {user.id!r} twice")
        unknown = set(user.allowed_authorization_servers) - servers.keys()
        if unknown:
            raise SamError(
                ErrorCode.configuration_invalid,
                f"SSA {user.id!r} allows unknown authorization servers {sorted(unknown)}",
            )
        ssas[user.id] = _Ssa(
            _key(user.public_key, f"SSA {user.id!r}"),
            frozenset(user.allowed_authorization_servers),
            shared_anchors + load_trust_anchors(user.trust_anchors),
        )
    return DynamicState(config, servers, ssas)


def _key(pem: str, what: str) -> RegisteredKey:
    try:
        return load_public_key(pem)
    except ValueError as exc:
        raise SamError(ErrorCode.configuration_invalid, f"{what}: {exc}") from exc
