"""The ``Hsm`` port over a lane of PKCS#11 sessions, so the event loop never waits on the HSM.

A worker's loop reads its streams, answers ``/live`` and serves every request it holds;
an HSM call made on it stops all of that for as long as the call takes — seconds for an
RSA-4096 key generation, 0.5-3 ms per call for an HSM on the network. So the lane runs
HSM work on threads of its own, each job on one of ``sessions`` PKCS#11 sessions:

- **signing sessions** (``sessions``) take signatures, seals, audit checkpoints, factor
  MACs and health checks; with several, a network HSM's latency overlaps;
- **generation sessions** (``generation_sessions``) take key generation and re-wrapping,
  the long operations, so they never hold up a signature;
- in ``inline`` mode the signing work runs on the loop thread itself (one session; the
  lowest overhead with a local software HSM), and generation still on its thread.

The library is initialized for threads (``library``: ``CKF_OS_LOCKING_OK``). Every so
many session objects the lane renews it for SoftHSM (``softhsm``): it stops handing out
sessions, waits until none is in use, closes them all, and finalizes and initializes
the library; new sessions open at the next use. A call that does not return within
``timeout`` seconds is answered ``hsm_unavailable``; its session is never handed out
again and the worker drains and restarts (``on_lost``): a thread stuck in the module
cannot be taken back.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pkcs11.exceptions import PKCS11Error

from worker.domain.algorithms import KeySpec, SignatureScheme
from worker.errors import ErrorCode, SamError
from worker.hsm import library
from worker.hsm.pkcs11_hsm import Pkcs11Session, Token
from worker.ports import GeneratedKeyPair, WrappedKey
from worker.settings import Infrastructure

__all__ = ["SESSION_OBJECTS_BEFORE_RENEWAL", "HsmLane", "LaneMode", "open_lane"]

log = logging.getLogger("sam.hsm")

T = TypeVar("T")

# SoftHSM2 keeps the bookkeeping of every session object it ever created until
# C_Finalize (see ``softhsm``): ~190 bytes per unwrap, which made a worker grow by
# ~2.4 MB per 10,000 signatures. After this many session objects the lane renews the
# library. A renewal holds the lane for ~5 ms: every 2,000 signatures that is ~3 µs each,
# and what is held between two renewals stays under 0.4 MB.
SESSION_OBJECTS_BEFORE_RENEWAL = 2_000
# While a key generation runs the renewal waits, up to this many times the objects above.
RENEWAL_DEFERRED_AT_MOST = 4


class LaneMode(enum.StrEnum):
    threads = "threads"
    inline = "inline"


class _Threads:
    """Daemon threads that run jobs and report each outcome on the loop. Not a
    ``ThreadPoolExecutor``: its threads are joined when the interpreter exits, so one
    stuck in the module would keep a worker that must restart from ever exiting."""

    def __init__(self, count: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any], object]] | None]
        self._jobs = queue.SimpleQueue()
        self._count = count
        for index in range(count):
            threading.Thread(target=self._serve, name=f"{name}_{index}", daemon=True).start()

    def run(self, job: Callable[[], T], settle: Callable[[], None] = lambda: None) -> asyncio.Future[T]:
        """``job`` on a thread; its outcome in the returned future. ``settle`` runs on the
        loop once the thread is out of ``job`` (only then, whoever still waits)."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = loop.create_future()

        def done(result: tuple[bool, Any]) -> None:
            settle()
            if not outcome.done():
                ok, value = result
                if ok:
                    outcome.set_result(value)
                else:
                    outcome.set_exception(value)

        self._jobs.put((job, lambda result: loop.call_soon_threadsafe(done, result)))
        return outcome

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, done = item
            try:
                outcome: tuple[bool, Any] = (True, job())
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome = (False, exc)
            done(outcome)

    def stop(self) -> None:
        for _ in range(self._count):
            self._jobs.put(None)


@dataclass
class _Pool:
    """Sessions for one kind of work, each used by one job at a time."""

    sessions: list[Pkcs11Session]
    threads: _Threads | None  # None: the jobs run on the loop thread
    free: asyncio.Queue[Pkcs11Session] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        for session in self.sessions:
            self.free.put_nowait(session)


