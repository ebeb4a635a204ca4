"""The pod's network, carried into its VM (what Kata calls the "tcfilter" model).

CNI configures a network namespace for the pod: containerd's CRI creates it and names it in the
sandbox container's OCI spec (``linux.namespaces``, type ``network``, a ``path``). QEMU does not run
in it. Instead, for every interface CNI made there (``eth0``: a veth with the pod's addresses):

- a tap device is created in the same namespace: a thread enters the namespace, opens
  ``/dev/net/tun`` and names it ``tap<N>_pyvm``. QEMU inherits that fd and backs a virtio-net NIC with
  it. A tap without ``TUNSETPERSIST`` lives as long as an fd to it is open, so it goes away with QEMU,
  even when the shim is SIGKILLed;
- tc wires the tap to the interface: an ingress qdisc on both, each with a u32 filter matching every
  frame and a mirred action redirecting it to the other's egress. What reaches ``eth0`` goes to the
  VM before the namespace's IP stack sees it, and what the VM sends leaves through ``eth0``;
- the guest's NIC gets the interface's MAC, and the agent gives it the interface's name, MTU and
  addresses, then the namespace's routes (``GuestInterface`` / ``GuestRoute``). To its peers the pod
  looks exactly as it would under runc.

Routes the kernel makes by itself for an address (protocol ``kernel``) are not copied: the guest
kernel makes them too. IPv6 link-local addresses are left to the guest (same MAC, same address).

Every netlink socket and the tap are made by a thread of their own that first entered the pod's
namespace (``setns`` moves only the calling thread) and ends there. pyroute2's ``NetNS`` would fork
a child instead; a SIGTERM that child gets before it exits runs the shim's own SIGTERM handler (it
shares asyncio's signal wake-up fd) and shut the whole shim down. Call these functions through
``asyncio.to_thread``: they block.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from shim.agentclient import GuestInterface, GuestRoute
from shim.errors import FailedPrecondition
from shim.log import get_logger

log = get_logger(__name__)
logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug logs every netlink message
T = TypeVar("T")

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_ARPHRD_ETHER = 1
_ETH_P_ALL = 0x0003
_INGRESS = 0xFFFF0000
_RT_TABLE_MAIN = 254
_RTPROT_KERNEL = 2
_RTN_UNICAST = 1
_RT_SCOPE_LINK = 253
#: the most interfaces one pod may bring (each is a NIC and a tap)
MAX_INTERFACES = 8


def tap_name(index: int) -> str:
    return f"tap{index}_pyvm"


@dataclass(frozen=True)
class PodNetwork:
    """What the pod's network namespace holds, as the guest must reproduce it."""

    netns: str
    interfaces: tuple[GuestInterface, ...]
    routes: tuple[GuestRoute, ...]


@dataclass
class Tap:
    """A tap device in the pod's namespace, wired to ``interface``; ``fd`` keeps it alive."""

    interface: str
    name: str
    mac: str
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def netns_path(spec: Mapping[str, Any]) -> str | None:
    """The path of the network namespace an OCI spec joins (CRI's pod netns), or None: no entry
    (the host's network) or a new, empty namespace (``ctr run`` without ``--with-ns``)."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, Mapping) and ns.get("type") == "network":
            path = ns.get("path")
            return str(path) if path else None
    return None


def _in_netns(netns: str, what: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a new thread that entered the network namespace at ``netns``; its result, or its
    exception as FailedPrecondition (``what`` says what was being done)."""
    if not os.path.exists(netns):
        raise FailedPrecondition(f"the pod's network namespace {netns} does not exist", netns=netns)
    result: list[Any] = []

    def run() -> None:
        from pyroute2.netns import setns

        try:
            setns(netns, flags=0)
            result.append((True, fn()))
        except BaseException as exc:
            result.append((False, exc))

    t = threading.Thread(target=run, name="netns")
    t.start()
    t.join()
    ok, value = result[0]
    if ok:
        return value  # type: ignore[no-any-return]
    if isinstance(value, FailedPrecondition):
        raise value
    raise FailedPrecondition(f"{what} in {netns}: {value}", netns=netns) from value


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return contextlib.closing(IPRoute())


def inspect(netns: str) -> PodNetwork:
    """Read the interfaces (Ethernet, not loopback, not our taps), their addresses and the main
    table's routes from the namespace at ``netns``."""
    return _in_netns(netns, "cannot read the pod's network", lambda: _inspect(netns))


