"""Spec rewrite for the guest, on real specs: ``ctr oci spec`` output (generated now) and the CRI specs
recorded from containerd 1.6 by tests/e2e/test_cri_harness.py (tests/fixtures/cri/)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from shim.errors import InvalidArgument
from shim.paths import GUEST_SHARE_DIR
from shim.resources.spec import PodNamespaces, guest_cgroups_path, guest_hostname, is_cri, rewrite_spec

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "cri"
SB = "sb1"


def _load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def ctr_spec() -> dict:
    if shutil.which("ctr") is None:
        pytest.skip("ctr (containerd) is not installed")
    out = subprocess.run(
        ["ctr", "oci", "spec"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return json.loads(out)


def test_ctr_run_spec(ctr_spec: dict) -> None:
    spec = copy.deepcopy(ctr_spec)
    spec["mounts"].append(
        {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]}
    )
    res = rewrite_spec(spec, container_id="c1", sandbox_id="c1", guest_mounts={"/data": "/g/c1/mounts/7"})
    out = res.spec
    assert out["root"] == {"path": f"{GUEST_SHARE_DIR}/c1/rootfs"}
    assert [m["type"] for m in out["mounts"]] == [m["type"] for m in spec["mounts"]]
    assert out["mounts"][-1] == {
        "destination": "/data",
        "type": "bind",
        "source": "/g/c1/mounts/7",
        "options": ["rbind", "ro"],
    }
    # not CRI and no host path: the new (empty) network namespace of `ctr run` is kept, as with runc
    assert [ns["type"] for ns in out["linux"]["namespaces"]] == ["pid", "ipc", "uts", "mount", "network"]
    assert out["linux"]["cgroupsPath"] == "/pyvm/c1/c1"
    assert out["process"] == spec["process"] and out["linux"]["resources"] == spec["linux"]["resources"]
    assert spec["root"] == {"path": "rootfs"}, "input must not be modified"
    assert any("root.path" in a for a in res.adjustments)


def test_ctr_run_net_host_namespace_path_is_dropped(ctr_spec: dict) -> None:
    spec = copy.deepcopy(ctr_spec)
    spec["linux"]["namespaces"] = [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}]
    out = rewrite_spec(spec, container_id="c1", sandbox_id="c1", guest_mounts={}).spec
    assert out["linux"]["namespaces"] == [{"type": "pid"}]


def test_cri_sandbox_spec() -> None:
    spec = _load("sandbox-spec.json")
    assert is_cri(spec)
    sid = spec["annotations"]["io.kubernetes.cri.sandbox-id"]
    shm = next(m for m in spec["mounts"] if m["destination"] == "/dev/shm" and m["type"] == "bind")
    res = rewrite_spec(
        spec,
        container_id=sid,
        sandbox_id=sid,
        guest_mounts={"/dev/shm": "/g/shm", "/etc/resolv.conf": "/g/r"},
    )
    out = res.spec
    assert out["root"] == {"path": f"{GUEST_SHARE_DIR}/{sid}/rootfs", "readonly": True}
    assert {ns["type"] for ns in out["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount"}
    assert all("path" not in ns for ns in out["linux"]["namespaces"])
    assert any("/var/run/netns/cni-" in a for a in res.adjustments)
    binds = {m["destination"]: m["source"] for m in out["mounts"] if m["type"] == "bind"}
    assert binds == {"/dev/shm": "/g/shm", "/etc/resolv.conf": "/g/r"}
    assert shm["source"].startswith("/"), "fixture sanity"
    assert out["linux"]["cgroupsPath"] == guest_cgroups_path(sid, sid)
    assert out["linux"]["resources"] == spec["linux"]["resources"]


def test_cri_container_spec() -> None:
    spec = _load("container-spec.json")
    cid = "ct1"
    sid = spec["annotations"]["io.kubernetes.cri.sandbox-id"]
    binds = [m for m in spec["mounts"] if m["type"] == "bind"]
    guest = {m["destination"]: f"/g/{i}" for i, m in enumerate(binds)}
    res = rewrite_spec(spec, container_id=cid, sandbox_id=sid, guest_mounts=guest)
    out = res.spec
    # without a running sandbox container to join, the pause container's /proc/<pid>/ns/{ipc,uts}
    # become new namespaces; the network entry is gone either way
    assert out["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
    ]
    assert out["linux"]["cgroupsPath"] == f"/pyvm/{sid}/{cid}"
    assert out["linux"]["resources"]["memory"] == spec["linux"]["resources"]["memory"]
    out_binds = [m for m in out["mounts"] if m["type"] == "bind"]
    assert [(m["destination"], m["source"], m["options"]) for m in out_binds] == [
        (m["destination"], guest[m["destination"]], m["options"]) for m in binds
    ]
    data = next(m for m in out_binds if m["destination"] == "/data")
    assert "ro" in data["options"]
    kept = [m["type"] for m in out["mounts"] if m["type"] != "bind"]
    assert kept == ["proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup"]
    assert out["annotations"] == spec["annotations"]


def _host_pause_pid(spec: dict) -> int:
    """The sandbox pid containerd wrote into the recorded spec's namespace paths."""
    path = next(ns["path"] for ns in spec["linux"]["namespaces"] if ns["type"] == "ipc")
    return int(path.split("/")[2])


