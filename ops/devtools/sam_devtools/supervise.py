"""TEST TOOLING: a minimal supervisor for the local stack, doing what systemd's
``Restart=on-failure`` (or a container restart policy) does in production: run the
worker, start it again after a non-zero exit (a lost HSM exits with 75), pass SIGTERM
and SIGHUP on, and stop when the worker stops cleanly or on SIGTERM.

Usage: ``python -m sam_devtools.supervise -- COMMAND...``
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import FrameType

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Run the command after ``--``, again after every non-zero exit — a second later, then
    twice as long after each exit that came within a minute of its start (up to 30 s), so
    a worker that cannot start (its HSM away) is not started twice a second; exit with
    its status once it exits 0 or a SIGTERM came."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = arguments[arguments.index("--") + 1 :] if "--" in arguments else arguments
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum == signal.SIGTERM:
            stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, forward)
    delay = 1.0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(command)
        status = child.wait()
        if stopping or status == 0:
            sys.exit(status)
        # A worker that served a while (past its start-up, ~2-5 s) lost something and
        # may start at once; one that keeps failing at start backs off (1 s … 30 s), each
        # start costing about a second of CPU. Waiting on a backoff left from an earlier
        # outage kept workers down long after the HSM was back.
        delay = 1.0 if time.monotonic() - started > 10 else delay
        print(
            f"supervise: worker exited with {status}; starting it again in {delay:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


if __name__ == "__main__":
    main()
