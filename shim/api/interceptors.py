"""The one envelope around every task RPC, whatever the transport (ttrpc or gRPC).

- binds ``rpc``, ``container_id`` and ``exec_id`` into the structlog context for the call;
- measures the duration, feeds it to the RPC observer (``set_observer``: the shim's metrics) by
  method and status code, and logs one line per call (debug; errors at info/error; successful polling
  calls, ``QUIET_METHODS``, are not logged);
- maps exceptions once: ``ShimError`` passes through (its code comes from ``shim.errors``' table),
  ``TimeoutError`` becomes ``DeadlineExceeded``, anything else becomes ``Internal`` with the traceback
  logged here and nowhere else. ``CancelledError`` is never caught.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from shim.errors import Code, DeadlineExceeded, Internal, ShimError, code_of
from shim.log import get_logger

log = get_logger("shim.api.rpc")

#: Read-only calls that containerd and CRI poll constantly: a success line for each would flood the
#: log FIFO (and cost more than the call); their errors are still logged.
QUIET_METHODS = frozenset({"State", "Stats", "Pids", "Connect"})

RpcObserver = Callable[[str, Code, float], None]
#: ``observer(method, code, seconds)`` after every call; one shim process serves one sandbox, so the
#: daemon sets it once (``ShimMetrics.observe_rpc``)
_observer: RpcObserver | None = None


def set_observer(observer: RpcObserver | None) -> None:
    global _observer
    _observer = observer


def _ids(request: Any) -> dict[str, str]:
    ids: dict[str, str] = {}
    if getattr(request, "id", ""):
        ids["container_id"] = request.id
    if getattr(request, "exec_id", ""):
        ids["exec_id"] = request.exec_id
    return ids


async def task_interceptor(ctx: Any, request: Any, call_next: Callable[[], Awaitable[Any]]) -> Any:
    """``ctx`` needs ``.method``; ``request`` may have ``id`` / ``exec_id`` fields."""
    start = time.monotonic()
    # Polling calls log nothing on success, so they skip the context binding (hot path); their
    # failures carry the ids explicitly. Others bind/reset by token (cheaper than bound_contextvars).
    quiet = ctx.method in QUIET_METHODS
    extra = {"rpc": ctx.method, **_ids(request)} if quiet else {}
    tokens = None if quiet else structlog.contextvars.bind_contextvars(rpc=ctx.method, **_ids(request))
    code = Code.CANCELLED
    try:
        response = await call_next()
        code = Code.OK
        if not quiet:
            log.debug("rpc", duration_ms=_ms(start))
        return response
    except ShimError as exc:
        code = code_of(exc)
        _log_failure(exc, start, extra)
        raise
    except TimeoutError as exc:
        code = Code.DEADLINE_EXCEEDED
        err = DeadlineExceeded(str(exc) or f"{ctx.method} timed out")
        _log_failure(err, start, extra)
        raise err from exc
    except Exception as exc:
        code = Code.INTERNAL
        log.exception("rpc failed unexpectedly", duration_ms=_ms(start), **extra)
        raise Internal(f"{ctx.method}: internal error: {type(exc).__name__}: {exc}") from exc
    finally:
        if tokens is not None:
            structlog.contextvars.reset_contextvars(**tokens)
        if _observer is not None:
            _observer(ctx.method, code, time.monotonic() - start)


def _ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 3)


def _log_failure(exc: ShimError, start: float, extra: dict[str, str]) -> None:
    log.info("rpc error", code=code_of(exc).name, error=str(exc), duration_ms=_ms(start), **extra)


__all__ = ["QUIET_METHODS", "RpcObserver", "set_observer", "task_interceptor"]
