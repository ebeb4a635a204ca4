"""Naming rules, enforced on every metric the shim and the monitor declare."""

from __future__ import annotations

import re

import pytest
from metrics_fakes import FakeSandboxSource, populate_running_pod

from shim.metrics import MonitorMetrics, ShimMetrics

# unitless gauges must say what they count; everything else carries a base unit
UNIT_SUFFIXES = ("_bytes", "_seconds")
COUNT_SUFFIXES = ("_threads", "_open_fds", "_info", "_load_average", "_running_shims")
NAME_RE = re.compile(r"pyvm_[a-z][a-z0-9_]*[a-z0-9]")
LABEL_RE = re.compile(r"[a-z][a-z0-9_]*")


async def _families():
    m = ShimMetrics()
    m.set_sandbox_source(FakeSandboxSource())
    populate_running_pod(m)
    m.hotplug_failed("grow", "acpi", "timeout")
    m.event_published(ok=False)
    await m.refresh()
    return list(m.registry.collect()) + list(MonitorMetrics().registry.collect())


async def test_every_metric_follows_the_conventions():
    fams = await _families()
    assert len(fams) >= 30
    seen = set()
    for fam in fams:
        full = fam.name + "_total" if fam.type == "counter" else fam.name
        assert full not in seen, f"{full} declared twice"
        seen.add(full)
        assert NAME_RE.fullmatch(full), full
        assert fam.documentation and "\n" not in fam.documentation, f"{full}: one-line help required"
        assert fam.documentation.endswith("."), f"{full}: help should be a sentence"
        if fam.type == "counter":
            assert full.endswith("_total"), full
            base = fam.name
        else:
            assert not full.endswith("_total"), f"{full}: only counters end in _total"
            base = full
        assert "milliseconds" not in full and "_kb" not in full and "_mb" not in full, (
            f"{full}: base units only"
        )
        if fam.type == "histogram":
            assert full.endswith("_seconds"), f"{full}: durations are seconds"
        elif fam.type == "gauge":
            assert base.endswith(UNIT_SUFFIXES + COUNT_SUFFIXES), f"{full}: unit suffix missing"
        for s in fam.samples:
            for label in s.labels:
                assert LABEL_RE.fullmatch(label), f"{full}: label {label!r}"
                assert label not in ("sandbox_id", "cri_uid", "cri_name", "cri_namespace"), (
                    f"{full}: {label} is added by the monitor"
                )


@pytest.mark.parametrize("name", ["pyvm_shim_cpu_seconds_total", "pyvm_hypervisor_cpu_seconds_total"])
async def test_cpu_counters_are_seconds_total(name):
    m = ShimMetrics()
    m.set_sandbox_source(FakeSandboxSource())
    assert name in m.render().decode()
