"""The pod's network inside the guest: CreateSandbox's interfaces and routes applied over netlink.

The host plugged a virtio-net NIC into the VM for each of the pod's interfaces, with that
interface's MAC. ``parse`` validates the whole request (nothing has changed when it raises);
``configure`` finds each NIC by its MAC, gives it the interface's name, MTU and addresses, brings it
up, then adds the routes.

pyroute2 (``AsyncIPRoute``, on the caller's event loop) is imported only by ``configure`` when
there is something to configure: its import is ~0.1 s on a host and several times that under TCG,
and most sandboxes carry no network. The import runs in a thread so the agent keeps answering.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import ipaddress
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from shim._pb.pyvm.agent.v1 import agent_pb2 as pb
from shim.errors import FailedPrecondition, InvalidArgument

#: how often ``configure`` looks again for a NIC that is not there yet (a hot-plugged one may still
#: be probing)
POLL = 0.025
IFNAMSIZ = 16
MTU_MIN = 68
MTU_MAX = 65535
#: RT_SCOPE_* a route may have (include/uapi/linux/rtnetlink.h); 255 (nowhere) is for deleted routes
SCOPES = {0: "universe", 200: "site", 253: "link", 254: "host"}
RT_SCOPE_LINK = 253
#: the proto's and Linux's address families
AF_INET = 2
AF_INET6 = 10
FAMILIES = {AF_INET: "AF_INET", AF_INET6: "AF_INET6"}
IFF_UP = 0x1
IFA_F_NODAD = 0x02
IFA_F_NOPREFIXROUTE = 0x200
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- the validated request ----------------------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    name: str
    #: lower case, as the kernel reports it
    mac: str
    #: 0 keeps the NIC's
    mtu: int
    addresses: tuple[IPInterface, ...]

    def describe(self) -> str:
        mtu = [f"mtu {self.mtu}"] if self.mtu else []
        return " ".join([self.name, self.mac, *mtu, *(str(a) for a in self.addresses)])


@dataclass(frozen=True)
class Route:
    destination: IPNetwork
    gateway: IPAddress | None
    device: str
    source: IPAddress | None
    scope: int
    family: int

    def describe(self) -> str:
        """As ``ip route`` prints it: "10.1.1.0/24 via 10.1.1.1 dev eth0 src 10.1.1.2 scope link"."""
        dst = "default" if self.destination.prefixlen == 0 else str(self.destination)
        parts = [dst]
        if self.gateway is not None:
            parts += ["via", str(self.gateway)]
        parts += ["dev", self.device]
        if self.source is not None:
            parts += ["src", str(self.source)]
        if self.scope:
            parts += ["scope", SCOPES[self.scope]]
        return " ".join(parts)


@dataclass(frozen=True)
class Network:
    interfaces: tuple[Interface, ...] = ()
    routes: tuple[Route, ...] = ()

    def ordered_routes(self) -> list[Route]:
        """On-link routes first: a gateway must be reachable when a route through it is added."""
        return [r for r in self.routes if r.gateway is None] + [
            r for r in self.routes if r.gateway is not None
        ]

    def routed_explicitly(self, iface: Interface, addr: IPInterface) -> bool:
        """Whether a route of the request covers ``addr``'s own network on ``iface``. The pod's
        table then had that network routed by something other than the kernel (CNI's ptp plugin
        replaces the on-link route with one via the gateway), so the address is added without the
        kernel's prefix route (IFA_F_NOPREFIXROUTE), or the guest would route it on-link."""
        return any(r.device == iface.name and r.destination == addr.network for r in self.routes)


@dataclass(frozen=True)
class Configured:
    """What ``configure`` did, as ``describe()`` strings for the log."""

    interfaces: tuple[str, ...]
    routes: tuple[str, ...]
    #: how long the NICs took to appear
    waited: float


def _valid_ifname(name: str) -> bool:
    # the kernel's dev_valid_name(): < IFNAMSIZ bytes, not "." or "..", no "/", ":" or whitespace
    return (
        0 < len(name.encode()) < IFNAMSIZ
        and name not in (".", "..")
        and not any(c in "/:" or c.isspace() or c == "\0" for c in name)
    )


