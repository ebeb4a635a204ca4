"""Per-pod overrides from ``io.pyvm.*`` annotations, accepted only where the configuration allows them.

A pod asks for a different VM shape with annotations such as ``io.pyvm.default_memory: "1024"``.
containerd passes them into the sandbox's OCI spec only if its runtime entry lists them in
``pod_annotations`` (``pyvm install`` writes ``["io.pyvm.*"]``). Like Kata's ``enable_annotations``,
the node's ``[runtime] enable_annotations`` decides which of them pyvm honours: a pod cannot resize
its VM beyond what the node operator opted into. Entries are annotation names without the prefix
(``"default_memory"``), the full key (``"io.pyvm.default_memory"``) or shell-style globs (``"memory_*"``,
``"*"``).

Every ``io.pyvm.*`` annotation must be known, enabled and well-formed, or the whole sandbox is refused
with an ``InvalidArgument`` naming the annotation, its value and what is valid: silently ignoring a
typo would boot a VM of the wrong size. Annotations outside the prefix are not ours and are ignored.
Cross-key checks (``max_memory`` >= ``default_memory``, firmware for ACPI hotplug on arm64) happen when
the overrides are applied to the configuration (``shim.config.with_overrides``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from shim.config import HOTPLUG
from shim.errors import InvalidArgument

PREFIX = "io.pyvm."
_MAX_MIB = 1 << 22  # 4 TiB, far above anything QEMU is asked for on a node


@dataclass(frozen=True)
class PodOverrides:
    """Configuration overrides one pod asked for; None = not asked (use the node's configuration).

    Field names are ``[hypervisor]`` keys of ``shim.config`` so ``hypervisor_overrides()`` can feed
    ``shim.config.with_overrides`` directly. Memory in MiB.
    """

    default_memory: int | None = None
    max_memory: int | None = None
    memory_slots: int | None = None
    memory_hotplug: str | None = None
    vcpus: int | None = None

    def hypervisor_overrides(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __bool__(self) -> bool:
        return bool(self.hypervisor_overrides())


def _integer(lo: int, hi: int, unit: str = "") -> tuple[Callable[[str], int], str]:
    suffix = f" {unit}" if unit else ""

    def parse(raw: str) -> int:
        text = raw.strip()
        if not text.isdigit() or not text.isascii():
            raise ValueError
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError
        return value

    return parse, f"a decimal integer from {lo} to {hi}{suffix}"


def _choice(values: Sequence[str]) -> tuple[Callable[[str], str], str]:
    def parse(raw: str) -> str:
        text = raw.strip()
        if text not in values:
            raise ValueError
        return text

    return parse, "one of " + ", ".join(f'"{v}"' for v in values)


#: annotation suffix -> (parser, description of what is valid)
KNOWN: dict[str, tuple[Callable[[str], Any], str]] = {
    "default_memory": _integer(64, _MAX_MIB, "MiB"),
    "max_memory": _integer(64, _MAX_MIB, "MiB"),
    "memory_slots": _integer(0, 255),
    "memory_hotplug": _choice(HOTPLUG),
    "vcpus": _integer(1, 255),
}


def parse_pod_annotations(annotations: Mapping[str, str], enabled: Sequence[str]) -> PodOverrides:
    """The overrides the pod's ``io.pyvm.*`` annotations ask for.

    :param annotations: the sandbox's OCI annotations (any keys; only ``io.pyvm.*`` are read).
    :param enabled: the configuration's ``[runtime] enable_annotations``.
    :raises InvalidArgument: for an unknown ``io.pyvm.*`` key, one that ``enabled`` does not allow, or a
        malformed value; the message names the annotation, its value and what is valid or enabled.
    """
    values: dict[str, Any] = {}
    for key in sorted(annotations):
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX) :]
        raw = annotations[key]
        if name not in KNOWN:
            raise InvalidArgument(
                f'unknown pyvm annotation {key}="{raw}"; known: '
                + ", ".join(PREFIX + k for k in KNOWN)
                + ". Remove it or fix the spelling",
                annotation=key,
                value=raw,
            )
        if not _is_enabled(name, enabled):
            allowed = ", ".join(f'"{e}"' for e in enabled) if enabled else "nothing"
            raise InvalidArgument(
                f'annotation {key}="{raw}" is not enabled on this node: [runtime] enable_annotations '
                f'allows {allowed}. Ask the node operator to add "{name}" to enable_annotations in the '
                f"pyvm configuration, or drop the annotation",
                annotation=key,
                value=raw,
                enabled=list(enabled),
            )
        parse, valid = KNOWN[name]
        try:
            values[name] = parse(raw)
        except ValueError:
            raise InvalidArgument(
                f'annotation {key}="{raw}" is invalid: must be {valid}', annotation=key, value=raw
            ) from None
    overrides = PodOverrides(**values)
    if (
        overrides.default_memory is not None
        and overrides.max_memory is not None
        and overrides.max_memory < overrides.default_memory
    ):
        raise InvalidArgument(
            f'annotation {PREFIX}max_memory="{overrides.max_memory}" is smaller than '
            f'{PREFIX}default_memory="{overrides.default_memory}"; max_memory must be at least default_memory',
            annotation=f"{PREFIX}max_memory",
            value=str(overrides.max_memory),
        )
    return overrides


def _is_enabled(name: str, enabled: Sequence[str]) -> bool:
    for pattern in enabled:
        short = pattern[len(PREFIX) :] if pattern.startswith(PREFIX) else pattern
        if fnmatch.fnmatchcase(name, short):
            return True
    return False


__all__ = ["KNOWN", "PREFIX", "PodOverrides", "parse_pod_annotations"]


CRI_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
CRI_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"


def cri_sandbox_vcpus(annotations: Mapping[str, str], *, host_cpus: int) -> int | None:
    """vCPUs the pod's CPU limits ask for (kubelet's sandbox-cpu-quota / -period), capped at the
    host's CPUs; None when the pod has no CPU limit or the annotations are absent or malformed."""
    try:
        quota = int(annotations.get(CRI_CPU_QUOTA, "0") or 0)
        period = int(annotations.get(CRI_CPU_PERIOD, "0") or 0)
    except ValueError:
        return None
    return _vcpus(quota, period, host_cpus)


def container_vcpus(resources: Mapping[str, Any], *, host_cpus: int) -> int | None:
    """vCPUs a container's own CPU limit asks for (OCI ``linux.resources.cpu`` quota / period, e.g.
    ``ctr run --cpus 2``), capped at the host's CPUs; None without a limit or when malformed."""
    cpu = resources.get("cpu")
    if not isinstance(cpu, Mapping):
        return None
    quota, period = cpu.get("quota"), cpu.get("period")
    if not isinstance(quota, int) or not isinstance(period, int) or isinstance(quota, bool):
        return None
    return _vcpus(quota, period, host_cpus)


def _vcpus(quota: int, period: int, host_cpus: int) -> int | None:
    if quota <= 0 or period <= 0:
        return None
    return max(1, min(host_cpus, -(-quota // period)))
