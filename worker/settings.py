"""The one place that reads configuration: the worker's settings file and ``SAM_``
environment overrides, the private infrastructure file, the static configuration
and secrets. Everything else receives typed objects.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.domain.configuration import StaticConfiguration
from worker.domain.contract import QueueClass

__all__ = [
    "Infrastructure",
    "TlsFiles",
    "TomlFileSettings",
    "WorkerSettings",
    "load_infrastructure",
    "load_settings",
    "load_static_configuration",
    "read_secret",
    "split_urls",
]


def split_urls(urls: str) -> tuple[str, ...]:
    """``"amqps://a,amqps://b"`` → one URL per broker node."""
    parts = tuple(part.strip() for part in urls.split(",") if part.strip())
    if not parts:
        raise ValueError("no broker URL given")
    return parts


class TlsFiles(BaseModel):
    """The CA, client certificate and key of a mutual-TLS broker connection; with EXTERNAL
    authentication the certificate's CN is the AMQP user."""

    model_config = ConfigDict(frozen=True)
    ca_file: Path
    cert_file: Path
    key_file: Path


class TomlFileSettings(BaseSettings):
    """Settings from arguments, then variables, then the TOML file that the variable
    ``CONFIG_VARIABLE`` names, if any."""

    CONFIG_VARIABLE: ClassVar[str] = "SAM_CONFIG_FILE"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = os.environ.get(cls.CONFIG_VARIABLE)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml)))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None, overrides: dict[str, object]) -> Self:
        """From ``config_file`` (or the file ``CONFIG_VARIABLE`` names), then variables,
        then ``overrides``. A settings file that is named must exist: silently running on
        defaults and variables alone is not what its operator meant."""
        if config_file is not None:
            os.environ[cls.CONFIG_VARIABLE] = str(config_file)
        named = os.environ.get(cls.CONFIG_VARIABLE)
        if named and not Path(named).is_file():
            raise FileNotFoundError(f"settings file {named} does not exist or is not a file")
        return cls(**overrides)  # type: ignore[arg-type]


class WorkerSettings(TomlFileSettings):
    """Settings of one worker process; ``SAM_<NAME>`` overrides the file."""

    model_config = SettingsConfigDict(env_prefix="SAM_", extra="forbid", frozen=True)

    broker_url: str = Field(
        default="amqps://127.0.0.1:5671/sam?auth=external",
        description=(
            "AMQP URL, or one per cluster node separated by commas (the worker connects to "
            "the first that answers, starting at a place chosen by its instance name); "
            "authentication is EXTERNAL (the TLS client certificate)"
        ),
    )
    tls_ca_file: Path
    tls_cert_file: Path
    tls_key_file: Path
    pkcs11_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = "sam"  # noqa: S105 — a label, not a secret
    token_pin_file: Path = Field(description="file holding the token user PIN (never on the command line)")
    infrastructure_file: Path = Field(description="sam_infrastructure.json written by `sam-admin create`")
    static_config_file: Path
    audit_dir: Path
    instance: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    queues: tuple[QueueClass, ...] = tuple(QueueClass)
    prefetch: int = Field(default=16, ge=1, le=1000)
    audit_timeout_seconds: float = Field(default=5.0, gt=0)
    ledger_timeout_seconds: float = Field(default=5.0, gt=0)
    publish_timeout_seconds: float = Field(default=5.0, gt=0)
    gil_switch_interval_seconds: float = Field(default=0.0005, gt=0, le=0.1)
    hsm_lane: Literal["threads", "inline"] = Field(
        default="threads",
        description=(
            "where signing work runs: on the HSM lane's threads (the default: the event loop "
            "never waits on the HSM), or inline on the event loop (one session; the lowest "
            "overhead with a local software HSM; nothing can bound an inline call, so only for "
            "a local HSM). Key generation always runs on its own thread"
        ),
    )
    hsm_sessions: int = Field(
        default=4, ge=1, le=64, description="signing sessions of the HSM lane (threads mode): calls in flight"
    )
    hsm_generation_sessions: int = Field(
        default=1, ge=1, le=16, description="sessions for key generation and re-wrapping, apart from signing"
    )
    hsm_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "bound of the wait for an HSM session (then hsm_unavailable: the HSM is busy) and, "
            "apart from it, of one operation inside the HSM (a signature request's unwrap, "
            "signatures and destroy; a key generation): one that outlasts it is a hang, "
            "answered hsm_unavailable, and the worker drains and restarts. Keep it well above "
            "the longest operation: 100 digests x 3 calls x the HSM's latency, and an RSA-4096 "
            "generation"
        ),
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="port of /metrics, /live and /ready (off when unset)"
    )
    metrics_address: str = "127.0.0.1"
    broker_connect_patience_seconds: float = Field(
        default=30.0, gt=0, description="how long a starting worker retries the broker before exiting"
    )

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def broker_urls(self) -> tuple[str, ...]:
        return split_urls(self.broker_url)

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(ca_file=self.tls_ca_file, cert_file=self.tls_cert_file, key_file=self.tls_key_file)


def load_settings(config_file: Path | None = None, **overrides: object) -> WorkerSettings:
    """Settings from ``config_file`` (TOML), then ``SAM_*`` variables, then ``overrides``."""
    return WorkerSettings.load(config_file, overrides)


class KeyInfo(BaseModel):
    """An HSM key the infrastructure file names: its token label and PEM public key, so a
    node can check that its token holds the very same key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str
    public_key: str


class Infrastructure(BaseModel):
    """The private configuration (``sam_infrastructure.json``): no secrets, but it
    names the HSM keys every node of this SAM must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = 1
    node: str
    token_label: str
    kek_label: str = Field(description="the current KEK: new key pairs are wrapped under it")
    previous_kek_labels: list[str] = Field(default_factory=list, description="older KEKs, still unwrapping")
    wrap_mechanism: str = "AES_KEY_WRAP_PAD"
    state_key: KeyInfo
    audit_key: KeyInfo
    factor_key_label: str | None = Field(default=None, description="HMAC key for SAM-managed factors")
    created: str


def load_infrastructure(path: Path) -> Infrastructure:
    """The private configuration from ``sam_infrastructure.json``; ``OSError`` if unreadable,
    pydantic ``ValidationError`` if malformed."""
    return Infrastructure.model_validate_json(path.read_bytes())


def load_static_configuration(path: Path) -> StaticConfiguration:
    """The operator's static configuration from its JSON file; ``OSError`` if unreadable,
    ``ValueError`` (bad JSON or a pydantic ``ValidationError``) if malformed."""
    return StaticConfiguration.model_validate(json.loads(path.read_text()))


def read_secret(path: Path) -> str:
    """A secret from a file, trailing newline removed; refuse group/world-readable files."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise PermissionError(f"{path} must not be readable by group or others (chmod 600)")
    return path.read_text().rstrip("\n")
