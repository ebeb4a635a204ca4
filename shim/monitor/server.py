"""The monitor's HTTP endpoint and the scrape fan-out behind ``/metrics``.

Every ``GET /metrics`` rediscovers the sandboxes (a directory scan), scrapes all their sockets
concurrently — each bounded by ``scrape_timeout`` so one hung shim costs at most that long and is
counted as a failure — and returns the monitor's own metrics followed by the merged, relabeled
shims' metrics. Nothing runs between scrapes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shim.log import get_logger
from shim.metrics import CONTENT_TYPE, MonitorMetrics
from shim.metrics_server import Request, answer_one_request, write_response
from shim.monitor.discovery import SandboxTarget, discover
from shim.monitor.relabel import Merger
from shim.monitor.scrape import FailureReason, ScrapeFailure, fetch_metrics

_log = get_logger("shim.monitor")

DEFAULT_SCRAPE_TIMEOUT = 2.0
DEFAULT_CONCURRENCY = 32
GZIP_MIN_BYTES = 1024

INDEX = b"""pyvm monitor
/metrics    Prometheus metrics of every pyvm sandbox on this node (sandbox_id, cri_* labels);
            ?filter_family=pyvm_memory_,pyvm_guest_ keeps only families with those prefixes
/sandboxes  the sandboxes found, as JSON
/healthz    200 ok
"""


@dataclass(frozen=True)
class ScrapeResult:
    target: SandboxTarget
    body: bytes | None
    error: ScrapeFailure | None
    seconds: float


class Monitor:
    """Discovery + concurrent scrape + merge. One per ``pyvm monitor`` process."""

    def __init__(
        self,
        run_root: Path | None = None,
        *,
        scrape_timeout: float = DEFAULT_SCRAPE_TIMEOUT,
        concurrency: int = DEFAULT_CONCURRENCY,
        metrics: MonitorMetrics | None = None,
    ) -> None:
        self.run_root = run_root
        self.scrape_timeout = scrape_timeout
        self.metrics = metrics if metrics is not None else MonitorMetrics()
        self._sem = asyncio.Semaphore(concurrency)

    def sandboxes(self) -> list[SandboxTarget]:
        return discover(self.run_root)

    async def _scrape_one(self, target: SandboxTarget, time_limit: float) -> ScrapeResult:
        async with self._sem:
            t0 = time.monotonic()
            try:
                body = await fetch_metrics(target.metrics_sock, time_limit=time_limit)
            except ScrapeFailure as exc:
                return ScrapeResult(target, None, exc, time.monotonic() - t0)
            return ScrapeResult(target, body, None, time.monotonic() - t0)

    def _failed(self, target: SandboxTarget, reason: FailureReason, message: str) -> None:
        self.metrics.scrape_failures.labels(reason.value).inc()
        _log.warning("shim scrape failed", sandbox_id=target.sandbox_id, reason=reason.value, error=message)

    async def collect(self, family_prefixes: Sequence[str] = (), scraper_limit: float | None = None) -> bytes:
        """The full ``/metrics`` body. Never raises but ``CancelledError``.

        ``family_prefixes`` keeps only the shims' families starting with one of them (kata-monitor's
        ``?filter_family=``); the monitor's own metrics are always included. ``scraper_limit`` is
        how long our own scraper waits (Prometheus sends ``X-Prometheus-Scrape-Timeout-Seconds``):
        shims get at most 80 % of it, so a hung shim costs its own samples, not the whole scrape.
        """
        limit = self.scrape_timeout
        if scraper_limit is not None and scraper_limit > 0:
            limit = min(limit, max(0.1, scraper_limit * 0.8))
        targets = self.sandboxes()
        self.metrics.scrapes.inc()
        self.metrics.running_shims.set(len(targets))
        results = await asyncio.gather(*(self._scrape_one(t, limit) for t in targets))
        merger = Merger(family_prefixes)
        for res in results:
            self.metrics.scrape_duration.observe(res.seconds)
            if res.error is not None:
                self._failed(res.target, res.error.reason, str(res.error))
                continue
            assert res.body is not None
            try:
                merger.add(res.body.decode("utf-8"), res.target.labels())
            except (UnicodeDecodeError, ValueError) as exc:
                self._failed(res.target, FailureReason.PROTOCOL, str(exc))
        # own metrics last-updated above, rendered first
        return self.metrics.render() + merger.render()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer_one_request(reader, writer, self._respond, log=_log, server="monitor")

    async def _respond(self, req: Request, writer: asyncio.StreamWriter) -> None:
        if req.method not in ("GET", "HEAD"):
            await write_response(writer, 405, b"GET only\n", headers={"Allow": "GET, HEAD"})
            return
        head_only = req.method == "HEAD"
        if req.path == "/metrics":
            prefixes = [p for v in req.query.get("filter_family", []) for p in v.split(",") if p]
            try:
                scraper_limit = float(req.headers.get("x-prometheus-scrape-timeout-seconds", ""))
            except ValueError:
                scraper_limit = None
            body = await self.collect(prefixes, scraper_limit)
            headers = {}
            if len(body) >= GZIP_MIN_BYTES and "gzip" in req.headers.get("accept-encoding", ""):
                body = gzip.compress(body, compresslevel=1)
                headers["Content-Encoding"] = "gzip"
            await write_response(
                writer, 200, body, content_type=CONTENT_TYPE, headers=headers, head_only=head_only
            )
        elif req.path == "/sandboxes":
            body = json.dumps([t.as_json() for t in self.sandboxes()], indent=1).encode() + b"\n"
            await write_response(writer, 200, body, content_type="application/json", head_only=head_only)
        elif req.path == "/healthz":
            await write_response(writer, 200, b"ok\n", head_only=head_only)
        elif req.path == "/":
            await write_response(writer, 200, INDEX, head_only=head_only)
        else:
            await write_response(writer, 404, b"not found; see /\n", head_only=head_only)

    async def start(self, host: str, port: int) -> asyncio.Server:
        """Listen on ``host:port`` (port 0: any free port; see ``server.sockets``)."""
        return await asyncio.start_server(self.handle, host, port, reuse_address=True)


def parse_listen(addr: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces). Raises ``ValueError``."""
    host, sep, port_s = addr.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError(f"listen address {addr!r} is not HOST:PORT")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port


async def run_monitor(
    host: str,
    port: int,
    *,
    run_root: Path | None = None,
    scrape_timeout: float = DEFAULT_SCRAPE_TIMEOUT,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or forever). Raises ``OSError`` if the address cannot be bound."""
    monitor = Monitor(run_root, scrape_timeout=scrape_timeout)
    server = await monitor.start(host, port)
    bound = [s.getsockname()[:2] for s in server.sockets]
    _log.info(
        "pyvm monitor listening", addresses=[f"{h}:{p}" for h, p in bound], run_root=str(run_root or "")
    )
    try:
        if stop is None:
            await asyncio.Future()
        else:
            await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


__all__ = ["Monitor", "ScrapeResult", "parse_listen", "run_monitor"]
