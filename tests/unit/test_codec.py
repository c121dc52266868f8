"""The tolerant AMQP codec: a content header that pamqp would fail to decode (and so
drop the whole connection) decodes, with what was not UTF-8 marked for the envelope
gate, a timestamp out of range as none, and tables nested too deep cut off."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from pamqp import commands, common, frame, header

from tests.raw_amqp import raw_encoding
from worker.transport import codec


def _header_frame(properties: commands.Basic.Properties) -> bytes:
    return frame.marshal(header.ContentHeader(0, 10, properties), 1)


@pytest.fixture(autouse=True)
def installed() -> None:
    codec.install()


def _decode(properties: commands.Basic.Properties) -> Any:
    with raw_encoding():
        data = _header_frame(properties)
    _, _, decoded = frame.unmarshal(data)
    assert isinstance(decoded, header.ContentHeader)
    return decoded.properties


@pytest.mark.parametrize("name", ["app_id", "message_id", "message_type", "content_type", "reply_to"])
def test_a_short_string_that_is_not_utf8_decodes_marked(name: str) -> None:
    fields: dict[str, Any] = {name: "x\udcff"}
    properties = _decode(commands.Basic.Properties(**fields))
    value = getattr(properties, name)
    assert value == "x\udcff" and codec.undecodable(value)


def test_header_names_and_nested_values_that_are_not_utf8_decode_marked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers: common.FieldTable = {"x-\udcff": 1, "ok": {"inner-\udcfe": "v"}, "list": ["a", "b"]}
    decoded = _decode(commands.Basic.Properties(headers=headers)).headers
    assert decoded["ok"] == {"inner-\udcfe": "v"} and decoded["list"] == ["a", "b"]
    assert codec.undecodable(decoded)
    assert not codec.undecodable({"ok": {"inner": "v"}, "list": ["a"], "n": 1})


def test_tables_nested_too_deep_are_cut_off_not_recursed(monkeypatch: pytest.MonkeyPatch) -> None:
    deep: Any = {"leaf": 1}
    for _ in range(100):
        deep = {"d": deep}
    decoded = _decode(commands.Basic.Properties(headers={"x": deep})).headers
    assert codec.undecodable(decoded)


def test_a_timestamp_out_of_range_decodes_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    with raw_encoding(far_timestamps=True):
        data = _header_frame(commands.Basic.Properties(timestamp=datetime.datetime.now(datetime.UTC)))
    _, _, decoded = frame.unmarshal(data)
    assert isinstance(decoded, header.ContentHeader) and decoded.properties.timestamp is None


def test_valid_frames_decode_as_before() -> None:
    properties = commands.Basic.Properties(app_id="sam", headers={"a": "b", "n": [1, {"k": "v"}]})
    _, _, decoded = frame.unmarshal(_header_frame(properties))
    assert isinstance(decoded, header.ContentHeader)
    assert decoded.properties.app_id == "sam"
    assert decoded.properties.headers == {"a": "b", "n": [1, {"k": "v"}]}
    assert not codec.undecodable(decoded.properties.headers)
