"""Settings of one ``sam-csc`` process: a TOML file (``SAM_CSC_CONFIG_FILE`` or
``--config``), then ``SAM_CSC_<NAME>`` variables. Safe defaults: loopback only, TLS
required unless ``plain_http`` is set, and ``plain_http`` refused off loopback (a TLS
terminating proxy in front is the operator's choice, on the same host)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from worker.settings import TomlFileSettings

__all__ = ["CscSettings", "load_csc_settings"]


class CscSettings(TomlFileSettings):
    """``SAM_CSC_<NAME>`` overrides the file."""

    model_config = SettingsConfigDict(env_prefix="SAM_CSC_", extra="forbid", frozen=True)
    CONFIG_VARIABLE: ClassVar[str] = "SAM_CSC_CONFIG_FILE"

    gateway_id: str = Field(default="sam-csc", description="the audience service tokens must name")
    name: str = Field(default="sam-csc", description="the service name info reports")
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8443, ge=1, le=65535)
    tls_cert_file: Path | None = Field(default=None, description="PEM server certificate (chain)")
    tls_key_file: Path | None = None
    plain_http: bool = Field(default=False, description="serve HTTP without TLS (loopback only)")
    sam_profile: Path = Field(description="the gateway's SSA profile (JSON, as `sam` uses)")
    store_file: Path = Field(default=Path("csc-credentials.sqlite3"), description="SQLite credential store")
    authorization_servers: dict[str, Path] = Field(
        default_factory=dict, description="issuer id -> PEM public key file of its service tokens"
    )
    multisign: int = Field(default=100, ge=1, le=10_000, description="= the SAM's max_digests_per_request")
    max_body_bytes: int = Field(default=1_048_576, ge=4096, le=64 * 1_048_576)
    token_max_lifetime_seconds: int = Field(default=3600, ge=60, le=86_400)
    clock_skew_seconds: int = Field(default=60, ge=0, le=600)
    sam_timeout_seconds: float = Field(
        default=15.0, gt=0, le=300, description="per SAM call (the SDK retries twice)"
    )
    idle_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        le=600,
        description="an idle connection (or one that sends no whole request) is closed",
    )
    body_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, description="for a request body to arrive"
    )

    @model_validator(mode="after")
    def _tls(self) -> CscSettings:
        if self.plain_http:
            try:
                loopback = ipaddress.ip_address(self.listen_host).is_loopback
            except ValueError:
                loopback = self.listen_host == "localhost"
            if not loopback:
                raise ValueError("plain_http is allowed on a loopback address only")
        elif self.tls_cert_file is None or self.tls_key_file is None:
            raise ValueError("tls_cert_file and tls_key_file are required (or plain_http on loopback)")
        return self


def load_csc_settings(config_file: Path | None = None, **overrides: object) -> CscSettings:
    """Settings from ``config_file`` (TOML), then ``SAM_CSC_*`` variables, then
    ``overrides``; a named file must exist."""
    return CscSettings.load(config_file, overrides)
