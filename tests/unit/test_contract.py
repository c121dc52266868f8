"""The published contract in ``schemas/`` matches the code, and every error code is
documented with a status."""

from __future__ import annotations

import ast
from pathlib import Path

from worker.errors import ErrorCode
from worker.schemas import render

ROOT = Path(__file__).resolve().parents[2]


def test_schemas_do_not_drift() -> None:
    rendered = render()
    committed = {p.name: p.read_bytes() for p in (ROOT / "schemas").glob("*.json")}
    assert set(committed) == set(rendered), "run: sam-admin schemas --out schemas"
    for name, content in rendered.items():
        assert committed[name] == content, f"schemas/{name} drifted; run: sam-admin schemas --out schemas"


def test_every_code_the_worker_raises_is_catalogued() -> None:
    """Every ``ErrorCode.<name>`` used in the worker exists (so it is in the catalogue)."""
    used = set()
    for path in (ROOT / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "ErrorCode"
            ):
                used.add(node.attr)
    known = {code.name for code in ErrorCode}
    assert used - {"value", "status", "meaning"} <= known
    assert all(400 <= code.status < 600 for code in ErrorCode)
