"""Rewrite a container's OCI runtime spec (``config.json``) for the guest (pure: no I/O).

The spec containerd writes names host things: the bundle-relative rootfs, host bind-mount sources, host
namespaces (the CNI netns, the pause container's ``/proc/<pid>/ns/*``), host cgroup paths, host LSM
labels and hooks. Inside the VM the guest agent hands the spec to crun, so each of those is mapped to
its guest counterpart or dropped:

- ``root.path`` -> ``<GUEST_SHARE_DIR>/<cid>/rootfs`` (``root.readonly`` kept);
- bind mounts -> their guest paths in the share (from :mod:`shim.resources.storage`); bind mounts that
  could not be shared (sockets, devices) are dropped; proc/sysfs/tmpfs/devpts/mqueue/cgroup mounts kept;
- namespaces: the network namespace entry is dropped for CRI containers and whenever it names a host
  path, so containers join the VM's network (which carries the pod's network). A CRI app container's
  ipc, uts and pid entries that name the sandbox task's namespaces (``/proc/<sandbox pid>/ns/<x>``,
  where the sandbox pid is the one this shim reported: QEMU's) are pointed at the guest pause
  container's (``/proc/<its guest pid>/ns/<x>``, ``PodNamespaces``), so the pod's containers share IPC,
  hostname and, with ``shareProcessNamespace``, processes, as under runc. Any other ``path`` is
  dropped: a host path means nothing in the guest, and the container gets a new namespace there;
- ``linux.cgroupsPath`` -> ``/pyvm/<sandbox-id>/<cid>`` (cgroupfs style, also when CRI sent systemd
  ``slice:prefix:name``); ``linux.resources`` kept (the guest agent applies it);
- ``process.apparmorProfile``, ``process.selinuxLabel``, ``linux.mountLabel`` and ``hooks`` are dropped
  (the guest kernel has no such profiles; hooks would run host paths); ``linux.seccomp`` kept;
- ``ociVersion`` newer than the guest's crun understands (1.2.x from containerd 1.7 built against
  runtime-spec 1.2, and 2.x) is lowered to ``1.1.0``: crun 1.8 refuses it outright ("unknown version
  specified") although the 1.2 additions are optional fields it ignores.

Every change is reported as a human-readable adjustment so the caller can log it once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shim.errors import InvalidArgument
from shim.ids import validate_id
from shim.log import get_logger
from shim.paths import GUEST_SHARE_DIR

log = get_logger(__name__)

CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
GUEST_CGROUP_ROOT = "/pyvm"
#: the newest runtime-spec version the guest's crun (Debian 12: 1.8.1) accepts in ``ociVersion``
GUEST_MAX_OCI_VERSION = (1, 1)


#: namespaces a pod's containers may share with its sandbox, and their ``/proc/<pid>/ns/`` file names
POD_SHARED_NAMESPACES = {"ipc": "ipc", "uts": "uts", "pid": "pid"}


@dataclass(frozen=True)
class PodNamespaces:
    """The pod sandbox's init as containerd sees it (``host_pid``, from the shim) and in the guest."""

    host_pid: int
    guest_pid: int

    def guest_path(self, kind: str, host_path: str) -> str | None:
        """The guest's ``/proc/<pid>/ns/<x>`` for a host path naming the sandbox's namespace, else None."""
        name = POD_SHARED_NAMESPACES.get(kind)
        if name is None or self.host_pid <= 0 or self.guest_pid <= 0:
            return None
        if host_path.rstrip("/") != f"/proc/{self.host_pid}/ns/{name}":
            return None
        return f"/proc/{self.guest_pid}/ns/{name}"


@dataclass(frozen=True)
class GuestSpec:
    spec: dict[str, Any]
    adjustments: list[str] = field(default_factory=list)


def is_cri(spec: Mapping[str, Any]) -> bool:
    """Whether containerd's CRI plugin created this spec (sandbox or app container)."""
    return CONTAINER_TYPE_ANNOTATION in (spec.get("annotations") or {})


def guest_cgroups_path(sandbox_id: str, container_id: str) -> str:
    return f"{GUEST_CGROUP_ROOT}/{sandbox_id}/{container_id}"


def guest_hostname(spec: Mapping[str, Any], host_hostname: str) -> str:
    """The VM's own hostname, set when the pod's first container boots it: the spec's ``hostname``
    (CRI's pod hostname, ``ctr run --hostname``), else the host's. Under runc a container with a new
    UTS namespace and no hostname, or with none of its own (a host-network pod), shows the host's;
    in the guest it shows the VM's. "" (keep the guest's) when the name is not one the guest accepts
    (at most 64 letters, digits, '-' and '.')."""
    name = spec.get("hostname") or host_hostname
    if not isinstance(name, str) or len(name) > 64 or not all(c.isalnum() or c in "-." for c in name):
        log.warning("hostname not usable in the guest; the VM keeps its own", hostname=name)
        return ""
    return name


def _is_bind(mount: Mapping[str, Any]) -> bool:
    opts = mount.get("options") or ()
    return mount.get("type") == "bind" or "bind" in opts or "rbind" in opts


