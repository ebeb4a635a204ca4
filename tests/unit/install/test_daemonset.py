"""The installer DaemonSet's logic against recorded Kubernetes API responses.

No API server can run here, so the `kubernetes` client's REST layer is cut at the HTTP level: its
urllib3 pool manager is replaced by a script of (method, path) -> (status, JSON body) and every
request is recorded, so these tests assert the exact method, path, query, content type and body the
installer sends. Unproven here: that a real API server accepts them (authn/RBAC, admission), and the
host side (nsenter + systemctl) which is replaced by a fake runner.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import urllib3
import yaml
from kubernetes import client

from shim.install import daemonset as ds

ROOT = Path(__file__).resolve().parents[3]


class FakeHTTP:
    """Stands in for urllib3.PoolManager: answers from a script, records every request."""

    def __init__(self, script: dict[tuple[str, str], list[tuple[int, dict]]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.requests: list[dict] = []

    def request(self, method, url, body=None, headers=None, **_kw):
        parts = urlsplit(url)
        self.requests.append(
            {
                "method": method,
                "path": parts.path,
                "query": parse_qs(parts.query),
                "content_type": (headers or {}).get("Content-Type"),
                "body": json.loads(body) if body else None,
            }
        )
        answers = self.script.get((method, parts.path))
        if not answers:
            raise AssertionError(f"unexpected request {method} {url}")
        status, payload = answers.pop(0) if len(answers) > 1 else answers[0]
        return urllib3.HTTPResponse(
            body=json.dumps(payload).encode(),
            status=status,
            headers={"Content-Type": "application/json"},
            preload_content=False,
        )


def status(code: int, reason: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}


NODE = {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "node-a", "labels": {ds.LABEL: "true"}}}
RC = {**ds.runtime_class_body(), "metadata": {"name": "pyvm", "resourceVersion": "1"}}


def apis(http: FakeHTTP) -> tuple[client.CoreV1Api, client.NodeV1Api]:
    conf = client.Configuration(host="https://k8s.test")
    api = client.ApiClient(conf)
    api.rest_client.pool_manager = http
    return client.CoreV1Api(api), client.NodeV1Api(api)


class FakeHost:
    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv):
        self.calls.append(list(argv))
        rc = 1 if any(word in argv for word in self.fail) else 0
        return subprocess.CompletedProcess(argv, rc, "", "Unit containerd.service not found." if rc else "")


@pytest.fixture
def node(tmp_path: Path):
    """A fake image (/opt/pyvm) and host mount (/host) with a containerd config."""
    image = tmp_path / "image"
    (image / "venv" / "bin").mkdir(parents=True)
    (image / "venv" / "bin" / "containerd-shim-pyvm-v2").write_text("#!/bin/sh\n")
    guest = image / "guest" / "x86_64"
    (guest / "abc123").mkdir(parents=True)
    (guest / "abc123" / "manifest.json").write_text('{"hash": "abc123"}')
    (guest / "current").symlink_to("abc123")
    (image / "config").mkdir()
    (image / "config" / "configuration.toml").write_text("[runtime]\n")
    host = tmp_path / "host"
    (host / "etc" / "containerd").mkdir(parents=True)
    original = b'version = 2\n# keep\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "pause:3.9"\n'
    (host / "etc" / "containerd" / "config.toml").write_bytes(original)
    settings = ds.Settings(node_name="node-a", host_root=host, image_root=image)
    return settings, original


def test_install_then_uninstall_exact_requests_and_host_effects(node):
    settings, original = node
    http = FakeHTTP(
        {
            ("PATCH", "/api/v1/nodes/node-a"): [(200, NODE)],
            ("GET", "/apis/node.k8s.io/v1/runtimeclasses/pyvm"): [(404, status(404, "NotFound"))],
            ("POST", "/apis/node.k8s.io/v1/runtimeclasses"): [(201, RC)],
            ("GET", "/api/v1/nodes"): [(200, {"kind": "NodeList", "apiVersion": "v1", "items": []})],
            ("DELETE", "/apis/node.k8s.io/v1/runtimeclasses/pyvm"): [(200, RC)],
        }
    )
    core, node_api = apis(http)
    hostrun = FakeHost()
    inst = ds.NodeInstaller(settings, core, node_api, run=hostrun)
    inst.install()

    assert [(r["method"], r["path"]) for r in http.requests] == [
        ("PATCH", "/api/v1/nodes/node-a"),
        ("GET", "/apis/node.k8s.io/v1/runtimeclasses/pyvm"),
        ("POST", "/apis/node.k8s.io/v1/runtimeclasses"),
    ]
    label, _, create = http.requests
    assert label["content_type"] == "application/merge-patch+json"
    assert label["body"] == {"metadata": {"labels": {"pyvm.io/runtime": "true"}}}
    assert create["body"] == ds.runtime_class_body()
    pyvm = "/opt/pyvm/venv/bin/pyvm"
    assert hostrun.calls == [
        ds.on_host("test", "-x", "/usr/bin/python3.11"),
        ds.on_host(pyvm, "template", "build", "--config", "/etc/pyvm/configuration.toml", "--vcpus", "all"),
        ds.on_host(pyvm, "template", "rm", "--config", "/etc/pyvm/configuration.toml", "--vcpus", "all"),
        ds.on_host("systemctl", "restart", "containerd"),
    ]
    h = settings.host
    assert (h("/opt/pyvm/venv/bin/containerd-shim-pyvm-v2")).is_file()
    assert (h("/usr/local/bin/containerd-shim-pyvm-v2")).readlink() == Path(
        "/opt/pyvm/venv/bin/containerd-shim-pyvm-v2"
    )
    assert (h("/var/lib/pyvm/guest/x86_64/current")).readlink() == Path("abc123")
    assert (h("/etc/pyvm/configuration.toml")).read_text() == "[runtime]\n"
    cfg = tomllib.loads(h("/etc/containerd/config.toml").read_text())
    pyvm = cfg["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["pyvm"]
    assert pyvm["options"]["ConfigPath"] == "/etc/pyvm/configuration.toml"

    # a restarted pod installs again: no containerd restart, RuntimeClass found
    http.requests.clear()
    hostrun.calls.clear()
    http.script[("GET", "/apis/node.k8s.io/v1/runtimeclasses/pyvm")] = [(200, RC)]
    inst2 = ds.NodeInstaller(settings, core, node_api, run=hostrun)
    inst2.install()
    assert [(r["method"], r["path"]) for r in http.requests] == [
        ("PATCH", "/api/v1/nodes/node-a"),
        ("GET", "/apis/node.k8s.io/v1/runtimeclasses/pyvm"),
    ]
    assert ds.on_host("systemctl", "restart", "containerd") not in hostrun.calls

    # SIGTERM path
    http.requests.clear()
    hostrun.calls.clear()
    inst2.uninstall()
    assert [(r["method"], r["path"]) for r in http.requests] == [
        ("PATCH", "/api/v1/nodes/node-a"),
        ("GET", "/api/v1/nodes"),
        ("DELETE", "/apis/node.k8s.io/v1/runtimeclasses/pyvm"),
    ]
    unlabel, listing, _ = http.requests
    assert unlabel["body"] == {"metadata": {"labels": {"pyvm.io/runtime": None}}}
    assert unlabel["content_type"] == "application/merge-patch+json"
    assert listing["query"] == {"labelSelector": ["pyvm.io/runtime=true"]}
    assert hostrun.calls == [ds.on_host("systemctl", "restart", "containerd")]
    assert h("/etc/containerd/config.toml").read_bytes() == original
    for gone in (
        "/opt/pyvm/venv",
        "/usr/local/bin/pyvm",
        "/var/lib/pyvm/guest/x86_64/abc123",
        "/etc/pyvm/configuration.toml",
        "/opt/pyvm/installed.json",
    ):
        assert not h(gone).exists(), gone


def test_runtime_class_kept_while_other_nodes_are_labelled(node):
    settings, _ = node
    other = {"kind": "NodeList", "apiVersion": "v1", "items": [{"metadata": {"name": "node-b"}}]}
    http = FakeHTTP({("GET", "/api/v1/nodes"): [(200, other)]})
    core, node_api = apis(http)
    ds.NodeInstaller(settings, core, node_api, run=FakeHost()).release_runtime_class()
    assert [r["method"] for r in http.requests] == ["GET"]


def test_create_conflict_means_another_node_created_it(node):
    settings, _ = node
    http = FakeHTTP(
        {
            ("GET", "/apis/node.k8s.io/v1/runtimeclasses/pyvm"): [(404, status(404, "NotFound"))],
            ("POST", "/apis/node.k8s.io/v1/runtimeclasses"): [(409, status(409, "AlreadyExists"))],
        }
    )
    core, node_api = apis(http)
    ds.NodeInstaller(settings, core, node_api, run=FakeHost()).ensure_runtime_class()


def test_forbidden_is_raised(node):
    settings, _ = node
    http = FakeHTTP({("PATCH", "/api/v1/nodes/node-a"): [(403, status(403, "Forbidden"))]})
    core, node_api = apis(http)
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as err:
        ds.NodeInstaller(settings, core, node_api, run=FakeHost()).label_node()
    assert err.value.status == 403


def test_host_without_python_is_refused_before_touching_anything(node):
    settings, original = node
    http = FakeHTTP({})
    core, node_api = apis(http)
    inst = ds.NodeInstaller(settings, core, node_api, run=FakeHost(fail={"test"}))
    with pytest.raises(ds.InstallerError, match=r"no /usr/bin/python3.11.*apt-get install python3.11"):
        inst.install()
    assert http.requests == []
    assert settings.host("/etc/containerd/config.toml").read_bytes() == original
    assert not settings.host("/opt/pyvm/venv").exists()


def test_failed_restart_names_the_cause(node):
    settings, _ = node
    core, node_api = apis(FakeHTTP({}))
    inst = ds.NodeInstaller(settings, core, node_api, run=FakeHost(fail={"systemctl"}))
    with pytest.raises(ds.InstallerError, match=r"restarting containerd on the host failed.*systemd unit"):
        inst.restart_containerd()


def test_a_failed_template_build_is_not_fatal(node, caplog):
    """No template means slow pod starts, not a node without pyvm: logged, the install goes on."""
    settings, _ = node
    core, node_api = apis(FakeHTTP({}))
    host = FakeHost(fail={"build"})
    inst = ds.NodeInstaller(settings, core, node_api, run=host)
    inst.copy_assets()
    inst.build_template()
    assert "building the VM template failed (exit 1)" in caplog.text and "cold-boot" in caplog.text
    assert not any("rm" in call for call in host.calls)  # nothing to tidy after a failed build


def test_operator_config_and_foreign_binaries_are_left_alone(node):
    settings, _ = node
    own_cfg = settings.host("/etc/pyvm/configuration.toml")
    own_cfg.parent.mkdir(parents=True)
    own_cfg.write_text("# operator's\n")
    foreign = settings.host("/usr/local/bin/pyvm")
    foreign.parent.mkdir(parents=True)
    foreign.write_text("#!/bin/sh\n")
    core, node_api = apis(FakeHTTP({}))
    inst = ds.NodeInstaller(settings, core, node_api, run=FakeHost())
    inst.copy_assets()
    inst.remove_assets()
    assert own_cfg.read_text() == "# operator's\n"
    assert foreign.read_text() == "#!/bin/sh\n"


def test_runtime_class_body_matches_deploy_manifest():
    manifest = yaml.safe_load((ROOT / "deploy" / "runtimeclass.yaml").read_text())
    assert manifest == ds.runtime_class_body()