class HsmLane:
    """The ``Hsm`` port on ``sessions`` signing and ``generation_sessions`` generation
    sessions, and one more for the SAM's own signatures (see the module). Errors as the
    port says; ``hsm_unavailable`` as well for a wait for a session that outlasts
    ``timeout``, for an operation that outlasts it inside the module (a hang), and for
    everything after a hang. ``start`` opens
    every session (failing at start if the SAM's keys are missing); ``close`` waits for
    what runs, then closes them and ends the login (``logout``, as before a renewal:
    ``renew`` then renews the library)."""

    def __init__(
        self,
        new_session: Callable[[], Pkcs11Session],
        *,
        current_kek_label: str,
        on_lost: Callable[[], None],
        logout: Callable[[], None] = lambda: None,
        renew: Callable[[], None] | None = None,
        mode: LaneMode = LaneMode.threads,
        sessions: int = 4,
        generation_sessions: int = 1,
        timeout: float = 60.0,
        objects_before_renewal: int = SESSION_OBJECTS_BEFORE_RENEWAL,
        probe_seconds: float = 5.0,
    ) -> None:
        if sessions < 1 or generation_sessions < 1:
            raise ValueError("a lane needs at least one signing and one generation session")
        inline = mode is LaneMode.inline
        signing = [new_session() for _ in range(1 if inline else sessions)]
        generation = [new_session() for _ in range(generation_sessions)]
        self._signing = _Pool(signing, None if inline else _Threads(len(signing), "sam-hsm-sign"))
        self._generation = _Pool(generation, _Threads(len(generation), "sam-hsm-generate"))
        # Audit checkpoints, seals and health probes on a session of their own: behind
        # an SSA's 100-digest requests they would miss the audit deadline, and every
        # tenant would get audit_unavailable. Inline, they share the one inline session.
        self._own = self._signing if inline else _Pool([new_session()], _Threads(1, "sam-hsm-own"))
        self._pools = [self._signing, self._generation] + ([] if inline else [self._own])
        self._all = [session for pool in self._pools for session in pool.sessions]
        self._kek_label = current_kek_label
        self._on_lost = on_lost
        self._logout = logout
        self._renew = renew
        self._timeout = timeout
        self._objects_before_renewal = objects_before_renewal
        self._probe_seconds = probe_seconds
        self._in_use = 0  # jobs inside the module, stuck ones included
        self._idle = asyncio.Event()  # set while none is
        self._idle.set()
        self._renewing: asyncio.Task[None] | None = None
        self._resumed = asyncio.Event()  # set while no renewal holds new jobs back
        self._resumed.set()
        self._objects_at_renewal = 0
        self._healthy = False
        self._lost = False
        self._probe: asyncio.Task[None] | None = None
        self.renewals = 0
        self.mode = mode

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open every session and find the SAM's keys in each (``hsm_unavailable`` if not)."""
        for pool in self._pools:
            for session in pool.sessions:
                await self._run(pool, lambda opened: opened.check(), session)
        self._healthy = True
        self._probe = asyncio.get_running_loop().create_task(self._probe_forever())

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        # after a hang nothing will come back: the worker exits for a restart at once
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0 if self._lost else self._timeout):
                if self._renewing is not None:  # C_Finalize must not meet a closing session
                    await asyncio.shield(self._renewing)
                await self._idle.wait()
        if self._in_use == 0:
            for session in self._all:
                session.close()
            self._logout()
        for pool in self._pools:
            if pool.threads is not None:
                pool.threads.stop()

    @property
    def healthy(self) -> bool:
        """Whether the HSM answered the last probe (every ``probe_seconds``) with the
        SAM's keys, and no operation has hung."""
        return self._healthy and not self._lost

    @property
    def sessions(self) -> int:
        return len(self._all)

    # --- the Hsm port -------------------------------------------------------------------

    @property
    def current_kek_label(self) -> str:
        return self._kek_label

    async def generate_key_pair(self, spec: KeySpec) -> GeneratedKeyPair:
        return await self._run(self._generation, lambda session: session.generate_key_pair(spec))

    async def rewrap(self, key: WrappedKey) -> WrappedKey:
        return await self._run(self._generation, lambda session: session.rewrap(key))

    async def sign_with_wrapped_key(
        self, key: WrappedKey, scheme: SignatureScheme, inputs: Sequence[bytes]
    ) -> list[bytes]:
        return await self._run(
            self._signing, lambda session: session.sign_with_wrapped_key(key, scheme, inputs)
        )

    async def factor_mac(self, data: bytes) -> bytes:
        return await self._run(self._signing, lambda session: session.factor_mac(data))

    async def sign_with_state_key(self, data: bytes) -> bytes:
        return await self._run(self._own, lambda session: session.sign_with_state_key(data))

    async def sign_audit_digest(self, digest: bytes) -> bytes:
        return await self._run(self._own, lambda session: session.sign_audit_digest(digest))

    # --- running jobs -------------------------------------------------------------------

    def _refuse_if_lost(self) -> None:
        if self._lost:
            raise SamError(ErrorCode.hsm_unavailable, "the HSM is lost to this worker (it restarts)")

    async def _run(self, pool: _Pool, job: Callable[[Pkcs11Session], T], *args: Pkcs11Session) -> T:
        """``job(session)`` on a free session of ``pool`` (or on ``args[0]``, at start).
        Waiting for a session and a renewal is bounded by ``timeout`` (the HSM is busy:
        refused); the job itself has ``timeout`` of its own from when it starts (only a
        job that outlasts that inside the module is a hang)."""
        self._refuse_if_lost()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        taken = not args
        try:
            async with asyncio.timeout_at(deadline):
                session = await pool.free.get() if taken else args[0]
        except TimeoutError:
            raise SamError(
                ErrorCode.hsm_unavailable, f"no HSM session was free within {self._timeout:g} s"
            ) from None
        try:
            self._refuse_if_lost()
            # a session held while a renewal runs is closed under it and opens again
            # at its next use; what counts is that no job is inside the module
            async with asyncio.timeout_at(deadline):
                while self._renewing is not None:
                    await self._resumed.wait()
        except TimeoutError:
            if taken:
                pool.free.put_nowait(session)
            raise SamError(ErrorCode.hsm_unavailable, "the HSM session renewal took too long") from None
        except BaseException:
            if taken:
                pool.free.put_nowait(session)
            raise
        self._in_use += 1
        self._idle.clear()
        if pool.threads is None:
            # inline: on the loop thread, so nothing here can bound the call (see LaneMode)
            try:
                return job(session)
            finally:
                self._settle(pool, session, taken)
        # the session serves another job only once the thread is out of the module
        outcome = pool.threads.run(lambda: job(session), lambda: self._settle(pool, session, taken))
        finished, _ = await asyncio.wait([outcome], timeout=self._timeout)
        if not finished:
            self._hung()
            raise SamError(ErrorCode.hsm_unavailable, f"the HSM did not answer within {self._timeout:g} s")
        return outcome.result()

    def _settle(self, pool: _Pool, session: Pkcs11Session, taken: bool) -> None:
        """On the loop, once the job is out of the module."""
        if taken:
            pool.free.put_nowait(session)
        self._in_use -= 1
        if self._in_use == 0:
            self._idle.set()
        made = sum(session.objects_made for session in self._all) - self._objects_at_renewal
        if self._renew is None or self._renewing is not None or made < self._objects_before_renewal:
            return
        # A renewal holds new jobs, the audit trail's included, until none is in the
        # module: not while a generation (seconds) runs, unless memory must come first.
        generating = self._generation.free.qsize() < len(self._generation.sessions)
        if not generating or made >= RENEWAL_DEFERRED_AT_MOST * self._objects_before_renewal:
            self._resumed.clear()
            self._renewing = asyncio.get_running_loop().create_task(self._renewal())

    def _hung(self) -> None:
        if not self._lost:
            log.critical("an HSM operation did not end within %g s", self._timeout)
        self._lost = True  # what waits for a session is refused from now on
        self._on_lost()

    async def _renewal(self) -> None:
        """With no session in use: close them all and renew the library (see the module)."""
        renew = self._renew
        assert renew is not None

        def renewed() -> None:
            for session in self._all:
                session.close()
            self._logout()
            # a failure shows at the next session open, which then reports the HSM lost
            with contextlib.suppress(PKCS11Error, SamError):
                renew()

        try:
            while self._in_use:
                await self._idle.wait()
            threads = self._generation.threads
            assert threads is not None  # generation always runs on its thread
            # what renewed() meets shows at the next session open (see there)
            with contextlib.suppress(Exception):
                await threads.run(renewed)
        finally:
            self._objects_at_renewal = sum(session.objects_made for session in self._all)
            self.renewals += 1
            self._renewing = None
            self._resumed.set()

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._probe_seconds)
            try:
                self._healthy = await self._run(self._own, lambda session: session.healthy())
            except SamError:
                self._healthy = False


