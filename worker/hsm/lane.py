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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

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


class LaneMode(enum.StrEnum):
    threads = "threads"
    inline = "inline"


@dataclass
class _Pool:
    """Sessions for one kind of work, each used by one job at a time."""

    sessions: list[Pkcs11Session]
    executor: ThreadPoolExecutor | None  # None: the jobs run on the loop thread
    free: asyncio.Queue[Pkcs11Session] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        for session in self.sessions:
            self.free.put_nowait(session)


class HsmLane:
    """The ``Hsm`` port on ``sessions`` signing and ``generation_sessions`` generation
    sessions (see the module). Errors as the port says; ``hsm_unavailable`` as well for a
    call that outlasts ``timeout``. ``start`` opens every session (failing at start if the
    SAM's keys are missing); ``close`` waits for what runs, then closes them and ends the
    login (``logout``, as before a renewal: ``renew`` then renews the library)."""

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
        self._signing = _Pool(
            signing, None if inline else ThreadPoolExecutor(len(signing), thread_name_prefix="sam-hsm-sign")
        )
        self._generation = _Pool(
            generation, ThreadPoolExecutor(len(generation), thread_name_prefix="sam-hsm-generate")
        )
        self._all = [*signing, *generation]
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
        self._renewing = False
        self._resumed = asyncio.Event()  # set while no renewal holds new jobs back
        self._resumed.set()
        self._objects_at_renewal = 0
        self._healthy = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.renewals = 0
        self.mode = mode

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open every session and find the SAM's keys in each (``hsm_unavailable`` if not)."""
        for session in self._all:
            await self._run(self._pool_of(session), lambda opened: opened.check(), session)
        self._healthy = True
        self._spawn(self._probe_forever())

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await self._idle.wait()
        if self._in_use == 0:
            for session in self._all:
                session.close()
            self._logout()
        for pool in (self._signing, self._generation):
            if pool.executor is not None:
                pool.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        """Whether the HSM answered the last probe (every ``probe_seconds``) with the
        SAM's keys, and no call has hung since."""
        return self._healthy

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
        return await self._run(self._signing, lambda session: session.sign_with_state_key(data))

    async def sign_audit_digest(self, digest: bytes) -> bytes:
        return await self._run(self._signing, lambda session: session.sign_audit_digest(digest))

    # --- running jobs -------------------------------------------------------------------

    def _pool_of(self, session: Pkcs11Session) -> _Pool:
        return self._signing if session in self._signing.sessions else self._generation

    async def _run(self, pool: _Pool, job: Callable[..., T], *args: Pkcs11Session) -> T:
        """``job(session)`` on a free session of ``pool`` (or on ``args[0]``, at start)."""
        taken = not args
        session = await pool.free.get() if taken else args[0]
        try:
            # a session held while a renewal runs is closed under it and opens again
            # at its next use; what counts is that no job is inside the module
            while self._renewing:
                await self._resumed.wait()
        except BaseException:
            if taken:
                pool.free.put_nowait(session)
            raise
        self._in_use += 1
        self._idle.clear()
        if pool.executor is None:
            try:
                return job(session)
            finally:
                self._settle(pool, session, taken)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool.executor, job, session)
        # the session goes back only when the thread is out of the module: a caller that
        # stops waiting (cancelled, or timed out) must not let another job share it
        future.add_done_callback(lambda _: self._settle(pool, session, taken))
        done, _ = await asyncio.wait([future], timeout=self._timeout)
        if not done:
            self._hung()
            raise SamError(ErrorCode.hsm_unavailable, f"the HSM did not answer within {self._timeout:g} s")
        return future.result()

    def _settle(self, pool: _Pool, session: Pkcs11Session, taken: bool) -> None:
        """On the loop, once the job is out of the module."""
        if taken:
            pool.free.put_nowait(session)
        self._in_use -= 1
        if self._in_use == 0:
            self._idle.set()
        made = sum(session.objects_made for session in self._all) - self._objects_at_renewal
        if self._renew is not None and not self._renewing and made >= self._objects_before_renewal:
            self._renewing = True
            self._resumed.clear()
            self._spawn(self._renewal())

    def _hung(self) -> None:
        if self._healthy:
            log.critical("an HSM call did not return within %g s", self._timeout)
        self._healthy = False
        self._on_lost()

    def _spawn(self, work: object) -> None:
        assert asyncio.iscoroutine(work)
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renewal(self) -> None:
        """With no session in use: close them all and renew the library (see the module)."""
        while self._in_use:
            await self._idle.wait()
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
            await asyncio.get_running_loop().run_in_executor(self._generation.executor, renewed)
        finally:
            self._objects_at_renewal = sum(session.objects_made for session in self._all)
            self.renewals += 1
            self._renewing = False
            self._resumed.set()

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._probe_seconds)
            try:
                self._healthy = await self._run(self._signing, lambda session: session.healthy())
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
