"""A CRI pod's network reaches into its VM: the pod is reachable at the IP CNI gave it, and it
reaches other pods, as under runc.

The harness runs containerd in a network namespace of its own with Debian's ``ptp`` CNI plugin
(each pod: a veth ``eth0`` with a /24 address, a host route to the gateway and a route to the rest
of the subnet via it). The shim wires a tap next to ``eth0`` (tc redirect both ways) and the guest's
NIC gets eth0's MAC, addresses and routes. Two pods, one per boot path:

- ``web``: restored from a VM template built for this configuration (``pyvm template build
  --config``, as a user would); its NIC is hot-plugged after the restore.
- ``client``: asks for a different memory size (``io.pyvm.default_memory``), which no template
  matches: a cold boot, the NIC on QEMU's command line.

Checked: the guest's eth0 has the pod's IP and MAC; the harness namespace (the "node") fetches a
page from an HTTP server in ``web`` at the pod IP CRI reports; ``client`` fetches it too (pod to pod,
through both VMs and the routes the guest got); removing the pods leaves nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cri import NETNS_DIR, CriContainerd
from tests.helpers.pyvm_vm import (
    VENV_BIN,
    cri_vm_dirs,
    pyvm_cri,
    wait_for,
    wait_pod_clean,
)

pytestmark = [pytest.mark.containerd, pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900)]

PAGE = "hello from a pod in a VM"
PORT = 8080


@pytest.fixture
def cri_net() -> Iterator[tuple[CriContainerd, Path]]:
    base, run_root = cri_vm_dirs("pn")
    cfg = base / "pyvm.toml"
    cfg.write_text(
        f'[runtime]\nenable_annotations = ["default_memory"]\n[factory]\ntemplate_path = "{base / "t"}"\n'
    )
    subprocess.run(
        [str(VENV_BIN / "pyvm"), "template", "build", "--config", str(cfg)], check=True, timeout=600
    )
    with pyvm_cri(base, cfg, run_root) as h:
        yield h, run_root


def _pod_ip(h: CriContainerd, pod: str) -> str:
    status = h.client.pod_sandbox_status(pod)
    ip = status.status.network.ip
    assert ip, status
    return ip


def _exec(h: CriContainerd, cid: str, script: str) -> str:
    res = h.client.exec_sync(cid, ["sh", "-c", script], timeout=60)
    assert res.exit_code == 0, (script, res)
    return res.stdout.decode()


def _ready_line(h: CriContainerd, pod: str) -> str:
    lines = [
        line
        for line in h.log_path.read_text(errors="replace").splitlines()
        if "sandbox VM ready" in line and pod in line
    ]
    assert lines, h.log_tail()
    return lines[-1]


def _netns_mac(h: CriContainerd, pod: str) -> str:
    """eth0's MAC in the pod's network namespace (the host side of the pod)."""
    info = h.client.pod_sandbox_status(pod, verbose=True).info
    netns = json.loads(info["info"])["runtimeSpec"]["linux"]["namespaces"]
    path = next(ns["path"] for ns in netns if ns["type"] == "network")
    out = subprocess.run(
        ["nsenter", f"--net={path}", "ip", "-j", "link", "show", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return str(json.loads(out)[0]["address"])


def test_pod_network_reaches_the_vm(cri_net: tuple[CriContainerd, Path]) -> None:
    h, run_root = cri_net
    client = h.client

    web, web_cfg = h.run_pod("web", runtime_handler="pyvm")
    assert "restore" in _ready_line(h, web), "the web pod should be restored from the template"
    server = f"mkdir -p /www && echo '{PAGE}' > /www/index.html && exec httpd -f -p {PORT} -h /www"
    srv = client.create_and_start(web, h.container_config("srv", ["sh", "-c", server]), web_cfg)
    web_ip = _pod_ip(h, web)

    # the guest's eth0 is the pod's: its IP and the MAC of the netns' eth0
    addr = _exec(h, srv, "ip -o -4 addr show dev eth0; cat /sys/class/net/eth0/address")
    assert f"inet {web_ip}/" in addr, addr
    assert addr.strip().splitlines()[-1] == _netns_mac(h, web), addr

    # the node (the harness netns, where CNI's host-side veths are) reaches the pod IP
    fetch = (
        "import sys, urllib.request; "
        f"print(urllib.request.urlopen('http://{web_ip}:{PORT}/index.html', timeout=5).read().decode(), end='')"
    )

    def node_fetch() -> str | None:
        r = subprocess.run(
            ["nsenter", f"--net={NETNS_DIR / h.netns}", "--", sys.executable, "-c", fetch],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return r.stdout if r.returncode == 0 else None

    t0 = time.monotonic()
    page = wait_for(node_fetch, 60, f"http://{web_ip}:{PORT}/ from the node")  # httpd may still start
    print(f"\nnode -> web pod {web_ip}: {time.monotonic() - t0:.2f}s")
    assert page == PAGE + "\n"

    # a second pod, cold-booted, fetches it too: pod to pod through both VMs
    other, other_cfg = h.run_pod(
        "client", runtime_handler="pyvm", annotations={"io.pyvm.default_memory": "640"}
    )
    assert "cold" in _ready_line(h, other), "the client pod asks for a size no template has"
    cli = client.create_and_start(other, h.container_config("cli", ["sleep", "3600"]), other_cfg)
    # no wget -T: Debian's static busybox 1.35 segfaults with it (on the host too)
    got = _exec(h, cli, f"wget -q -O - http://{web_ip}:{PORT}/index.html")
    assert got == PAGE + "\n", got
    routes = _exec(h, cli, "ip route")
    assert "eth0" in routes, routes

    for pod in (web, other):
        client.stop_pod_sandbox(pod)
        client.remove_pod_sandbox(pod)
        wait_pod_clean(h, run_root, pod)
