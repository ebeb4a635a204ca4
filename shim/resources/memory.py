"""Memory policy: how big a sandbox VM should be. The hypervisor layer decides *how* to get there.

Target = ``default_memory`` + the sum of the memory limits of the sandbox's containers, rounded up to
the guest's memory block size (hot-plug granularity; 128 MiB on x86_64). Containers without a limit
add nothing (they share the default memory, as in Kata). Before any app container exists, the CRI
sandbox sizing annotation (``io.kubernetes.cri.sandbox-memory``, kubelet's sum of the pod's limits)
stands in for the sum, so the VM is sized once for the whole pod instead of growing per container.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shim.errors import InvalidArgument, ResourceExhausted

MiB = 1 << 20
#: cgroup "no limit" values arrive as huge numbers; anything above this is treated as unlimited.
UNLIMITED_THRESHOLD = 1 << 62
SANDBOX_MEMORY_ANNOTATION = "io.kubernetes.cri.sandbox-memory"


@dataclass(frozen=True)
class MemoryPlan:
    """What the policy decided, with the numbers that led to it (all bytes)."""

    default: int
    reserved: int
    target: int
    maximum: int

    @property
    def hotplug(self) -> int:
        """Bytes above the boot memory that must be plugged."""
        return self.target - self.default


def round_up(value: int, block: int) -> int:
    if block <= 0:
        raise InvalidArgument(f"memory block size must be positive, got {block}")
    return -(-value // block) * block


def limit_of(limit: int | None) -> int:
    """A container's memory limit in bytes as counted by the policy (0 = no limit)."""
    if limit is None or limit <= 0 or limit >= UNLIMITED_THRESHOLD:
        return 0
    return limit


def sandbox_memory_hint(annotations: Mapping[str, str]) -> int:
    """Bytes from the CRI sandbox-memory annotation, 0 when absent.

    :raises InvalidArgument: when present but not a non-negative integer.
    """
    raw = annotations.get(SANDBOX_MEMORY_ANNOTATION)
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(
            f"annotation {SANDBOX_MEMORY_ANNOTATION}={raw!r} is not a number of bytes"
        ) from None
    if value < 0:
        raise InvalidArgument(f"annotation {SANDBOX_MEMORY_ANNOTATION}={raw!r} must not be negative")
    return limit_of(value)


def plan(
    *,
    default: int,
    maximum: int,
    block: int,
    limits: Mapping[str, int | None],
    sandbox_hint: int = 0,
) -> MemoryPlan:
    """Compute the memory target for a sandbox.

    :param default: boot memory in bytes (config ``default_memory``)
    :param maximum: the most the VM may have in bytes (config ``max_memory``)
    :param block: guest memory block size in bytes (from the guest, e.g. 128 MiB)
    :param limits: container id -> memory limit in bytes (None/0/huge = unlimited) of the app
        containers that count (created and not yet deleted)
    :param sandbox_hint: the CRI sandbox-memory annotation in bytes; used while no app container
        has a limit
    :raises ResourceExhausted: when the target exceeds ``maximum``; the message names both numbers.
    """
    reserved = sum(limit_of(v) for v in limits.values())
    if reserved == 0:
        reserved = sandbox_hint
    target = default + round_up(reserved, block) if reserved else default
    if target > maximum:
        raise ResourceExhausted(
            f"memory target {target // MiB} MiB (default {default // MiB} MiB + limits "
            f"{reserved // MiB} MiB, rounded to {block // MiB} MiB blocks) exceeds max_memory "
            f"{maximum // MiB} MiB",
            target=target,
            maximum=maximum,
        )
    return MemoryPlan(default=default, reserved=reserved, target=target, maximum=maximum)


__all__ = [
    "MiB",
    "SANDBOX_MEMORY_ANNOTATION",
    "MemoryPlan",
    "limit_of",
    "plan",
    "round_up",
    "sandbox_memory_hint",
]
