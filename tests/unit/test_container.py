"""The container files without a container engine (there is none on the test machines):
compose.yaml as Debian's docker-compose reads it, the Dockerfile's stages as compose
uses them, what the worker image owns, and that the worker runs without the test tooling
the image leaves out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "ops" / "Dockerfile"


def stages() -> dict[str, str]:
    """Each ``FROM … AS name`` stage's text, by name."""
    found: dict[str, str] = {}
    name = None
    for line in DOCKERFILE.read_text().splitlines():
        if match := re.match(r"FROM \S+ AS (\S+)$", line):
            name = match.group(1)
            found[name] = ""
        elif name is not None:
            found[name] += line + "\n"
    return found


def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def test_debians_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    """Compose v1 (Debian 12's docker-compose) refused the top-level ``name:`` that v2
    accepts; the file now keeps to what both read. ``config`` needs no engine."""
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose (Debian's package) is needed; ./ops/test installs it")
    result = subprocess.run(
        [tool, "--project-name", "sam-worker", "-f", str(ROOT / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"},
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["services"]["sam-worker"]["build"]["target"] == "worker"
    assert resolved["services"]["init"]["build"]["target"] == "init"
    assert "name" not in compose()


def test_the_init_job_comes_from_a_stage_the_worker_image_does_not_contain() -> None:
    built = stages()
    assert {"base", "build", "init", "worker"} <= set(built)
    services = compose()["services"]
    assert services["init"]["build"]["target"] == "init"
    assert services["sam-worker"]["build"]["target"] == "worker"
    worker = built["worker"]
    assert "compose_init" not in worker and "--from=init" not in worker
    # the worker image installs the package's wheel alone, not the tooling's
    assert "/wheels/*.whl &&" in worker and "devtools" not in worker
    assert "/wheels/devtools/*.whl" in built["init"]
    assert worker.rstrip().splitlines()[-2:] == ["USER sam", 'ENTRYPOINT ["sam-worker"]']
    assert "sam_devtools.compose_init" in built["init"]


def test_the_image_owns_what_the_worker_writes() -> None:
    """A named volume starts as a copy of the image's folder: mounted where the image has
    none, it is root's, and the worker (``sam``) cannot write its audit trail."""
    worker = stages()["worker"]
    service = compose()["services"]["sam-worker"]
    audit_mount = next(v.split(":")[1] for v in service["volumes"] if v.startswith("audit:"))
    assert f"install -d -o sam -g sam -m 0750 {audit_mount}" in worker
    assert f"SAM_AUDIT_DIR={audit_mount}" in worker


def test_the_worker_runs_without_the_test_tooling_or_the_pdf_extra() -> None:
    """What the worker image holds (the wheel, no extras): every module but the ``pdf``
    extra's imports, and the three commands start, with ``sam_devtools`` and pyHanko made
    unimportable."""
    probe = """
import importlib, pkgutil, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sam_devtools", "pyhanko", "pyhanko_certvalidator"):
            raise ImportError(f"{name} is not in the worker image")
sys.meta_path.insert(0, Absent())
import worker
for module in pkgutil.walk_packages(worker.__path__, "worker."):
    if module.name != "worker.integrations.pdf":
        importlib.import_module(module.name)
from worker.cli import admin, sam, worker_main
for main in (admin.main, sam.main, worker_main.main):
    try:
        main(["--help"])
    except SystemExit as exit:
        assert exit.code == 0, exit.code
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
