"""rsyslog forwarding as shipped: a real rsyslogd with ``ops/rsyslog/sam-worker.conf``
reads a worker's audit files and forwards them over mutual TLS to a real rsyslogd with
``ops/rsyslog/siem-receiver.conf``, both with only their placeholders substituted and
certificates of the dev PKI. Restarted under load, the sender delivers every line once,
byte for byte, and the received copy verifies; the receiver takes nobody else's lines."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import ssl
import subprocess
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import PORT_BASE
from tests.integration.conftest import Harness
from tests.integration.test_audit_trail import Signing, own_worker, signing, verify
from worker.client import RawReply, SamClient
from worker.devtools.pki import DevPki

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
    assert found, "no rsyslogd: rsyslog and rsyslog-gnutls are in ops/lib.sh's APT_PACKAGES"
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

    def stop(self) -> None:
        """SIGTERM, as systemd stops it, and wait for it to save its state and exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
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


async def test_every_line_arrives_once_across_a_sender_restart_and_verifies(
    harness: Harness, signing: Signing, admin: SamClient, tmp_path: Path
) -> None:
    instance = "worker-rsyslog"
    configs = Configs(harness.stack.pki, tmp_path, tmp_path / "audit", RECEIVER_PORT)
    receiver, sender = Rsyslogd("receiver", configs.receiver), Rsyslogd("sender", configs.sender)
    files = {log: configs.audit_dir / instance / f"{log}.jsonl" for log in LOGS}
    replies: list[RawReply] = []
    try:
        receiver.start()
        await asyncio.to_thread(receiver.wait_listening, RECEIVER_PORT)
        async with own_worker(harness, instance, configs.audit_dir):
            sender.start()  # after the worker's first lines: a file first seen is read from its start
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    replies.extend(
                        reply for _, reply in await asyncio.gather(*(signing.send() for _ in range(8)))
                    )
                    await admin.get_configuration()  # a line of the admin log too

            loader = asyncio.create_task(load())
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
            stop.set()
            await loader
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
        missing, extra = (
            Counter(sent[log]) - Counter(received[log]),
            Counter(received[log]) - Counter(sent[log]),
        )
        assert not missing and not extra, (
            f"{log}: {sum(missing.values())} missing, {sum(extra.values())} extra\n"
            f"{sender.log[-3000:]}\n{receiver.log[-3000:]}"
        )
        # and no second copy came late
        assert Counter(late[log]) == Counter(sent[log]), f"{log}: delivered twice"
    # the received copy verifies on its own: chains complete, every checkpoint signed
    copies = sorted(configs.received.glob("*/*.jsonl"))
    result = verify(harness, copies)
    assert result.returncode == 0 and "BAD " not in result.stdout, result.stdout
    assert f"/{instance}/service:" in result.stdout and f"/{instance}/admin:" in result.stdout, result.stdout


def _send_over_tls(
    pki: DevPki, port: int, line: bytes, client: str | None, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
) -> Exception | None:
    """Send ``line`` as the sender does (RFC 5424, octet-counted) as ``client`` (no
    certificate if ``None``), over TLS ``version`` only; what failed, if anything did."""
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
            tls.sendall(b"%d %s" % (len(message), message))
    except OSError as exc:  # ssl.SSLError is one
        return exc
    return None


def test_the_receiver_takes_lines_only_from_permitted_senders_over_tls_1_2_or_later(
    own_pki: DevPki, tmp_path: Path
) -> None:
    pki = own_pki
    configs = Configs(pki, tmp_path, tmp_path / "audit", PROBE_PORT)
    pki.issue("rsyslog-intruder")  # a client certificate of the same CA, not permitted
    receiver = Rsyslogd("receiver", configs.receiver)
    try:
        receiver.start()
        receiver.wait_listening(PROBE_PORT)
        # TLS 1.1 with a permitted certificate: the receiver hangs up in the handshake (not
        # this client refusing to offer it: that would be another error)
        refused = _send_over_tls(pki, PROBE_PORT, b'{"probe":"tls1.1"}', SENDER, ssl.TLSVersion.TLSv1_1)
        assert isinstance(refused, (ssl.SSLEOFError, ConnectionResetError)), refused
        # no client certificate, or one whose name is not permitted (permittedPeer): rsyslog
        # judges the peer once the handshake is done, so sending may seem to succeed; only
        # what arrives tells
        _send_over_tls(pki, PROBE_PORT, b'{"probe":"anonymous"}', None)
        _send_over_tls(pki, PROBE_PORT, b'{"probe":"intruder"}', "rsyslog-intruder")
        # the control: the permitted sender gets through, over TLS 1.2 and 1.3
        assert _send_over_tls(pki, PROBE_PORT, b'{"probe":"sender-1.2"}', SENDER) is None
        assert (
            _send_over_tls(pki, PROBE_PORT, b'{"probe":"sender-1.3"}', SENDER, ssl.TLSVersion.TLSv1_3) is None
        )
        deadline = time.monotonic() + 10
        while len(configs.received_lines("service")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # for anything refused that would, wrongly, come after
    finally:
        receiver.stop()
    assert sorted(configs.received_lines("service")) == [
        b'{"probe":"sender-1.2"}',
        b'{"probe":"sender-1.3"}',
    ], receiver.log
