"""Logging setup: structlog, JSON lines, context variables bound per sandbox/container/exec.

The shim daemon logs to the bundle's ``log`` FIFO (dup'ed onto stderr), which containerd folds into
its own log. Only the serving daemon configures logging; ``start`` and ``delete`` must keep stdout
clean, so they log to stderr only on failure.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


class _NeverRaisingStream:
    """Wraps the log stream so that a failed write drops the line instead of raising.

    containerd closes its read end of the shim's ``log`` FIFO as soon as the shim's ttrpc connection
    goes away, i.e. right after answering ``Shutdown`` -- while the daemon still stops the VM,
    unmounts the share and removes its socket and state dir, logging as it goes. A write to a FIFO
    without a reader fails with EPIPE (Python ignores SIGPIPE, so: ``BrokenPipeError``); raised from
    a log call it aborted that cleanup half way (regression: CRI pod removal left the share mount,
    the sandbox dir and the shim socket behind). Once a write failed, later lines are dropped.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # EPIPE, EBADF; ValueError: the stream was closed
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self.broken = True


def configure(*, level: str = "info", stream: TextIO | None = None, json: bool = True) -> None:
    """Configure structlog and the stdlib root logger to write one JSON object per line.

    Logging never raises for a broken stream (see :class:`_NeverRaisingStream`).
    """
    out: Any = _NeverRaisingStream(stream if stream is not None else sys.stderr)
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # stdlib loggers (asyncio, qemu.qmp, grpc) go through the same processors, so every line that
    # reaches containerd's log is one JSON object.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    root = logging.getLogger()
    root.handlers[:] = []
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(lvl)


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """A structlog logger, optionally with values bound (``sandbox_id=...``)."""
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bound) if bound else log


bind_contextvars = structlog.contextvars.bind_contextvars
bound_contextvars = structlog.contextvars.bound_contextvars

__all__ = ["bind_contextvars", "bound_contextvars", "configure", "get_logger"]
