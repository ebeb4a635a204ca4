"""Fetch one shim's ``/metrics`` over its unix socket, bounded in time and size."""

from __future__ import annotations

import asyncio
import enum
from pathlib import Path

MAX_BODY = 8 << 20


class FailureReason(enum.StrEnum):
    TIMEOUT = "timeout"  # no complete answer in time: a hung shim
    CONNECT = "connect"  # socket refused or vanished: a shim that died without cleaning up
    PROTOCOL = "protocol"  # answered, but not with 200 and a sane body


class ScrapeFailure(Exception):
    """One shim could not be scraped; ``reason`` is the label value counted by the monitor."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


async def fetch_metrics(sock: Path, *, time_limit: float, max_body: int = MAX_BODY) -> bytes:
    """``GET /metrics`` over ``sock``; the body on 200.

    Raises ``ScrapeFailure`` (never anything else but ``CancelledError``). The whole exchange —
    connect, request, response — is bounded by ``time_limit`` seconds.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(time_limit):
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock))
            except OSError as exc:
                raise ScrapeFailure(FailureReason.CONNECT, f"connect {sock}: {exc}") from exc
            writer.write(
                b"GET /metrics HTTP/1.1\r\nHost: shim\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                raise ScrapeFailure(FailureReason.PROTOCOL, f"{sock}: no HTTP response head") from exc
            lines = head.decode("latin-1").split("\r\n")
            status = lines[0].split(" ", 2)
            if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
                raise ScrapeFailure(FailureReason.PROTOCOL, f"{sock}: {lines[0][:80]!r}")
            length = None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if length is not None:
                if length > max_body:
                    raise ScrapeFailure(
                        FailureReason.PROTOCOL, f"{sock}: body of {length} bytes is too large"
                    )
                body = await reader.readexactly(length)
            else:
                body = await reader.read(max_body + 1)
                if len(body) > max_body:
                    raise ScrapeFailure(FailureReason.PROTOCOL, f"{sock}: body too large")
            return body
    except TimeoutError as exc:
        raise ScrapeFailure(FailureReason.TIMEOUT, f"{sock}: no answer within {time_limit:g}s") from exc
    except (asyncio.IncompleteReadError, ValueError) as exc:
        raise ScrapeFailure(FailureReason.PROTOCOL, f"{sock}: {exc!r}") from exc
    except OSError as exc:
        raise ScrapeFailure(FailureReason.CONNECT, f"{sock}: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()  # no wait_closed(): a hung peer must not hold us here


__all__ = ["FailureReason", "ScrapeFailure", "fetch_metrics"]
