"""The per-shim endpoint: HTTP/1.1 over a 0600 unix socket; its output passes promtool."""

from __future__ import annotations

import asyncio
import stat
import time

from metrics_fakes import FakeSandboxSource, populate_running_pod, promtool_check

from shim.metrics import ShimMetrics
from shim.metrics_server import serve_metrics
from shim.monitor.scrape import fetch_metrics


async def raw_request(sock, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_serves_metrics_on_a_private_socket(run_root):
    sock = run_root / "metrics.sock"
    m = ShimMetrics()
    m.set_sandbox_source(FakeSandboxSource())
    populate_running_pod(m)
    async with await serve_metrics(sock, m) as server:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        resp = await raw_request(sock, b"GET /metrics HTTP/1.1\r\nHost: shim\r\n\r\n")
        head, _, body = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"Content-Type: text/plain; version=0.0.4" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert b'pyvm_guest_meminfo_bytes{field="MemTotal"}' in body  # refreshed before render
        assert b"pyvm_hypervisor_info{" in body
        assert server.sock_path == sock
    assert not sock.exists()


async def test_single_shim_output_passes_promtool(run_root):
    sock = run_root / "metrics.sock"
    m = ShimMetrics()
    m.set_sandbox_source(FakeSandboxSource())
    populate_running_pod(m)
    m.hotplug_failed("grow", "acpi", "qmp_error")
    async with await serve_metrics(sock, m):
        body = await fetch_metrics(sock, time_limit=5)
    res = promtool_check(body)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res


async def test_other_paths_and_methods(run_root):
    sock = run_root / "metrics.sock"
    async with await serve_metrics(sock, ShimMetrics()):
        assert (await raw_request(sock, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await raw_request(sock, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await raw_request(sock, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        head = await raw_request(sock, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")


async def test_replaces_a_stale_socket_and_close_is_idempotent(run_root):
    sock = run_root / "metrics.sock"
    first = await serve_metrics(sock, ShimMetrics())
    await first.close()
    sock.write_bytes(b"")  # leftover from a crashed shim
    server = await serve_metrics(sock, ShimMetrics())
    assert stat.S_ISSOCK(sock.stat().st_mode)
    await server.close()
    await server.close()


async def test_hung_agent_does_not_hang_the_endpoint(run_root):
    sock = run_root / "metrics.sock"
    m = ShimMetrics(guest_timeout=0.1)
    m.set_sandbox_source(FakeSandboxSource(guest_delay=3600))
    async with await serve_metrics(sock, m):
        t0 = time.monotonic()
        body = await fetch_metrics(sock, time_limit=5)
        assert time.monotonic() - t0 < 1.0
    await m.aclose()
    assert b"pyvm_memory_configured_bytes" in body
    assert b'pyvm_guest_stats_failures_total{reason="timeout"} 1.0' in body
    assert b"pyvm_guest_meminfo_bytes{" not in body
