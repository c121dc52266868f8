"""An ``Hsm`` that times every call of another one (metrics by operation and mechanism)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from worker.domain.algorithms import KeySpec, SignatureScheme
from worker.errors import SamError
from worker.metrics import HsmOperation, Metrics
from worker.ports import GeneratedKeyPair, Hsm, WrappedKey

__all__ = ["InstrumentedHsm"]


class InstrumentedHsm:
    """An ``Hsm`` that passes every call on and records its time (and its failure) in
    ``sam_hsm_seconds`` / ``sam_hsm_errors``."""

    def __init__(self, inner: Hsm, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    @contextmanager
    def _timed(self, operation: HsmOperation, mechanism: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except SamError:
            self._metrics.hsm_errors.labels(operation).inc()
            raise
        finally:
            self._metrics.hsm_seconds.labels(operation, mechanism).observe(time.perf_counter() - started)

    @property
    def current_kek_label(self) -> str:
        return self._inner.current_kek_label

    async def generate_key_pair(self, spec: KeySpec) -> GeneratedKeyPair:
        with self._timed(HsmOperation.generate, spec.description):
            return await self._inner.generate_key_pair(spec)

    async def sign_with_wrapped_key(
        self, key: WrappedKey, scheme: SignatureScheme, inputs: Sequence[bytes]
    ) -> list[bytes]:
        with self._timed(HsmOperation.unwrap_sign_destroy, str(scheme.mechanism)):
            return await self._inner.sign_with_wrapped_key(key, scheme, inputs)

    async def rewrap(self, key: WrappedKey) -> WrappedKey:
        with self._timed(HsmOperation.rewrap, key.wrap_mechanism):
            return await self._inner.rewrap(key)

    async def factor_mac(self, data: bytes) -> bytes:
        with self._timed(HsmOperation.factor, "SHA256_HMAC"):
            return await self._inner.factor_mac(data)

    async def sign_with_state_key(self, data: bytes) -> bytes:
        with self._timed(HsmOperation.seal, "ECDSA"):
            return await self._inner.sign_with_state_key(data)

    async def sign_audit_digest(self, digest: bytes) -> bytes:
        with self._timed(HsmOperation.audit_checkpoint, "ECDSA"):
            return await self._inner.sign_audit_digest(digest)
