"""Copies that came over an at-least-once transport (rsyslog forwarding): with
``transport_copies``, a line that is byte for byte an earlier line of its own file is a
second delivery, counted and not reported; every other fault is still named. Without
it, nothing changes: the worker's own files never hold a line twice."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from tests.unit.test_audit_chain import KEY, trail
from worker.domain.audit import VerifyReport, verify_entries

Damage = Callable[[list[bytes]], list[bytes]]


def report(*files: list[bytes], transport_copies: bool) -> VerifyReport:
    lines = ((f"f{i}", n, line) for i, f in enumerate(files) for n, line in enumerate(f, 1))
    return verify_entries(lines, KEY.public_key(), transport_copies=transport_copies)


def kinds(result: VerifyReport) -> list[tuple[str, tuple[int, int] | None]]:
    return [(p.kind, p.seqs) for p in result.problems]


def _respaced(line: bytes) -> bytes:
    return orjson.dumps(orjson.loads(line), option=orjson.OPT_INDENT_2).replace(b"\n", b"")


def _altered(line: bytes) -> bytes:
    return orjson.dumps({**orjson.loads(line), "status": 500})


# trail([3, 4]): seq 1-3 records, 4 checkpoint, 5-8 records, 9 checkpoint (lines 0-8)
@pytest.mark.parametrize(
    ("damage", "as_transport_copies", "as_own_files", "redelivered"),  # as_own_files None: the same
    [
        # what rsyslog does when stopped while the receiver is unreachable: the line it
        # held goes to the end, and the next one comes twice
        (
            lambda ls: [*ls[1:], ls[0], ls[1]],
            [],
            [("repeated", (2, 2))],
            1,
        ),
        (lambda ls: [*ls, ls[3]], [], [("repeated", (4, 4))], 1),  # a checkpoint twice
        (lambda ls: [*ls, *ls, *ls], [], [("repeated", (s, s)) for s in range(1, 10)] * 2, 18),
        (lambda ls: [*ls, ls[4] + b"\n"], [], [("repeated", (5, 5))], 1),  # the newline is no part of it
        # what a second delivery cannot explain is still named
        (lambda ls: [*ls, _altered(ls[1])], [("altered", (2, 2)), ("repeated", (2, 2))], None, 0),
        (
            lambda ls: [*ls, _respaced(ls[1])],
            [("noncanonical", (2, 2)), ("repeated", (2, 2))],
            None,
            0,
        ),
        (lambda ls: [*ls[:1], *ls[2:], ls[0]], [("gap", (2, 2))], [("repeated", (1, 1)), ("gap", (2, 2))], 1),
        (
            lambda ls: [*ls, ls[6][:40], ls[6][:40]],
            [("unreadable", None), ("unreadable", None)],
            None,
            0,
        ),
    ],
    ids=[
        "restart while unreachable",
        "checkpoint twice",
        "whole file three times",
        "with and without newline",
        "altered copy",
        "respaced copy",
        "removed, another twice",
        "torn line twice",
    ],
)
def test_a_second_delivery_is_counted_and_nothing_else_is_excused(
    damage: Damage,
    as_transport_copies: list[tuple[str, tuple[int, int] | None]],
    as_own_files: list[tuple[str, tuple[int, int] | None]] | None,
    redelivered: int,
) -> None:
    lines = damage(trail([3, 4]))
    copies = report(lines, transport_copies=True)
    assert sorted(kinds(copies), key=str) == sorted(as_transport_copies, key=str)
    assert copies.redelivered == redelivered
    own = report(lines, transport_copies=False)
    expected_own = as_transport_copies if as_own_files is None else as_own_files
    assert sorted(kinds(own), key=str) == sorted(expected_own, key=str)
    assert own.redelivered == 0


def test_a_second_delivery_is_per_file_and_the_chain_is_whole() -> None:
    """A line in two files is a copy in either mode (nothing to count); the chain summary
    is the same as the intact file's."""
    lines = trail([3, 4])
    twice = report([*lines, lines[2]], lines, transport_copies=True)
    assert twice.ok and twice.redelivered == 1
    [summary] = twice.chains.values()
    [intact] = report(lines, transport_copies=False).chains.values()
    assert summary == intact
