"""TEST TOOLING: a model of a network HSM — a PKCS#11 module (``native/pkcs11_delay.c``)
that forwards every call to SoftHSM2 after a fixed delay, as a network HSM's client
library waits on its round trip. This module builds it and names the environment that
sets it up; the load of the module, and every PKCS#11 call, are the caller's.

Usage: ``python -m sam_devtools.hsm_delay build --out DIR`` (prints the module's path)
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from sam_devtools.stack import SOFTHSM_MODULE

__all__ = ["LIBRARY_NAME", "SOURCE", "build", "environment", "main"]

SOURCE = Path(__file__).parent / "native" / "pkcs11_delay.c"
LIBRARY_NAME = "libsam-pkcs11-delay.so"
COMPILER_FLAGS = ["-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-I/usr/include/p11-kit-1"]


def build(out_dir: Path) -> Path:
    """The module compiled into ``out_dir``, compiled again only if missing or older than
    the source. Two processes may build at once: each compiles to a name of its own and
    renames it into place (a process that has the old one loaded keeps its copy).
    RuntimeError, with gcc's output, if it does not compile."""
    library = out_dir / LIBRARY_NAME
    if library.exists() and library.stat().st_mtime >= SOURCE.stat().st_mtime:
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    # a folder, not a file of mkstemp's: the linker would keep that file's mode (0600)
    with tempfile.TemporaryDirectory(prefix=f".{LIBRARY_NAME}.", dir=out_dir) as scratch:
        partial = Path(scratch) / LIBRARY_NAME
        command = ["gcc", *COMPILER_FLAGS, "-o", str(partial), str(SOURCE), "-ldl", "-lpthread"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as error:
            raise RuntimeError(f"cannot run gcc to build {LIBRARY_NAME}: {error}") from error
        if result.returncode != 0:
            raise RuntimeError(f"gcc could not build {LIBRARY_NAME} from {SOURCE}:\n{result.stderr}")
        partial.replace(library)
    return library


def environment(delay_ms: float, target: str = SOFTHSM_MODULE) -> dict[str, str]:
    """The variables that make the module forward to ``target`` after ``delay_ms`` per
    call; the module reads them once, when it is first loaded in a process."""
    if delay_ms < 0:
        raise ValueError(f"a delay cannot be negative: {delay_ms} ms")
    return {
        "SAM_DELAY_PKCS11_TARGET": target,
        "SAM_DELAY_PKCS11_MICROSECONDS": str(round(delay_ms * 1000)),
    }


def main(argv: list[str] | None = None) -> None:
    """``build --out DIR``: build the module (if needed) and print its path."""
    parser = argparse.ArgumentParser(prog="python -m sam_devtools.hsm_delay")
    commands = parser.add_subparsers(dest="command", required=True)
    build_command = commands.add_parser("build", help="build the module and print its path")
    build_command.add_argument("--out", type=Path, required=True, help="the folder to build it in")
    args = parser.parse_args(argv)
    try:
        print(build(args.out))
    except RuntimeError as error:
        parser.exit(1, f"{error}\n")


if __name__ == "__main__":
    main()
