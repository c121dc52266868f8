"""``sam-worker``: run one worker process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from worker.app import EXIT_RESTART, run_worker
from worker.errors import ErrorCode, SamError
from worker.settings import load_settings

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """``sam-worker``: run one worker until it stops. A ``SamError`` at start exits with
    ``EXIT_RESTART`` if it is ``hsm_unavailable`` (the supervisor tries again), else with 1."""
    parser = argparse.ArgumentParser(prog="sam-worker", description=__doc__)
    parser.add_argument("--config", type=Path, help="settings file (TOML); SAM_* variables override it")
    parser.add_argument("--queues", help="comma-separated queue classes to consume: admin,keys,signatures")
    parser.add_argument("--instance", help="name of this process in audit records and logs")
    parser.add_argument("--ready-file", type=Path, help="written once the worker consumes")
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    if args.queues:
        overrides["queues"] = args.queues
    if args.instance:
        overrides["instance"] = args.instance
    settings = load_settings(args.config, **overrides)
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
