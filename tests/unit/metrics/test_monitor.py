"""`pyvm monitor`: discovery, relabeling, concurrency with a hung shim, its HTTP endpoints."""

from __future__ import annotations

import asyncio
import gzip
import json
import time

import pytest
from metrics_fakes import (
    FakeSandboxSource,
    HungSocket,
    cri_annotations,
    promtool_check,
    sandbox_id,
    start_fake_sandbox,
)
from prometheus_client.parser import text_string_to_metric_families

from shim.cli.monitor import add_arguments
from shim.monitor.discovery import discover, read_cri_annotations
from shim.monitor.relabel import Merger, format_value
from shim.monitor.server import Monitor, parse_listen

SHIM_TEXT = """\
# HELP pyvm_x_bytes An x.
# TYPE pyvm_x_bytes gauge
pyvm_x_bytes{field="a"} 1.0
pyvm_x_bytes{field="b",sandbox_id="spoofed"} 2.5
# HELP pyvm_y_total A y.
# TYPE pyvm_y_total counter
pyvm_y_total 3.0
# HELP pyvm_dur_seconds A duration.
# TYPE pyvm_dur_seconds histogram
pyvm_dur_seconds_bucket{le="1.0"} 1.0
pyvm_dur_seconds_bucket{le="+Inf"} 2.0
pyvm_dur_seconds_count 2.0
pyvm_dur_seconds_sum 7.5
# HELP pyvm_monitor_running_shims A shim may not speak for the monitor.
# TYPE pyvm_monitor_running_shims gauge
pyvm_monitor_running_shims 99.0
"""


def parse(body: bytes) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(body.decode())}


def series(body: bytes, name: str) -> list[dict[str, str]]:
    return [
        dict(s.labels) | {"__value__": s.value} for fam in parse(body).values() for s in fam if s.name == name
    ]


# -- discovery --------------------------------------------------------------------------------------


def test_discovery_reads_sockets_and_annotations(run_root):
    import socket

    sbs = run_root / "sbs"
    for sid in ("aaa", "bbb", "ccc", "no-socket"):
        (sbs / sid).mkdir(parents=True)
    socks = []
    for sid in ("aaa", "bbb", "ccc"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(sbs / sid / "metrics.sock"))
        socks.append(s)
    ann = cri_annotations("web", "prod", uid="u-1")
    (sbs / "aaa" / "state.json").write_text(json.dumps({"annotations": ann}))
    (sbs / "bbb" / "state.json").write_text(json.dumps({"version": 1, "sandbox": {"annotations": ann}}))
    (sbs / "ccc" / "state.json").write_text("{truncated")
    (sbs / "no-socket" / "metrics.sock").write_text("not a socket")
    (sbs / "..bad").mkdir()
    try:
        found = discover(run_root)
    finally:
        for s in socks:
            s.close()
    assert [t.sandbox_id for t in found] == ["aaa", "bbb", "ccc"]
    for t in found[:2]:
        assert t.labels() == {
            "sandbox_id": t.sandbox_id,
            "cri_uid": "u-1",
            "cri_name": "web",
            "cri_namespace": "prod",
        }
    assert found[2].labels() == {"sandbox_id": "ccc"}


def test_discovery_of_a_missing_root_is_empty(tmp_path, monkeypatch):
    assert discover(tmp_path / "nope") == []
    monkeypatch.setenv("PYVM_RUN_ROOT", str(tmp_path / "nope2"))
    assert discover() == []


def test_annotations_read_defensively(tmp_path):
    p = tmp_path / "state.json"
    p.write_text(
        json.dumps(
            {"annotations": {"io.kubernetes.cri.sandbox-name": 3, "io.kubernetes.cri.sandbox-uid": "u"}}
        )
    )
    assert read_cri_annotations(p) == {"cri_uid": "u"}
    p.write_text("[1, 2]")
    assert read_cri_annotations(p) == {}
    assert read_cri_annotations(tmp_path / "missing.json") == {}


# -- relabeling -------------------------------------------------------------------------------------


