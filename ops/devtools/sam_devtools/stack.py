"""TEST TOOLING: the local stack — dev PKI, an isolated RabbitMQ node on loopback,
a SoftHSM2 token with the SAM's keys, and worker processes — all under one folder.

``ops/stack up|down|status`` drives it; the test session uses the same class with its
own folder and ports, so the demo stack and a test run never collide. ``down`` stops
exactly what ``up`` started (by the pids it recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam_devtools.pki import DevPki
from worker.hsm.lane import HsmLane, open_lane
from worker.settings import load_infrastructure, read_secret
from worker.transport.topology import AUDIT_ARCHIVE_STREAM, VHOST, definitions

__all__ = [
    "Stack",
    "create_sam_keys",
    "fill_filesystem",
    "init_token",
    "main",
    "rabbitmq_config",
    "softhsm_config",
    "verify_audit",
]

WORKER_USER = "sam-worker"
ADMINS = ["admin-1"]
SSAS = ["ssa-1", "ssa-2"]
SIEMS = ["siem-1"]
BENCHMARKS = ["bench"]
AUTHORIZATION_SERVERS = ["dev-as", "other-as"]
SAM_ID = "sam-dev"
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); reap it if it is ours
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _stop_pid(pid: int, timeout: float, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop_pid_file(pid_file: Path, timeout: float) -> None:
    """Stop the process a pid file names (if any) and remove the file."""
    if pid_file.exists():
        _stop_pid(int(pid_file.read_text()), timeout=timeout)
        pid_file.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_stack(prefix: str, port_base: int, cluster: int = 1) -> Iterator[tuple[Stack, bool]]:
    """A stack in a folder of its own, with its audit directory on a 16 MiB tmpfs where one
    can be mounted (the second value), so that a full disk can be played; stopped,
    unmounted and removed whatever happens."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    stack = Stack(root, port_base, cluster)
    audit = stack.path("audit")
    audit.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(audit)]
    mounted = subprocess.run(mount, capture_output=True, check=False).returncode == 0
    try:
        yield stack, mounted
    finally:
        stack.down()
        if mounted:
            subprocess.run(["umount", "-l", str(audit)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def fill_filesystem(filler: Path) -> None:
    """Write ``filler`` until its filesystem is full (a small tmpfs under test)."""
    # unbuffered: closing a full file must not flush (and fail on) a buffered rest
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)


LOOPBACK_DISTRIBUTION = "-kernel inet_dist_use_interface {127,0,0,1}"


def rabbitmq_config(listener: str, ca_file: Path, server: Path, definitions_file: Path | None) -> str:
    """The security core of every node's rabbitmq.conf: TLS only (1.2+), peer certificates
    required, EXTERNAL authentication by certificate CN, a bounded message size, topology
    and users from definitions."""
    return "\n".join(
        [
            "listeners.tcp = none",
            f"listeners.ssl.1 = {listener}",
            f"ssl_options.cacertfile = {ca_file}",
            f"ssl_options.certfile = {server / 'cert.pem'}",
            f"ssl_options.keyfile = {server / 'key.pem'}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "ssl_options.versions.1 = tlsv1.3",
            "ssl_options.versions.2 = tlsv1.2",
            "auth_mechanisms.1 = EXTERNAL",
            "ssl_cert_login_from = common_name",
            # RabbitMQ accepts 128 MiB by default: a worker holding its prefetch of such
            # messages (refused unread as message_too_large) would need gigabytes. A request
            # is at most 256 KiB of body; audit and ledger batches stay far below 16 MiB.
            "max_message_size = 16777216",
            # A client can make RabbitMQ 3.10 log a crash report of hundreds of KB per
            # connection (a stream consumer whose x-stream-offset has a type it does not
            # expect): the log must not be able to fill the disk, whose alarm would block
            # every publisher.
            "log.file.rotation.size = 10485760",
            "log.file.rotation.count = 5",
            *([f"load_definitions = {definitions_file}"] if definitions_file else []),
            "",
        ]
    )


def softhsm_config(folder: Path) -> Path:
    """A SoftHSM2 configuration with its token store in ``folder/tokens``."""
    (folder / "tokens").mkdir(parents=True, exist_ok=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    return conf


def init_token(conf: Path, pin: str, so_pin: str, label: str = "sam") -> None:
    """Initialise a SoftHSM2 token (the `sam` label by default) in ``conf``'s store."""
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=True,
        capture_output=True,
    )


def create_sam_keys(conf: Path, pin_file: Path, node: str, out: Path) -> None:
    """``sam-admin create`` against ``conf``'s token."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli.admin",
            "create",
            "--pin-file",
            str(pin_file),
            "--node",
            node,
            "--out",
            str(out),
        ],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=True,
        capture_output=True,
    )


def verify_audit(
    infrastructure: Path, files: list[Path], *, transport_copies: bool = False
) -> subprocess.CompletedProcess[str]:
    """``sam-admin audit verify`` over ``files`` (``--transport-copies``: copies received
    over an at-least-once transport, whose byte-identical second deliveries are counted)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli.admin",
            "audit",
            "verify",
            "--infrastructure",
            str(infrastructure),
            *(["--transport-copies"] if transport_copies else []),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@dataclass
class Stack:
    """``cluster`` RabbitMQ nodes (1 or 3): node 1 listens on ``port_base``; every node has
    its own AMQPS and distribution port, and all share one epmd port and Erlang cookie."""

    root: Path
    port_base: int = 25671
    cluster: int = 1

    # --- layout -----------------------------------------------------------------------
    # node 1: AMQPS base, dist base+1; epmd base+2; node n>1: AMQPS base+2n-1, dist base+2n
    # (workers' metrics ports start at base+11, so up to five nodes fit)

    def node_amqps_port(self, node: int) -> int:
        return self.port_base if node == 1 else self.port_base + 2 * node - 1

    def node_dist_port(self, node: int) -> int:
        return self.port_base + 1 if node == 1 else self.port_base + 2 * node

    def node_name_of(self, node: int) -> str:
        return f"sam{self.port_base}@localhost" if node == 1 else f"sam{self.port_base}-{node}@localhost"

    def node_folder(self, node: int) -> Path:
        return self.path("rabbitmq") if node == 1 else self.path(f"rabbitmq-{node}")

    def node_pid_file(self, node: int) -> Path:
        return self.path("run", "rabbitmq.pid" if node == 1 else f"rabbitmq-{node}.pid")

    def node_url(self, node: int) -> str:
        return f"amqps://127.0.0.1:{self.node_amqps_port(node)}/{VHOST}?auth=external&name=sam"

    @property
    def nodes(self) -> range:
        return range(1, self.cluster + 1)

    @property
    def epmd_port(self) -> int:
        return self.port_base + 2

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: workers and the SDK move on along it."""
        return ",".join(self.node_url(node) for node in self.nodes)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def pki(self) -> DevPki:
        return DevPki(self.path("pki"))

    @property
    def infrastructure_file(self) -> Path:
        return self.path("config", "sam_infrastructure.json")

    @property
    def worker_config(self) -> Path:
        return self.path("config", "worker.toml")

    def profile(self, user: str) -> Path:
        return self.path("clients", f"{user}.json")

    # --- up ---------------------------------------------------------------------------

    def up(self, workers: int = 2) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in ("run", "logs", "audit", "config", "clients", "secrets"):
            self.path(folder).mkdir(exist_ok=True)
        self.path("secrets").chmod(0o700)
        self._pki()
        self._rabbitmq()
        self._token()
        self._configuration()
        self.start_workers(workers)

    def _pki(self) -> None:
        pki = self.pki
        pki.ensure_ca()
        pki.issue("rabbitmq", server=True)
        for user in [WORKER_USER, *ADMINS, *SSAS, *SIEMS, *BENCHMARKS]:
            pki.issue(user)
        for user in [*ADMINS, *SSAS, *AUTHORIZATION_SERVERS]:
            pki.jws_key(user)

    def _rabbitmq_env(self, node: int = 1) -> dict[str, str]:
        folder = self.node_folder(node)
        env = dict(os.environ)
        env.update(
            # one HOME for every node: they must share the Erlang cookie kept there
            HOME=str(self.path("rabbitmq", "home")),
            RABBITMQ_NODENAME=self.node_name_of(node),
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_DIST_PORT=str(self.node_dist_port(node)),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            # the distribution port (any peer with the cookie may run code on the node)
            # binds to every address unless told: loopback, for the node and for the CLI
            # tools' own short-lived nodes
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=LOOPBACK_DISTRIBUTION,
            RABBITMQ_CTL_ERL_ARGS=LOOPBACK_DISTRIBUTION,
            RABBITMQ_MNESIA_BASE=str(folder / "mnesia"),
            RABBITMQ_LOG_BASE=str(folder / "log"),
            RABBITMQ_CONFIG_FILE=str(folder / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(folder / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(folder / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(folder / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(folder / "rabbitmq.pid"),
        )
        return env

    def rabbitmqctl(self, *args: str, check: bool = True, node: int = 1) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RABBITMQCTL, "-n", self.node_name_of(node), *args],
            env=self._rabbitmq_env(node),
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def _rabbitmq(self) -> None:
        """Start every node that is not running; with a cluster, join nodes 2.. to node 1
        so that every quorum queue and stream has a member on each node."""
        definitions_file = self.path("rabbitmq", "definitions.json")
        self.path("rabbitmq").mkdir(parents=True, exist_ok=True)
        definitions_file.write_text(
            json.dumps(definitions([WORKER_USER], ADMINS, SSAS, SIEMS, BENCHMARKS), indent=2)
        )
        if self.cluster > 1 and self.node_running(1) and not self.node_folder(2).exists():
            raise RuntimeError("this stack runs a single broker node: `ops/stack down` before --cluster 3")
        # a node that holds data already (running, or restarted) gets its users,
        # permissions and topology brought up to date once it runs
        upgrade = self.cluster == 1 and self._has_data(1)
        # launched together, awaited after: restarted cluster members wait for each other
        started = {node: self._launch_node(node) for node in self.nodes if not self.node_running(node)}
        for node, process in started.items():
            self._await_node(node, process)
        if upgrade:
            self._drop_superseded_queues()
            self.rabbitmqctl("import_definitions", str(definitions_file))
        if self.cluster > 1:
            self._form_cluster()

    def _has_data(self, node: int) -> bool:
        mnesia = self.node_folder(node) / "mnesia"
        return mnesia.is_dir() and any(mnesia.iterdir())

    def _drop_superseded_queues(self) -> None:
        """Queues of an earlier version whose type changed since (RabbitMQ cannot change
        a queue's type): ``sam.audit.archive`` was a quorum queue bound to ``sam.audit``
        and is a stream now. The dev stack deletes the old one; an operator drains it
        first (CHANGELOG)."""
        listed = self.rabbitmqctl("list_queues", "-p", VHOST, "name", "type", "--no-table-headers", "-q")
        for line in listed.stdout.splitlines():
            name, _, kind = line.partition("\t")
            if name == AUDIT_ARCHIVE_STREAM and kind.strip() != "stream":
                self.rabbitmqctl("delete_queue", "-p", VHOST, name)

    def node_running(self, node: int) -> bool:
        pid_file = self.node_pid_file(node)
        return pid_file.exists() and _pid_alive(int(pid_file.read_text()))

    def start_node(self, node: int) -> None:
        """Start one node (its files written anew) and wait until it has booted."""
        self._await_node(node, self._launch_node(node))

    def _launch_node(self, node: int) -> subprocess.Popen[bytes]:
        folder = self.node_folder(node)
        for sub in ("mnesia", "log"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        home = self.path("rabbitmq", "home")
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():  # written here, not by whichever node boots first
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)
        pki = self.pki
        (folder / "rabbitmq.conf").write_text(
            rabbitmq_config(
                f"127.0.0.1:{self.node_amqps_port(node)}",
                pki.ca_file,
                pki.root / "rabbitmq",
                # a cluster imports them once it is formed (see _form_cluster), a node
                # with data once it runs (see _rabbitmq)
                self.path("rabbitmq", "definitions.json")
                if self.cluster == 1 and not self._has_data(node)
                else None,
            )
            + "loopback_users = none\nlog.console = false\nlog.file.level = warning\n"
        )
        (folder / "enabled_plugins").write_text("[rabbitmq_auth_mechanism_ssl].\n")
        (folder / "rabbitmq-env.conf").write_text("")
        (folder / "advanced.config").write_text("[].\n")
        log_name = "rabbitmq.out" if node == 1 else f"rabbitmq-{node}.out"
        log = self.path("logs", log_name).open("ab")
        process = subprocess.Popen(
            [RABBITMQ_SERVER],
            env=self._rabbitmq_env(node),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.node_pid_file(node).write_text(str(process.pid))
        return process

    def _await_node(self, node: int, process: subprocess.Popen[bytes]) -> None:
        # await_startup fails at once while the node is not yet registered with epmd
        deadline = time.monotonic() + 120
        while True:
            result = self.rabbitmqctl("await_startup", "--timeout", "30", check=False, node=node)
            if result.returncode == 0:
                return
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"RabbitMQ node {node} did not start: {result.stderr.strip()[-500:]} "
                    f"(see {self.node_folder(node) / 'log'})"
                )
            time.sleep(0.5)

    def stop_node(self, node: int) -> None:
        """Stop one node as an operator would (SIGTERM: a clean shutdown)."""
        _stop_pid_file(self.node_pid_file(node), timeout=60)

    def cluster_nodes(self) -> set[str]:
        """The nodes of the cluster, as a running node sees it."""
        result = self.rabbitmqctl("cluster_status", "--formatter", "json", node=self._any_running_node())
        return set(json.loads(result.stdout).get("disk_nodes", []))

    def _any_running_node(self) -> int:
        return next((node for node in self.nodes if self.node_running(node)), 1)

    def _form_cluster(self) -> None:
        """Join nodes 2.. to node 1, then declare the topology: queues and streams declared
        on a formed cluster get a member on every node. (Streams declared while node 1
        stood alone and given replicas afterwards left the stream coordinator of
        RabbitMQ 3.10 unable to start those replicas.)"""
        members = self.cluster_nodes()
        seed = self.node_name_of(1)
        for node in self.nodes:
            name = self.node_name_of(node)
            if node == 1 or name in members:
                continue
            self.rabbitmqctl("stop_app", node=node)
            self.rabbitmqctl("reset", node=node)
            self.rabbitmqctl("join_cluster", seed, node=node)
            self.rabbitmqctl("start_app", node=node)
            self.rabbitmqctl("await_startup", "--timeout", "60", node=node)
        self.rabbitmqctl("import_definitions", str(self.path("rabbitmq", "definitions.json")))
        short = {name: count for name, count in self.queue_members().items() if count < self.cluster}
        if short:
            raise RuntimeError(f"queues without a member on every node: {short}")

    def queue_members(self) -> dict[str, int]:
        """Each quorum queue and stream of vhost sam with its number of members."""
        result = self.rabbitmqctl(
            "list_queues",
            "-p",
            VHOST,
            "name",
            "type",
            "members",
            "--formatter",
            "json",
            node=self._any_running_node(),
        )
        return {
            row["name"]: len(row.get("members") or [])
            for row in json.loads(result.stdout)
            if row.get("type") in ("quorum", "stream")
        }

    def _token(self) -> None:
        conf = softhsm_config(self.path("softhsm"))
        os.environ["SOFTHSM2_CONF"] = str(conf)
        pin_file, so_pin_file = self.path("secrets", "token-pin"), self.path("secrets", "token-so-pin")
        for path in (pin_file, so_pin_file):
            if not path.exists():
                path.write_text(secrets.token_hex(8))
                path.chmod(0o600)
        if not any(self.path("softhsm", "tokens").iterdir()):
            init_token(conf, pin_file.read_text(), so_pin_file.read_text())
        if not self.infrastructure_file.exists():
            create_sam_keys(conf, pin_file, "node-1", self.infrastructure_file)

    def _configuration(self) -> None:
        pki = self.pki

        def pub(user: str) -> str:
            return (pki.root / user / "jws-pub.pem").read_text()

        static = {
            "sam_id": SAM_ID,
            "administrators": [{"id": a, "public_key": pub(a)} for a in ADMINS],
        }
        self.path("config", "static_config.json").write_text(json.dumps(static, indent=2))
        dynamic = {
            "version": 1,
            "authorization_servers": [{"id": a, "public_key": pub(a)} for a in AUTHORIZATION_SERVERS],
            "signing_service_privileged_users": [
                {"id": "ssa-1", "public_key": pub("ssa-1"), "allowed_authorization_servers": ["dev-as"]},
                {"id": "ssa-2", "public_key": pub("ssa-2"), "allowed_authorization_servers": ["other-as"]},
            ],
            # the dev CA certifies key pairs here; a TSP names its qualified CAs
            "trust_anchors": [pki.ca_file.read_text()],
        }
        self.path("config", "dynamic_config.json").write_text(json.dumps(dynamic, indent=2))
        worker = pki.root / WORKER_USER
        self.worker_config.write_text(
            "\n".join(
                [
                    f'broker_url = "{self.url}"',
                    f'tls_ca_file = "{pki.ca_file}"',
                    f'tls_cert_file = "{worker / "cert.pem"}"',
                    f'tls_key_file = "{worker / "key.pem"}"',
                    f'pkcs11_module = "{SOFTHSM_MODULE}"',
                    'token_label = "sam"',
                    f'token_pin_file = "{self.path("secrets", "token-pin")}"',
                    f'infrastructure_file = "{self.infrastructure_file}"',
                    f'static_config_file = "{self.path("config", "static_config.json")}"',
                    f'audit_dir = "{self.path("audit")}"',
                    "",
                ]
            )
        )
        for user in [*ADMINS, *SSAS, *SIEMS, *BENCHMARKS]:
            self.profile(user).write_text(
                json.dumps(
                    {
                        "url": self.url,
                        "user_id": user,
                        "ca_file": str(pki.ca_file),
                        "cert_file": str(pki.root / user / "cert.pem"),
                        "key_file": str(pki.root / user / "key.pem"),
                        "jws_key_file": str(pki.root / user / "jws-key.pem")
                        if user in ADMINS + SSAS
                        else None,
                    },
                    indent=2,
                )
            )

    def register_configuration(self) -> str:
        """Register the stack's dynamic configuration (``config/dynamic_config.json``) as
        ``admin-1`` if the SAM has none yet, so an SSA can use the stack at once; one the
        SAM already has is left as it is (an operator may have changed it). Needs a
        running worker. Returns what it did, in a line."""
        return asyncio.run(self._register_configuration())

    async def _register_configuration(self) -> str:
        from worker.cli.sam import ClientProfile
        from worker.client import SamRequestError
        from worker.domain.contract import DynamicConfiguration, Operation

        def content(document: Any) -> dict[str, Any]:  # defaults filled in, version aside
            return DynamicConfiguration.model_validate(document).model_dump(exclude={"version"})

        file = self.path("config", "dynamic_config.json")
        wanted = json.loads(file.read_text())
        profile = ClientProfile.model_validate_json(self.profile(ADMINS[0]).read_text())
        async with profile.client() as admin:
            try:
                current = await admin.call(Operation.configurations_dynamic_get)
            except SamRequestError as exc:
                if exc.code != "configuration_missing":
                    raise
                await admin.call(Operation.configurations_dynamic_put, wanted)
                return f"dynamic configuration version {wanted['version']} registered ({file})"
        if content(current) == content(wanted):
            return f"dynamic configuration version {current['version']} already registered"
        return (
            f"the SAM holds dynamic configuration version {current['version']}, not {file}; left as it is "
            f"(to register the file: sam --profile {self.profile(ADMINS[0])} config-put {file} --bump)"
        )

    def next_steps(self) -> list[str]:
        """The three commands to run after ``ops/stack up``, with this stack's paths."""
        clients = _shown(self.path("clients"))
        return [
            f". {_shown(self.root / 'venv' / 'bin' / 'activate')}"
            if (self.root / "venv").exists()
            else f". {_shown(Path(sys.prefix) / 'bin' / 'activate')}",
            f"sam --profile {clients}/ssa-1.json key-create --algorithm ECDSA > key-pair.json",
            "sam-dev-as --help   # SADs for your signers; then docs/INTEGRATION.md, Quickstart",
        ]

    # --- workers ----------------------------------------------------------------------

    async def hsm(self, **options: Any) -> HsmLane:
        """The SAM's HSM lane on this stack's token, in this process, started (tests; close
        it). ``options``: those of ``open_lane``."""
        infrastructure = load_infrastructure(self.infrastructure_file)
        pin = read_secret(self.path("secrets", "token-pin"))
        return await open_lane(
            SOFTHSM_MODULE, infrastructure.token_label, pin, infrastructure, lambda: None, **options
        )

    def worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SOFTHSM2_CONF"] = str(self.path("softhsm", "softhsm2.conf"))
        env["SAM_CONFIG_FILE"] = str(self.worker_config)
        return env

    def start_worker(
        self,
        instance: str,
        *,
        queues: str | None = None,
        wait: bool = True,
        env: dict[str, str] | None = None,
        metrics_port: int | None = None,
        supervised: bool = False,
        user: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start one worker; ``env`` adds variables (``SAM_*`` overrides, ``SOFTHSM2_CONF``).

        ``user``: run it as that account (needs root), as a deployment does. It may read
        anything (CAP_DAC_READ_SEARCH, so the stack's private folders and this checkout
        need not be opened up) but write only what the account owns: the audit folder
        and token store passed in ``env`` must be its own."""
        ready = self.path("run", f"{instance}.ready")
        ready.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "worker.cli.worker_main",
            "--instance",
            instance,
            "--ready-file",
            str(ready),
        ]
        if queues:
            command += ["--queues", queues]
        if metrics_port is not None:
            env = {**(env or {}), "SAM_METRICS_PORT": str(metrics_port)}
        if supervised:  # started again after a non-zero exit, like systemd Restart=on-failure
            command = [sys.executable, "-m", "sam_devtools.supervise", "--", *command]
        if user is not None:
            ready = self.path("run", user, f"{instance}.ready")
            ready.parent.mkdir(exist_ok=True)
            shutil.chown(ready.parent, user, user)
            command[command.index("--ready-file") + 1] = str(ready)
            command = [
                "setpriv",
                f"--reuid={user}",
                f"--regid={user}",
                "--clear-groups",
                "--inh-caps=+dac_read_search",
                "--ambient-caps=+dac_read_search",
                *command,
            ]
        log = self.path("logs", f"{instance}.log").open("ab")
        process = subprocess.Popen(
            command,
            env={**self.worker_env(), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.path("run", f"{instance}.pid").write_text(str(process.pid))
        if wait:
            self.wait_ready(instance, process, ready=ready)
        return process

    def wait_ready(
        self, instance: str, process: subprocess.Popen[bytes], timeout: float = 300, ready: Path | None = None
    ) -> None:
        # a long-lived stack replays a long sam.key-events stream at start (README: limits)
        ready = ready or self.path("run", f"{instance}.ready")
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if process.poll() is not None:
                tail = self.path("logs", f"{instance}.log").read_text()[-3000:]
                raise RuntimeError(f"worker {instance} exited with {process.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {instance} not ready after {timeout} s")
            time.sleep(0.05)

    def start_workers(self, count: int) -> None:
        for index in range(1, count + 1):
            instance = f"worker-{index}"
            pid_file = self.path("run", f"{instance}.pid")
            if pid_file.exists() and _pid_alive(int(pid_file.read_text())):
                continue
            self.start_worker(instance, metrics_port=self.metrics_port(index), supervised=True)

    def metrics_port(self, index: int) -> int:
        """/metrics, /live and /ready of stack worker ``index`` (1-based)."""
        return self.port_base + 10 + index

    def _pids(self) -> dict[str, int]:
        pids = {}
        for pid_file in sorted(self.path("run").glob("*.pid")) if self.path("run").exists() else []:
            with contextlib.suppress(ValueError):
                pids[pid_file.stem] = int(pid_file.read_text())
        return pids

    def stop_instance(self, instance: str) -> None:
        _stop_pid_file(self.path("run", f"{instance}.pid"), timeout=20)

    def down_workers(self) -> None:
        for name in self._pids():
            if not name.startswith("rabbitmq"):
                self.stop_instance(name)

    # --- down / status ----------------------------------------------------------------

    def down(self) -> None:
        pids = self._pids()
        for name, pid in pids.items():
            if not name.startswith("rabbitmq"):
                _stop_pid(pid, timeout=15)
                self.path("run", f"{name}.pid").unlink(missing_ok=True)
        nodes = [name for name in pids if name.startswith("rabbitmq")]
        for name in nodes:
            _stop_pid(pids[name], timeout=60)
            self.path("run", f"{name}.pid").unlink(missing_ok=True)
        if nodes:
            # epmd was started by these nodes on their own port; stop that one only
            epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"],
                capture_output=True,
                check=False,
                timeout=30,
                env=self._rabbitmq_env(),
            )

    def status(self) -> dict[str, Any]:
        return {name: ("running" if _pid_alive(pid) else "stopped") for name, pid in self._pids().items()}


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (as the user typed it)."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def main(argv: list[str] | None = None) -> None:
    """``ops/stack up|down|status`` for the stack under ``--root``."""
    parser = argparse.ArgumentParser(
        prog="ops/stack", description="the local sam-worker stack (test tooling)"
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("SAM_STACK_DIR", ".stack")))
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("SAM_STACK_PORT_BASE", "25671")))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--cluster", type=int, choices=[1, 3], default=1, help="RabbitMQ nodes (3: a cluster on loopback)"
    )
    args = parser.parse_args(argv)
    stack = Stack(args.root.resolve(), args.port_base, args.cluster)
    if args.command == "up":
        stack.up(args.workers)
        print(f"stack up in {stack.root}: RabbitMQ {stack.url}, {args.workers} worker(s)")
        for name, state in stack.status().items():
            print(f"  {name}: {state}")
        if args.workers:
            print(stack.register_configuration())
        else:
            print("no worker started: the dynamic configuration is registered with the first (ops/stack up)")
        print(f"client profiles (broker URL, TLS files, user id, JWS key): {_shown(stack.path('clients'))}/")
        print("  admin-1.json (administrator), ssa-1.json (an SSA; its signers' AS is dev-as), ssa-2.json")
        print("next:")
        for command in stack.next_steps():
            print(f"  {command}")
    elif args.command == "down":
        stack.down()
        print("stack down")
    else:
        status = stack.status()
        for name, state in status.items():
            print(f"{name}: {state}")
        if not status:
            print("nothing running")


if __name__ == "__main__":
    main()
