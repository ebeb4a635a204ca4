"""The netlink half of the pod network (see :mod:`shim.resources.network`), run in a helper process
``python -m shim.resources.netlink`` so the resident shim never imports pyroute2 (~13 MiB of RSS
per pod, measured) and never hosts its forks.

Commands (the helper exits 0 on success; on failure it prints ``error: <why>`` on stderr, exits 1):

- ``wire NETNS --fd N``: read the namespace's interfaces, addresses and routes, create a tap per
  interface, wire each both ways with tc; send one message on the unix socket ``N`` (SEQPACKET):
  JSON ``{"interfaces": [...], "routes": [...], "taps": [[interface, tap], ...]}`` with the tap fds
  attached, in the order of ``taps``. A failure leaves nothing behind.
- ``unwire NETNS INTERFACE=TAP ...``: remove the ingress qdiscs ``wire`` added (the taps themselves
  are gone once every fd to them is closed). A namespace that is gone already is fine.

Every netlink socket and every tap are made by a thread that first entered the namespace (``setns``
moves only the calling thread). pyroute2's ``NetNS`` would fork a child instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from shim.errors import FailedPrecondition

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
TAP_SUFFIX = "_pyvm"
T = TypeVar("T")


def tap_name(index: int) -> str:
    return f"tap{index}{TAP_SUFFIX}"


def in_netns(netns: str, what: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a new thread that entered the network namespace at ``netns``; its result, or its
    exception as FailedPrecondition (``what`` says what was being done)."""
    if not os.path.exists(netns):
        raise FailedPrecondition(f"the pod's network namespace {netns} does not exist", netns=netns)
    result: list[tuple[bool, Any]] = []

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

    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug logs every message
    return contextlib.closing(IPRoute())


def inspect(netns: str) -> dict[str, Any]:
    """The Ethernet interfaces (not loopback, not our taps) of the namespace at ``netns`` with their
    MAC, MTU and addresses (no IPv6 link-local: the guest derives the same one from the same MAC),
    and the main table's unicast routes through them (not the kernel's own prefix routes)."""
    return in_netns(netns, "cannot read the pod's network", lambda: _inspect(netns))


def _inspect(netns: str) -> dict[str, Any]:
    with _iproute() as ns:
        links = [
            link
            for link in ns.get_links()
            if link["ifi_type"] == _ARPHRD_ETHER and not str(link.get("IFLA_IFNAME")).endswith(TAP_SUFFIX)
        ]
        if len(links) > MAX_INTERFACES:
            raise FailedPrecondition(
                f"the pod's network namespace has {len(links)} interfaces; pyvm carries at most {MAX_INTERFACES}",
                netns=netns,
            )
        names = {link["index"]: str(link.get("IFLA_IFNAME")) for link in links}
        addresses: dict[int, list[str]] = {i: [] for i in names}
        for a in ns.get_addr():
            if a["index"] in names and a["scope"] != _RT_SCOPE_LINK:
                addresses[a["index"]].append(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
        routes = []
        for r in ns.get_routes(table=_RT_TABLE_MAIN):
            oif = r.get("RTA_OIF")
            if r["proto"] == _RTPROT_KERNEL or r["type"] != _RTN_UNICAST or oif not in names:
                continue
            dst = r.get("RTA_DST")
            routes.append(
                {
                    "destination": f"{dst}/{r['dst_len']}" if dst else "",
                    "gateway": str(r.get("RTA_GATEWAY") or ""),
                    "device": names[oif],
                    "source": str(r.get("RTA_PREFSRC") or ""),
                    "scope": int(r["scope"]),
                    "family": int(r["family"]),
                }
            )
        interfaces = [
            {
                "name": names[link["index"]],
                "mac": str(link.get("IFLA_ADDRESS")).lower(),
                "mtu": int(link.get("IFLA_MTU") or 0),
                "addresses": addresses[link["index"]],
            }
            for link in links
        ]
    return {"interfaces": interfaces, "routes": routes}


def _open_tap(name: str) -> int:
    """Create tap ``name`` in the calling thread's network namespace; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach(netns: str, interfaces: Sequence[tuple[str, int]]) -> list[tuple[str, str, int]]:
    """A tap per ``(interface, mtu)``, wired both ways to it by tc: ``[(interface, tap, fd)]``.
    On failure nothing stays behind (the taps are closed, the filters removed)."""
    taps: list[tuple[str, str, int]] = []

    def wire() -> None:
        for i, (iface, _) in enumerate(interfaces):
            name = tap_name(i)
            taps.append((iface, name, _open_tap(name)))
        with _iproute() as ns:
            for (iface, tap, _), (_, mtu) in zip(taps, interfaces, strict=True):
                (veth,) = ns.link_lookup(ifname=iface)
                (tidx,) = ns.link_lookup(ifname=tap)
                ns.link("set", index=tidx, mtu=mtu or 1500, state="up")
                for src, dst in ((veth, tidx), (tidx, veth)):
                    _redirect(ns, src, dst)

    try:
        in_netns(netns, "cannot wire the pod's network into the VM", wire)
    except BaseException:
        for _, _, fd in taps:
            os.close(fd)
        detach(netns, [(iface, tap) for iface, tap, _ in taps])
        raise
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


def detach(netns: str, pairs: Iterable[tuple[str, str]]) -> None:
    """Remove the ingress qdiscs (and so the filters) on each ``(interface, tap)``; a namespace or
    a device that is gone already is fine."""
    names = [n for pair in pairs for n in pair]
    if not names or not os.path.exists(netns):
        return

    def unwire() -> None:
        with _iproute() as ns:
            for name in names:
                idx = ns.link_lookup(ifname=name)
                if idx:
                    with contextlib.suppress(Exception):
                        ns.tc("del", "ingress", idx[0])

    in_netns(netns, "cannot remove the tc filters of the pod network", unwire)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse  # here: the shim imports this module for MAX_INTERFACES only

    p = argparse.ArgumentParser(prog="python -m shim.resources.netlink")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wire")
    w.add_argument("netns")
    w.add_argument("--fd", type=int, required=True)
    u = sub.add_parser("unwire")
    u.add_argument("netns")
    u.add_argument("pairs", nargs="*", metavar="INTERFACE=TAP")
    args = p.parse_args(argv)
    try:
        if args.cmd == "wire":
            net = inspect(args.netns)
            taps = attach(args.netns, [(i["name"], i["mtu"]) for i in net["interfaces"]])
            payload = json.dumps({**net, "taps": [[iface, tap] for iface, tap, _ in taps]}).encode()
            try:
                with socket.socket(fileno=args.fd) as sock:
                    socket.send_fds(sock, [payload], [fd for _, _, fd in taps])
            except OSError:
                detach(args.netns, [(iface, tap) for iface, tap, _ in taps])
                raise
        else:
            detach(args.netns, [tuple(pair.split("=", 1)) for pair in args.pairs])  # type: ignore[misc]
    except (FailedPrecondition, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
