"""deploy/grafana and deploy/monitor: valid documents that use only metrics we declare."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from metrics_fakes import FakeSandboxSource, populate_running_pod

from shim.metrics import MonitorMetrics, ShimMetrics

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy" / "grafana" / "pyvm-dashboard.json"
DAEMONSET = ROOT / "deploy" / "monitor" / "daemonset.yaml"


async def declared_sample_names() -> set[str]:
    m = ShimMetrics()
    m.set_sandbox_source(FakeSandboxSource())
    populate_running_pod(m)
    m.hotplug_failed("grow", "acpi", "timeout")
    m.observe_hotplug("grow", "acpi", 0.1, 1)
    m.guest_stats_failures.labels("timeout").inc()  # counted only once it happens
    await m.refresh()
    names = set()
    for reg in (m.registry, MonitorMetrics().registry):
        for fam in reg.collect():
            names |= {s.name for s in fam.samples}
    return names


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])] + [
        v["query"]["query"] for v in doc["templating"]["list"] if v["type"] == "query"
    ]


async def test_dashboard_uses_only_declared_metrics():
    declared = await declared_sample_names()
    used = {n for e in dashboard_exprs() for n in re.findall(r"\bpyvm_[a-z0-9_]+", e)}
    assert used, "no pyvm metrics in the dashboard?"
    assert used <= declared, sorted(used - declared)


def test_dashboard_is_grafana_shaped():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 36
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for topic in ("pod start latency", "memory per pod", "hotplug", "shim errors"):
        assert topic in titles, topic
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        for t in p.get("targets", []):
            assert t["refId"] and t["expr"].count("(") == t["expr"].count(")")


def test_monitor_daemonset_validates_for_k8s_1_30():
    import kubernetes_validate

    doc = yaml.safe_load(DAEMONSET.read_text())
    kubernetes_validate.validate(doc, "1.30.0", strict=True)
    container = doc["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "monitor"
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == "/run/pyvm" and mount["readOnly"] is True
