"""The quickstart of docs/INTEGRATION.md, run as written: ``./ops/stack up`` (on a stack
of this test's own: a temporary folder and ports, through the variables ``ops/stack``
documents), then every later block of the section in order — the Python file saved under
the name its first line gives, the shell blocks one after the other in one bash session
with ``-euo pipefail``, as a reader types them into one terminal — in a folder where
``.stack`` is that stack. A guide whose code no longer runs fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PORT_BASE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "INTEGRATION.md"
MARK = "@@ end of a block @@"
QUICKSTART_PORT_BASE = PORT_BASE + 100  # clear of the session stack's range (base … base+51)


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the Quickstart section, in order."""
    text = GUIDE.read_text()
    start = text.index("\n## Quickstart")
    end = text.index("\n## ", start + 1)
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w+)\n(.*?)^```$", text[start:end], re.M | re.S)]


def run_shell(code: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"{code}\n--- exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_the_guides_blocks_take_a_new_ssa_to_a_verified_signature(tmp_path: Path) -> None:
    blocks = quickstart_blocks()
    assert blocks[0] == ("sh", "./ops/stack up\n"), blocks[0]
    assert [language for language, _ in blocks].count("python") == 1
    stack_root = tmp_path / ".stack"
    stack_root.mkdir()
    (stack_root / "venv").symlink_to(sys.prefix)  # the checkout's virtualenv, as in .stack/venv
    env = {**os.environ, "SAM_STACK_DIR": str(stack_root), "SAM_STACK_PORT_BASE": str(QUICKSTART_PORT_BASE)}
    try:
        started = run_shell(blocks[0][1], ROOT, env)
        # the stack is usable at once and says what to do next
        assert "dynamic configuration version 1 registered" in started, started
        assert "ssa-1.json" in started and "next:" in started, started
        next_commands = started.split("next:\n", 1)[1].strip().splitlines()
        assert len(next_commands) == 3, started
        assert next_commands[0].strip() == f". {stack_root / 'venv' / 'bin' / 'activate'}", started
        shell = []
        for language, code in blocks[1:]:
            if language == "python":
                name = re.match(r"# (\S+\.py)\b", code)
                assert name, "the Python block's first line names its file"
                (tmp_path / name[1]).write_text(code)
            else:
                assert language == "sh", language
                shell.append(code)
        outputs = run_shell(f"\necho {MARK}\n".join(shell), tmp_path, env).split(f"{MARK}\n")
        assert len(outputs) == len(shell) == 2, outputs
        assert "signature verified: CN=Alice,O=Example signed contract.txt" in outputs[0], outputs[0]
        assert '"signatures"' in outputs[1], outputs[1]
    finally:
        subprocess.run(
            [str(ROOT / "ops" / "stack"), "down"], env=env, capture_output=True, check=False, timeout=120
        )