def _address(value: str, what: str, *, family: int | None = None) -> IPAddress:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidArgument(f"{what} {value!r} is not an IPv4 or IPv6 address", value=value) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise InvalidArgument(f"{what} {value!r} has a zone; give the address alone", value=value)
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidArgument(f"{what} {value!r} is not a unicast address", value=value)
    if family is not None and _family(ip) != family:
        raise InvalidArgument(
            f"{what} {value!r} is not of the route's family {family} ({FAMILIES[family]})", value=value
        )
    return ip


def _family(ip: IPAddress | IPNetwork) -> int:
    return AF_INET if ip.version == 4 else AF_INET6


def parse_interface(msg: pb.Interface) -> Interface:
    """One interface, validated. Raises ``InvalidArgument`` naming the bad value and what is valid."""
    name = msg.name
    if not _valid_ifname(name):
        raise InvalidArgument(
            f"interface name {name!r} is invalid: 1-{IFNAMSIZ - 1} bytes, no '/', ':' or whitespace, "
            "not '.' or '..'",
            name=name,
        )
    mac = msg.mac.lower()
    if not _MAC.fullmatch(mac):
        raise InvalidArgument(
            f"interface {name}: MAC {msg.mac!r} is not of the form aa:bb:cc:dd:ee:ff", mac=msg.mac
        )
    if int(mac[:2], 16) & 1:
        raise InvalidArgument(f"interface {name}: MAC {msg.mac!r} is a multicast address; a NIC's is unicast")
    if msg.mtu and not MTU_MIN <= msg.mtu <= MTU_MAX:
        raise InvalidArgument(
            f"interface {name}: MTU {msg.mtu} is out of range: 0 (keep the NIC's) or {MTU_MIN}-{MTU_MAX}",
            mtu=msg.mtu,
        )
    addresses: list[IPInterface] = []
    for a in msg.addresses:
        ip = _address(a.address, f"interface {name}: address")
        if not 0 <= a.prefix_len <= ip.max_prefixlen:
            raise InvalidArgument(
                f"interface {name}: address {a.address} has prefix length {a.prefix_len}; an IPv{ip.version} "
                f"address takes 0-{ip.max_prefixlen}",
                prefix_len=a.prefix_len,
            )
        addresses.append(ipaddress.ip_interface(f"{ip}/{a.prefix_len}"))
    return Interface(name, mac, msg.mtu, tuple(addresses))


def parse_route(msg: pb.Route, devices: Sequence[str]) -> Route:
    """One route, validated against the interfaces' names ``devices``. Raises ``InvalidArgument``."""
    family = msg.family
    where = f"route to {msg.destination or 'default'!r}"
    if family not in FAMILIES:
        raise InvalidArgument(
            f"{where}: family {family} is neither 2 (AF_INET) nor 10 (AF_INET6)", family=family
        )
    if not msg.destination:
        dst: IPNetwork = ipaddress.ip_network("0.0.0.0/0" if family == AF_INET else "::/0")
    else:
        try:
            dst = ipaddress.ip_network(msg.destination)
        except ValueError as exc:
            raise InvalidArgument(
                f"{where}: the destination is not a network in CIDR form such as 10.89.0.0/16 ({exc})",
                destination=msg.destination,
            ) from None
        if _family(dst) != family:
            raise InvalidArgument(
                f"{where}: the destination is not of the route's family {family} ({FAMILIES[family]})",
                destination=msg.destination,
            )
    gateway = _address(msg.gateway, f"{where}: gateway", family=family) if msg.gateway else None
    source = _address(msg.source, f"{where}: source", family=family) if msg.source else None
    if msg.device not in devices:
        raise InvalidArgument(
            f"{where}: device {msg.device!r} is not one of the interfaces ({', '.join(devices) or 'none given'})",
            device=msg.device,
        )
    if msg.scope not in SCOPES:
        known = ", ".join(f"{k} ({v})" for k, v in SCOPES.items())
        raise InvalidArgument(f"{where}: scope {msg.scope} is not one of {known}", scope=msg.scope)
    if gateway is not None and msg.scope >= RT_SCOPE_LINK:
        raise InvalidArgument(
            f"{where}: a route via a gateway has scope 0 (universe) or 200 (site), not {msg.scope} "
            f"({SCOPES[msg.scope]})",
            scope=msg.scope,
        )
    return Route(dst, gateway, msg.device, source, msg.scope, family)