def _inspect(netns: str) -> PodNetwork:
    with _iproute() as ns:
        links = [
            link
            for link in ns.get_links()
            if link["ifi_type"] == _ARPHRD_ETHER and not str(link.get("IFLA_IFNAME")).endswith("_pyvm")
        ]
        if len(links) > MAX_INTERFACES:
            raise FailedPrecondition(
                f"the pod's network namespace has {len(links)} interfaces; pyvm carries at most {MAX_INTERFACES}",
                netns=netns,
            )
        names = {link["index"]: str(link.get("IFLA_IFNAME")) for link in links}
        addresses: dict[int, list[str]] = {i: [] for i in names}
        for a in ns.get_addr():
            if a["index"] not in names or a["scope"] == _RT_SCOPE_LINK:
                continue  # an IPv6 link-local: the guest derives the same one from the same MAC
            addresses[a["index"]].append(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
        routes = []
        for r in ns.get_routes(table=_RT_TABLE_MAIN):
            oif = r.get("RTA_OIF")
            if r["proto"] == _RTPROT_KERNEL or r["type"] != _RTN_UNICAST or oif not in names:
                continue
            dst = r.get("RTA_DST")
            routes.append(
                GuestRoute(
                    destination=f"{dst}/{r['dst_len']}" if dst else "",
                    gateway=str(r.get("RTA_GATEWAY") or ""),
                    device=names[oif],
                    source=str(r.get("RTA_PREFSRC") or ""),
                    scope=int(r["scope"]),
                    family=int(r["family"]),
                )
            )
        interfaces = tuple(
            GuestInterface(
                name=names[link["index"]],
                mac=str(link.get("IFLA_ADDRESS")).lower(),
                mtu=int(link.get("IFLA_MTU") or 0),
                addresses=tuple(addresses[link["index"]]),
            )
            for link in links
        )
    return PodNetwork(netns, interfaces, tuple(routes))


def _open_tap(name: str) -> int:
    """Create tap ``name`` in the calling thread's network namespace; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(
            fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach(net: PodNetwork) -> list[Tap]:
    """A tap per interface of ``net``, each wired both ways to its interface by tc. On failure
    nothing stays behind (the taps are closed, the filters removed)."""
    taps: list[Tap] = []

    def wire() -> None:
        for i, iface in enumerate(net.interfaces):
            name = tap_name(i)
            taps.append(Tap(iface.name, name, iface.mac, _open_tap(name)))
        with _iproute() as ns:
            for tap, iface in zip(taps, net.interfaces, strict=True):
                (veth,) = ns.link_lookup(ifname=iface.name)
                (tidx,) = ns.link_lookup(ifname=tap.name)
                ns.link("set", index=tidx, mtu=iface.mtu or 1500, state="up")
                for src, dst in ((veth, tidx), (tidx, veth)):
                    _redirect(ns, src, dst)

    try:
        _in_netns(net.netns, "cannot wire the pod's network into the VM", wire)
    except BaseException:
        detach(net.netns, taps)
        raise
    log.info(
        "pod network wired to taps",
        netns=net.netns,
        taps={t.name: t.interface for t in taps},
        addresses={i.name: list(i.addresses) for i in net.interfaces},
        routes=len(net.routes),
    )
    return taps


def _redirect(ns: Any, src: int, dst: int) -> None:
    """Every frame arriving on ``src`` leaves through ``dst``."""
    ns.tc("add", "ingress", src)
    ns.tc(
        "add-filter",
        "u32",
        src,
        parent=_INGRESS,
        protocol=_ETH_P_ALL,
        keys=["0x0/0x0+0"],
        target=0x10001,
        action=[{"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst}],
    )


def detach(netns: str, taps: Iterable[Tap]) -> None:
    """Close the taps (they disappear once QEMU's copies are closed too) and remove the ingress
    qdiscs attach() put on the interfaces. A namespace that is gone already is fine."""
    taps = list(taps)
    for t in taps:
        t.close()
    if not taps or not os.path.exists(netns):
        return

    def unwire() -> None:
        with _iproute() as ns:
            for t in taps:
                for name in (t.interface, t.name):
                    idx = ns.link_lookup(ifname=name)
                    if idx:
                        with contextlib.suppress(Exception):
                            ns.tc("del", "ingress", idx[0])

    try:
        _in_netns(netns, "cannot remove the tc filters of the pod network", unwire)
    except FailedPrecondition as exc:  # teardown: say it, go on
        log.warning("cannot remove the tc filters of the pod network", netns=netns, error=str(exc))
