"""Logging setup: JSON lines, context variables bound per sandbox/container/exec.

On the host this is structlog. The guest image ships without structlog (importing it is ~0.25 s of
a TCG boot, measured with ``-X importtime`` in the guest), so when it cannot be imported the same
API -- ``configure``, ``get_logger(...).bind/info/...``, ``bind_contextvars``, ``bound_contextvars``
-- is served by a small stdlib logger that writes the same JSON objects (``event``, ``level``,
``time``, bound and call keys; ``exception`` for tracebacks).

The shim daemon logs to the bundle's ``log`` FIFO (dup'ed onto stderr), which containerd folds into
its own log. Only the serving daemon configures logging; ``start`` and ``delete`` must keep stdout
clean, so they log to stderr only on failure.
"""

from __future__ import annotations

import contextlib
import contextvars
import json as _json
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any, TextIO

# structlog.dev imports rich (or better_exceptions) when installed, to pretty-print console tracebacks
# we never render: the shim writes JSON. rich comes with the dev tools (import-linter) and pulls in
# pygments and attrs: 5 of the idle shim daemon's 27 MiB anonymous PSS (measured in a CRI pod). So
# structlog is imported with them hidden; whoever imports them later still gets them.
_HIDDEN = [name for name in ("rich", "better_exceptions") if name not in sys.modules]
sys.modules.update(dict.fromkeys(_HIDDEN))  # type: ignore[arg-type]  # None: ``import`` raises ImportError
try:
    import structlog
except ImportError:  # the guest: see the module docstring
    structlog = None  # type: ignore[assignment]
finally:
    for _name in _HIDDEN:
        if _name in sys.modules and sys.modules[_name] is None:
            del sys.modules[_name]


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
    """Configure the logger and the stdlib root logger to write one JSON object per line.

    Logging never raises for a broken stream (see :class:`_NeverRaisingStream`). Without structlog
    the output is always JSON (``json`` is ignored).
    """
    out: Any = _NeverRaisingStream(stream if stream is not None else sys.stderr)
    lvl = getattr(logging, level.upper(), logging.INFO)
    if structlog is None:
        _Plain.configure(out, lvl)
        formatter: logging.Formatter = _PlainFormatter()
    else:
        formatter = _configure_structlog(out, lvl, json)
    root = logging.getLogger()
    root.handlers[:] = []
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(lvl)


def _configure_structlog(out: Any, lvl: int, json: bool) -> logging.Formatter:
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
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """A logger, optionally with values bound (``sandbox_id=...``)."""
    if structlog is None:
        return _Plain(bound)
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bound) if bound else log


# -- the stdlib logger (no structlog) --------------------------------------------------------------

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "pyvm_log_context", default=None
)


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _render(record: dict[str, Any]) -> str:
    return _json.dumps(record, default=repr) + "\n"


class _Plain:
    """structlog's bound-logger surface, enough for the guest agent, ttrpc and the shared modules."""

    _out: Any = _NeverRaisingStream(sys.stderr)
    _level = logging.INFO

    def __init__(self, bound: dict[str, Any]) -> None:
        self._bound = bound

    @classmethod
    def configure(cls, out: Any, level: int) -> None:
        cls._out, cls._level = out, level

    def bind(self, **values: Any) -> _Plain:
        return _Plain({**self._bound, **values})

    def _log(self, level: int, name: str, event: str, kw: dict[str, Any]) -> None:
        if level < _Plain._level:
            return
        exc_info = kw.pop("exc_info", None)
        record = {
            **(_context.get() or {}),
            **self._bound,
            **kw,
            "event": event,
            "level": name,
            "time": _now(),
        }
        if exc_info:
            if isinstance(exc_info, BaseException):
                lines = traceback.format_exception(type(exc_info), exc_info, exc_info.__traceback__)
            else:
                lines = traceback.format_exception(*sys.exc_info())
            record["exception"] = "".join(lines).rstrip("\n")
        _Plain._out.write(_render(record))
        _Plain._out.flush()

    def debug(self, event: str, **kw: Any) -> None:
        self._log(logging.DEBUG, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log(logging.INFO, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log(logging.WARNING, "warning", event, kw)

    warn = warning

    def error(self, event: str, **kw: Any) -> None:
        self._log(logging.ERROR, "error", event, kw)

    def critical(self, event: str, **kw: Any) -> None:
        self._log(logging.CRITICAL, "critical", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        kw.setdefault("exc_info", True)
        self._log(logging.ERROR, "error", event, kw)


class _PlainFormatter(logging.Formatter):
    """stdlib records (asyncio) as the same JSON objects."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "event": record.getMessage(),
            "logger": record.name,
            "level": record.levelname.lower(),
            "time": _now(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return _json.dumps(doc, default=repr)


def _plain_bind_contextvars(**values: Any) -> dict[str, Any] | None:
    """Bind ``values`` for every logger in this context; returns the previous bindings."""
    old = _context.get()
    _context.set({**(old or {}), **values})
    return old


@contextlib.contextmanager
def _plain_bound_contextvars(**values: Any) -> Iterator[None]:
    old = _plain_bind_contextvars(**values)
    try:
        yield
    finally:
        _context.set(old)


if structlog is None:
    bind_contextvars: Any = _plain_bind_contextvars
    bound_contextvars: Any = _plain_bound_contextvars
else:
    bind_contextvars = structlog.contextvars.bind_contextvars
    bound_contextvars = structlog.contextvars.bound_contextvars

__all__ = ["bind_contextvars", "bound_contextvars", "configure", "get_logger"]