def parse(interfaces: Iterable[pb.Interface], routes: Iterable[pb.Route]) -> Network:
    """The whole request, validated: every interface and route, names and MACs unique, every
    route's device one of the interfaces. Raises ``InvalidArgument`` naming the value."""
    parsed = tuple(parse_interface(i) for i in interfaces)
    for attr in ("name", "mac"):
        seen: set[str] = set()
        for iface in parsed:
            value = getattr(iface, attr)
            if value in seen:
                raise InvalidArgument(f"two interfaces have the {attr} {value!r}", **{attr: value})
            seen.add(value)
    names = [i.name for i in parsed]
    return Network(parsed, tuple(parse_route(r, names) for r in routes))


# -- applying it ---------------------------------------------------------------------------------


def _errno(exc: Exception) -> int | None:
    """The errno of a failed request: pyroute2's NetlinkError has it as ``code``, OSError as ``errno``."""
    return getattr(exc, "code", None) or getattr(exc, "errno", None)


def _kernel_says(exc: Exception) -> str:
    """The kernel's words for a failed request: its extended ack message and the errno's name."""
    code = _errno(exc)
    if not code:
        return str(exc)
    strerror = os.strerror(code)
    msg = exc.args[1] if len(exc.args) > 1 and exc.args[1] else strerror
    return strerror if msg == strerror else f"{msg} ({strerror})"