def test_cri_container_joins_the_guest_pause_containers_ipc_and_uts() -> None:
    spec = _load("container-spec.json")
    pod = PodNamespaces(host_pid=_host_pause_pid(spec), guest_pid=57)
    res = rewrite_spec(spec, container_id="ct1", sandbox_id=SB, guest_mounts={}, pod=pod)
    assert res.spec["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "ipc", "path": "/proc/57/ns/ipc"},
        {"type": "uts", "path": "/proc/57/ns/uts"},
        {"type": "mount"},
    ]
    assert any(f"'/proc/{pod.host_pid}/ns/uts' -> '/proc/57/ns/uts'" in a for a in res.adjustments)


def test_shared_process_namespace_joins_the_guest_pause_containers_pid_namespace() -> None:
    # shareProcessNamespace: CRI's pid NamespaceMode POD puts the sandbox's pid namespace in the spec
    spec = _load("container-spec.json")
    host_pid = _host_pause_pid(spec)
    spec["linux"]["namespaces"][0] = {"type": "pid", "path": f"/proc/{host_pid}/ns/pid"}
    pod = PodNamespaces(host_pid=host_pid, guest_pid=9)
    out = rewrite_spec(spec, container_id="ct1", sandbox_id=SB, guest_mounts={}, pod=pod).spec
    assert out["linux"]["namespaces"][0] == {"type": "pid", "path": "/proc/9/ns/pid"}


@pytest.mark.parametrize(
    "path",
    [
        "/proc/1/ns/ipc",
        "/proc/{pid}/ns/uts",
        "/proc/{pid}0/ns/ipc",
        "/var/run/ipcns/x",
        "/proc/{pid}/ns/ipc/..",
    ],
)
def test_a_namespace_path_that_is_not_the_sandboxs_own_is_not_mapped(path: str) -> None:
    # another process's namespace (the host's, a target container's), or the sandbox's of another
    # kind, means nothing in the guest: a new namespace, as before
    spec = _load("container-spec.json")
    host_pid = _host_pause_pid(spec)
    spec["linux"]["namespaces"] = [{"type": "ipc", "path": path.format(pid=host_pid)}]
    pod = PodNamespaces(host_pid=host_pid, guest_pid=57)
    out = rewrite_spec(spec, container_id="ct1", sandbox_id=SB, guest_mounts={}, pod=pod).spec
    assert out["linux"]["namespaces"] == [{"type": "ipc"}]


def test_only_cri_containers_join_the_pod(ctr_spec: dict) -> None:
    spec = copy.deepcopy(ctr_spec)
    spec["linux"]["namespaces"] = [{"type": "ipc", "path": "/proc/77/ns/ipc"}]
    pod = PodNamespaces(host_pid=77, guest_pid=5)
    out = rewrite_spec(spec, container_id="c2", sandbox_id="c1", guest_mounts={}, pod=pod).spec
    assert out["linux"]["namespaces"] == [{"type": "ipc"}]


