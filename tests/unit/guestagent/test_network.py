"""The agent configures the pod's network (CreateSandbox's interfaces and routes).

Validation is pure. Applying runs against the real kernel: each test gets a network namespace of
its own (``ip netns add``, removed afterwards) holding a veth pair, one end with a known MAC
standing in for the NIC the host plugs into the VM; ``configure`` runs in a thread that entered
that namespace, and ``ip -n <ns> -j`` reads back what the kernel holds.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shim._pb.pyvm.agent.v1 import agent_pb2 as pb
from shim.errors import FailedPrecondition, InvalidArgument
from shim.guestagent import agent as agent_mod
from shim.guestagent import kernel, network
from shim.guestagent.reaper import Reaper
from shim.guestagent.service import AgentService

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
REPO = Path(__file__).resolve().parents[3]


def iface(name: str = "eth0", mac: str = "02:00:00:00:00:05", mtu: int = 0, *addrs: str) -> pb.Interface:
    return pb.Interface(
        name=name,
        mac=mac,
        mtu=mtu,
        addresses=[pb.IPAddress(address=a.split("/")[0], prefix_len=int(a.split("/")[1])) for a in addrs],
    )


def route(
    destination: str,
    gateway: str = "",
    device: str = "eth0",
    source: str = "",
    scope: int = 0,
    family: int = 2,
) -> pb.Route:
    return pb.Route(
        destination=destination, gateway=gateway, device=device, source=source, scope=scope, family=family
    )


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interfaces", "routes", "named"),
    [
        ([iface("")], [], "interface name ''"),
        ([iface("sixteen-bytes-xx")], [], "'sixteen-bytes-xx'"),
        ([iface("eth/0")], [], "'eth/0'"),
        ([iface("eth 0")], [], "'eth 0'"),
        ([iface("eth0", "02:00:00:00:00")], [], "'02:00:00:00:00'"),
        ([iface("eth0", "02-00-00-00-00-05")], [], "'02-00-00-00-00-05'"),
        ([iface("eth0", "01:00:5e:00:00:01")], [], "'01:00:5e:00:00:01' is a multicast"),
        ([iface("eth0", mtu=67)], [], "MTU 67"),
        ([iface("eth0", "02:00:00:00:00:05", 0, "10.0.0.300/24")], [], "'10.0.0.300'"),
        ([iface("eth0", "02:00:00:00:00:05", 0, "10.0.0.3/33")], [], "prefix length 33"),
        ([iface("eth0", "02:00:00:00:00:05", 0, "fd00::3/129")], [], "prefix length 129"),
        ([iface("eth0", "02:00:00:00:00:05", 0, "0.0.0.0/0")], [], "'0.0.0.0' is not a unicast"),
        ([iface("eth0", "02:00:00:00:00:05", 0, "fe80::1%eth0/64")], [], "'fe80::1%eth0' has a zone"),
        ([iface("eth0"), iface("eth0", "02:00:00:00:00:06")], [], "two interfaces have the name 'eth0'"),
        ([iface("eth0"), iface("eth1", "02:00:00:00:00:05")], [], "the mac '02:00:00:00:00:05'"),
        ([iface()], [route("10.89.0.5/16")], "'10.89.0.5/16'"),
        ([iface()], [route("10.89.0.0/16", family=7)], "family 7"),
        ([iface()], [route("fd00::/64", family=2)], "'fd00::/64'"),
        ([iface()], [route("", "fd00::1", family=2)], "gateway 'fd00::1'"),
        ([iface()], [route("", "10.0.0.1", source="fd00::2")], "source 'fd00::2'"),
        (
            [iface()],
            [route("", "10.0.0.1", device="eth1")],
            "device 'eth1' is not one of the interfaces (eth0)",
        ),
        ([], [route("", "10.0.0.1")], "device 'eth0' is not one of the interfaces (none given)"),
        ([iface()], [route("10.0.0.1/32", scope=100)], "scope 100"),
        ([iface()], [route("10.0.0.0/8", "10.0.0.1", scope=253)], "not 253 (link)"),
    ],
)
def test_malformed_network_is_invalid_argument_naming_the_value(
    interfaces: list[pb.Interface], routes: list[pb.Route], named: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        network.parse(interfaces, routes)
    assert named in str(err.value)


def test_parse_normalizes_and_orders() -> None:
    net = network.parse(
        [iface("eth0", "02:AB:00:00:00:05", 1400, "10.1.1.2/24", "fd00::2/64")],
        [
            route("", "10.1.1.1"),
            route("10.1.1.0/24", "10.1.1.1", source="10.1.1.2"),
            route("10.1.1.1/32", scope=253),
            route("", "fd00::1", family=10),
        ],
    )
    (eth0,) = net.interfaces
    assert eth0.mac == "02:ab:00:00:00:05"
    assert eth0.describe() == "eth0 02:ab:00:00:00:05 mtu 1400 10.1.1.2/24 fd00::2/64"
    assert [r.describe() for r in net.ordered_routes()] == [
        "10.1.1.1/32 dev eth0 scope link",
        "default via 10.1.1.1 dev eth0",
        "10.1.1.0/24 via 10.1.1.1 dev eth0 src 10.1.1.2",
        "default via fd00::1 dev eth0",
    ]
    v4, v6 = eth0.addresses
    assert net.routed_explicitly(eth0, v4) and not net.routed_explicitly(eth0, v6)


def python(*lines: str) -> str:
    """What a fresh interpreter prints running ``lines`` (the agent's modules imported first)."""
    code = "\n".join(["import asyncio, sys", "from shim.guestagent import network, service", *lines])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_no_network_does_not_import_pyroute2() -> None:
    """Most sandboxes carry no network, and pyroute2's import is slow under TCG."""
    out = python(
        "assert asyncio.run(network.configure(network.parse([], []), wait=0)).interfaces == ()",
        "print('pyroute2' in sys.modules)",
    )
    assert out == "False"


def test_pyroute2_imports_where_pyvm_init_blocked_ssl() -> None:
    """pyvm-init puts None in sys.modules for ssl, bz2 and lzma; pyroute2 imports ssl (regression:
    the first VM run answered CreateSandbox with "import of ssl halted; None in sys.modules")."""
    out = python(
        "sys.modules.update(dict.fromkeys(('ssl', 'bz2', 'lzma')))",
        "network._import_pyroute2()",
        "from pyroute2 import AsyncIPRoute",
        "print(sys.modules['bz2'], sys.modules['lzma'])",
    )
    assert out == "None None"


def _seeding_agent(
    monkeypatch: pytest.MonkeyPatch, *, guest_kernel: bool
) -> tuple[agent_mod.Agent, list[Any]]:
    done: list[Any] = []

    def set_realtime(ns: int) -> float:
        done.append(("clock", ns))
        return 1.0

    monkeypatch.setattr(kernel, "set_realtime", set_realtime)

    async def configure(net: network.Network, **kw: Any) -> network.Configured:
        done.append(("network", net))
        return network.Configured((), (), 0.0)

    monkeypatch.setattr(network, "configure", configure)
    return agent_mod.Agent(Reaper(), agent_mod.Config(guest_kernel=guest_kernel)), done


async def test_create_sandbox_validates_the_network_before_changing_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, done = _seeding_agent(monkeypatch, guest_kernel=True)
    with pytest.raises(InvalidArgument, match="'eth9' is not one of the interfaces"):
        await a.create_sandbox(
            "",
            "",
            "",
            host_time_ns=10**18,
            interfaces=[iface()],
            routes=[route("", "10.0.0.1", device="eth9")],
        )
    assert done == []


async def test_create_sandbox_configures_the_network_in_the_guest_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agent_mod.guest, "load_modules", lambda: [])
    a, done = _seeding_agent(monkeypatch, guest_kernel=True)
    await a.create_sandbox("", "", "", interfaces=[iface()], routes=[route("", "10.0.0.1")])
    assert [what for what, _ in done] == ["network"]
    a, done = _seeding_agent(monkeypatch, guest_kernel=False)
    await a.create_sandbox("", "", "", interfaces=[iface()], routes=[route("", "10.0.0.1")])
    assert done == []  # a test on a host: validated and logged, the host's links left alone