def _major_minor(version: str) -> tuple[int, int]:
    """``"1.2.0"`` -> (1, 2); anything unparseable -> (0, 0) (left alone)."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1].split("-")[0])
    except (IndexError, ValueError):
        return (0, 0)


def rewrite_spec(
    spec: Mapping[str, Any],
    *,
    container_id: str,
    sandbox_id: str,
    guest_mounts: Mapping[str, str],
    guest_share_dir: str = GUEST_SHARE_DIR,
    pod: PodNamespaces | None = None,
) -> GuestSpec:
    """Return the guest's copy of ``spec`` and the list of adjustments made (``spec`` is not changed).

    ``guest_mounts`` maps a bind mount's spec destination to its guest source path
    (``SharedMounts.guest_paths``); bind mounts missing from it are dropped and reported. ``pod``: the
    running sandbox container of this pod, whose ipc/uts/pid namespaces a CRI app container joins.
    :raises InvalidArgument: when the spec is not a JSON object with a ``root`` or the ids are invalid.
    """
    validate_id(container_id, kind="container id")
    validate_id(sandbox_id, kind="sandbox id")
    if not isinstance(spec, Mapping):
        raise InvalidArgument("OCI spec must be a JSON object")
    out: dict[str, Any] = copy.deepcopy(dict(spec))
    adj: list[str] = []
    cri = is_cri(out)

    # root
    root = out.get("root")
    if not isinstance(root, dict) or not root.get("path"):
        raise InvalidArgument("OCI spec has no root.path")
    guest_root = f"{guest_share_dir}/{container_id}/rootfs"
    adj.append(f"root.path {root['path']!r} -> {guest_root!r}")
    out["root"] = {"path": guest_root, **({"readonly": root["readonly"]} if "readonly" in root else {})}

    # mounts
    mounts = []
    for m in out.get("mounts") or []:
        if not _is_bind(m):
            mounts.append(m)
            continue
        dest = m.get("destination", "")
        guest = guest_mounts.get(dest)
        if guest is None:
            adj.append(f"dropped bind mount {dest} (source {m.get('source')!r} is not shared with the VM)")
            continue
        mounts.append({**m, "source": guest, "type": "bind"})
        adj.append(f"bind mount {dest}: source {m.get('source')!r} -> {guest!r}")
    if "mounts" in out:
        out["mounts"] = mounts

    linux = out.get("linux")
    if isinstance(linux, dict):
        # namespaces
        namespaces = []
        for ns in linux.get("namespaces") or []:
            kind, path = ns.get("type"), ns.get("path")
            if kind == "network" and (cri or path):
                adj.append(
                    f"dropped network namespace {path or '(new)'}: the container uses the VM's network"
                )
                continue
            guest_path = pod.guest_path(kind, path) if path and pod is not None and cri else None
            if guest_path is not None:
                adj.append(f"{kind} namespace: the pod sandbox's {path!r} -> {guest_path!r} in the guest")
                ns = {**ns, "path": guest_path}
            elif path:
                adj.append(
                    f"{kind} namespace: dropped host path {path!r}; a new {kind} namespace in the guest"
                )
                ns = {k: v for k, v in ns.items() if k != "path"}
            namespaces.append(ns)
        if "namespaces" in linux:
            linux["namespaces"] = namespaces

        # cgroups
        new_cg = guest_cgroups_path(sandbox_id, container_id)
        old_cg = linux.get("cgroupsPath")
        if old_cg != new_cg:
            style = " (systemd style)" if old_cg and ":" in old_cg and not old_cg.startswith("/") else ""
            adj.append(f"linux.cgroupsPath {old_cg!r}{style} -> {new_cg!r}")
        linux["cgroupsPath"] = new_cg

        if linux.pop("mountLabel", None) is not None:
            adj.append("dropped linux.mountLabel (no SELinux in the guest)")

    process = out.get("process")
    if isinstance(process, dict):
        for key, why in (
            ("apparmorProfile", "no AppArmor in the guest"),
            ("selinuxLabel", "no SELinux in the guest"),
        ):
            value = process.pop(key, None)
            if value is not None:
                adj.append(f"dropped process.{key} {value!r} ({why})")

    version = out.get("ociVersion")
    if isinstance(version, str) and _major_minor(version) > GUEST_MAX_OCI_VERSION:
        lowered = "{}.{}.0".format(*GUEST_MAX_OCI_VERSION)
        out["ociVersion"] = lowered
        adj.append(f"ociVersion {version!r} -> {lowered!r} (the newest the guest's crun accepts)")

    hooks = out.pop("hooks", None)
    if hooks:
        kinds = ", ".join(f"{k}: {len(v)}" for k, v in hooks.items() if v)
        adj.append(f"dropped hooks ({kinds}): they name host paths")

    log.debug("spec rewritten for the guest", container_id=container_id, adjustments=adj)
    return GuestSpec(out, adj)


__all__ = [
    "CONTAINER_TYPE_ANNOTATION",
    "GUEST_CGROUP_ROOT",
    "GuestSpec",
    "guest_cgroups_path",
    "is_cri",
    "rewrite_spec",
]