def test_unshared_bind_mount_is_dropped_and_reported() -> None:
    spec = _load("container-spec.json")
    res = rewrite_spec(spec, container_id="ct1", sandbox_id="sb1", guest_mounts={})
    assert not [m for m in res.spec["mounts"] if m["type"] == "bind"]
    assert any("dropped bind mount /etc/hosts" in a for a in res.adjustments)


def test_systemd_cgroup_path_and_host_only_fields_dropped() -> None:
    spec = _load("container-spec.json")
    spec["linux"]["cgroupsPath"] = "kubepods-burstable-pod1.slice:cri-containerd:abc"
    spec["linux"]["mountLabel"] = "system_u:object_r:container_file_t:s0:c1,c2"
    spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}],
    }
    spec["process"]["apparmorProfile"] = "cri-containerd.apparmor.d"
    spec["process"]["selinuxLabel"] = "system_u:system_r:container_t:s0:c1,c2"
    spec["hooks"] = {"createRuntime": [{"path": "/usr/bin/nvidia-hook"}], "poststop": []}
    res = rewrite_spec(spec, container_id="ct1", sandbox_id=SB, guest_mounts={})
    out = res.spec
    assert out["linux"]["cgroupsPath"] == "/pyvm/sb1/ct1"
    assert "mountLabel" not in out["linux"] and "hooks" not in out
    assert "apparmorProfile" not in out["process"] and "selinuxLabel" not in out["process"]
    assert out["linux"]["seccomp"] == spec["linux"]["seccomp"]
    text = "\n".join(res.adjustments)
    for word in ("systemd style", "mountLabel", "apparmorProfile", "selinuxLabel", "createRuntime: 1"):
        assert word in text


@pytest.mark.parametrize("bad", [{}, {"root": {}}, {"root": {"path": ""}}])
def test_spec_without_root_is_invalid(bad: dict) -> None:
    with pytest.raises(InvalidArgument, match=r"root\.path"):
        rewrite_spec(bad, container_id="c", sandbox_id="s", guest_mounts={})


def test_bad_ids_are_invalid() -> None:
    with pytest.raises(InvalidArgument):
        rewrite_spec({"root": {"path": "rootfs"}}, container_id="../x", sandbox_id="s", guest_mounts={})


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("1.2.0", "1.1.0"),
        ("1.2.1", "1.1.0"),
        ("1.3.0-rc.1", "1.1.0"),
        ("1.1.0", "1.1.0"),
        ("1.0.2-dev", "1.0.2-dev"),
    ],
)
def test_oci_version_newer_than_guest_crun_is_lowered(version: str, expected: str) -> None:
    """Regression: containerd 1.7.24 (Debian trixie) writes ociVersion 1.2.0; crun 1.8.1 in the guest
    refused every container with "unknown version specified"."""
    spec = {"ociVersion": version, "root": {"path": "rootfs"}, "process": {"args": ["true"]}}
    out = rewrite_spec(spec, container_id="c1", sandbox_id="c1", guest_mounts={})
    assert out.spec["ociVersion"] == expected
    assert any("ociVersion" in a for a in out.adjustments) == (version != expected)


@pytest.mark.parametrize(
    ("spec_hostname", "host", "expected"),
    [
        ("web-0", "node1", "web-0"),  # the pod's (CRI), or ctr run --hostname
        (None, "node1.example.org", "node1.example.org"),  # else the host's, as runc shows it
        ("", "node1", "node1"),
        (None, "bad_name", ""),  # not a name the guest takes: it keeps its own
        ("x" * 65, "node1", ""),
    ],
)
def test_guest_hostname(spec_hostname: str | None, host: str, expected: str) -> None:
    spec = {} if spec_hostname is None else {"hostname": spec_hostname}
    assert guest_hostname(spec, host) == expected
