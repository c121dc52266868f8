"""The session's real parts, shared by the integration and contract suites: one
RabbitMQ node and one SoftHSM token (in a folder and on ports of their own), started
at the first test that needs them and stopped at the end of the run."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sam_devtools.stack import Stack

PORT_BASE = int(os.environ.get("SAM_TEST_PORT_BASE", "26671"))


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="sam-test-stack-"))
    stack = Stack(root, PORT_BASE)
    try:
        stack.up(workers=0)
        yield stack
    finally:
        stack.down()
        if os.environ.get("SAM_TEST_KEEP_STACK") != "1":
            shutil.rmtree(root, ignore_errors=True)