async def open_lane(
    module: str,
    token_label: str,
    pin: str,
    infrastructure: Infrastructure,
    on_lost: Callable[[], None],
    *,
    mode: LaneMode = LaneMode.threads,
    sessions: int = 4,
    generation_sessions: int = 1,
    call_timeout: float = 60.0,
    objects_before_renewal: int = SESSION_OBJECTS_BEFORE_RENEWAL,
) -> HsmLane:
    """A started lane on the token ``token_label`` of ``module``, with the SAM's keys that
    ``infrastructure`` names; SoftHSM's renewal on. ``hsm_unavailable`` if it cannot start."""
    library.initialize(module)
    token = Token(module, token_label, pin)

    def session() -> Pkcs11Session:
        return Pkcs11Session(
            token.open,
            on_lost,
            infrastructure.kek_label,
            infrastructure.state_key.label,
            infrastructure.audit_key.label,
            infrastructure.factor_key_label,
            infrastructure.wrap_mechanism,
        )

    lane = HsmLane(
        session,
        current_kek_label=infrastructure.kek_label,
        on_lost=on_lost,
        logout=token.logout,
        renew=lambda: library.renew(module),
        mode=mode,
        sessions=sessions,
        generation_sessions=generation_sessions,
        timeout=call_timeout,
        objects_before_renewal=objects_before_renewal,
    )
    try:
        await lane.start()
    except BaseException:
        await lane.close()
        raise
    return lane