async def test_service_passes_interfaces_and_routes_through() -> None:
    seen: dict[str, Any] = {}

    class Agent:
        async def create_sandbox(self, *args: Any, **kwargs: Any) -> None:
            seen.update(kwargs)

    req = pb.CreateSandboxRequest(interfaces=[iface()], routes=[route("", "10.0.0.1")])
    await AgentService(Agent()).create_sandbox(req, None)  # type: ignore[arg-type]
    assert list(seen["interfaces"]) == [iface()] and list(seen["routes"]) == [route("", "10.0.0.1")]


# -- applying it in a network namespace -----------------------------------------------------------


def ip(ns: str, *args: str) -> Any:
    out = subprocess.run(
        ["ip", "-n", ns, *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return json.loads(out) if args[0] == "-j" else out


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """A fresh namespace holding veth ``va`` (a random MAC, returned) whose peer ``vb`` is up."""
    if shutil.which("ip") is None:
        pytest.skip("no ip(8)")
    name = f"pyvm-nettest-{secrets.token_hex(4)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
    try:
        mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
        ip(name, "link", "add", "va", "address", mac, "type", "veth", "peer", "name", "vb")
        ip(name, "link", "set", "vb", "up")
        yield name, mac
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def in_netns(ns: str, run: Callable[[], Awaitable[T]]) -> T:
    """``run()`` on an event loop of a thread that entered ``ns`` (setns moves the calling thread only)."""
    result: list[Any] = []

    def main() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result.append(asyncio.run(run()))  # type: ignore[arg-type]
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=main, name=f"netns-{ns}")
    t.start()
    t.join(30)
    assert result, "configure did not finish in 30 s"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[no-any-return]


def configure(ns: str, interfaces: list[pb.Interface], routes: list[pb.Route], wait: float = 2.0) -> Any:
    net = network.parse(interfaces, routes)
    return in_netns(ns, lambda: network.configure(net, wait=wait))


def ptp(mac: str) -> tuple[list[pb.Interface], list[pb.Route]]:
    """What CNI's ptp plugin leaves in a pod: a /24 without its on-link route, the gateway on-link
    (/32, scope link), the subnet and the default route via it; plus IPv6."""
    routes = [
        route("", "10.1.1.1", source="10.1.1.2"),  # before the route that makes its gateway reachable
        route("10.1.1.0/24", "10.1.1.1", source="10.1.1.2"),
        route("10.1.1.1/32", source="10.1.1.2", scope=253),
        route("", "fd00::1", family=10),
    ]
    return [iface("eth0", mac.upper(), 1400, "10.1.1.2/24", "fd00::2/64")], routes


def snapshot(ns: str) -> tuple[Any, Any, Any]:
    return (
        ip(ns, "-j", "link", "show", "eth0"),
        ip(ns, "-j", "addr"),
        ip(ns, "-j", "route", "show", "table", "all"),
    )


def test_configure_names_the_nic_and_gives_it_mtu_addresses_and_routes(netns: tuple[str, str]) -> None:
    ns, mac = netns
    done = configure(ns, *ptp(mac))
    (link,) = [x for x in ip(ns, "-j", "link") if x["address"] == mac]
    assert link["ifname"] == "eth0" and link["mtu"] == 1400 and "UP" in link["flags"]
    (addr,) = ip(ns, "-j", "addr", "show", "eth0")
    got = {(a["local"], a["prefixlen"]): a for a in addr["addr_info"] if a["scope"] == "global"}
    assert set(got) == {("10.1.1.2", 24), ("fd00::2", 64)}
    assert not got["fd00::2", 64].get("tentative")  # no DAD: usable at once
    routes = {
        (r["dst"], r.get("gateway"), r.get("prefsrc"), r.get("scope"))
        for r in ip(ns, "-j", "-4", "route", "show", "dev", "eth0")
    }
    assert routes == {
        ("10.1.1.1", None, "10.1.1.2", "link"),
        ("10.1.1.0/24", "10.1.1.1", "10.1.1.2", None),  # not on-link: the kernel's own route was not made
        ("default", "10.1.1.1", "10.1.1.2", None),
    }
    v6 = {(r["dst"], r.get("gateway")) for r in ip(ns, "-j", "-6", "route", "show", "dev", "eth0")}
    assert ("default", "fd00::1") in v6 and ("fd00::/64", None) in v6
    assert done.routes[0] == "10.1.1.1/32 dev eth0 src 10.1.1.2 scope link"


def test_applying_the_same_network_twice_changes_nothing(netns: tuple[str, str]) -> None:
    ns, mac = netns
    configure(ns, *ptp(mac))
    before = snapshot(ns)
    configure(ns, *ptp(mac))
    assert snapshot(ns) == before


def test_a_nic_that_appears_late_is_waited_for(netns: tuple[str, str]) -> None:
    ns, _ = netns
    mac = "02:00:00:00:00:42"
    threading.Timer(
        0.2, ip, (ns, "link", "add", "late0", "address", mac, "type", "veth", "peer", "late1")
    ).start()
    done = configure(ns, [iface("eth1", mac, 0, "10.2.0.5/16")], [], wait=5.0)
    assert 0.1 < done.waited < 5.0
    (addr,) = ip(ns, "-j", "addr", "show", "eth1")
    assert [a["local"] for a in addr["addr_info"] if a["family"] == "inet"] == ["10.2.0.5"]


def test_a_mac_that_never_appears_is_failed_precondition_naming_it(netns: tuple[str, str]) -> None:
    ns, _ = netns
    start = time.monotonic()
    with pytest.raises(FailedPrecondition) as err:
        configure(ns, [iface("eth0", "02:00:00:00:00:99")], [], wait=0.2)
    assert time.monotonic() - start < 2
    msg = str(err.value)
    assert "02:00:00:00:00:99" in msg and "(for eth0)" in msg and "va " in msg and "vb " in msg, msg


def test_two_nics_swap_names(netns: tuple[str, str]) -> None:
    ns, mac = netns
    (peer,) = ip(ns, "-j", "link", "show", "vb")
    configure(ns, [iface("vb", mac), iface("va", peer["address"])], [])
    assert ip(ns, "-j", "link", "show", "vb")[0]["address"] == mac
    assert ip(ns, "-j", "link", "show", "va")[0]["address"] == peer["address"]


def test_a_route_the_kernel_refuses_is_failed_precondition_with_its_reason(netns: tuple[str, str]) -> None:
    ns, mac = netns
    with pytest.raises(FailedPrecondition) as err:
        configure(ns, [iface("eth0", mac, 0, "10.1.1.2/24")], [route("10.99.0.0/16", "192.168.7.1")])
    msg = str(err.value)
    assert "10.99.0.0/16 via 192.168.7.1 dev eth0" in msg and "Network is unreachable" in msg, msg
