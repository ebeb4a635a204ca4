"""The shim's metrics endpoint: HTTP/1.1 ``GET /metrics`` on a unix socket, and a tiny HTTP toolkit.

Each shim serves its registry on ``SandboxDir.metrics_sock`` (mode 0600). The node monitor
(``pyvm monitor``) scrapes it; anything that speaks HTTP over a unix socket can too::

    curl --unix-socket /run/pyvm/sbs/<id>/metrics.sock http://shim/metrics

One request per connection (``Connection: close``): the only client is a scraper every few seconds,
so keep-alive would buy nothing and cost code. The connection envelope (``answer_one_request``) and
``read_request``/``write_response`` are shared with the monitor's TCP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry

from shim.log import get_logger
from shim.metrics import CONTENT_TYPE, ShimMetrics, render

_log = get_logger("shim.metrics_server")

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0


class BadRequest(Exception):
    """The peer sent something that is not a small HTTP/1.x request."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # lower-case names


async def read_request(reader: asyncio.StreamReader, *, time_limit: float = REQUEST_TIMEOUT) -> Request:
    """Read one request head (no body). Raises ``BadRequest``, ``TimeoutError`` or ``ConnectionError``."""
    try:
        async with asyncio.timeout(time_limit):
            head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise ConnectionError("peer closed before sending a request") from exc
    except asyncio.LimitOverrunError as exc:
        raise BadRequest("request head too large") from exc
    if len(head) > MAX_REQUEST_HEAD:
        raise BadRequest("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"bad header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    url = urlsplit(parts[1])
    return Request(parts[0], url.path or "/", parse_qs(url.query), headers)


async def write_response(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: Mapping[str, str] | None = None,
    head_only: bool = False,
) -> None:
    reason = HTTPStatus(status).phrase
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    await writer.drain()


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


Respond = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


async def answer_one_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, respond: Respond, *, log: Any, server: str
) -> None:
    """The envelope of one connection: read a request (400 if it is not one), let ``respond`` answer
    it, close the connection. A peer that goes away is not an error; anything else ``respond`` raises
    is logged (``<server> request failed`` on ``log``) and not re-raised. Raises only ``CancelledError``.
    """
    try:
        try:
            req = await read_request(reader)
        except (BadRequest, TimeoutError) as exc:
            await write_response(writer, 400, f"{exc}\n".encode())
            return
        await respond(req, writer)
    except ConnectionError:
        pass
    except Exception as exc:
        log.error(f"{server} request failed", error=repr(exc))
    finally:
        await close_writer(writer)


class MetricsServer:
    """A running endpoint. ``await close()`` stops it and removes the socket file (idempotent)."""

    def __init__(
        self, server: asyncio.Server, sock_path: Path, source: ShimMetrics | CollectorRegistry
    ) -> None:
        self._server = server
        self.sock_path = sock_path
        self._source = source

    async def close(self) -> None:
        if self._server.is_serving():
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        await self._server.wait_closed()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _render(source: ShimMetrics | CollectorRegistry) -> bytes:
    if isinstance(source, ShimMetrics):
        await source.refresh()
        return source.render()
    return render(source)


async def serve_metrics(sock_path: Path | str, source: ShimMetrics | CollectorRegistry) -> MetricsServer:
    """Serve ``GET /metrics`` on a unix socket at ``sock_path`` (mode 0600) until closed.

    ``source`` is the shim's ``ShimMetrics`` (its guest stats are refreshed, bounded by its
    ``guest_timeout``, before each render) or any registry. A stale socket file is replaced. The
    socket is created with the process umask and chmod'ed to 0600 right after; the sandbox directory
    (0700) covers that instant. Raises ``OSError`` if the socket cannot be bound.
    """
    path = Path(sock_path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def respond(req: Request, writer: asyncio.StreamWriter) -> None:
        if req.path != "/metrics":
            await write_response(writer, 404, b"only /metrics here\n")
            return
        if req.method not in ("GET", "HEAD"):
            await write_response(writer, 405, b"GET only\n", headers={"Allow": "GET, HEAD"})
            return
        body = await _render(source)
        await write_response(writer, 200, body, content_type=CONTENT_TYPE, head_only=req.method == "HEAD")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer_one_request(reader, writer, respond, log=_log, server="metrics")

    server = await asyncio.start_unix_server(handle, path=os.fspath(path))
    try:
        os.chmod(path, 0o600)
    except OSError:
        server.close()
        await server.wait_closed()
        raise
    return MetricsServer(server, path, source)


__all__ = [
    "BadRequest",
    "MetricsServer",
    "Request",
    "Respond",
    "answer_one_request",
    "close_writer",
    "read_request",
    "serve_metrics",
    "write_response",
]
