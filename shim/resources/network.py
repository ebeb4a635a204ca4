"""The pod's network, carried into its VM (what Kata calls the "tcfilter" model).

CNI configures a network namespace for the pod: containerd's CRI creates it and names it in the
sandbox container's OCI spec (``linux.namespaces``, type ``network``, a ``path``). QEMU does not run
in it. Instead, for every interface CNI made there (``eth0``: a veth with the pod's addresses):

- a tap device ``tap<N>_pyvm`` is created in the same namespace. QEMU inherits its fd and backs a
  virtio-net NIC with it. A tap without ``TUNSETPERSIST`` lives as long as an fd to it is open, so it
  goes away with QEMU, even when the shim is SIGKILLed;
- tc wires the tap to the interface: an ingress qdisc on both, each with a u32 filter matching every
  frame and a mirred action redirecting it to the other's egress. What reaches ``eth0`` goes to the
  VM before the namespace's IP stack sees it, and what the VM sends leaves through ``eth0``;
- the guest's NIC gets the interface's MAC, and the agent gives it the interface's name, MTU and
  addresses, then the namespace's routes (``GuestInterface`` / ``GuestRoute``). To its peers the pod
  looks exactly as it would under runc.

Routes the kernel makes by itself for an address (protocol ``kernel``) are not copied: the guest
kernel makes them too. IPv6 link-local addresses are left to the guest (same MAC, same address).

The netlink work runs in a short helper process (:mod:`shim.resources.netlink`, ~0.2 s) that hands
the tap fds back over a unix socket: pyroute2 would add ~13 MiB to every pod's resident shim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shim.agentclient import GuestInterface, GuestRoute
from shim.errors import FailedPrecondition
from shim.log import get_logger
from shim.resources.netlink import MAX_INTERFACES

log = get_logger(__name__)

#: how long the helper may take (it reads a few netlink dumps and adds four tc objects per interface)
HELPER_TIMEOUT_S = 30.0


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


async def _helper(what: str, *args: str, pass_fds: tuple[int, ...] = ()) -> None:
    """Run ``python -m shim.resources.netlink ARGS``; FailedPrecondition with its error if it fails."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shim.resources.netlink",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        pass_fds=pass_fds,
    )
    try:
        async with asyncio.timeout(HELPER_TIMEOUT_S):
            _, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        why = lines[-1].removeprefix("error: ") if lines else f"exit status {proc.returncode}"
        raise FailedPrecondition(f"{what}: {why}", netns=args[1])


async def wire(netns: str) -> tuple[PodNetwork, list[Tap]]:
    """Read the namespace at ``netns`` and wire a tap to each of its interfaces. The taps' fds are
    the caller's (close them once QEMU has its copies)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with parent:
        try:
            await _helper(
                "cannot wire the pod's network into the VM",
                "wire",
                netns,
                "--fd",
                str(child.fileno()),
                pass_fds=(child.fileno(),),
            )
        finally:
            child.close()
        parent.setblocking(False)
        msg, fds, _, _ = socket.recv_fds(parent, 1 << 20, MAX_INTERFACES)
    data = json.loads(msg)
    interfaces = tuple(
        GuestInterface(i["name"], i["mac"], i["mtu"], tuple(i["addresses"])) for i in data["interfaces"]
    )
    net = PodNetwork(netns, interfaces, tuple(GuestRoute(**r) for r in data["routes"]))
    macs = {i.name: i.mac for i in interfaces}
    taps = [Tap(iface, tap, macs[iface], fd) for (iface, tap), fd in zip(data["taps"], fds, strict=True)]
    log.info(
        "pod network wired to taps",
        netns=netns,
        taps={t.name: t.interface for t in taps},
        addresses={i.name: list(i.addresses) for i in interfaces},
        routes=len(net.routes),
    )
    return net, taps


async def unwire(netns: str, taps: Iterable[Tap]) -> None:
    """Close the taps (they disappear once QEMU's copies are closed too) and remove the tc filters
    of :func:`wire`. A namespace that is gone already is fine (the helper checks); a failure is
    logged, not raised."""
    taps = list(taps)
    for t in taps:
        t.close()
    if not taps:
        return
    try:
        await _helper(
            "cannot remove the tc filters of the pod network",
            "unwire",
            netns,
            *(f"{t.interface}={t.name}" for t in taps),
        )
    except (FailedPrecondition, OSError, TimeoutError) as exc:
        log.warning("cannot remove the tc filters of the pod network", netns=netns, error=str(exc))
