"""The wheel as a Python user gets it, built here from the checkout: one version (the
package's), the license file and the type-information marker inside, pyHanko only with
the ``pdf`` extra, and none of the test tooling (which is a distribution of its own)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import sam_devtools
import worker

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(folder: Path) -> Path:
    """The package's wheel, built into ``folder`` from a copy of what it is made of:
    setuptools leaves a build/ folder in the tree it builds, which a later build would
    take stale files from."""
    source = folder / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "worker", source / "worker", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--wheel-dir",
            str(folder),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = folder.glob("sam_worker-*.whl")
    return wheel


def test_the_wheel_carries_one_version_the_license_py_typed_and_no_test_tooling(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        license_files = [n for n in names if n.endswith("/licenses/LICENSE")]
        assert license_files, sorted(n for n in names if "dist-info" in n)
        assert "Apache License" in archive.read(license_files[0]).decode()
    assert metadata["Version"] == worker.__version__
    tooling = sorted(n for n in names if "devtools" in n or n.split("/")[0] in ("tests", "ops"))
    assert not tooling, tooling
    assert {n.split("/")[0] for n in names} == {"worker", f"sam_worker-{worker.__version__}.dist-info"}
    requires = metadata.get_all("Requires-Dist") or []
    pdf = [r for r in requires if r.lower().startswith("pyhanko")]
    assert pdf and all('extra == "pdf"' in r for r in pdf), pdf
    assert not [r for r in requires if "devtools" in r], requires
    assert set(metadata.get_all("Provides-Extra") or []) == {"pdf", "csc", "dev", "bench"}
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "worker/py.typed" in names
    assert wheel.name.startswith(f"sam_worker-{worker.__version__}-")


def test_the_tooling_keeps_the_package_version() -> None:
    """Two distributions from one checkout, released together."""
    assert sam_devtools.__version__ == worker.__version__
