"""Memory hotplug mechanism: *how* a running VM gets to a memory size. *How much* is policy (resources).

API (both mechanisms)::

    mem = DimmMemory(qmp, boot_mib=..., max_mib=..., slots=..., timeout=...)    # or VirtioMemMemory(...)
    await mem.refresh()                      # learn what QEMU already has (after attach)
    mem.block_bytes = <from the guest>       # /sys/devices/system/memory/block_size_bytes; default 128 MiB
    state = await mem.resize(target_bytes)   # -> MemoryState, what QEMU reports *after* the change

``resize`` raises:

- :class:`ResourceExhausted` when ``target`` exceeds max memory (both numbers in the message) or no
  DIMM slot is free; nothing is changed and the VM keeps running;
- :class:`FailedPrecondition` when the guest refuses to give memory back (pc-dimm eject answered with
  ACPI _OST status 0x82: the memory was not onlined movable); the DIMM stays plugged and accounted;
- :class:`DeadlineExceeded` when QEMU/the guest did not confirm in time; the state then reports what
  QEMU has at that moment;
- :class:`QMPCommandError` / :class:`Unavailable` from QMP.

Growth with pc-dimm: each step adds at most ``48 x`` the current memory (the guest needs free RAM for
the struct-page map of the new memory; Kata uses the same factor), rounded to the guest memory block
size; each step is ``object-add`` (memfd, share=on: virtiofsd must map it) then ``device_add pc-dimm``
and waits for the guest's ``ACPI_DEVICE_OST`` (insert, status 0). A failed ``device_add`` deletes the
backend it just added. Shrinking removes the newest DIMMs whose removal keeps the VM at or above the
target: ``device_del``, wait for ``DEVICE_DELETED`` (or a refusing _OST), then ``object-del``.

virtio-mem: one device sized ``max - boot`` at boot; ``resize`` sets ``requested-size`` (aligned to the
block size) and polls the device's ``size`` until it reaches it. Onlining the new memory inside the
guest is the agent's job (or ``memhp_default_state=online_movable`` on the kernel command line).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

from shim.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceExhausted
from shim.hypervisor.qemu.cmdline import MemoryBackend
from shim.hypervisor.qemu.qmp import Qmp
from shim.log import get_logger

log = get_logger("pyvm.hypervisor.memory")

MiB = 1024 * 1024
DEFAULT_BLOCK_BYTES = 128 * MiB
#: each pc-dimm step adds at most this many times the VM's current memory
GROWTH_FACTOR = 48
OST_INSERT, OST_EJECT = 1, 3
OST_SUCCESS, OST_BUSY, OST_IN_PROGRESS = 0x0, 0x82, 0x84


@dataclass(frozen=True)
class Dimm:
    id: str
    memdev: str
    size: int
    slot: int | None = None
    addr: int | None = None


@dataclass(frozen=True)
class MemoryState:
    """What QEMU reports the VM has (not what was asked)."""

    boot_bytes: int
    max_bytes: int
    #: hot-plugged bytes: sum of DIMM sizes + the virtio-mem device's current ``size``
    plugged_bytes: int
    dimms: tuple[Dimm, ...] = ()
    virtio_mem_requested: int | None = None
    slots_free: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.boot_bytes + self.plugged_bytes


def align_up(value: int, block: int) -> int:
    return -(-value // block) * block


class _Base:
    def __init__(self, qmp: Qmp, *, boot_mib: int, max_mib: int, timeout: float) -> None:
        self.qmp = qmp
        self.boot = boot_mib * MiB
        self.max = max_mib * MiB
        self.timeout = timeout
        self._block = DEFAULT_BLOCK_BYTES
        self._lock = asyncio.Lock()

    @property
    def block_bytes(self) -> int:
        return self._block

    @block_bytes.setter
    def block_bytes(self, value: int) -> None:
        if value <= 0 or value & (value - 1) or value % MiB:
            raise InvalidArgument(f"guest memory block size {value} must be a power of two multiple of 1 MiB")
        self._block = value

    def _check_max(self, target: int) -> None:
        if target > self.max:
            raise ResourceExhausted(
                f"requested VM memory {target // MiB} MiB exceeds max_memory {self.max // MiB} MiB",
                requested=target,
                max=self.max,
            )


class DimmMemory(_Base):
    """pc-dimm hotplug (x86 q35; arm64 virt only with UEFI firmware, where acpi-ged exists)."""

    def __init__(self, qmp: Qmp, *, boot_mib: int, max_mib: int, slots: int, timeout: float) -> None:
        super().__init__(qmp, boot_mib=boot_mib, max_mib=max_mib, timeout=timeout)
        self.slots = slots
        self._dimms: list[Dimm] = []
        self._seq = itertools.count(1)

    async def refresh(self) -> MemoryState:
        devs = await self.qmp.query_memory_devices()
        dimms = []
        for d in devs:
            if d.get("type") != "dimm":
                continue
            data = d["data"]
            memdev = str(data.get("memdev", "")).rsplit("/", 1)[-1]
            dimms.append(
                Dimm(str(data.get("id")), memdev, int(data["size"]), data.get("slot"), data.get("addr"))
            )
        self._dimms = dimms
        used = [int(d.id[4:]) for d in dimms if d.id.startswith("dimm") and d.id[4:].isdigit()]
        self._seq = itertools.count(max(used, default=0) + 1)
        return self.state()

    def state(self) -> MemoryState:
        plugged = sum(d.size for d in self._dimms)
        return MemoryState(
            self.boot, self.max, plugged, tuple(self._dimms), None, self.slots - len(self._dimms)
        )

    async def resize(self, target_bytes: int) -> MemoryState:
        async with self._lock:
            self._check_max(target_bytes)
            await self.refresh()
            current = self.state().total_bytes
            if target_bytes > current:
                await self._grow(target_bytes)
            elif target_bytes < current:
                await self._shrink(max(target_bytes, self.boot))
            return await self.refresh()

    async def _grow(self, target: int) -> None:
        current = self.state().total_bytes
        need = align_up(target - current, self._block)
        if current + need > self.max:
            need = (self.max - current) // self._block * self._block
            if current + need < target:
                raise ResourceExhausted(
                    f"requested VM memory {target // MiB} MiB exceeds max_memory {self.max // MiB} MiB "
                    f"once aligned to {self._block // MiB} MiB blocks",
                    requested=target,
                    max=self.max,
                )
        while need > 0:
            step_cap = max(self._block, (GROWTH_FACTOR * current) // self._block * self._block)
            step = min(need, step_cap)
            if len(self._dimms) >= self.slots:
                raise ResourceExhausted(
                    f"no free memory slot: all {self.slots} memory_slots hold DIMMs "
                    f"({current // MiB} MiB plugged of the {target // MiB} MiB requested)",
                    slots=self.slots,
                )
            await self._plug(step)
            current += step
            need -= step

    async def _plug(self, size: int) -> None:
        n = next(self._seq)
        dimm = Dimm(f"dimm{n}", f"mem{n}", size)
        backend = MemoryBackend(dimm.memdev, size // MiB)
        t0 = time.monotonic()
        await self.qmp.execute("object-add", backend.qmp_args())
        async with self.qmp.subscribe("ACPI_DEVICE_OST") as ost:
            try:
                await self.qmp.device_add("pc-dimm", dimm.id, memdev=dimm.memdev)
            except BaseException:
                # roll back the half-done plug: the backend is useless without its DIMM
                try:
                    await self.qmp.object_del(dimm.memdev)
                except Exception as exc:  # keep the original error; note the leak
                    log.error("rollback object-del failed", memdev=dimm.memdev, error=str(exc))
                raise
            self._dimms.append(dimm)
            try:
                ev = await ost.wait(
                    lambda e: (
                        e["data"].get("info", {}).get("device") == dimm.id
                        and e["data"].get("info", {}).get("source") == OST_INSERT
                    ),
                    self.timeout,
                )
            except DeadlineExceeded as exc:
                raise DeadlineExceeded(
                    f"the guest did not acknowledge DIMM {dimm.id} ({size // MiB} MiB) within {self.timeout:g} s "
                    "(no ACPI_DEVICE_OST): the DIMM stays plugged in QEMU",
                    device=dimm.id,
                ) from exc
        status = ev["data"]["info"].get("status")
        log.info(
            "dimm plugged",
            device=dimm.id,
            size_mib=size // MiB,
            ost_status=status,
            ms=round((time.monotonic() - t0) * 1000, 1),
        )
        if status != OST_SUCCESS:
            raise FailedPrecondition(
                f"the guest rejected DIMM {dimm.id} ({size // MiB} MiB): ACPI _OST status {status:#x}",
                device=dimm.id,
                ost_status=status,
            )

    async def _shrink(self, target: int) -> None:
        total = self.state().total_bytes
        for dimm in sorted(self._dimms, key=_dimm_order, reverse=True):
            if total - dimm.size < target:
                continue
            await self._unplug(dimm)
            total -= dimm.size

    async def _unplug(self, dimm: Dimm) -> None:
        t0 = time.monotonic()

        def done(e: Any) -> bool:
            d = e["data"]
            if e["event"] == "DEVICE_DELETED":
                return d.get("device") == dimm.id
            info = d.get("info", {})
            return (
                info.get("device") == dimm.id
                and info.get("source") == OST_EJECT
                and info.get("status") not in (OST_SUCCESS, OST_IN_PROGRESS)
            )

        async with self.qmp.subscribe("DEVICE_DELETED", "ACPI_DEVICE_OST") as sub:
            await self.qmp.device_del(dimm.id)
            try:
                ev = await sub.wait(done, self.timeout)
            except DeadlineExceeded as exc:
                raise DeadlineExceeded(
                    f"DIMM {dimm.id} was not released by the guest within {self.timeout:g} s; it stays plugged",
                    device=dimm.id,
                ) from exc
        if ev["event"] != "DEVICE_DELETED":
            status = ev["data"]["info"]["status"]
            raise FailedPrecondition(
                f"the guest refused to release DIMM {dimm.id} ({dimm.size // MiB} MiB): ACPI _OST status "
                f"{status:#x}{' (busy: its memory is in use and not movable)' if status == OST_BUSY else ''}; "
                "the guest must online hot-added memory as movable (memhp_default_state=online_movable) "
                "for pc-dimm unplug to work. The DIMM stays plugged.",
                device=dimm.id,
                ost_status=status,
            )
        # only now is the backend free
        await self.qmp.object_del(dimm.memdev)
        self._dimms = [d for d in self._dimms if d.id != dimm.id]
        log.info(
            "dimm unplugged",
            device=dimm.id,
            size_mib=dimm.size // MiB,
            ms=round((time.monotonic() - t0) * 1000, 1),
        )


def _dimm_order(d: Dimm) -> int:
    tail = d.id[4:]
    return int(tail) if tail.isdigit() else -1


class VirtioMemMemory(_Base):
    """One virtio-mem device (id ``dev_id``) whose ``requested-size`` follows the target."""

    POLL = 0.02

    def __init__(
        self, qmp: Qmp, *, boot_mib: int, max_mib: int, timeout: float, dev_id: str = "vmem0"
    ) -> None:
        super().__init__(qmp, boot_mib=boot_mib, max_mib=max_mib, timeout=timeout)
        self.dev_id = dev_id
        self._size = 0
        self._requested = 0

    @property
    def _path(self) -> str:
        return f"/machine/peripheral/{self.dev_id}"

    async def refresh(self) -> MemoryState:
        self._size = int(await self.qmp.qom_get(self._path, "size"))
        self._requested = int(await self.qmp.qom_get(self._path, "requested-size"))
        return self.state()

    def state(self) -> MemoryState:
        return MemoryState(self.boot, self.max, self._size, (), self._requested, None)

    async def resize(self, target_bytes: int) -> MemoryState:
        async with self._lock:
            self._check_max(target_bytes)
            requested = min(self.max - self.boot, align_up(max(0, target_bytes - self.boot), self._block))
            await self.qmp.qom_set(self._path, "requested-size", requested)
            self._requested = requested
            t0 = time.monotonic()
            # shrinking migrates and offlines pages: allow ~1 timeout per GiB moved on top of the base
            moved = abs(requested - self._size)
            deadline = t0 + self.timeout * (1 + moved / (1024 * MiB))
            while True:
                self._size = int(await self.qmp.qom_get(self._path, "size"))
                if self._size == requested:
                    break
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(
                        f"virtio-mem {self.dev_id} reached {self._size // MiB} MiB, not the requested "
                        f"{requested // MiB} MiB, within {deadline - t0:.1f} s (the guest may not be able to "
                        "release memory it did not online movable)",
                        requested=requested,
                        size=self._size,
                    )
                await asyncio.sleep(self.POLL)
            log.info(
                "virtio-mem resized",
                device=self.dev_id,
                size_mib=self._size // MiB,
                ms=round((time.monotonic() - t0) * 1000, 1),
            )
            return self.state()


class NoHotplug(_Base):
    """``memory_hotplug = "none"``: the VM keeps its boot memory."""

    async def refresh(self) -> MemoryState:
        return self.state()

    def state(self) -> MemoryState:
        return MemoryState(self.boot, self.boot, 0)

    async def resize(self, target_bytes: int) -> MemoryState:
        if target_bytes > self.boot:
            raise ResourceExhausted(
                f"requested VM memory {target_bytes // MiB} MiB exceeds the fixed {self.boot // MiB} MiB "
                '(memory_hotplug = "none")',
                requested=target_bytes,
                max=self.boot,
            )
        return self.state()


MemoryMechanism = DimmMemory | VirtioMemMemory | NoHotplug

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "GROWTH_FACTOR",
    "Dimm",
    "DimmMemory",
    "MemoryMechanism",
    "MemoryState",
    "NoHotplug",
    "VirtioMemMemory",
    "align_up",
]
