"""The guest agent inside the real guest image, booted by the QEMU driver under TCG (issue 4's "Done when").

One VM per module: QEMU (q35, OVMF pflash, memfd share=on RAM, pc-dimm hotplug) + virtiofsd sharing
a directory that holds a busybox rootfs under the tag ``pyvm-shared``; the agent is reached over the
virtio-serial port ``io.pyvm.agent.0`` through QEMU's unix chardev socket. Needs the guest image:
``.venv/bin/pyvm guest build --arch x86_64``. Every process and file is cleaned up, pass or fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from shim.agentclient import AgentClient, Stdio, TemplatePrepared, wait_ready
from shim.errors import InvalidArgument, NotFound
from shim.paths import GUEST_SHARE_DIR, SHARE_TAG, SandboxDir, guest_dir
from tests.integration.test_agent_host import build_busybox_rootfs, process, read_all, run_to_exit, spec

pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd and QEMU's memfd share need root"),
]

TIMEOUT_FACTOR = 10.0  # TCG: see DESIGN.md "Facts of this world"
BOOT_MIB = 1024
MiB = 1 << 20


class VM:
    def __init__(self, vm: object, client: AgentClient, sdir: SandboxDir, prepared: TemplatePrepared) -> None:
        self.vm = vm
        self.client = client
        self.sdir = sdir
        self.rootfs = f"{GUEST_SHARE_DIR}/rootfs"
        #: PrepareTemplate's answer, asked right after Health as the template builder does
        self.prepared = prepared


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VM]:
    from shim import config as config_mod
    from shim.hypervisor.qemu.driver import QemuVM
    from shim.platform.accel import AccelVerdict

    if not (guest_dir("x86_64") / "manifest.json").exists():
        pytest.skip("no x86_64 guest image: .venv/bin/pyvm guest build --arch x86_64")
    base = tmp_path_factory.mktemp("sbs")
    sid = f"agent-vm-{uuid.uuid4().hex[:6]}"
    sdir = SandboxDir.for_sandbox(sid, base)
    sdir.root.mkdir(parents=True)
    sdir.share.mkdir(mode=0o700)
    build_busybox_rootfs(sdir.share / "rootfs")
    cfg = config_mod.with_overrides(
        config_mod.defaults("x86_64"), default_memory=BOOT_MIB, max_memory=4096, memory_hotplug="acpi"
    )
    verdict = AccelVerdict("tcg", False, "agent VM test runs under TCG", TIMEOUT_FACTOR, None)
    vm = QemuVM(cfg, sdir, verdict)
    client: AgentClient | None = None
    handle: VM | None = None
    try:
        t0 = time.monotonic()
        await vm.start()
        client = await wait_ready(vm.agent_socket_path, deadline=t0 + 180, timeout_factor=TIMEOUT_FACTOR)
        print(f"\nQEMU start -> agent Health: {time.monotonic() - t0:.2f}s")
        t1 = time.monotonic()
        prepared = await client.prepare_template()
        print(f"PrepareTemplate: {time.monotonic() - t1:.2f}s {prepared}")
        await client.create_sandbox(sandbox_id=sid, share_tag=SHARE_TAG)
        handle = VM(vm, client, sdir, prepared)
        yield handle
        client = handle.client  # tests may reconnect
        await client.destroy_sandbox()
    finally:
        if handle is not None:
            client = handle.client
        if client is not None:
            await client.close()
        await vm.stop()
        shutil.rmtree(sdir.share, ignore_errors=True)


def cid() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


async def test_guest_details(guest: VM) -> None:
    d = await guest.client.guest_details()
    assert d.cgroup_version == 2 and d.memory_block_size == 128 * MiB
    assert d.kernel_release.endswith("cloud-amd64") and d.arch == "x86_64"
    v = await guest.client.version()
    assert v.crun_version.startswith("crun version")


async def test_prepare_template_loaded_every_module(guest: VM) -> None:
    """Right after Health pyvm-init's background loader is still at work: PrepareTemplate loads
    the rest and waits for it, so the loader has said it finished before the answer."""
    r = guest.prepared
    assert r.modules_listed > 10 and r.failures == () and not r.caches_dropped, r
    assert 0 <= r.modules_loaded <= r.modules_listed
    assert "PYVM-MODULES-LOADED" in guest.sdir.console_log.read_text(errors="replace")


async def test_create_sandbox_sets_the_guest_clock(guest: VM) -> None:
    """A restored template has a stale wall clock: CreateSandbox's host_time sets it (and seeds the
    RNG; a refused ioctl would fail the call). Asked again with the real time afterwards."""
    client, c = guest.client, cid()
    future = datetime.now(UTC) + timedelta(hours=1)
    sent = time.monotonic()
    await client.create_sandbox(sandbox_id=guest.sdir.root.name, share_tag=SHARE_TAG, host_time=future)
    try:
        await client.create_container(c, spec(Path(guest.rootfs), ["date", "+%s"]), Stdio())
        await client.start_container(c)
        out, _err, status = await run_to_exit(client, c)
        expected = future.timestamp() + (time.monotonic() - sent)
        assert status == 0 and abs(int(out) - expected) < 5, (out, expected)
        await client.remove_container(c)
    finally:
        await client.create_sandbox(sandbox_id=guest.sdir.root.name, share_tag=SHARE_TAG)


async def test_streams_and_exit_code_from_virtiofs_rootfs(guest: VM) -> None:
    c, client = cid(), guest.client
    await client.create_container(
        c, spec(Path(guest.rootfs), ["sh", "-c", "echo out; echo err >&2; exit 3"]), Stdio()
    )
    await client.start_container(c)
    assert await run_to_exit(client, c) == (b"out\n", b"err\n", 3)
    await client.remove_container(c)


async def test_10mib_stdin_cat(guest: VM) -> None:
    c, client = cid(), guest.client
    data = os.urandom(10 * MiB)
    await client.create_container(c, spec(Path(guest.rootfs), ["cat"]), Stdio(stdin=True))
    await client.start_container(c)

    async def feed() -> None:
        await client.write_stdin(c, "", data)
        await client.close_stdin(c)

    _, out, ex = await asyncio.gather(feed(), read_all(client, c), client.wait_process(c))
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest() and ex.exit_status == 0
    await client.remove_container(c)


async def test_exec_and_signals(guest: VM) -> None:
    c, client = cid(), guest.client
    await client.create_container(c, spec(Path(guest.rootfs), ["sleep", "1000"]), Stdio())
    await client.start_container(c)
    await client.exec_process(c, "e1", process(["sh", "-c", "echo second; cat /proc/1/cmdline"]), Stdio())
    assert await run_to_exit(client, c, "e1") == (b"second\nsleep\x001000\x00", b"", 0)
    await client.exec_process(c, "e2", process(["sleep", "1000"]), Stdio())
    await client.signal_process(c, "e2", signal.SIGTERM)
    assert (await client.wait_process(c, "e2")).exit_status == 143
    await client.signal_process(c, "", signal.SIGKILL)
    assert (await client.wait_process(c)).exit_status == 137
    await client.remove_container(c)


async def test_oom_event(guest: VM) -> None:
    c, client = cid(), guest.client
    s = spec(
        Path(guest.rootfs), ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=4"], memory_limit=16 * MiB
    )
    await client.create_container(c, s, Stdio())
    oom = asyncio.create_task(client.get_oom_event())
    await client.start_container(c)
    assert (await run_to_exit(client, c))[2] == 137
    async with asyncio.timeout(30):
        assert await oom == c
    st = await client.stats_container(c)
    assert st.cgroup_version == 2 and st.memory.limit == 16 * MiB and st.memory.oom_kill >= 1
    await client.remove_container(c)


async def test_bad_input_and_unknown_ids(guest: VM) -> None:
    client = guest.client
    with pytest.raises(InvalidArgument):
        await client.create_container("bad", b"{", Stdio())
    with pytest.raises(NotFound):
        await client.wait_process("nope")
    assert await client.check()


async def test_reconnect_over_virtio_serial(guest: VM) -> None:
    """The host drops the chardev connection; the agent reopens its port and a new client works."""
    await guest.client.close()
    guest.client = await wait_ready(
        guest.vm.agent_socket_path,  # type: ignore[attr-defined]
        deadline=time.monotonic() + 60,
        timeout_factor=TIMEOUT_FACTOR,
    )
    assert (await guest.client.guest_details()).cgroup_version == 2


async def test_pc_dimm_hotplug_then_online_memory(guest: VM) -> None:
    client = guest.client
    before = await client.mem_info()
    state = await guest.vm.resize_memory((BOOT_MIB + 256) * MiB)  # type: ignore[attr-defined]
    assert state.total_bytes >= (BOOT_MIB + 256) * MiB
    r = await client.online_memory(movable=True, wait_for_bytes=256 * MiB, wait_s=30)
    assert r.bytes_onlined >= 256 * MiB and not r.failures, r
    after = await client.mem_info()
    assert after.mem_total - before.mem_total >= 256 * MiB - 4 * MiB
    assert r.mem_total == after.mem_total
