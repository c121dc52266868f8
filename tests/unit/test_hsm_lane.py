"""The HSM lane's scheduling, with sessions that only take time (the real PKCS#11 sessions
are exercised by tests/contract/test_hsm_port.py and tests/integration/test_hsm_lane.py):
long operations never hold up signatures or the event loop, calls overlap across
sessions, a call that hangs is refused and restarts the worker without its session
being handed out again, and the SoftHSM renewal happens only with no call in the HSM."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from worker.domain.algorithms import KeyType, key_spec_from_template, signature_scheme
from worker.errors import ErrorCode, SamError
from worker.hsm.lane import HsmLane, LaneMode
from worker.ports import GeneratedKeyPair, WrappedKey

SPEC = key_spec_from_template("ECDSA", None, "secp256r1")
KEY = WrappedKey(SPEC, b"w" * 40, "kek", "AES_KEY_WRAP_PAD")
SCHEME = signature_scheme("1.2.840.10045.4.3.2", KeyType.EC)


@dataclass
class Clock:
    """What the sessions saw: threads, overlap, renewal windows."""

    sign_seconds: float = 0.0
    generate_seconds: float = 0.0
    gate: threading.Event | None = None  # when set, a signature waits for it
    threads: list[str] = field(default_factory=list)
    inside: int = 0
    most_inside: int = 0
    calls: list[tuple[float, float]] = field(default_factory=list)
    renewals: list[tuple[float, float]] = field(default_factory=list)
    closed: int = 0
    guard: threading.Lock = field(default_factory=threading.Lock)

    def enter(self) -> float:
        with self.guard:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.threads.append(threading.current_thread().name)
        return time.monotonic()

    def leave(self, started: float) -> None:
        with self.guard:
            self.inside -= 1
            self.calls.append((started, time.monotonic()))


class TimedSession:
    """Stands in for ``Pkcs11Session``: every call takes the time the clock says."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.objects_made = 0

    def check(self) -> None:
        pass

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        self.clock.closed += 1

    def generate_key_pair(self, spec: Any) -> GeneratedKeyPair:
        started = self.clock.enter()
        time.sleep(self.clock.generate_seconds)
        self.clock.leave(started)
        return GeneratedKeyPair(b"spki", b"wrapped", "kek", "AES_KEY_WRAP_PAD")

    def sign_audit_digest(self, digest: bytes) -> bytes:
        return b"a" * 64

    def sign_with_state_key(self, data: bytes) -> bytes:
        return b"a" * 64

    def sign_with_wrapped_key(self, key: Any, scheme: Any, inputs: Any) -> list[bytes]:
        started = self.clock.enter()
        if self.clock.gate is not None:
            self.clock.gate.wait(5)
        time.sleep(self.clock.sign_seconds)
        self.objects_made += 1
        self.clock.leave(started)
        return [b"s" * 64 for _ in inputs]


def lane(clock: Clock, on_lost: Callable[[], None] = lambda: None, **options: Any) -> HsmLane:
    renew = options.pop("renew", None)
    return HsmLane(
        cast(Any, lambda: TimedSession(clock)),
        current_kek_label="kek",
        on_lost=on_lost,
        renew=renew,
        **options,
    )


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Any]]:
    lanes: list[HsmLane] = []

    async def start(clock: Clock, **options: Any) -> HsmLane:
        made = lane(clock, **options)
        await made.start()
        lanes.append(made)
        return made

    yield start
    for made in lanes:
        await made.close()


async def _loop_lag_while(work: asyncio.Future[Any]) -> float:
    """The longest the event loop was away while ``work`` ran (10 ms ticks)."""
    worst = 0.0
    while not work.done():
        before = time.monotonic()
        await asyncio.sleep(0.01)
        worst = max(worst, time.monotonic() - before - 0.01)
    return worst


