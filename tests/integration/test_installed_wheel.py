"""The wheel as a user installs it: built from the checkout, installed into a fresh
virtualenv (no system packages, no extras, no test tooling), then its commands run and
one SDK round trip goes through the test stack. What the checkout's editable install
hides — a module left out of the wheel, a dependency only the dev tools pull in, a
console script pointing nowhere — fails here. (CI runs it: it is part of ./ops/test.)"""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

import worker
from tests.integration.conftest import Harness
from tests.unit.test_packaging import build_wheel

pytestmark = pytest.mark.integration

ROUND_TRIP = """
import asyncio, sys
from worker.client import SamClient

async def main() -> None:
    async with SamClient.from_profile(sys.argv[1]) as sam:
        key_pair = await sam.create_key_pair("ECDSA", named_curve="secp256r1")
        print(type(key_pair).__name__, key_pair.algorithm, key_pair.status.assigned)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with the wheel (and its dependencies, from the index or pip's cache)."""
    folder = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(folder)
    environment = folder / "venv"
    venv.create(environment, with_pip=True, system_site_packages=False)
    installed = subprocess.run(
        [str(environment / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return environment / "bin"


def run(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout, cwd="/")


def test_the_commands_start_and_say_their_version(fresh_install: Path) -> None:
    for command in ("sam-worker", "sam", "sam-admin"):
        done = run([str(fresh_install / command), "--version"])
        assert done.returncode == 0 and done.stdout.strip() == f"{command} {worker.__version__}", done
    helped = run([str(fresh_install / "sam"), "--help"])
    assert helped.returncode == 0 and "key-create" in helped.stdout, helped
    # the test tooling is not there, and neither is the pdf extra unless asked for
    assert not (fresh_install / "sam-dev-as").exists()
    probe = run([str(fresh_install / "python"), "-c", "import sam_devtools"])
    assert probe.returncode == 1 and "No module named 'sam_devtools'" in probe.stderr, probe
    pdf = run([str(fresh_install / "sam"), "sign-file", "x", "--key-pair", "k", "--signer", "s",
               "--certificate", "c", "--sad-command", "true"])  # fmt: skip
    assert pdf.returncode == 2 and "pip install 'sam-worker[pdf]'" in pdf.stderr, pdf


async def test_one_sdk_round_trip_from_the_installed_wheel(
    fresh_install: Path, harness: Harness, tmp_path: Path
) -> None:
    profile = harness.stack.profile("ssa-1")
    json.loads(profile.read_text())  # the stack's own profile, as an SSA developer gets it
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    done = run([str(fresh_install / "python"), str(script), str(profile)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "KeyPairObject ECDSA False", done.stdout
