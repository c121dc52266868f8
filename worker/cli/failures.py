"""How ``sam`` and ``sam-admin`` end when something fails: one line on standard error
that names the cause, and an exit status per class of failure, so scripts can tell "the
SAM said no" from "the broker cannot be reached" from "your input is wrong".

| status | class |
|---|---|
| 0 | done |
| 1 | refused: the SAM refused the request (its status and code are printed), or the broker refused access |
| 2 | bad input: arguments, files, a profile or key that cannot be used (argparse's usage errors are 2 too) |
| 3 | unreachable: no broker node answered, or TLS or the login failed |
| 4 | no answer: the request went out and no answer came in time; its outcome is unknown |
"""

from __future__ import annotations

import json
import logging
import ssl
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import NoReturn

import aio_pika
import aiormq
from pydantic import ValidationError

from worker.client import (
    SamAccessRefused,
    SamClientError,
    SamConfigurationError,
    SamRequestError,
    SamTimeout,
    SamUnreachable,
    broker_reply_text,
)
from worker.errors import SamError

__all__ = ["EXIT_STATUS_HELP", "Exit", "describe", "run"]

EXIT_STATUS_HELP = (
    "0 done; 1 refused (by the SAM: status and code printed; or by the broker); 2 bad input "
    "(arguments, files, profile, key); 3 unreachable (no broker node answered, TLS or login "
    "failed); 4 no answer in time (outcome unknown: send the same request again)"
)


class Exit(IntEnum):
    OK = 0
    REFUSED = 1
    BAD_INPUT = 2
    UNREACHABLE = 3
    NO_ANSWER = 4


# what to do about a refusal a new user meets first, keyed by code
_HINTS = {
    "unknown_user": "the SAM's dynamic configuration does not register this user id; an administrator "
    "adds it (sam config-put), or ops/stack up registers the local stack's",
    "configuration_missing": "no dynamic configuration is registered yet: an administrator puts one "
    "(sam --profile admin.json config-put FILE)",
    "request_signature_invalid": "the profile's jws_key_file is not the key registered for this user id",
    "sad_invalid": "the SAD does not verify: is it from an authorization server this SSA may use, "
    "for this SAM (aud) and still valid?",
}


def describe(exc: BaseException) -> tuple[Exit, str]:
    """The class and the one line for a failure of a command."""
    if isinstance(exc, SamRequestError):
        hint = _HINTS.get(str(exc.code))
        request = f" (request {exc.request_id})" if exc.request_id else ""
        return Exit.REFUSED, f"refused: {exc.status} {exc.code}: {exc.message}{request}" + (
            f" — {hint}" if hint else ""
        )
    if isinstance(exc, SamAccessRefused):
        return Exit.REFUSED, str(exc)
    if isinstance(exc, SamTimeout):
        return Exit.NO_ANSWER, (
            f"{exc}: the outcome is unknown; to learn it, send the same request again with its id "
            f"(sam: the same command with --message-id {exc.request_id})"
        )
    if isinstance(exc, SamUnreachable):
        return Exit.UNREACHABLE, str(exc)
    if isinstance(exc, SamConfigurationError):
        return Exit.BAD_INPUT, str(exc)
    if isinstance(exc, SamClientError):
        return Exit.REFUSED, str(exc)
    if isinstance(exc, SamError):
        return Exit.REFUSED, f"{exc.code.name}: {exc.message}"
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return Exit.REFUSED, f"the broker refused access: {broker_reply_text(exc)}"
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'document'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        return Exit.BAD_INPUT, f"{exc.title} is not valid: {problems}"
    if isinstance(exc, json.JSONDecodeError):
        return Exit.BAD_INPUT, f"not JSON: {exc}"
    if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError | aio_pika.exceptions.AMQPError):
        return Exit.UNREACHABLE, f"broker: {exc}"
    if isinstance(exc, OSError):  # a file named on the command line or in the profile
        where = f"{exc.filename}: " if exc.filename else ""
        return Exit.BAD_INPUT, f"{where}{exc.strerror or exc}"
    if isinstance(exc, ValueError):
        return Exit.BAD_INPUT, str(exc)
    raise exc


def run(prog: str, action: Callable[[], int | None]) -> NoReturn:
    """Run ``action`` and exit with its status, or with the class of its failure after one
    line on standard error. aiormq's own logging of failed connections is silenced: the
    line says it."""
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
    try:
        status = action()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        code, line = describe(exc)
        print(f"{prog}: {line}", file=sys.stderr)
        sys.exit(code)
    sys.exit(status or 0)
