"""Regression: a log line written after containerd closed the shim's log FIFO must not raise.

containerd closes the FIFO's read end when the shim's connection drops (after Shutdown); the daemon
then still logs while it stops the VM and removes mounts, socket and state dir. A BrokenPipeError
from a log call used to abort that cleanup half way.
"""

from __future__ import annotations

import logging
import os

from shim import log


def test_logging_to_a_pipe_without_reader_does_not_raise() -> None:
    r, w = os.pipe()
    os.close(r)
    stream = os.fdopen(w, "w")
    try:
        log.configure(stream=stream)
        log.get_logger("t").info("after the reader went away")
        log.get_logger("t").warning("and again")
        logging.getLogger("stdlib").warning("stdlib too")
    finally:
        log.configure()
        try:
            stream.close()
        except OSError:
            pass


def test_lines_still_reach_a_working_stream(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "log"
    with open(path, "w") as f:
        log.configure(stream=f)
        try:
            log.get_logger("t").info("hello", k=1)
        finally:
            log.configure()
    assert '"event": "hello"' in path.read_text()
