"""Every manifest in deploy/ validates offline against the Kubernetes 1.30+ schemas (strict), and the
non-Kubernetes files there parse as what they claim to be."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: oldest supported and newest known schema; strict = unknown fields are errors
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
NOT_K8S = {"kustomization.yaml", "scrape-pyvm.yml"}


def k8s_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.y*ml") if p.name not in NOT_K8S)


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_deploy_has_the_promised_manifests():
    names = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file()}
    for required in (
        "kustomization.yaml",
        "runtimeclass.yaml",
        "installer/daemonset.yaml",
        "installer/rbac.yaml",
        "installer/Containerfile",
        "examples/pod.yaml",
        "examples/pod-resize.yaml",
        "containerd/config-v2.toml",
        "containerd/config-v3.toml",
        "systemd/pyvm-monitor.service",
        "prometheus/scrape-pyvm.yml",
    ):
        assert required in names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_validates_strictly(path, version):
    docs = documents(path)
    assert docs, f"{path} holds no objects"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path} ({doc.get('kind')}) is invalid for Kubernetes {version}: {exc}")


def test_kustomization_lists_existing_files_only():
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    for res in kust["resources"]:
        assert (DEPLOY / res).is_file(), res
    listed = {str((DEPLOY / r).resolve()) for r in kust["resources"]}
    installable = {str(p.resolve()) for p in k8s_files() if "examples" not in p.parts}
    assert installable <= listed, "a manifest outside examples/ is not in the kustomization"


def test_runtime_class_and_daemonset_agree():
    (rc,) = documents(DEPLOY / "runtimeclass.yaml")
    assert rc["handler"] == "pyvm"
    assert rc["overhead"]["podFixed"]["memory"]
    assert rc["scheduling"]["nodeSelector"] == {"pyvm.io/runtime": "true"}
    rbac = {d["kind"]: d for d in documents(DEPLOY / "installer" / "rbac.yaml")}
    (ds,) = documents(DEPLOY / "installer" / "daemonset.yaml")
    spec = ds["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == rbac["ServiceAccount"]["metadata"]["name"]
    assert spec["hostPID"] is True  # nsenter --target 1
    rules = {
        (tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in rbac["ClusterRole"]["rules"]
    }
    assert {"get", "patch"} <= rules[(("",), ("nodes",))]
    assert {"get", "create"} <= rules[(("node.k8s.io",), ("runtimeclasses",))]


def test_installer_creates_the_runtime_class_of_the_manifest():
    """The DaemonSet's installer creates the RuntimeClass itself: same handler, overhead, scheduling."""
    from shim.install import daemonset

    (rc,) = documents(DEPLOY / "runtimeclass.yaml")
    body = daemonset.runtime_class_body()
    for key in ("apiVersion", "kind", "handler", "overhead", "scheduling"):
        assert body[key] == rc[key], key
    assert body["metadata"] == rc["metadata"]


def test_example_pods_use_the_runtime_class_with_memory_limits():
    for name in ("pod.yaml", "pod-resize.yaml"):
        (pod,) = documents(DEPLOY / "examples" / name)
        assert pod["spec"]["runtimeClassName"] == "pyvm"
        for c in pod["spec"]["containers"]:
            assert c["resources"]["limits"]["memory"]
    (resize,) = documents(DEPLOY / "examples" / "pod-resize.yaml")
    policies = {
        p["resourceName"]: p["restartPolicy"] for p in resize["spec"]["containers"][0]["resizePolicy"]
    }
    assert policies["memory"] == "NotRequired"


@pytest.mark.parametrize(
    ("name", "version", "plugin"),
    [
        ("config-v2.toml", 2, "io.containerd.grpc.v1.cri"),
        ("config-v3.toml", 3, "io.containerd.cri.v1.runtime"),
    ],
)
def test_containerd_snippets_match_what_pyvm_install_writes(name, version, plugin):
    from shim.install import containerd_config as cc

    snippet = tomllib.loads((DEPLOY / "containerd" / name).read_text())
    assert snippet["version"] == version
    doc = cc.new_document(version)
    cc.apply(doc, version, cc.RuntimeEntry(config_path="/etc/pyvm/configuration.toml"), "new")
    assert tomllib.loads(cc.dumps(doc)) == snippet
    assert (
        snippet["plugins"][plugin]["containerd"]["runtimes"]["pyvm"]["runtime_type"]
        == "io.containerd.pyvm.v2"
    )


def test_monitor_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment]
    unit.read(DEPLOY / "systemd" / "pyvm-monitor.service")
    assert unit["Service"]["ExecStart"] == "/usr/local/bin/pyvm monitor --listen 127.0.0.1:8090"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_prometheus_scrape_fragment():
    path = DEPLOY / "prometheus" / "scrape-pyvm.yml"
    cfg = yaml.safe_load(path.read_text())
    (job,) = cfg["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8090"]
    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package (hack/setup.sh) ships it
        res = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
