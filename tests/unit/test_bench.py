"""The arithmetic of ``ops/bench`` on synthetic points, without a broker or an HSM: the
ratios against the bare worker and the echo baseline, the worker's own CPU per request,
broker CPU per signature by number of workers, and the HSM lane's bound."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import NoReturn

import pytest

from sam_devtools.bench import (
    Point,
    Results,
    hsm_lane_rows,
    lane_bound,
    paced_loop,
    ratios,
    scaling,
    table,
    worker_overhead_ms,
)
from sam_devtools.stack import Stack


def point(
    name: str,
    concurrency: int,
    processes: int,
    rate: float,
    cpu: dict[str, float] | None = None,
    per_request: int = 1,
    p50_ms: float | None = None,
) -> Point:
    return Point(
        name,
        concurrency,
        processes,
        int(rate * 3),
        3.0,
        rate,
        p50_ms,
        None,
        per_request,
        cpu or {},
    )


def synthetic() -> Results:
    """Every point ``ratios`` reads, with round figures."""
    results = Results()
    results.points = [
        point("hsm.persistent.p256", 0, 2, 10_000),
        point("hsm.stateless.p256", 0, 1, 400, {"workers": 1.25}),  # waited for a core half the time
        point("hsm.stateless.p256", 0, 2, 1_000, {"workers": 1.5}),
        point("hsm.stateless.rsa2048", 0, 2, 400),
        point("echo", 1, 2, 500, p50_ms=2.0),
        point("echo", 64, 2, 2_000, {"broker": 0.5, "workers": 0.25, "load": 0.3}),
        point("sam.sign.p256", 1, 2, 100, p50_ms=5.0),
        point("sam.sign.p256", 16, 1, 300),
        point("sam.sign.p256", 64, 2, 400, {"broker": 2.0, "workers": 3.5, "load": 1.0}),
        point("sam.sign.rsa2048", 64, 2, 150),
        point("sam.repeat.p256", 16, 1, 600),
        point("sam.sign100.p256", 8, 1, 10, per_request=100),
        point("sam.sign100.p256", 8, 2, 15, per_request=100),
        point("bare.sign.p256", 64, 2, 800, {"broker": 0.6, "workers": 1.6, "load": 0.4}),
        point("bare.sign.rsa2048", 64, 2, 300),
        point("bare.sign100.p256", 8, 2, 20, per_request=100),
    ]
    return results


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("p256_single_vs_bare", 400 / 800),
        ("rsa_single_vs_bare", 150 / 300),
        ("p256_batch_vs_bare", 1_500 / 2_000),  # signatures per second, not requests
        ("worker_overhead_ms_p256", 3.5 - (0.25 + 1.25)),
        ("broker_cpu_vs_echo", 2.0 / 0.5),
        ("p256_p50_vs_echo_p50", 5.0 / 2.0),
        ("batch_scaling_2_vs_1_workers", 1_500 / 1_000),
        ("p256_repeat_vs_sign_c16", 600 / 300),
    ],
)
def test_ratio(name: str, expected: float) -> None:
    assert ratios(synthetic())[name] == pytest.approx(expected)


def test_worker_overhead_counts_the_cpu_of_a_cycle_not_its_wall_time() -> None:
    results = synthetic()
    assert 1000 / results.find("hsm.stateless.p256", processes=1).rate == 2.5  # not what is taken
    assert worker_overhead_ms(results) == pytest.approx(3.5 - 0.25 - 1.25)


def test_a_ratio_names_the_point_it_misses() -> None:
    results = synthetic()
    results.points = [p for p in results.points if p.name != "bare.sign.rsa2048"]
    with pytest.raises(KeyError, match=r"bare\.sign\.rsa2048"):
        ratios(results)


def test_scaling_is_broker_cpu_per_signature_by_workers() -> None:
    results = Results()
    results.points = [
        point("sam.scale.p256", 64, 4, 300, {"broker": 4.0, "workers": 3.0, "load": 1.0}),
        point("sam.scale.p256", 64, 1, 250, {"broker": 2.0, "workers": 3.0, "load": 1.0}),
        point("sam.scale.p256", 64, 2, 400, {"broker": 3.0, "workers": 3.0, "load": 1.0}, per_request=2),
        point("sam.sign.p256", 64, 2, 400, {"broker": 9.0, "workers": 3.0, "load": 1.0}),
    ]
    assert scaling(results) == {
        "broker_cpu_ms_per_signature": {"1": 2.0, "2": 1.5, "4": 4.0},
        "signatures_per_second": {"1": 250.0, "2": 800.0, "4": 300.0},
    }
    results.points += [
        point("sam.scale_paced.p256", 64, 2, 60, {"broker": 5.0, "workers": 3.0, "load": 1.0}),
        point("sam.scale_paced.p256", 64, 1, 60, {"broker": 4.5, "workers": 3.0, "load": 1.0}),
    ]
    figures = scaling(results)
    assert figures["paced_broker_cpu_ms_per_signature"] == {"1": 4.5, "2": 5.0}
    assert figures["paced_signatures_per_second"] == {"1": 60.0, "2": 60.0}


async def test_paced_loop_starts_calls_at_its_rate_whatever_they_take() -> None:
    started: list[int] = []

    async def call(n: int) -> None:
        started.append(n)
        await asyncio.sleep(0.05)  # 50 ms answers: a closed loop of 4 would do 80/s

    count, _, latencies = await paced_loop(call, 200.0, 64, 0.5, 0.1)
    assert 80 <= count <= 110  # 200/s over 0.5 s, after the warmup
    assert len(started) >= 100 and all(latency >= 0.05 for latency in latencies)


@pytest.mark.parametrize(
    ("sessions", "latency_ms", "expected"),
    [
        (1, 1.0, 1_000 / 7),  # seven round trips of 1 ms one after another
        (4, 1.0, 4_000 / 7),
        (16, 1.0, 16_000 / 7),
        (1, 3.0, 1_000 / 21),
        (16, 3.0, 16_000 / 21),
    ],
)
def test_lane_bound(sessions: int, latency_ms: float, expected: float) -> None:
    assert lane_bound(sessions, latency_ms) == pytest.approx(expected)


async def test_the_lane_is_skipped_with_a_message_without_the_delay_shim(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_workload() -> NoReturn:
        pytest.fail("nothing is measured without the shim")

    monkeypatch.setitem(sys.modules, "sam_devtools.hsm_delay", None)  # import fails as if absent
    said: list[str] = []
    assert await hsm_lane_rows(Stack(Path("/nonexistent")), no_workload, (1.0, 1.0), said.append) == []
    assert said == ["HSM lane: skipped, sam_devtools.hsm_delay cannot be imported (ModuleNotFoundError)"]


def test_table_puts_the_bare_worker_beside_the_sam_and_lists_the_lane() -> None:
    results = synthetic()
    results.ratios.update(ratios(results))
    results.ratios["hsm_lane"] = [{"latency_ms": 1.0, "sessions": 4, "rate": 900.0, "bound": 1000.0}]
    results.scaling = {"broker_cpu_ms_per_signature": {"1": 2.0}, "signatures_per_second": {"1": 250.0}}
    lines = table(results).splitlines()
    sam = next(line for line in lines if line.startswith("sam.sign.p256") and " 64 " in line)
    assert sam.split()[-1] == "1.60"  # the bare worker's CPU per request at the same c and processes
    echo = next(line for line in lines if line.startswith("echo") and " 64 " in line)
    assert echo.split()[-1] == "0.30"  # no twin: ends with its own load column
    assert any(line.split()[-4:] == ["1.0", "4", "900", "1000"] for line in lines)
    assert any("1: 2.00 (250 sig/s)" in line for line in lines)
