"""TEST TOOLING: the init job of ``compose.yaml`` — writes into /config (a shared volume)
a dev PKI, the RabbitMQ configuration and definitions, a SoftHSM token with the SAM's
keys, the static configuration and the worker settings. Idempotent: a second run keeps
what exists."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
from pathlib import Path

from sam_devtools.pki import DevPki
from sam_devtools.stack import (
    ADMINS,
    AUTHORIZATION_SERVERS,
    SAM_ID,
    SIEMS,
    SSAS,
    WORKER_USER,
    create_sam_keys,
    init_token,
    rabbitmq_config,
    softhsm_config,
)
from worker.transport.topology import definitions

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """The compose init job: dev PKI, broker files, token, SAM keys and worker settings into
    ``--config``; what exists is kept."""
    parser = argparse.ArgumentParser(prog="compose-init")
    parser.add_argument("--config", type=Path, default=Path("/config"))
    parser.add_argument("--broker-host", default="rabbitmq")
    args = parser.parse_args(argv)
    root: Path = args.config
    pki = DevPki(root / "pki")
    pki.ensure_ca()
    server = pki.issue("rabbitmq", server=True)
    for user in [WORKER_USER, *ADMINS, *SSAS, *SIEMS]:
        pki.issue(user)
    for user in [*ADMINS, *SSAS, *AUTHORIZATION_SERVERS]:
        pki.jws_key(user)
    rabbit = root / "rabbitmq"
    rabbit.mkdir(parents=True, exist_ok=True)
    (rabbit / "definitions.json").write_text(
        json.dumps(definitions([WORKER_USER], ADMINS, SSAS, SIEMS), indent=2)
    )
    (rabbit / "enabled_plugins").write_text("[rabbitmq_auth_mechanism_ssl,rabbitmq_prometheus].\n")
    (rabbit / "rabbitmq.conf").write_text(
        rabbitmq_config(
            "5671",
            Path("/config/pki/ca.pem"),
            Path("/config/pki") / server.name,
            Path("/config/rabbitmq/definitions.json"),
        )
    )
    # RabbitMQ runs as its own user in its container and must read its key
    for path in (pki.root / "rabbitmq").iterdir():
        path.chmod(0o644)
    conf = softhsm_config(root)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    pin = root / "secrets" / "token-pin"
    pin.parent.mkdir(exist_ok=True)
    if not pin.exists():
        pin.write_text(secrets.token_hex(8))
        pin.chmod(0o600)
    tokens = root / "tokens"
    if not any(tokens.iterdir()):
        init_token(conf, pin.read_text(), secrets.token_hex(8))
    infrastructure = root / "sam_infrastructure.json"
    if not infrastructure.exists():
        create_sam_keys(conf, pin, "node-1", infrastructure)
    static = {
        "sam_id": SAM_ID,
        "administrators": [
            {"id": a, "public_key": (pki.root / a / "jws-pub.pem").read_text()} for a in ADMINS
        ],
    }
    (root / "static_config.json").write_text(json.dumps(static, indent=2))
    worker = pki.root / WORKER_USER
    (root / "worker.toml").write_text(
        "\n".join(
            [
                f'broker_url = "amqps://{args.broker_host}:5671/sam?auth=external"',
                'tls_ca_file = "/config/pki/ca.pem"',
                f'tls_cert_file = "{worker / "cert.pem"}"',
                f'tls_key_file = "{worker / "key.pem"}"',
                f'token_pin_file = "{pin}"',
                f'infrastructure_file = "{infrastructure}"',
                'static_config_file = "/config/static_config.json"',
                'audit_dir = "/audit"',
                "metrics_port = 9464",
                'metrics_address = "0.0.0.0"',
                "",
            ]
        )
    )
    # the workers run as the unprivileged `sam` user of the image
    subprocess.run(
        ["chown", "-R", "sam:sam", str(tokens), str(pin.parent), str(pki.root / WORKER_USER)], check=False
    )
    print(f"compose configuration ready in {root}")


if __name__ == "__main__":
    main()