def test_relabel_adds_labels_and_keeps_help_type_once():
    merger = Merger()
    a = {"sandbox_id": "sb-a", "cri_uid": "u-a", "cri_name": 'we"ird\\name', "cri_namespace": "ns"}
    b = {"sandbox_id": "sb-b"}
    assert merger.add(SHIM_TEXT, a) == 7
    assert merger.add(SHIM_TEXT, b) == 7
    body = merger.render()
    text = body.decode()
    assert text.count("# TYPE pyvm_x_bytes gauge") == 1
    assert text.count("# HELP pyvm_y_total A y.") == 1
    assert text.count("# TYPE pyvm_y_total counter") == 1
    assert "pyvm_monitor_running_shims" not in text
    xs = series(body, "pyvm_x_bytes")
    assert {"field": "a", "__value__": 1.0, **a} in xs
    assert {"field": "b", "__value__": 2.5, **b} in xs  # the shim's own sandbox_id loses
    assert len(xs) == 4
    buckets = series(body, "pyvm_dur_seconds_bucket")
    assert {"le": "+Inf", "__value__": 2.0, **a} in buckets
    assert series(body, "pyvm_y_total") == [{"__value__": 3.0, **a}, {"__value__": 3.0, **b}]
    res = promtool_check(body)
    assert res.returncode == 0, res


def test_relabel_rejects_garbage_atomically_and_drops_type_conflicts():
    merger = Merger()
    with pytest.raises(ValueError):
        merger.add("pyvm_ok 1\nthis is { not exposition\n", {"sandbox_id": "x"})
    assert merger.render() == b""
    merger.add(SHIM_TEXT, {"sandbox_id": "a"})
    merger.add(
        "# HELP pyvm_x_bytes An x.\n# TYPE pyvm_x_bytes untyped\npyvm_x_bytes 1\n", {"sandbox_id": "b"}
    )
    assert len(series(merger.render(), "pyvm_x_bytes")) == 2


def test_family_filter():
    merger = Merger(["pyvm_y", "pyvm_dur_"])
    merger.add(SHIM_TEXT, {"sandbox_id": "a"})
    assert set(parse(merger.render())) == {"pyvm_y", "pyvm_dur_seconds"}


def test_format_value():
    assert format_value(3.0) == "3"
    assert format_value(0.25) == "0.25"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("nan")) == "NaN"
    assert format_value(1.34217728e18) == "1.34217728e+18"


# -- the monitor over real shim endpoints -----------------------------------------------------------


async def test_monitor_output_passes_promtool_and_carries_cri_labels(run_root):
    sbs = [
        await start_fake_sandbox(run_root, sandbox_id(i), annotations=cri_annotations(f"pod-{i}", "team-a"))
        for i in range(3)
    ]
    try:
        body = await Monitor(run_root).collect()
    finally:
        for s in sbs:
            await s.close()
    res = promtool_check(body)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res
    fams = parse(body)
    assert fams["pyvm_monitor_running_shims"][0].value == 3
    mem = series(body, "pyvm_memory_configured_bytes")
    assert sorted(m["sandbox_id"] for m in mem) == sorted(s.sandbox_id for s in sbs)
    for s in sbs:
        (row,) = [m for m in mem if m["sandbox_id"] == s.sandbox_id]
        assert row["cri_uid"] == s.cri["cri_uid"]
        assert row["cri_name"] == s.cri["cri_name"]
        assert row["cri_namespace"] == "team-a"
    # every shim sample got the sandbox label
    for name, samples in fams.items():
        if not name.startswith("pyvm_monitor_"):
            assert all("sandbox_id" in smp.labels for smp in samples), name


async def test_hung_shim_is_timed_out_and_counted(run_root):
    good = await start_fake_sandbox(run_root, "good", annotations=cri_annotations("good"))
    hung = await HungSocket().start(run_root / "sbs" / "hung" / "metrics.sock")
    dead = run_root / "sbs" / "dead"
    dead.mkdir(parents=True)
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead / "metrics.sock"))  # bound, never listening: connection refused
    s.close()
    monitor = Monitor(run_root, scrape_timeout=0.3)
    try:
        t0 = time.monotonic()
        body = await monitor.collect()
        elapsed = time.monotonic() - t0
    finally:
        await good.close()
        await hung.close()
    assert hung.accepted == 1
    assert elapsed < 1.5, elapsed
    fams = parse(body)
    failures = {s.labels["reason"]: s.value for s in fams["pyvm_monitor_scrape_failures"]}
    assert failures == {"timeout": 1, "connect": 1, "protocol": 0}
    assert fams["pyvm_monitor_running_shims"][0].value == 3
    assert {m["sandbox_id"] for m in series(body, "pyvm_memory_configured_bytes")} == {"good"}
    assert fams["pyvm_monitor_scrape_duration_seconds"][-2].value == 3  # _count: every attempt timed


