"""Each scrape-time collector against a fake sandbox source and against this process's /proc."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from metrics_fakes import FakeSandboxSource, MiB, populate_running_pod
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shim.errors import Code
from shim.metrics import ShimMetrics, read_proc_stats, read_pss


def samples(metrics: ShimMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: ShimMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def names(metrics: ShimMetrics) -> set[str]:
    return {name for name, _ in samples(metrics)}


def test_read_proc_stats_of_this_process():
    st = read_proc_stats(os.getpid())
    assert st is not None
    assert st.threads >= 1
    assert 1 * MiB < st.rss_bytes < 4096 * MiB
    assert st.open_fds is not None and st.open_fds >= 3
    # CPU time only grows
    t0 = st.cpu_seconds
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    st2 = read_proc_stats("self")
    assert st2 is not None and st2.cpu_seconds >= t0


def test_read_proc_stats_of_a_gone_process_is_none():
    assert read_proc_stats(2**22 + 12345) is None
    assert read_pss(2**22 + 12345) is None


def test_read_pss_of_this_process():
    pss = read_pss(os.getpid())
    assert pss is not None
    assert 0 < pss.pss_bytes <= read_proc_stats().rss_bytes + 4 * MiB
    assert 0 <= pss.pss_shmem_bytes <= pss.pss_bytes


def test_shim_process_collector_reads_own_proc():
    m = ShimMetrics()
    rss = value(m, "pyvm_shim_resident_memory_bytes")
    assert rss is not None and rss > 1 * MiB
    assert value(m, "pyvm_shim_threads") >= 1
    assert value(m, "pyvm_shim_open_fds") >= 3
    assert value(m, "pyvm_shim_cpu_seconds_total") > 0


def test_no_source_means_no_sandbox_metrics():
    m = ShimMetrics()
    got = names(m)
    assert not any(
        n.startswith(("pyvm_hypervisor_info", "pyvm_memory_configured", "pyvm_guest_meminfo")) for n in got
    )
    assert "pyvm_pod_overhead_memory_bytes" not in got


def test_hypervisor_collector_labels_and_proc_numbers():
    src = FakeSandboxSource(accel="kvm", version="8.2.2")
    m = ShimMetrics()
    m.set_sandbox_source(src)
    assert value(m, "pyvm_hypervisor_info", accelerator="kvm", qemu_version="8.2.2") == 1
    for process in ("qemu", "virtiofsd"):  # both are this process in the fake
        assert value(m, "pyvm_hypervisor_resident_memory_bytes", process=process) > 1 * MiB
        assert value(m, "pyvm_hypervisor_threads", process=process) >= 1
        assert value(m, "pyvm_hypervisor_cpu_seconds_total", process=process) > 0


def test_hypervisor_collector_skips_dead_processes():
    m = ShimMetrics()
    m.set_sandbox_source(FakeSandboxSource(qemu=None, virtiofsd=2**22 + 7))
    got = names(m)
    assert "pyvm_hypervisor_resident_memory_bytes" not in got
    assert value(m, "pyvm_hypervisor_info", accelerator="tcg", qemu_version="7.2.0") == 1


def test_memory_collector_follows_the_source():
    src = FakeSandboxSource(configured_bytes=512 * MiB, max_bytes=2048 * MiB)
    m = ShimMetrics()
    m.set_sandbox_source(src)
    assert value(m, "pyvm_memory_configured_bytes") == 512 * MiB
    assert value(m, "pyvm_memory_plugged_bytes") == 0
    assert value(m, "pyvm_memory_max_bytes") == 2048 * MiB
    src.hot_add(256 * MiB, m, seconds=0.4)
    assert value(m, "pyvm_memory_plugged_bytes") == 256 * MiB
    assert value(m, "pyvm_memory_target_bytes") == 768 * MiB
    assert value(m, "pyvm_memory_hotplug_operations_total", direction="grow", mechanism="acpi") == 1
    assert value(m, "pyvm_memory_hotplug_bytes_total", direction="grow", mechanism="acpi") == 256 * MiB
    assert value(m, "pyvm_memory_hotplug_duration_seconds_count", direction="grow", mechanism="acpi") == 1
    assert (
        value(m, "pyvm_memory_hotplug_duration_seconds_bucket", direction="grow", mechanism="acpi", le="1.0")
        == 1
    )


def test_hotplug_labels_are_bounded():
    m = ShimMetrics()
    with pytest.raises(ValueError):
        m.observe_hotplug("sideways", "acpi", 1.0, 1)
    with pytest.raises(ValueError):
        m.hotplug_failed("grow", "balloon", "x")
    m.hotplug_failed("grow", "virtio-mem", "qmp_error")
    m.hotplug_failed("shrink", "virtio-mem", "Guest said: no! (errno 16)")
    assert (
        value(
            m,
            "pyvm_memory_hotplug_failures_total",
            direction="grow",
            mechanism="virtio-mem",
            reason="qmp_error",
        )
        == 1
    )
    assert (
        value(
            m,
            "pyvm_memory_hotplug_failures_total",
            direction="shrink",
            mechanism="virtio-mem",
            reason="other",
        )
        == 1
    )


async def test_guest_collector_after_refresh():
    src = FakeSandboxSource(containers=["pause", "app"])
    m = ShimMetrics()
    m.set_sandbox_source(src)
    assert "pyvm_guest_meminfo_bytes" not in names(m)  # nothing fetched yet
    await m.refresh()
    assert value(m, "pyvm_guest_meminfo_bytes", field="MemTotal") == src.guest_mem_total()
    assert ("pyvm_guest_meminfo_bytes", frozenset({("field", "HugePages_Total")})) not in samples(m)
    assert value(m, "pyvm_guest_load_average", period="1m") == 0.25
    assert value(m, "pyvm_guest_load_average", period="15m") == 0.05
    assert value(m, "pyvm_guest_container_memory_usage_bytes", container_id="app") == 24 * MiB
    assert value(m, "pyvm_guest_container_memory_limit_bytes", container_id="app") == 256 * MiB
    assert value(m, "pyvm_guest_container_memory_limit_bytes", container_id="pause") is None
    assert value(m, "pyvm_guest_container_cpu_seconds_total", container_id="pause") == 0.5


async def test_slow_guest_is_bounded_and_served_later():
    src = FakeSandboxSource(guest_delay=0.5)
    m = ShimMetrics(guest_timeout=0.05)
    m.set_sandbox_source(src)
    t0 = time.monotonic()
    await m.refresh()
    assert time.monotonic() - t0 < 0.4
    assert value(m, "pyvm_guest_stats_failures_total", reason="timeout") == 1
    assert "pyvm_guest_meminfo_bytes" not in names(m)
    assert "pyvm_memory_configured_bytes" in names(m)  # the rest is served
    # the timed-out call is shared, not repeated
    await m.refresh()
    assert src.guest_calls == 1
    await asyncio.sleep(0.5)
    assert value(m, "pyvm_guest_meminfo_bytes", field="MemTotal") == src.guest_mem_total()
    await m.aclose()


async def test_stale_guest_stats_expire():
    src = FakeSandboxSource()
    m = ShimMetrics(guest_max_age=0.05)
    m.set_sandbox_source(src)
    await m.refresh()
    assert "pyvm_guest_meminfo_bytes" in names(m)
    await asyncio.sleep(0.1)
    assert "pyvm_guest_meminfo_bytes" not in names(m)


async def test_failing_provider_never_fails_the_scrape():
    class Broken(FakeSandboxSource):
        def memory_state(self):
            raise RuntimeError("policy not ready")

        def accelerator(self):
            raise RuntimeError("no qemu")

    src = Broken(guest_error=ConnectionResetError("agent gone"))
    m = ShimMetrics()
    m.set_sandbox_source(src)
    await m.refresh()
    got = names(m)
    assert "pyvm_shim_resident_memory_bytes" in got
    assert "pyvm_hypervisor_resident_memory_bytes" in got
    assert "pyvm_memory_configured_bytes" not in got
    assert "pyvm_pod_overhead_memory_bytes" not in got
    assert value(m, "pyvm_guest_stats_failures_total", reason="error") == 1


def test_pod_overhead_from_pss():
    src = FakeSandboxSource(virtiofsd=None, configured_bytes=512 * MiB)  # qemu: this process
    m = ShimMetrics()
    m.set_sandbox_source(src)
    pss = read_pss(os.getpid())
    shim = qemu = pss.pss_bytes  # one number for the pod: shim + qemu, both this process
    total = value(m, "pyvm_pod_memory_pss_bytes")
    assert total is not None and abs(total - 2 * pss.pss_bytes) < 16 * MiB
    overhead = value(m, "pyvm_pod_overhead_memory_bytes")
    # this test process has (almost) no shmem, so nearly all of its PSS is "overhead"
    assert overhead is not None and overhead >= shim + qemu - 2 * pss.pss_shmem_bytes - 8 * MiB


def test_rpc_and_event_observations():
    m = ShimMetrics()
    m.observe_rpc("Create", Code.OK, 1.2)
    m.observe_rpc("State", 5, 0.001)
    m.observe_rpc("Kill", "UNAVAILABLE", 0.001)
    m.observe_agent_rpc("CreateContainer", Code.INTERNAL, 0.2)
    m.event_published(ok=True)
    m.event_published(ok=False)
    m.observe_boot(4.0)
    m.observe_sandbox_start(6.0)
    assert value(m, "pyvm_shim_rpc_duration_seconds_count", method="Create", code="OK") == 1
    assert value(m, "pyvm_shim_rpc_duration_seconds_bucket", method="Create", code="OK", le="1.0") == 0
    assert value(m, "pyvm_shim_rpc_duration_seconds_bucket", method="Create", code="OK", le="+Inf") == 1
    # polling methods: sum and count only, in their own family
    assert value(m, "pyvm_shim_poll_rpc_duration_seconds_count", method="State", code="NOT_FOUND") == 1
    assert value(m, "pyvm_shim_rpc_duration_seconds_count", method="State", code="NOT_FOUND") is None
    assert (
        value(
            m, "pyvm_agent_rpc_duration_seconds_bucket", method="CreateContainer", code="INTERNAL", le="+Inf"
        )
        is None
    )
    assert value(m, "pyvm_shim_rpc_duration_seconds_count", method="Kill", code="UNAVAILABLE") == 1
    assert value(m, "pyvm_agent_rpc_duration_seconds_sum", method="CreateContainer", code="INTERNAL") == 0.2
    assert value(m, "pyvm_shim_events_published_total") == 1
    assert value(m, "pyvm_shim_event_publish_failures_total") == 1
    assert value(m, "pyvm_hypervisor_boot_duration_seconds_bucket", le="2.0") == 0
    assert value(m, "pyvm_hypervisor_boot_duration_seconds_bucket", le="15.0") == 1
    assert value(m, "pyvm_sandbox_start_duration_seconds_sum") == 6.0


def test_no_created_series_and_private_registry():
    m = ShimMetrics()
    populate_running_pod(m)
    text = m.render().decode()
    assert "_created" not in text
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("pyvm_shim_events_published_total") is None
    assert isinstance(m.registry, CollectorRegistry) and m.registry is not REGISTRY
