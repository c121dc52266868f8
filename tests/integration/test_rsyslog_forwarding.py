"""rsyslog forwarding as shipped: a real rsyslogd with ``ops/rsyslog/sam-worker.conf``
reads a worker's audit files and forwards them over RELP with mutual TLS to a real
rsyslogd with ``ops/rsyslog/siem-receiver.conf``, both with only their placeholders
substituted and certificates of the dev PKI. Restarted under load, the sender delivers
every line once, in order, byte for byte; restarted under load, the receiver loses none
(what it had not acknowledged comes again, byte for byte); the longest line arrives
whole; each received copy verifies; the receiver takes nobody else's lines."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sam_devtools.pki import DevPki
from sam_devtools.stack import verify_audit
from tests.conftest import PORT_BASE
from tests.integration.conftest import Harness
from tests.integration.test_audit_trail import Signing, own_worker, signing, verify
from worker.client import RawReply, SamClient

pytestmark = pytest.mark.integration

__all__ = ["signing"]  # the module's signing key pair, as in the audit trail tests

ROOT = Path(__file__).resolve().parents[2]
RECEIVER_PORT = PORT_BASE + 50  # inside this session's port range
PROBE_PORT = PORT_BASE + 51
SENDER, RECEIVER = "rsyslog-sender", "rsyslog-receiver"  # CN of each one's certificate
RECEIVER_NAME = "localhost"  # what DevPki puts in a server certificate's subjectAltName
PLACEHOLDER = re.compile(r"\b[A-Z]+(?:_[A-Z]+)+\b")
LOGS = ("service", "admin")


def shipped(name: str, values: dict[str, str]) -> str:
    """``ops/rsyslog/<name>`` with its placeholders replaced, and none left outside comments."""
    text = PLACEHOLDER.sub(
        lambda m: values.get(m.group(), m.group()), (ROOT / "ops" / "rsyslog" / name).read_text()
    )
    left = {
        p
        for line in text.splitlines()
        if not line.lstrip().startswith("#")
        for p in PLACEHOLDER.findall(line)
    }
    assert not left, f"{name}: placeholders the operator's list (and this test) do not know: {left}"
    return text


class Configs:
    """Both shipped files, substituted for this test's folders and the dev PKI."""

    def __init__(self, pki: DevPki, root: Path, audit_dir: Path, port: int) -> None:
        self.audit_dir, self.work_dir, self.received = audit_dir, root / "sender-work", root / "received"
        for folder in (self.work_dir, self.received, audit_dir):
            folder.mkdir(parents=True, exist_ok=True)
        sender, receiver = pki.issue(SENDER), pki.issue(RECEIVER, server=True)
        self.sender = root / "sender.conf"
        self.sender.write_text(
            shipped(
                "sam-worker.conf",
                {
                    "AUDIT_DIR": str(audit_dir),
                    "WORK_DIR": str(self.work_dir),
                    "CA_FILE": str(pki.ca_file),
                    "CERT_FILE": str(sender / "cert.pem"),
                    "KEY_FILE": str(sender / "key.pem"),
                    "RECEIVER_HOST": "127.0.0.1",
                    "RECEIVER_PORT": str(port),
                    "RECEIVER_NAME": RECEIVER_NAME,
                },
            )
        )
        self.receiver = root / "receiver.conf"
        self.receiver.write_text(
            shipped(
                "siem-receiver.conf",
                {
                    "RECEIVE_DIR": str(self.received),
                    "CA_FILE": str(pki.ca_file),
                    "CERT_FILE": str(receiver / "cert.pem"),
                    "KEY_FILE": str(receiver / "key.pem"),
                    "RECEIVER_PORT": str(port),
                    "SENDER_NAME": SENDER,
                },
            )
        )

    def received_lines(self, log: str) -> list[bytes]:
        """What the receiver wrote for ``log``, from every sender host (there is one)."""
        return [
            line
            for path in sorted(self.received.glob(f"*/{log}.jsonl"))
            for line in path.read_bytes().splitlines()
        ]


def rsyslogd() -> str:
    found = shutil.which("rsyslogd")
    assert found, "no rsyslogd: rsyslog and rsyslog-relp are in ops/lib.sh's APT_PACKAGES"
    return found


