"""``sam-worker``: run one worker process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from worker import __version__
from worker.app import EXIT_RESTART, run_worker
from worker.errors import ErrorCode, SamError
from worker.settings import load_settings

# EX_CONFIG: the settings are wrong; starting again will not help (systemd:
# RestartPreventExitStatus in the unit)
EXIT_CONFIGURATION = 78

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """``sam-worker``: run one worker until it stops. A ``SamError`` at start exits with
    ``EXIT_RESTART`` if it is ``hsm_unavailable`` (the supervisor tries again), else with 1;
    settings that do not load exit with ``EXIT_CONFIGURATION``, in one line."""
    parser = argparse.ArgumentParser(prog="sam-worker", description=__doc__)
    parser.add_argument("--config", type=Path, help="settings file (TOML); SAM_* variables override it")
    parser.add_argument("--queues", help="comma-separated queue classes to consume: admin,keys,signatures")
    parser.add_argument("--instance", help="name of this process in audit records and logs")
    parser.add_argument("--ready-file", type=Path, help="written once the worker consumes")
    parser.add_argument("--version", action="version", version=f"sam-worker {__version__}")
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    if args.queues:
        overrides["queues"] = args.queues
    if args.instance:
        overrides["instance"] = args.instance
    try:
        settings = load_settings(args.config, **overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        print(f"sam-worker: cannot start: the settings do not load: {problems}", file=sys.stderr)
        sys.exit(EXIT_CONFIGURATION)
    except (OSError, ValueError) as exc:  # an unreadable or malformed file (tomllib's error is a ValueError)
        print(f"sam-worker: cannot start: the settings do not load: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIGURATION)
    # PKCS#11 calls release the GIL; with the default 5 ms switch interval the event-loop
    # thread can wait that long to get it back from the audit I/O thread. Measured with
    # ops/bench: about +30% signatures/s at concurrency 64, same latency at 1.
    sys.setswitchinterval(settings.gil_switch_interval_seconds)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    try:
        status = asyncio.run(run_worker(settings, args.ready_file))
    except SamError as exc:
        logging.getLogger("sam.worker").critical("cannot start: %s: %s", exc.code.name, exc.message)
        status = EXIT_RESTART if exc.code is ErrorCode.hsm_unavailable else 1
    sys.exit(status)


if __name__ == "__main__":
    main()