async def test_a_long_generation_holds_up_neither_signatures_nor_the_loop(
    started: Callable[..., Any],
) -> None:
    clock = Clock(sign_seconds=0.001, generate_seconds=1.0)
    hsm = await started(clock, sessions=2)
    generation = asyncio.ensure_future(hsm.generate_key_pair(SPEC))
    await asyncio.sleep(0.05)  # the generation is in the HSM
    began = time.monotonic()
    signatures = await asyncio.gather(*(hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"]) for _ in range(20)))
    assert len(signatures) == 20 and time.monotonic() - began < 0.5
    assert not generation.done()
    lag = await _loop_lag_while(generation)
    assert lag < 0.1, f"the loop was away {lag * 1000:.0f} ms"
    assert (await generation).kek_label == "kek"
    assert any(name.startswith("sam-hsm-generate") for name in clock.threads)


async def test_calls_overlap_across_the_signing_sessions(started: Callable[..., Any]) -> None:
    """An HSM on the network waits per call: four sessions keep four calls in flight."""
    clock = Clock(sign_seconds=0.05)
    hsm = await started(clock, sessions=4)
    began = time.monotonic()
    await asyncio.gather(*(hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"]) for _ in range(8)))
    assert time.monotonic() - began < 0.3  # one after another: 0.4 s
    assert clock.most_inside == 4


async def test_inline_mode_signs_on_the_loop_thread_and_generates_off_it(
    started: Callable[..., Any],
) -> None:
    clock = Clock()
    hsm = await started(clock, mode=LaneMode.inline, sessions=8)
    await hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"])
    await hsm.generate_key_pair(SPEC)
    assert clock.threads == [threading.current_thread().name, "sam-hsm-generate_0"]
    assert hsm.sessions == 2  # one signing session inline, whatever ``sessions`` says


async def test_a_call_that_hangs_is_refused_and_its_session_never_handed_out_again(
    started: Callable[..., Any],
) -> None:
    gate = threading.Event()
    clock = Clock(gate=gate)
    lost: list[bool] = []
    hsm = await started(clock, sessions=1, timeout=0.2, on_lost=lambda: lost.append(True))
    with pytest.raises(SamError) as refused:
        await hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"])
    assert (
        refused.value.code is ErrorCode.hsm_unavailable
        and "did not answer within 0.2 s" in refused.value.message
    )
    assert lost == [True] and not hsm.healthy  # the worker drains and restarts
    # what comes after is refused at once, not queued behind the hung session
    with pytest.raises(SamError, match="lost to this worker"):
        await hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"])
    assert clock.most_inside == 1 and clock.inside == 1
    gate.set()
    await asyncio.sleep(0.05)
    assert clock.inside == 0 and not hsm.healthy  # a late answer does not make it healthy


async def test_a_wait_for_a_busy_session_is_bounded(started: Callable[..., Any]) -> None:
    gate = threading.Event()
    clock = Clock(gate=gate)
    hsm = await started(clock, sessions=1, timeout=0.3)
    first = asyncio.ensure_future(hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"]))
    await asyncio.sleep(0.2)
    with pytest.raises(SamError, match=r"no HSM session was free within 0\.3 s"):
        await hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"])
    gate.set()
    with contextlib.suppress(SamError):
        await first


async def test_a_job_that_waited_for_its_session_still_has_its_whole_time_in_the_hsm(
    started: Callable[..., Any],
) -> None:
    """A queue of generations is no hang: only time inside the module counts as one."""
    clock = Clock(generate_seconds=0.2)
    lost: list[bool] = []
    hsm = await started(clock, sessions=1, timeout=0.3, on_lost=lambda: lost.append(True))
    first = asyncio.ensure_future(hsm.generate_key_pair(SPEC))
    await asyncio.sleep(0.01)
    second = await hsm.generate_key_pair(SPEC)  # 0.2 s waiting, then 0.2 s in the HSM
    assert second.kek_label == "kek" and (await first).kek_label == "kek"
    assert lost == [] and hsm.healthy


async def test_the_sams_own_signatures_never_wait_behind_client_work(started: Callable[..., Any]) -> None:
    """Audit checkpoints and seals have a session of their own: an SSA that fills every
    signing session cannot make the audit trail miss its deadline for every tenant."""
    gate = threading.Event()
    clock = Clock(gate=gate)
    hsm = await started(clock, sessions=2)
    busy = [asyncio.ensure_future(hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"])) for _ in range(6)]
    await asyncio.sleep(0.05)
    async with asyncio.timeout(1):
        assert await hsm.sign_audit_digest(b"d" * 32) == b"a" * 64
        assert await hsm.sign_with_state_key(b"seal") == b"a" * 64
    gate.set()
    await asyncio.gather(*busy)


async def test_a_caller_that_stops_waiting_does_not_free_a_session_still_in_the_hsm(
    started: Callable[..., Any],
) -> None:
    gate = threading.Event()
    clock = Clock(gate=gate)
    hsm = await started(clock, sessions=1)
    first = asyncio.ensure_future(hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"]))
    await asyncio.sleep(0.05)
    first.cancel()
    second = asyncio.ensure_future(hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"]))
    await asyncio.sleep(0.1)
    assert not second.done() and clock.most_inside == 1
    gate.set()
    await second
    assert clock.most_inside == 1 and len(clock.calls) == 2


async def test_the_renewal_runs_with_no_call_in_the_hsm_and_closes_every_session(
    started: Callable[..., Any],
) -> None:
    clock = Clock(sign_seconds=0.002)

    def renew() -> None:
        began = time.monotonic()
        assert clock.inside == 0
        time.sleep(0.01)
        clock.renewals.append((began, time.monotonic()))

    hsm = await started(clock, sessions=4, objects_before_renewal=25, renew=renew)
    await asyncio.gather(*(hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"]) for _ in range(200)))
    await asyncio.sleep(0.05)
    assert len(clock.renewals) >= 6 and hsm.renewals == len(clock.renewals)
    assert clock.closed >= 6 * len(clock.renewals)  # 4 signing, 1 generation, 1 own, each time
    for began, ended in clock.renewals:
        assert not [call for call in clock.calls if call[0] < ended and call[1] > began]


async def test_the_renewal_does_not_hold_the_audit_trail_behind_a_generation(
    started: Callable[..., Any],
) -> None:
    """A renewal waits until nothing is in the module and holds new jobs meanwhile: due
    while a generation runs (seconds), it waits for the generation to end instead."""
    clock = Clock(sign_seconds=0.001, generate_seconds=0.6)
    renewals: list[float] = []
    hsm = await started(clock, sessions=2, objects_before_renewal=5, renew=lambda: renewals.append(1))
    generation = asyncio.ensure_future(hsm.generate_key_pair(SPEC))
    await asyncio.sleep(0.05)
    await asyncio.gather(*(hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"]) for _ in range(10)))
    async with asyncio.timeout(0.2):  # not behind the generation
        await hsm.sign_audit_digest(b"d" * 32)
    assert renewals == [] and not generation.done()
    await generation
    await hsm.sign_with_wrapped_key(KEY, SCHEME, [b"d"])
    await asyncio.sleep(0.05)
    assert renewals == [1]