@pytest.fixture
def own_pki(tmp_path: Path) -> DevPki:
    """A CA of the test's own, for the tests that need no worker (and no stack)."""
    pki = DevPki(tmp_path / "pki")
    pki.ensure_ca()
    return pki


class Rsyslogd:
    """An rsyslogd of the test's own, in the foreground, with its own pid file and log."""

    def __init__(self, name: str, config: Path) -> None:
        self.config, self.folder, self.name = config, config.parent, name
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        path = self.folder / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        with (self.folder / f"{self.name}.log").open("ab") as log:
            self.process = subprocess.Popen(
                [rsyslogd(), "-n", "-f", str(self.config), "-i", str(self.folder / f"{self.name}.pid")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stall(self) -> None:
        """SIGSTOP: it reads nothing more, like a receiver that falls behind, until stopped."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        """SIGTERM, as systemd stops it, and wait for it to save its state and exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        self.process.send_signal(signal.SIGCONT)  # a stalled one goes on, to its stop
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def wait_listening(self, port: int, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while True:
            assert self.process is not None and self.process.poll() is None, self.log
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"{self.name} does not listen on {port}:\n{self.log}"
                time.sleep(0.05)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


async def arrived(
    configs: Configs, sent: dict[str, list[bytes]], seconds: float = 20
) -> dict[str, list[bytes]]:
    """What was received per log, once it is everything sent (or ``seconds`` have passed)."""
    deadline = time.monotonic() + seconds
    while True:
        received = {log: configs.received_lines(log) for log in LOGS}
        if (
            all(not Counter(sent[log]) - Counter(received[log]) for log in LOGS)
            or time.monotonic() > deadline
        ):
            return received
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def under_load(signing: Signing, admin: SamClient) -> AsyncIterator[list[RawReply]]:
    """Signature requests eight at a time, and an admin request after each eight (a line
    of the admin log too), until the block ends; the replies."""
    replies: list[RawReply] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            replies.extend(reply for _, reply in await asyncio.gather(*(signing.send() for _ in range(8))))
            await admin.get_configuration()

    loader = asyncio.create_task(load())
    try:
        yield replies
    finally:
        stop.set()
        await loader


def differences(sent: list[bytes], received: list[bytes]) -> tuple[Counter[bytes], Counter[bytes]]:
    """The lines sent that did not arrive (as often as sent), and those that arrived more
    often than sent or were never sent."""
    return Counter(sent) - Counter(received), Counter(received) - Counter(sent)


@pytest.mark.parametrize("name", ["sam-worker.conf", "siem-receiver.conf"])
def test_rsyslogd_accepts_the_shipped_config(own_pki: DevPki, tmp_path: Path, name: str) -> None:
    """``rsyslogd -N1``: every parameter is known to this rsyslog (a misspelt one is an
    error, not ignored), with only the placeholders substituted."""
    configs = Configs(own_pki, tmp_path, tmp_path / "audit", RECEIVER_PORT)
    config = configs.sender if name == "sam-worker.conf" else configs.receiver
    result = subprocess.run(
        [rsyslogd(), "-N1", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr


def test_the_longest_line_arrives_byte_for_byte(own_pki: DevPki, tmp_path: Path) -> None:
    """A record of limits.max_digests_per_request at its maximum (10000 digests, some 680
    KB) and lines with what framing or escaping could change (UTF-8, a backslash, a quote)
    arrive as written, in order: nothing cut at a size limit, escaped or given a space."""
    configs = Configs(own_pki, tmp_path, tmp_path / "audit", PROBE_PORT)
    digests = ",".join(f'"{i:064x}"' for i in range(10000))
    lines = [
        b'{"type":"record","seq":1,"detail":"Zo\xc3\xab \\\\ \\" \xe2\x82\xac"}',
        b'{"type":"record","seq":2,"dtbs_sha256":[' + digests.encode() + b"]}",
        b'{"type":"record","seq":3}',
    ]
    assert len(lines[1]) > 670_000
    (configs.audit_dir / "worker-long").mkdir()
    (configs.audit_dir / "worker-long" / "service.jsonl").write_bytes(
        b"".join(line + b"\n" for line in lines)
    )
    receiver, sender = Rsyslogd("receiver", configs.receiver), Rsyslogd("sender", configs.sender)
    try:
        receiver.start()
        receiver.wait_listening(PROBE_PORT)
        sender.start()
        received = asyncio.run(arrived(configs, {"service": lines, "admin": []}, seconds=10))
    finally:
        sender.stop()
        receiver.stop()
    assert received["service"] == lines, (
        [len(line) for line in received["service"]],
        f"{sender.log[-3000:]}\n{receiver.log[-3000:]}",
    )


def forwarding(
    harness: Harness, tmp_path: Path, instance: str
) -> tuple[Configs, Rsyslogd, Rsyslogd, dict[str, Path]]:
    """Both shipped files for this test, the two rsyslogd's (not started) and the files
    of ``instance`` that the sender reads."""
    configs = Configs(harness.stack.pki, tmp_path, tmp_path / "audit", RECEIVER_PORT)
    receiver, sender = Rsyslogd("receiver", configs.receiver), Rsyslogd("sender", configs.sender)
    return configs, receiver, sender, {log: configs.audit_dir / instance / f"{log}.jsonl" for log in LOGS}


async def test_every_line_arrives_once_across_a_sender_restart_and_verifies(
    harness: Harness, signing: Signing, admin: SamClient, tmp_path: Path
) -> None:
    instance = "worker-rsyslog"
    configs, receiver, sender, files = forwarding(harness, tmp_path, instance)
    try:
        receiver.start()
        await asyncio.to_thread(receiver.wait_listening, RECEIVER_PORT)
        async with own_worker(harness, instance, configs.audit_dir):
            sender.start()  # after the worker's first lines: a file first seen is read from its start
            async with under_load(signing, admin) as replies:
                await asyncio.sleep(3)
                await asyncio.to_thread(sender.stop)
                received_before = len(configs.received_lines("service"))
                written_at_stop = len(lines_of(files["service"]))
                # where imfile goes on from after the restart (else it would read the files again)
                assert list(configs.work_dir.glob("imfile-state:*")), sender.log
                await asyncio.sleep(0.5)
                written_at_start = len(lines_of(files["service"]))
                sender.start()
                await asyncio.sleep(2)
        # the worker has stopped: its files are final
        sent = {log: lines_of(path) for log, path in files.items()}
        received = await arrived(configs, sent)
        await asyncio.sleep(1)  # a line delivered twice would come after the last one
        late = {log: configs.received_lines(log) for log in LOGS}
    finally:
        sender.stop()
        receiver.stop()

    # the load was real and the restart fell in the middle of it: lines had been forwarded
    # before the stop, and lines were written while no sender was running
    assert len(replies) > 50 and all(r.status == 200 for r in replies), [r.json() for r in replies[:3]]
    assert received_before > 0 and written_at_start > written_at_stop, (received_before, written_at_stop)
    assert sent["admin"], "no admin line: the admin log's path through both configs is untested"
    for log in LOGS:
        # every line of the worker's file arrived exactly once, byte for byte (nothing lost,
        # re-read after the restart, cut at a size limit, escaped or given a leading space)
        missing, extra = differences(sent[log], received[log])
        assert not missing and not extra, (
            f"{log}: {sum(missing.values())} missing, {sum(extra.values())} extra\n"
            f"{sender.log[-3000:]}\n{receiver.log[-3000:]}"
        )
        # in the order written, and no second copy came late
        assert received[log] == sent[log], f"{log}: out of order"
        assert late[log] == sent[log], f"{log}: delivered twice"
    # the received copy verifies on its own: chains complete, every checkpoint signed
    copies = sorted(configs.received.glob("*/*.jsonl"))
    result = verify(harness, copies)
    assert result.returncode == 0 and "BAD " not in result.stdout, result.stdout
    assert f"/{instance}/service:" in result.stdout and f"/{instance}/admin:" in result.stdout, result.stdout


async def test_every_line_arrives_across_a_receiver_restart_and_verifies(
    harness: Harness, signing: Signing, admin: SamClient, tmp_path: Path
) -> None:
    """The receiver stopped (SIGTERM) and started again under load, while the sender
    catches up with what the worker wrote before it started. Lines must be on their way at
    the stop, or there is nothing to lose: so the receiver first falls behind for half a
    second (SIGSTOP), as a busy one does, while the sender goes on sending. Every line
    arrives, the first copies in the order written; a line that arrives again is byte for
    byte a line sent, which ``audit verify --transport-copies`` counts, and the copy
    verifies."""
    instance = "worker-rsyslog-receiver"
    configs, receiver, sender, files = forwarding(harness, tmp_path, instance)
    try:
        receiver.start()
        await asyncio.to_thread(receiver.wait_listening, RECEIVER_PORT)
        async with own_worker(harness, instance, configs.audit_dir), under_load(signing, admin) as replies:
            await asyncio.sleep(2)  # lines for the sender to catch up with
            sender.start()
            deadline = time.monotonic() + 10
            while not configs.received_lines("service"):
                assert time.monotonic() < deadline, f"nothing forwarded\n{sender.log}\n{receiver.log}"
                await asyncio.sleep(0.01)
            receiver.stall()
            written_at_stall = len(lines_of(files["service"]))
            await asyncio.sleep(0.5)
            written_at_stop = len(lines_of(files["service"]))
            await asyncio.to_thread(receiver.stop)
            received_before = len(configs.received_lines("service"))
            await asyncio.sleep(1)
            written_at_start = len(lines_of(files["service"]))
            receiver.start()
            await asyncio.to_thread(receiver.wait_listening, RECEIVER_PORT)
            await asyncio.sleep(2)
        sent = {log: lines_of(path) for log, path in files.items()}
        received = await arrived(configs, sent, seconds=25)
    finally:
        sender.stop()
        receiver.stop()

    assert len(replies) > 50 and all(r.status == 200 for r in replies), [r.json() for r in replies[:3]]
    # lines had arrived before the stall, lines were written during it (the sender sent
    # them to a receiver that read nothing) and while no receiver was running
    assert received_before > 0 and written_at_stall < written_at_stop < written_at_start, (
        received_before,
        written_at_stall,
        written_at_stop,
        written_at_start,
    )
    assert sent["admin"], "no admin line: the admin log's path through both configs is untested"
    copies = 0
    for log in LOGS:
        missing, extra = differences(sent[log], received[log])
        assert not missing, (
            f"{log}: {sum(missing.values())} of {len(sent[log])} lines lost across the receiver's "
            f"restart\n{sender.log[-3000:]}\n{receiver.log[-3000:]}"
        )
        # what arrived again is a line sent, byte for byte, nothing else; and the first
        # copies came in the order written
        assert set(extra) <= set(sent[log]), f"{log}: lines that were never sent arrived"
        assert list(dict.fromkeys(received[log])) == sent[log], f"{log}: out of order"
        copies += sum(extra.values())
    received_files = sorted(configs.received.glob("*/*.jsonl"))
    result = verify_audit(harness.stack.infrastructure_file, received_files, transport_copies=True)
    assert result.returncode == 0 and "BAD " not in result.stdout, result.stdout
    assert f"/{instance}/service:" in result.stdout and f"/{instance}/admin:" in result.stdout, result.stdout
    assert not copies or f", {copies} lines delivered twice" in result.stdout, (copies, result.stdout)


RELP_FRAME = re.compile(rb"(\d+) (\w+) (\d+)[ \n]")


def _relp_frame(txnr: int, command: bytes, data: bytes) -> bytes:
    return b"%d %s %d %s\n" % (txnr, command, len(data), data)


def _read_relp_frame(tls: ssl.SSLSocket) -> tuple[int, bytes, bytes]:
    """The next RELP frame the receiver sends: transaction number, command, data."""
    buffer = b""
    while True:
        header = RELP_FRAME.match(buffer)
        if header and len(buffer) >= header.end() + int(header[3]):
            return int(header[1]), header[2], buffer[header.end() : header.end() + int(header[3])]
        chunk = tls.recv(4096)
        if not chunk:
            raise ConnectionError(f"the receiver hung up after {buffer!r}")
        buffer += chunk


def _send_over_relp(
    pki: DevPki, port: int, line: bytes, client: str | None, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
) -> tuple[int, bytes, bytes] | Exception:
    """Open a RELP session as the sender does, as ``client`` (no certificate if
    ``None``) over TLS ``version`` only, and send ``line`` in an RFC 5424 message; the
    receiver's answer to it, or what failed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1, on purpose
        context.minimum_version = context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client offers TLS 1.1 at all
    if client is not None:
        context.load_cert_chain(pki.root / client / "cert.pem", pki.root / client / "key.pem")
    message = b"<173>1 2026-01-01T00:00:00Z probe sam-audit-service - - - " + line
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=RECEIVER_NAME) as tls,
        ):
            tls.sendall(_relp_frame(1, b"open", b"relp_version=0\nrelp_software=probe\ncommands=syslog"))
            txnr, command, data = _read_relp_frame(tls)
            if (txnr, command) != (1, b"rsp") or not data.startswith(b"200 "):
                return ConnectionError(f"session not opened: {txnr} {command!r} {data!r}")
            tls.sendall(_relp_frame(2, b"syslog", message))
            return _read_relp_frame(tls)
    except OSError as exc:  # ssl.SSLError is one
        return exc


ACKNOWLEDGED = (2, b"rsp", b"200 OK")


def test_the_receiver_takes_lines_only_from_permitted_senders_over_tls_1_2_or_later(
    own_pki: DevPki, tmp_path: Path
) -> None:
    """A line is acknowledged (RELP ``200 OK``) and written only when it comes from a
    client certificate of CA_FILE, issued for a TLS client, with a permitted name, over
    TLS 1.2 or 1.3. Each refusal comes before any line is taken, so the sender knows."""
    pki = own_pki
    configs = Configs(pki, tmp_path, tmp_path / "audit", PROBE_PORT)
    pki.issue("rsyslog-intruder")  # a client certificate of the same CA, not permitted
    # the same CA, the permitted name, but a TLS server certificate
    server_side = DevPki(tmp_path / "pki-server-side")
    shutil.copytree(pki.root, server_side.root, ignore=shutil.ignore_patterns(SENDER))
    server_side.issue(SENDER, server=True)
    receiver = Rsyslogd("receiver", configs.receiver)
    try:
        receiver.start()
        receiver.wait_listening(PROBE_PORT)
        probes = {
            "tls1.1": _send_over_relp(pki, PROBE_PORT, b'{"probe":"tls1.1"}', SENDER, ssl.TLSVersion.TLSv1_1),
            "anonymous": _send_over_relp(pki, PROBE_PORT, b'{"probe":"anonymous"}', None),
            "intruder": _send_over_relp(pki, PROBE_PORT, b'{"probe":"intruder"}', "rsyslog-intruder"),
            "server-cert": _send_over_relp(server_side, PROBE_PORT, b'{"probe":"server-cert"}', SENDER),
            "sender-1.2": _send_over_relp(pki, PROBE_PORT, b'{"probe":"sender-1.2"}', SENDER),
            "sender-1.3": _send_over_relp(
                pki, PROBE_PORT, b'{"probe":"sender-1.3"}', SENDER, ssl.TLSVersion.TLSv1_3
            ),
        }
        time.sleep(0.5)  # for anything refused that would, wrongly, be written after all
    finally:
        receiver.stop()
    # TLS 1.1 is refused in the handshake for its version (tls.tlsCfgCmd MinProtocol;
    # OpenSSL's defaults alone would answer internal_error), not by this client: it
    # offers TLS 1.1
    assert isinstance(probes["tls1.1"], ssl.SSLError) and "PROTOCOL_VERSION" in str(probes["tls1.1"]), probes
    # no client certificate: the handshake fails; a server certificate: its purpose is
    # checked (OpenSSL's, as rsyslog's gnutls driver did with CheckExtendedKeyPurpose)
    assert isinstance(probes["anonymous"], ssl.SSLError), probes
    assert isinstance(probes["server-cert"], ssl.SSLError) and "UNSUPPORTED_CERTIFICATE" in str(
        probes["server-cert"]
    ), probes
    # a name not permitted: the handshake completes, then the receiver closes the session
    # (serverclose) instead of opening it
    assert isinstance(probes["intruder"], ConnectionError), probes
    # the control: the permitted sender gets through, over TLS 1.2 and 1.3
    assert probes["sender-1.2"] == probes["sender-1.3"] == ACKNOWLEDGED, (probes, receiver.log)
    assert sorted(configs.received_lines("service")) == [
        b'{"probe":"sender-1.2"}',
        b'{"probe":"sender-1.3"}',
    ], receiver.log
