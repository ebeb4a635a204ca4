"""The pod network wiring on a real kernel: two network namespaces made by the test play the pod's
(``eth0``, as CNI leaves it) and the node's (the veth's other end). No VM: the test holds the tap's
fd the way QEMU would, and reads and writes frames on it. ``wire``/``unwire`` run the real helper
process (``python -m shim.resources.netlink``), as the shim does."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shim.agentclient import GuestInterface, GuestRoute
from shim.errors import FailedPrecondition
from shim.resources import network

VNET_HDR = 10  # struct virtio_net_hdr in front of every frame (IFF_VNET_HDR)


@dataclass
class Netns:
    pod: str
    node: str

    @property
    def pod_path(self) -> str:
        return f"/run/netns/{self.pod}"

    def ip(self, ns: str, *args: str) -> str:
        return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout

    def tc(self, *args: str) -> str:
        return subprocess.run(
            ["tc", "-n", self.pod, *args], check=True, capture_output=True, text=True
        ).stdout


@pytest.fixture
def netns() -> Iterator[Netns]:
    tag = secrets.token_hex(3)
    n = Netns(f"pyvm-pod-{tag}", f"pyvm-node-{tag}")
    made = []
    try:
        for name in (n.pod, n.node):
            r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
            made.append(name)
        n.ip(n.pod, "link", "add", "eth0", "type", "veth", "peer", "name", "veth-node", "netns", n.node)
        n.ip(n.pod, "link", "set", "eth0", "address", "0a:58:0a:4d:00:05", "mtu", "1450", "up")
        n.ip(n.pod, "addr", "add", "10.77.0.5/24", "dev", "eth0")
        n.ip(n.pod, "addr", "add", "fd00:77::5/64", "dev", "eth0", "nodad")
        n.ip(n.pod, "route", "add", "default", "via", "10.77.0.1")
        n.ip(n.pod, "route", "add", "10.78.0.0/16", "via", "10.77.0.1", "src", "10.77.0.5")
        n.ip(n.node, "addr", "add", "10.77.0.1/24", "dev", "veth-node")
        n.ip(n.node, "link", "set", "veth-node", "up")
        yield n
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_netns_path_of_a_spec() -> None:
    def spec(*ns: dict[str, str]) -> dict[str, object]:
        return {"linux": {"namespaces": list(ns)}}

    assert network.netns_path(spec({"type": "network", "path": "/run/netns/cni-1"})) == "/run/netns/cni-1"
    assert network.netns_path(spec({"type": "network"})) is None  # a new, empty one (ctr run)
    assert network.netns_path(spec({"type": "pid"})) is None  # the host's network
    assert network.netns_path({}) is None


def test_wire_reads_what_cni_left(netns: Netns) -> None:
    net, taps = asyncio.run(network.wire(netns.pod_path))
    asyncio.run(network.unwire(netns.pod_path, taps))
    assert net.interfaces == (
        GuestInterface("eth0", "0a:58:0a:4d:00:05", 1450, ("10.77.0.5/24", "fd00:77::5/64")),
    )
    # the prefix routes of the addresses are the kernel's: the guest kernel makes them itself
    assert set(net.routes) == {
        GuestRoute("", "10.77.0.1", "eth0", "", 0, 2),
        GuestRoute("10.78.0.0/16", "10.77.0.1", "eth0", "10.77.0.5", 0, 2),
    }


def test_wire_of_a_missing_namespace_names_it() -> None:
    with pytest.raises(FailedPrecondition, match="/run/netns/pyvm-no-such-ns does not exist"):
        asyncio.run(network.wire("/run/netns/pyvm-no-such-ns"))


def _read_frame(fd: int, want: bytes, timeout: float = 5.0) -> bytes:
    """The first frame read from the tap whose EtherType is ``want``."""
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        frame = os.read(fd, 65536)[VNET_HDR:]
        if frame[12:14] == want:
            return frame
    raise AssertionError(f"no frame of EtherType {want.hex()} on the tap within {timeout}s")


def test_wire_makes_a_tap_both_ways_and_unwire_removes_it(netns: Netns) -> None:
    _, taps = asyncio.run(network.wire(netns.pod_path))
    try:
        assert [(t.interface, t.name, t.mac) for t in taps] == [("eth0", "tap0_pyvm", "0a:58:0a:4d:00:05")]
        tap = json.loads(netns.ip(netns.pod, "-j", "link", "show", "tap0_pyvm"))[0]
        assert tap["mtu"] == 1450 and "UP" in tap["flags"]
        assert "Egress Redirect to device tap0_pyvm" in netns.tc("filter", "show", "dev", "eth0", "ingress")
        assert "Egress Redirect to device eth0" in netns.tc("filter", "show", "dev", "tap0_pyvm", "ingress")

        # node -> pod: the node's ARP request for the pod IP reaches the tap (the VM); the netns'
        # own stack never sees it, so nobody answers and the sender keeps asking
        send = (
            "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('10.77.0.5', 9))"
        )
        subprocess.run(["ip", "netns", "exec", netns.node, sys.executable, "-c", send], check=True)
        arp = _read_frame(taps[0].fd, b"\x08\x06")
        assert arp[38:42] == bytes([10, 77, 0, 5])  # ARP target protocol address: the pod's IP
        neigh = netns.ip(netns.node, "neigh", "show", "10.77.0.5")
        assert "lladdr" not in neigh, neigh

        # VM -> node: a frame written to the tap leaves through eth0 and arrives at the node's end
        def rx() -> int:
            stats = json.loads(netns.ip(netns.node, "-j", "-s", "link", "show", "veth-node"))[0]
            return int(stats["stats64"]["rx"]["packets"])

        before = rx()
        frame = b"\xff" * 6 + bytes.fromhex("0a580a4d0005") + b"\x88\xb5" + b"pyvm".ljust(46, b"\0")
        os.write(taps[0].fd, b"\0" * VNET_HDR + frame)
        deadline = time.monotonic() + 5
        while rx() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rx() > before
    finally:
        asyncio.run(network.unwire(netns.pod_path, taps))
    assert taps[0].fd == -1
    assert "tap0_pyvm" not in netns.ip(netns.pod, "-br", "link")  # no fd left: the tap is gone
    assert "ingress" not in netns.tc("qdisc", "show", "dev", "eth0")
    asyncio.run(network.unwire(netns.pod_path, taps))  # twice is fine


def test_wire_that_fails_leaves_nothing(netns: Netns) -> None:
    netns.tc("qdisc", "add", "dev", "eth0", "ingress")  # someone else's: wire cannot add its own
    with pytest.raises(FailedPrecondition, match="cannot wire the pod's network"):
        asyncio.run(network.wire(netns.pod_path))
    assert "tap0_pyvm" not in netns.ip(netns.pod, "-br", "link")
