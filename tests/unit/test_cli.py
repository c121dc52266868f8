"""The command lines' failure classes and defaults without a broker: each kind of
failure maps to its exit status and one line; flags that need no SAM are checked here."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import ssl
from pathlib import Path

import pytest
from aiormq.exceptions import ChannelAccessRefused
from pydantic import ValidationError

from worker import __version__
from worker.cli import failures, sam
from worker.cli.failures import Exit
from worker.client import (
    SamAccessRefused,
    SamConfigurationError,
    SamRequestError,
    SamTimeout,
    SamUnreachable,
)
from worker.domain.contract import KeyPairObject
from worker.errors import ErrorCode


@pytest.mark.parametrize(
    ("failure", "status", "words"),
    [
        (SamRequestError(401, ErrorCode.unknown_user, "who?", "r-1"), Exit.REFUSED, "config-put"),
        (SamRequestError(422, "a_newer_code", "new", None), Exit.REFUSED, "422 a_newer_code: new"),
        (SamAccessRefused("the broker refused ssa-1 access"), Exit.REFUSED, "refused ssa-1"),
        (
            ChannelAccessRefused(403, 'x "ACCESS_REFUSED - no"'),
            Exit.REFUSED,
            "ACCESS_REFUSED",
        ),
        (SamTimeout("r-2", 15), Exit.NO_ANSWER, "outcome is unknown"),
        (SamUnreachable("no broker node reachable: nothing accepts"), Exit.UNREACHABLE, "nothing accepts"),
        (ssl.SSLError(1, "handshake"), Exit.UNREACHABLE, "broker:"),
        (SamConfigurationError("the client certificate is for CN=a"), Exit.BAD_INPUT, "CN=a"),
        (
            FileNotFoundError(2, "No such file or directory", "kp.json"),
            Exit.BAD_INPUT,
            "kp.json: No such file",
        ),
        (json.JSONDecodeError("Expecting value", "x", 0), Exit.BAD_INPUT, "not JSON"),
    ],
)
def test_each_failure_has_its_class_and_one_line(failure: Exception, status: Exit, words: str) -> None:
    code, line = failures.describe(failure)
    assert code is status
    assert words in line and "\n" not in line


def test_a_document_that_is_no_key_pair_is_bad_input() -> None:
    with pytest.raises(ValidationError) as invalid:
        KeyPairObject.model_validate({"sealed": 5})
    code, line = failures.describe(invalid.value)
    assert code is Exit.BAD_INPUT and line.startswith("KeyPairObject is not valid: sealed:")


def test_an_unexpected_error_is_not_hidden() -> None:
    with pytest.raises(ZeroDivisionError):
        failures.describe(ZeroDivisionError("a bug"))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        sam.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"sam {__version__}"


def test_key_update_without_anything_to_record_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        sam.main(["--profile", str(tmp_path / "p.json"), "key-update", "kp.json", "--signer", "alice"])
    assert exited.value.code == Exit.BAD_INPUT
    assert "give --certificate, --enable or --disable" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "oid"),
    [("ecdsa-with-SHA256", "1.2.840.10045.4.3.2"), ("sha256WithRSAEncryption", "1.2.840.113549.1.1.11"),
     ("1.2.840.10045.4.3.3", "1.2.840.10045.4.3.3"), ("1.2.3.4", "1.2.3.4")],
)  # fmt: skip
def test_signature_algorithms_by_oid_or_name(given: str, oid: str) -> None:
    assert sam._signature_algorithm(given) == oid


def test_an_unknown_algorithm_name_lists_the_supported_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        sam.main(["--profile", "p", "sign", "kp", "--signer", "a", "--algorithm", "md5", "--sad-file", "s"])
    assert exited.value.code == Exit.BAD_INPUT
    assert "1.2.840.10045.4.3.2 ecdsa-with-SHA256" in capsys.readouterr().err


def test_help_lists_sizes_curves_and_algorithms(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["key-create", "--help"], ["sign", "--help"]):
        with pytest.raises(SystemExit):
            sam.main(command)
    text = " ".join(capsys.readouterr().out.split())
    assert "2048, 3072, 4096 (default 3072)" in text and "secp256r1" in text
    assert "1.2.840.113549.1.1.10 RSASSA-PSS" in text


def test_pdf_commands_without_the_pdf_extra_say_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pyhanko" else real(name, *a)
    )
    with pytest.raises(SystemExit) as exited:
        sam.main(["validate-pdf", "x.pdf", "--ca", "ca.pem"])
    assert exited.value.code == Exit.BAD_INPUT
    assert "pip install 'sam-worker[pdf]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "command", "words"),
    [
        (b"[]", ["public-key"], "KeyPairObject is not valid"),
        (b'{"sealed": "x"}', ["public-key"], "the key pair has no public_key"),
        (b"hello", ["validate-pdf", "--ca", "CA"], "not a PDF pyHanko can read"),
    ],
)
def test_offline_commands_on_files_that_are_not_what_they_take_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, command: list[str], words: str
) -> None:
    given = tmp_path / "given"
    given.write_bytes(content)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(_self_signed_pem())
    with pytest.raises(SystemExit) as exited:
        sam.main([command[0], str(given), *[str(ca) if part == "CA" else part for part in command[1:]]])
    assert exited.value.code == Exit.BAD_INPUT
    error = capsys.readouterr().err
    assert words in error and len(error.strip().splitlines()) == 1, error


def _self_signed_pem() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_sign_without_anything_to_sign_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        sam.main(["--profile", "p", "sign", "kp", "--signer", "a", "--algorithm", "ecdsa-with-SHA256",
                  "--sad-file", "s"])  # fmt: skip
    assert exited.value.code == Exit.BAD_INPUT and "--dtbs or --file" in capsys.readouterr().err


def test_a_truncated_rotated_file_is_a_problem_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from worker.cli import admin

    key = tmp_path / "audit-key.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    rotated = tmp_path / "service.jsonl-20261201.gz"
    lines = b"".join(b'{"type": "record", "n": "%s"}\n' % os.urandom(16).hex().encode() for _ in range(1000))
    rotated.write_bytes(gzip.compress(lines)[:4000])  # a rotation cut short
    with pytest.raises(SystemExit) as exited:
        admin.main(["audit", "verify", "--key", str(key), str(rotated)])
    assert exited.value.code == 1
    assert f"BAD {rotated}: unreadable after line" in capsys.readouterr().out