async def test_prometheus_scrape_timeout_header_bounds_the_fan_out(run_root):
    hung = await HungSocket().start(run_root / "sbs" / "hung" / "metrics.sock")
    monitor = Monitor(run_root, scrape_timeout=30)
    server = await monitor.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        t0 = time.monotonic()
        head, body = await http_get(port, "/metrics", "X-Prometheus-Scrape-Timeout-Seconds: 0.5\r\n")
        assert time.monotonic() - t0 < 2
        assert head.startswith(b"HTTP/1.1 200")
        assert b'pyvm_monitor_scrape_failures_total{reason="timeout"} 1.0' in body
    finally:
        server.close()
        await server.wait_closed()
        await hung.close()


async def test_many_hung_shims_are_scraped_concurrently(run_root):
    hung = [await HungSocket().start(run_root / "sbs" / f"h{i}" / "metrics.sock") for i in range(8)]
    try:
        t0 = time.monotonic()
        await Monitor(run_root, scrape_timeout=0.3).collect()
        assert time.monotonic() - t0 < 1.5
    finally:
        for h in hung:
            await h.close()


async def http_get(port: int, path: str, headers: str = "") -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


async def test_http_endpoints(run_root):
    sb = await start_fake_sandbox(run_root, sandbox_id(1), annotations=cri_annotations("web", "prod"))
    monitor = Monitor(run_root)
    server = await monitor.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        head, body = await http_get(port, "/sandboxes")
        assert head.startswith(b"HTTP/1.1 200") and b"application/json" in head
        (entry,) = json.loads(body)
        assert entry["sandbox_id"] == sb.sandbox_id and entry["cri_name"] == "web"
        assert entry["cri_uid"] == sb.cri["cri_uid"] and entry["cri_namespace"] == "prod"

        head, body = await http_get(port, "/metrics", "Accept-Encoding: gzip\r\n")
        assert b"Content-Encoding: gzip" in head
        text = gzip.decompress(body)
        assert b"pyvm_hypervisor_info{" in text

        _, body = await http_get(port, "/metrics?filter_family=pyvm_memory_")
        names = set(parse(body))
        assert "pyvm_memory_max_bytes" in names and "pyvm_monitor_scrapes" in names
        assert not any(n.startswith(("pyvm_guest", "pyvm_shim")) for n in names)

        assert (await http_get(port, "/healthz"))[0].startswith(b"HTTP/1.1 200")
        assert (await http_get(port, "/nope"))[0].startswith(b"HTTP/1.1 404")
    finally:
        server.close()
        await server.wait_closed()
        await sb.close()


async def test_a_source_without_vm_yet_is_still_listed(run_root):
    sb = await start_fake_sandbox(
        run_root,
        "booting",
        annotations=None,
        source=FakeSandboxSource(qemu=None, virtiofsd=None),
        populate=False,
    )
    try:
        body = await Monitor(run_root).collect()
    finally:
        await sb.close()
    assert {m["sandbox_id"] for m in series(body, "pyvm_shim_threads")} == {"booting"}
    assert not any(k.startswith("cri_") for m in series(body, "pyvm_shim_threads") for k in m)


def test_listen_address_parsing_and_cli_defaults():
    import argparse

    assert parse_listen("127.0.0.1:8090") == ("127.0.0.1", 8090)
    assert parse_listen(":9") == ("0.0.0.0", 9)
    assert parse_listen("[::1]:8090") == ("::1", 8090)
    for bad in ("8090", "host:", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    assert args.listen == "127.0.0.1:8090" and args.scrape_timeout == 2.0 and args.run_root is None