def _import_pyroute2() -> None:
    """pyroute2 imports ssl at module level (for a TLS probe the agent never uses), and pyvm-init
    keeps ssl out of the guest (None in sys.modules: asyncio then does without it). Unblock it for
    this import: the real ssl, rather than a stand-in that code importing ssl meanwhile would see."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]
    importlib.import_module("pyroute2")


async def preload() -> None:
    """Import pyroute2, in a thread (the agent keeps answering); a no-op once imported.
    ``configure`` needs it; PrepareTemplate calls it so that a VM restored from the template has it
    loaded, instead of paying ~1.6 s (TCG) at its first CreateSandbox with a network."""
    await asyncio.to_thread(_import_pyroute2)


@dataclass
class _Link:
    index: int
    name: str
    up: bool


class _Netlink:
    """One rtnetlink socket (pyroute2's ``AsyncIPRoute``) whose failures are ``FailedPrecondition``."""

    def __init__(self) -> None:
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        self._errors: tuple[type[Exception], ...] = (NetlinkError, OSError)
        try:
            # ext_ack: the kernel says why ("Nexthop has invalid gateway"), not only an errno
            self.ipr: Any = AsyncIPRoute(ext_ack=True)
        except OSError as exc:
            raise FailedPrecondition(f"cannot open a netlink socket: {exc}", errno=exc.errno) from exc

    def close(self) -> None:
        self.ipr.close()

    async def links(self) -> dict[str, list[_Link]]:
        """MAC -> the links carrying it."""
        try:
            dump = [link async for link in await self.ipr.link("dump")]
        except self._errors as exc:
            raise FailedPrecondition(f"cannot list the network links: {_kernel_says(exc)}") from exc
        found: dict[str, list[_Link]] = {}
        for link in dump:
            mac = str(link.get("IFLA_ADDRESS") or "").lower()
            found.setdefault(mac, []).append(
                _Link(link["index"], str(link.get("IFLA_IFNAME")), bool(link["flags"] & IFF_UP))
            )
        return found

    async def request(self, what: str, call: str, command: str, *, exist_ok: bool = False, **kw: Any) -> None:
        """``ipr.<call>(command, **kw)``; an ``EEXIST`` is fine when ``exist_ok``."""
        try:
            await getattr(self.ipr, call)(command, **kw)
        except self._errors as exc:
            code = _errno(exc)
            if exist_ok and code == errno.EEXIST:
                return
            raise FailedPrecondition(f"cannot {what}: {_kernel_says(exc)}", errno=code) from exc

    async def rename(self, link: _Link, name: str) -> None:
        """Down first when up: the kernel refuses to rename a running link (EBUSY)."""
        if link.up:
            await self.request(
                f"set {link.name} down to rename it", "link", "set", index=link.index, state="down"
            )
            link.up = False
        await self.request(f"rename {link.name} to {name}", "link", "set", index=link.index, ifname=name)
        link.name = name


async def _find_links(
    nl: _Netlink, interfaces: Sequence[Interface], wait: float, poll: float
) -> dict[str, _Link]:
    """Interface name -> the link carrying its MAC; polls every ``poll`` seconds for up to ``wait``
    seconds while some MAC is missing, then raises ``FailedPrecondition`` naming it."""
    start = time.monotonic()
    while True:
        by_mac = await nl.links()
        missing = [i for i in interfaces if i.mac not in by_mac]
        if not missing:
            break
        waited = time.monotonic() - start
        if waited >= wait:
            seen = ", ".join(f"{x.name} {mac or '-'}" for mac, links in by_mac.items() for x in links)
            raise FailedPrecondition(
                f"no network link has MAC {', '.join(i.mac for i in missing)} (for "
                f"{', '.join(i.name for i in missing)}) after {waited:.1f} s; links seen: {seen}",
                macs=[i.mac for i in missing],
                waited=waited,
            )
        await asyncio.sleep(poll)
    found = {}
    for iface in interfaces:
        link, *others = by_mac[iface.mac]
        if others:
            names = ", ".join(x.name for x in by_mac[iface.mac])
            raise FailedPrecondition(f"interface {iface.name}: several links have MAC {iface.mac}: {names}")
        found[iface.name] = link
    return found


async def configure(net: Network, *, wait: float, poll: float = POLL) -> Configured:
    """Apply ``net`` (from ``parse``) to this network namespace. For each interface: wait up to
    ``wait`` seconds for a link with its MAC (polling every ``poll`` s), rename it (down first),
    set the MTU, add the addresses (one already there is fine; IPv6 ones without duplicate address
    detection: the address is the pod's, and a tentative one cannot be used for a second or so),
    bring it up. Then the routes, on-link ones first (one already there is fine). Applying the same
    network again changes nothing. pyroute2 is imported here, in a thread.

    Raises ``FailedPrecondition`` naming the MAC and the links seen when a NIC never appears, or
    the interface or route and the kernel's error when a request fails. What was done before the
    failure stays (the VM is not usable without its network anyway).
    """
    if not net.interfaces:
        return Configured((), (), 0.0)
    await preload()
    nl = _Netlink()
    try:
        start = time.monotonic()
        links = await _find_links(nl, net.interfaces, wait, poll)
        waited = time.monotonic() - start
        # a link holding the name another one must take (two NICs swapping names) steps aside first
        for link in links.values():
            if link.name in links and links[link.name] is not link:
                await nl.rename(link, f"pyvm{link.index}")
        for iface in net.interfaces:
            await _configure_link(nl, net, iface, links[iface.name])
        for r in net.ordered_routes():
            kw: dict[str, Any] = {
                "dst": str(r.destination),
                "oif": links[r.device].index,
                "family": r.family,
                "scope": r.scope,
            }
            if r.gateway is not None:
                kw["gateway"] = str(r.gateway)
            if r.source is not None:
                kw["prefsrc"] = str(r.source)
            await nl.request(f"add route {r.describe()}", "route", "add", exist_ok=True, **kw)
    finally:
        nl.close()
    return Configured(
        tuple(i.describe() for i in net.interfaces), tuple(r.describe() for r in net.ordered_routes()), waited
    )


async def _configure_link(nl: _Netlink, net: Network, iface: Interface, link: _Link) -> None:
    where = f"interface {iface.name} ({iface.mac})"
    if link.name != iface.name:
        await nl.rename(link, iface.name)
    if iface.mtu:
        await nl.request(
            f"set the MTU of {where} to {iface.mtu}", "link", "set", index=link.index, mtu=iface.mtu
        )
    for addr in iface.addresses:
        flags = IFA_F_NODAD if addr.version == 6 else 0
        if net.routed_explicitly(iface, addr):
            flags |= IFA_F_NOPREFIXROUTE
        await nl.request(
            f"add address {addr} to {where}",
            "addr",
            "add",
            exist_ok=True,
            index=link.index,
            address=str(addr.ip),
            prefixlen=addr.network.prefixlen,
            family=_family(addr.ip),
            IFA_FLAGS=flags,
        )
    if not link.up:
        await nl.request(f"bring {where} up", "link", "set", index=link.index, state="up")
        link.up = True


__all__ = [
    "Configured",
    "Interface",
    "Network",
    "Route",
    "configure",
    "parse",
]
