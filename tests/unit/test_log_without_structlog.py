"""The guest image ships without structlog: shim.log then writes the same JSON lines with the stdlib."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from shim import log


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    monkeypatch.setattr(log, "structlog", None)
    monkeypatch.setattr(log, "bind_contextvars", log._plain_bind_contextvars)
    monkeypatch.setattr(log, "bound_contextvars", log._plain_bound_contextvars)
    out = io.StringIO()
    log.configure(stream=out, level="info")
    yield out
    monkeypatch.undo()
    log.configure()


def test_bound_and_call_keys_event_level_time(plain: io.StringIO) -> None:
    lg = log.get_logger("t", sandbox_id="sb1").bind(peer="p")
    lg.debug("hidden")
    with log.bound_contextvars(rpc="Create"):
        lg.info("booted", seconds=1.5)
    lg.warning("after")
    logging.getLogger("asyncio").warning("took %.3f seconds", 0.2)
    lines = [json.loads(line) for line in plain.getvalue().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert first["event"] == "booted" and first["level"] == "info" and first["seconds"] == 1.5
    assert first["sandbox_id"] == "sb1" and first["peer"] == "p" and first["rpc"] == "Create"
    assert first["time"].endswith("Z")
    assert "rpc" not in lines[1]
    assert lines[2] == {**lines[2], "logger": "asyncio", "level": "warning", "event": "took 0.200 seconds"}


def test_exception_carries_the_traceback(plain: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        log.get_logger("t").exception("handler failed")
        log.get_logger("t").error("read loop failed", exc_info=exc)
    a, b = (json.loads(line) for line in plain.getvalue().splitlines())
    assert a["level"] == "error" and "ValueError: boom" in a["exception"]
    assert "ValueError: boom" in b["exception"]


def test_a_broken_stream_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "structlog", None)
    stream = io.StringIO()
    log.configure(stream=stream)
    stream.close()
    try:
        log.get_logger("t").info("after close", unserialisable=object())
    finally:
        monkeypatch.undo()
        log.configure()
