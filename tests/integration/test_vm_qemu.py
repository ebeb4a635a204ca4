"""The sandbox VM against real QEMU (TCG here; the same assertions hold where KVM works).

Uses the floor guest of `pyvm guest build` (shim.paths.guest_dir(arch): vmlinuz + floor-initrd.img):
its /init prints PYVM-FLOOR-READY on the console and then runs a line shell there (a line in, eval,
``@@RC=<n>`` out), reached through the console socket the driver opens when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from shim import config
from shim.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from shim.hypervisor.qemu.driver import ExitInfo, QemuVM, virtiofsd_pidfile
from shim.paths import SandboxDir, guest_dir
from shim.platform import accel

pytestmark = [pytest.mark.vm, pytest.mark.slow]
MiB = 1 << 20


def _guest(arch: str) -> Path:
    g = guest_dir(arch)
    for name in ("vmlinuz", "floor-initrd.img"):
        if not (g / name).is_file():
            pytest.skip(f"guest image for {arch} missing ({g / name}): run `pyvm guest build --arch {arch}`")
    return g


def _floor_config(arch: str, **over: object) -> config.Config:
    g = _guest(arch)
    values: dict[str, object] = {
        "kernel": str(g / "vmlinuz"),
        "initrd": str(g / "floor-initrd.img"),
        "image": "",
        "default_memory": 512,
        "max_memory": 4096,
        "memory_slots": 8,
        "kernel_params": "quiet memhp_default_state=online_movable",
    }
    values.update(over)
    return config.with_overrides(config.defaults(arch), **values)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    old = os.environ.get("PYVM_CACHE_ROOT")
    os.environ["PYVM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("PYVM_CACHE_ROOT", None)
    else:
        os.environ["PYVM_CACHE_ROOT"] = old


async def _verdict(cfg: config.Config) -> accel.AccelVerdict:
    return accel.resolve(
        cfg.hypervisor.accelerator, await accel.get_verdict(accel.target_for(cfg.hypervisor))
    )


class FloorShell:
    """The floor guest's console line shell."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def sh(self, line: str, timeout: float = 30.0) -> str:  # noqa: ASYNC109
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        buf = b""
        async with asyncio.timeout(timeout):
            while (m := re.search(rb"@@RC=(\d+)", buf)) is None:
                buf += await self.reader.read(4096)
        out = buf[: m.start()].decode(errors="replace").replace("\r", "")
        assert m.group(1) == b"0", f"{line!r} failed: {out}"
        return out

    async def memtotal_kb(self) -> int:
        out = await self.sh("grep MemTotal /proc/meminfo")
        return int(re.search(r"MemTotal:\s+(\d+)", out).group(1))  # type: ignore[union-attr]

    async def wait_memtotal(self, expected_kb: int, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while (got := await self.memtotal_kb()) != expected_kb and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        return got


def _leftovers(sd: SandboxDir) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(sd.root).encode() in cmd:
                argv = cmd.replace(b"\0", b" ").decode(errors="replace")
                found.append(f"process {pid}: {argv[:120]}")
    if sd.root.exists():
        for f in sd.root.iterdir():
            if f.name not in ("console.log", "qemu.log", "virtiofsd.log", "guest.log"):
                found.append(f"file {f}")
    if virtiofsd_pidfile(sd.virtiofsd_sock).exists():
        found.append(f"file {virtiofsd_pidfile(sd.virtiofsd_sock)}")
    return found


@contextlib.asynccontextmanager
async def booted(
    cfg: config.Config, tmp_path: Path, name: str, **kw: object
) -> AsyncIterator[tuple[QemuVM, FloorShell]]:
    verdict = await _verdict(cfg)
    sd = SandboxDir.for_sandbox(name, tmp_path / "sbs")
    vm = QemuVM(cfg, sd, verdict, console_socket=True, **kw)  # type: ignore[arg-type]
    try:
        await vm.start()
        deadline = time.monotonic() + vm.timeouts.boot * 3
        while b"PYVM-FLOOR-READY" not in sd.console_log.read_bytes():
            assert not vm.exited.done(), f"QEMU exited during boot: {vm.exited.result()}"
            assert time.monotonic() < deadline, "floor guest not ready:\n" + sd.console_log.read_text(
                errors="replace"
            )
            await asyncio.sleep(0.05)
        assert vm.console_socket_path is not None
        reader, writer = await asyncio.open_unix_connection(str(vm.console_socket_path))
        shell = FloorShell(reader, writer)
        await shell.sh("true")
        try:
            yield vm, shell
        finally:
            writer.close()
    finally:
        await vm.stop()
        assert _leftovers(sd) == []


async def test_x86_ovmf_dimm_grow_and_shrink(tmp_path: Path) -> None:
    cfg = _floor_config("x86_64")
    assert cfg.hypervisor.firmware_code is not None and "OVMF" in str(cfg.hypervisor.firmware_code)
    async with booted(cfg, tmp_path, "x86dimm") as (vm, sh):
        base = await sh.memtotal_kb()
        st = await vm.resize_memory(1024 * MiB)
        assert st.total_bytes == 1024 * MiB and [d.size for d in st.dimms] == [512 * MiB]
        assert await sh.wait_memtotal(base + 512 * 1024) == base + 512 * 1024
        st = await vm.resize_memory(2048 * MiB)
        assert [d.size for d in st.dimms] == [512 * MiB, 1024 * MiB]
        assert await sh.wait_memtotal(base + 1536 * 1024) == base + 1536 * 1024
        # over max: refused with both numbers, nothing changes, the VM keeps running
        with pytest.raises(ResourceExhausted, match="5000 MiB exceeds max_memory 4096 MiB"):
            await vm.resize_memory(5000 * MiB)
        assert await vm.qmp.query_status() == "running"  # type: ignore[union-attr]
        # shrink back by DIMM unplug (the floor onlines hot-added memory movable)
        st = await vm.resize_memory(512 * MiB)
        assert st.dimms == () and st.total_bytes == 512 * MiB
        assert await sh.wait_memtotal(base) == base


async def test_x86_virtio_mem_and_kill_from_outside(tmp_path: Path) -> None:
    cfg = _floor_config("x86_64", memory_hotplug="virtio-mem", memory_slots=0)
    exits: list[ExitInfo] = []
    async with booted(cfg, tmp_path, "x86vmem", on_exit=exits.append) as (vm, sh):
        base = await sh.memtotal_kb()
        st = await vm.resize_memory(1536 * MiB)
        assert st.plugged_bytes == 1024 * MiB
        assert await sh.wait_memtotal(base + 1024 * 1024) == base + 1024 * 1024
        st = await vm.resize_memory(512 * MiB)
        assert st.plugged_bytes == 0
        assert await sh.wait_memtotal(base) == base

        assert vm.pid is not None
        t0 = time.monotonic()
        os.kill(vm.pid, signal.SIGKILL)
        info = await asyncio.wait_for(asyncio.shield(vm.exited), 1.0)
        assert time.monotonic() - t0 < 1.0
        assert info.unexpected and info.exit_code == -signal.SIGKILL and "SIGKILL" in info.description
        await asyncio.sleep(0)  # the callback runs right after `exited` resolves
        assert exits == [info]
        from shim.errors import Unavailable

        with pytest.raises(Unavailable, match="the VM is gone"):
            await vm.resize_memory(1024 * MiB)


async def test_arm64_aavmf_dimm_hot_add(tmp_path: Path) -> None:
    cfg = _floor_config("aarch64")
    assert cfg.hypervisor.firmware_code is not None and "AAVMF" in str(cfg.hypervisor.firmware_code)
    async with booted(cfg, tmp_path, "armdimm") as (vm, sh):
        base = await sh.memtotal_kb()
        st = await vm.resize_memory(1024 * MiB)
        assert [d.size for d in st.dimms] == [512 * MiB]
        assert await sh.wait_memtotal(base + 512 * 1024) == base + 512 * 1024


async def test_arm64_without_pflash_refused_before_qemu_starts(tmp_path: Path) -> None:
    cfg = _floor_config("aarch64")
    with pytest.raises(InvalidArgument, match=r"pflashes.*acpi-ged"):
        config.with_overrides(cfg, pflashes=[])
    nofw = replace(cfg, hypervisor=replace(cfg.hypervisor, pflashes=()))  # bypasses load-time validation
    sd = SandboxDir.for_sandbox("armnofw", tmp_path / "sbs")
    vm = QemuVM(nofw, sd, accel.AccelVerdict("tcg", False, "test", 4.0, None))
    with pytest.raises(InvalidArgument, match=r"pflashes.*acpi-ged"):
        await vm.start()
    assert vm.pid is None and not sd.root.exists()

    f = tmp_path / "arm-nofw.toml"
    f.write_text(f'[hypervisor]\narch = "aarch64"\npflashes = []\nkernel = "{cfg.hypervisor.kernel}"\n')
    out = await _pyvm([sys.executable, "-m", "shim.cli.pyvm", "check", "--config", str(f), "--no-probe"])
    assert out.returncode != 0
    assert "pflashes" in out.stdout and "acpi-ged" in out.stdout


async def test_accelerator_auto_and_kvm(tmp_path: Path) -> None:
    cfg = _floor_config("x86_64")
    t0 = time.monotonic()
    verdict = await accel.get_verdict(accel.target_for(cfg.hypervisor), refresh=True)
    probe_s = time.monotonic() - t0
    # bounded: a hanging KVM guest costs at most the probe deadline, then TCG is timed
    assert probe_s < accel.KVM_PROBE_TIMEOUT + 60
    auto = accel.resolve("auto", verdict)
    if verdict.kvm_works:
        assert auto.accel == "kvm"
        assert accel.resolve("kvm", verdict).accel == "kvm"
        return
    assert auto.accel == "tcg" and auto.degraded and "KVM unusable" in auto.reason
    assert auto.speed_factor > 1
    t0 = time.monotonic()
    with pytest.raises(FailedPrecondition, match=r'accelerator = "kvm" but KVM does not work') as ei:
        await _verdict(config.with_overrides(cfg, accelerator="kvm"))
    assert time.monotonic() - t0 < 1.0  # cached verdict: fails fast, boots nothing
    assert verdict.kvm_result in str(ei.value)
    out = await _pyvm(
        [
            sys.executable,
            "-m",
            "shim.cli.pyvm",
            "check",
            "--no-probe",
            "--config",
            str(_write_cfg(tmp_path, cfg)),
        ]
    )
    assert re.search(r"\[WARN\] accelerator +TCG", out.stdout), out.stdout


async def _pyvm(argv: list[str]) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return subprocess.CompletedProcess(argv, proc.returncode or 0, out.decode(), err.decode())


def _write_cfg(tmp_path: Path, cfg: config.Config) -> Path:
    hv = cfg.hypervisor
    f = tmp_path / "x86.toml"
    f.write_text(f'[hypervisor]\nkernel = "{hv.kernel}"\ninitrd = "{hv.initrd}"\nimage = ""\n')
    return f
