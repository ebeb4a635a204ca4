import io
import json
import logging

from shim import log


def test_structlog_and_stdlib_lines_are_json():
    out = io.StringIO()
    log.configure(stream=out, level="debug")
    log.get_logger("t", sandbox_id="sb1").info("booted", seconds=1.5)
    logging.getLogger("asyncio").warning("Executing <Task %r> took %.3f seconds", "x'y\"", 0.2)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["event"] == "booted" and lines[0]["sandbox_id"] == "sb1" and lines[0]["level"] == "info"
    assert lines[1]["logger"] == "asyncio" and lines[1]["level"] == "warning"
    assert lines[1]["event"].endswith("took 0.200 seconds")
