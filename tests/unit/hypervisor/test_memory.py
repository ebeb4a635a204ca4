"""Memory mechanism against a scripted fake QMP: steps, alignment, rollback, refusals, limits."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shim.errors import DeadlineExceeded, FailedPrecondition, QMPCommandError, ResourceExhausted
from shim.hypervisor.qemu.memory import DimmMemory, NoHotplug, VirtioMemMemory
from shim.hypervisor.qemu.qmp import Subscription

MiB = 1 << 20


class FakeQmp:
    """Just enough of shim.hypervisor.qemu.qmp.Qmp: records commands, emits ACPI events."""

    def __init__(
        self, *, refuse_unplug: bool = False, fail_device_add: bool = False, silent: bool = False
    ) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.objects: dict[str, int] = {}
        self.dimms: dict[str, str] = {}
        self.subs: set[Subscription] = set()
        self.refuse_unplug = refuse_unplug
        self.fail_device_add = fail_device_add
        self.silent = silent
        self.vmem = {"size": 0, "requested-size": 0}

    @contextlib.asynccontextmanager
    async def subscribe(self, *names: str) -> AsyncIterator[Subscription]:
        sub = Subscription(frozenset(names))
        self.subs.add(sub)
        try:
            yield sub
        finally:
            self.subs.discard(sub)

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        for s in self.subs:
            if name in s.names:
                s.queue.put_nowait({"event": name, "data": data})

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        args = args or {}
        self.calls.append((cmd, args))
        if cmd == "object-add":
            self.objects[args["id"]] = args["size"]
        elif cmd == "object-del":
            del self.objects[args["id"]]
        elif cmd == "query-memory-devices":
            return [
                {
                    "type": "dimm",
                    "data": {"id": d, "memdev": f"/objects/{m}", "size": self.objects[m], "slot": i},
                }
                for i, (d, m) in enumerate(self.dimms.items())
            ]
        return {}

    async def device_add(self, driver: str, dev_id: str, **props: Any) -> None:
        self.calls.append(("device_add", {"driver": driver, "id": dev_id, **props}))
        if self.fail_device_add:
            raise QMPCommandError("QMP device_add failed: GenericError: boom", error_class="GenericError")
        self.dimms[dev_id] = props["memdev"]
        if not self.silent:
            self._emit("ACPI_DEVICE_OST", {"info": {"device": dev_id, "source": 1, "status": 0}})

    async def device_del(self, dev_id: str) -> None:
        self.calls.append(("device_del", {"id": dev_id}))
        self._emit("ACPI_DEVICE_OST", {"info": {"device": dev_id, "source": 3, "status": 0x84}})
        if self.refuse_unplug:
            self._emit("ACPI_DEVICE_OST", {"info": {"device": dev_id, "source": 3, "status": 0x82}})
        else:
            del self.dimms[dev_id]
            self._emit("DEVICE_DELETED", {"device": dev_id})

    async def object_del(self, obj_id: str) -> None:
        await self.execute("object-del", {"id": obj_id})

    async def query_memory_devices(self) -> list[dict[str, Any]]:
        return await self.execute("query-memory-devices")

    async def qom_get(self, path: str, prop: str) -> Any:
        if prop == "size" and self.vmem["size"] != self.vmem["requested-size"]:
            # the guest converges over a few polls
            step = 256 * MiB
            d = self.vmem["requested-size"] - self.vmem["size"]
            self.vmem["size"] += max(-step, min(step, d))
        return self.vmem[prop]

    async def qom_set(self, path: str, prop: str, value: Any) -> None:
        self.vmem[prop] = value


def dimm_mem(q: FakeQmp, boot: int = 512, max_mib: int = 8192, slots: int = 4) -> DimmMemory:
    return DimmMemory(q, boot_mib=boot, max_mib=max_mib, slots=slots, timeout=0.5)  # type: ignore[arg-type]


async def test_grow_aligns_to_block_and_reports_qemu_state() -> None:
    q = FakeQmp()
    m = dimm_mem(q)
    st = await m.resize(1000 * MiB)  # 488 MiB more -> 512 MiB (4 x 128 MiB blocks)
    assert st.plugged_bytes == 512 * MiB and st.total_bytes == 1024 * MiB
    calls = [c for c in q.calls if c[0] != "query-memory-devices"]
    assert calls[0] == (
        "object-add",
        {"qom-type": "memory-backend-memfd", "id": "mem1", "size": 512 * MiB, "share": True},
    )
    assert calls[1] == ("device_add", {"driver": "pc-dimm", "id": "dimm1", "memdev": "mem1"})
    assert st.slots_free == 3


async def test_grow_in_steps_of_48x_current() -> None:
    q = FakeQmp()
    m = dimm_mem(q, boot=128, max_mib=128 * 49 + 128 * 49 * 49, slots=4)
    await m.resize((128 + 128 * 48 + 1024) * MiB)
    sizes = [a["size"] // MiB for c, a in q.calls if c == "object-add"]
    assert sizes == [128 * 48, 1024]


async def test_failed_device_add_rolls_back_the_backend() -> None:
    q = FakeQmp(fail_device_add=True)
    m = dimm_mem(q)
    with pytest.raises(QMPCommandError):
        await m.resize(1024 * MiB)
    assert q.objects == {}
    assert [c for c, _ in q.calls if c in ("object-add", "object-del")] == ["object-add", "object-del"]


async def test_above_max_is_resource_exhausted_naming_both_numbers_and_changes_nothing() -> None:
    q = FakeQmp()
    m = dimm_mem(q, max_mib=4096)
    with pytest.raises(ResourceExhausted, match="5000 MiB exceeds max_memory 4096 MiB"):
        await m.resize(5000 * MiB)
    assert q.calls == []


async def test_no_free_slot() -> None:
    q = FakeQmp()
    m = dimm_mem(q, slots=1)
    await m.resize(1024 * MiB)
    with pytest.raises(ResourceExhausted, match="no free memory slot"):
        await m.resize(2048 * MiB)


async def test_shrink_unplugs_newest_dimm_then_deletes_backend() -> None:
    q = FakeQmp()
    m = dimm_mem(q)
    await m.resize(1024 * MiB)
    await m.resize(2048 * MiB)
    q.calls.clear()
    st = await m.resize(1024 * MiB)
    calls = [c for c in q.calls if c[0] != "query-memory-devices"]
    assert calls == [("device_del", {"id": "dimm2"}), ("object-del", {"id": "mem2"})]
    assert st.total_bytes == 1024 * MiB and [d.id for d in st.dimms] == ["dimm1"]


async def test_shrink_never_goes_below_target() -> None:
    q = FakeQmp()
    m = dimm_mem(q)
    await m.resize(1536 * MiB)  # one 1 GiB DIMM
    st = await m.resize(1024 * MiB)
    assert st.total_bytes == 1536 * MiB  # removing it would undershoot


async def test_guest_refusing_unplug_is_reported_and_state_kept() -> None:
    q = FakeQmp(refuse_unplug=True)
    m = dimm_mem(q)
    await m.resize(1024 * MiB)
    with pytest.raises(FailedPrecondition, match=r"refused.*0x82.*online_movable"):
        await m.resize(512 * MiB)
    assert "mem1" in q.objects  # backend not deleted while the DIMM exists
    st = await m.refresh()
    assert st.plugged_bytes == 512 * MiB


async def test_missing_ost_is_deadline_and_dimm_stays_accounted() -> None:
    q = FakeQmp(silent=True)
    m = dimm_mem(q)
    with pytest.raises(DeadlineExceeded, match="did not acknowledge"):
        await m.resize(1024 * MiB)
    assert (await m.refresh()).plugged_bytes == 512 * MiB


async def test_virtio_mem_resize_waits_for_size() -> None:
    q = FakeQmp()
    m = VirtioMemMemory(q, boot_mib=512, max_mib=4096, timeout=2.0)  # type: ignore[arg-type]
    m.POLL = 0.001
    st = await m.resize(1500 * MiB)
    assert st.plugged_bytes == 1024 * MiB and st.virtio_mem_requested == 1024 * MiB
    st = await m.resize(512 * MiB)
    assert st.plugged_bytes == 0
    with pytest.raises(ResourceExhausted, match="4097 MiB exceeds max_memory 4096 MiB"):
        await m.resize(4097 * MiB)


async def test_virtio_mem_stuck_is_deadline_with_real_size() -> None:
    q = FakeQmp()
    m = VirtioMemMemory(q, boot_mib=512, max_mib=4096, timeout=0.05)  # type: ignore[arg-type]
    m.POLL = 0.001

    async def stuck(path: str, prop: str) -> Any:
        return 0 if prop == "size" else q.vmem[prop]

    q.qom_get = stuck  # type: ignore[method-assign]
    with pytest.raises(DeadlineExceeded, match="reached 0 MiB, not the requested 512 MiB"):
        await m.resize(1024 * MiB)
    assert m.state().plugged_bytes == 0


async def test_no_hotplug() -> None:
    m = NoHotplug(FakeQmp(), boot_mib=512, max_mib=512, timeout=1)  # type: ignore[arg-type]
    assert (await m.resize(256 * MiB)).total_bytes == 512 * MiB
    with pytest.raises(ResourceExhausted, match='memory_hotplug = "none"'):
        await m.resize(1024 * MiB)


def test_block_size_must_be_power_of_two() -> None:
    m = dimm_mem(FakeQmp())
    m.block_bytes = 512 * MiB
    from shim.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        m.block_bytes = 100 * MiB
