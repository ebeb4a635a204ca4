"""What a VM restored from a template needs from the agent, without touching this host's kernel:
the wall clock and RNG seeding (through injected syscalls), the wait for a hot-plugged virtio-fs
tag, and PrepareTemplate settling the modules.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from shim.errors import FailedPrecondition, InvalidArgument
from shim.guestagent import agent as agent_mod
from shim.guestagent import guest, kernel
from shim.guestagent.reaper import Reaper


def test_ioctl_numbers_match_linux_random_h() -> None:
    # _IOW('R', 0x03, int[2]): dir write (1) << 30 | size 8 << 16 | 'R' << 8 | 3; _IO('R', 0x07)
    assert kernel.RNDADDENTROPY == (1 << 30) | (8 << 16) | (ord("R") << 8) | 0x03
    assert kernel.RNDRESEEDCRNG == (ord("R") << 8) | 0x07


def test_rand_pool_info_credits_every_bit() -> None:
    data = bytes(range(10))
    assert kernel.rand_pool_info(data) == struct.pack("=ii", 80, 10) + data


def test_add_entropy_adds_then_reseeds(tmp_path: Path) -> None:
    dev = tmp_path / "urandom"
    dev.touch()
    calls: list[tuple[int, Any]] = []

    def ioctl(fd: int, request: int, arg: Any = 0) -> int:
        assert os.fstat(fd).st_ino == dev.stat().st_ino
        calls.append((request, arg))
        return 0

    assert kernel.add_entropy(b"\xaa" * 64, device=str(dev), ioctl=ioctl)
    assert calls == [(kernel.RNDADDENTROPY, kernel.rand_pool_info(b"\xaa" * 64)), (kernel.RNDRESEEDCRNG, 0)]


def test_add_entropy_before_the_crng_is_ready_and_without_privilege(tmp_path: Path) -> None:
    dev = tmp_path / "urandom"
    dev.touch()

    def refuse(code: int) -> Any:
        def ioctl(fd: int, request: int, arg: Any = 0) -> int:
            if request == kernel.RNDRESEEDCRNG or code == errno.EPERM:
                raise OSError(code, os.strerror(code))
            return 0

        return ioctl

    # not initialized yet: it will seed from the pool that holds our bytes
    assert kernel.add_entropy(b"x", device=str(dev), ioctl=refuse(errno.ENODATA)) is False
    with pytest.raises(PermissionError):
        kernel.add_entropy(b"x", device=str(dev), ioctl=refuse(errno.EPERM))
    with pytest.raises(ValueError, match="513 bytes"):
        kernel.add_entropy(b"x" * 513, device=str(dev), ioctl=refuse(0))


def test_set_realtime_reports_the_jump() -> None:
    seen: list[tuple[int, int]] = []
    target = time.time_ns() + 3600 * 10**9
    jump = kernel.set_realtime(target, settime=lambda clock, ns: seen.append((clock, ns)))
    assert seen == [(time.CLOCK_REALTIME, target)]
    assert 3599 < jump <= 3600


def test_drop_caches_writes_3(tmp_path: Path) -> None:
    f = tmp_path / "drop_caches"
    kernel.drop_caches(f)
    assert f.read_text() == "3\n"


class FlakyMount:
    """A mount that fails with ``code`` ``failures`` times, then works."""

    def __init__(self, failures: int, code: int = errno.EINVAL) -> None:
        self.failures = failures
        self.code = code
        self.calls = 0

    def __call__(self, tag: str, target: str) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(self.code, os.strerror(self.code), target)


async def test_mount_waits_for_a_hot_plugged_tag() -> None:
    m = FlakyMount(3)
    waited = await agent_mod.mount_share("pyvm-shared", "/run/x", wait=5, poll=0.01, mount=m)
    assert m.calls == 4 and 0.02 < waited < 2


async def test_mount_at_first_try_did_not_wait() -> None:
    m = FlakyMount(0)
    assert await agent_mod.mount_share("pyvm-shared", "/run/x", mount=m) == 0.0


async def test_mount_of_a_tag_that_never_appears_names_tag_and_errno() -> None:
    m = FlakyMount(10**9)
    start = time.monotonic()
    with pytest.raises(FailedPrecondition, match=r"'nope' is not in the guest after 0\.\d s .*EINVAL") as ei:
        await agent_mod.mount_share("nope", "/run/x", wait=0.2, poll=0.02, mount=m)
    assert 0.2 <= time.monotonic() - start < 2 and m.calls >= 5
    assert ei.value.facts["tag"] == "nope" and ei.value.facts["errno"] == errno.EINVAL


async def test_mount_fails_at_once_for_other_errors() -> None:
    m = FlakyMount(10**9, errno.ENODEV)
    with pytest.raises(FailedPrecondition, match="cannot mount virtiofs pyvm-shared on /run/x"):
        await agent_mod.mount_share("pyvm-shared", "/run/x", wait=10, mount=m)
    assert m.calls == 1


def _seeding_agent(
    monkeypatch: pytest.MonkeyPatch, *, guest_kernel: bool
) -> tuple[agent_mod.Agent, list[Any]]:
    done: list[Any] = []
    monkeypatch.setattr(kernel, "set_realtime", lambda ns: done.append(("clock", ns)) or 1.0)
    monkeypatch.setattr(kernel, "add_entropy", lambda data: done.append(("entropy", data)) or True)
    return agent_mod.Agent(Reaper(), agent_mod.Config(guest_kernel=guest_kernel)), done


async def test_create_sandbox_sets_clock_then_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    a, done = _seeding_agent(monkeypatch, guest_kernel=True)
    await a.create_sandbox("", "", "", host_time_ns=1_800_000_000 * 10**9, entropy=b"e" * 64)
    assert done == [("clock", 1_800_000_000 * 10**9), ("entropy", b"e" * 64)]
    done.clear()
    await a.create_sandbox("", "", "")  # an old host: neither
    assert done == []


async def test_create_sandbox_validates_before_changing_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    a, done = _seeding_agent(monkeypatch, guest_kernel=True)
    with pytest.raises(InvalidArgument, match="entropy is 513 bytes; at most 512"):
        await a.create_sandbox("", "", "", host_time_ns=10**18, entropy=b"x" * 513)
    with pytest.raises(InvalidArgument, match="hostname"):
        await a.create_sandbox("bad host", "", "", host_time_ns=10**18, entropy=b"x")
    with pytest.raises(InvalidArgument, match="epoch"):
        await a.create_sandbox("", "", "", host_time_ns=-1)
    assert done == []


async def test_create_sandbox_on_a_host_leaves_the_kernel_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    a, done = _seeding_agent(monkeypatch, guest_kernel=False)
    await a.create_sandbox("", "", "", host_time_ns=10**18, entropy=b"x" * 512)
    assert done == []


async def test_create_sandbox_clock_refused_is_failed_precondition(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(ns: int) -> float:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(kernel, "set_realtime", refuse)
    a = agent_mod.Agent(Reaper(), agent_mod.Config(guest_kernel=True))
    with pytest.raises(FailedPrecondition, match="cannot set the clock: Operation not permitted"):
        await a.create_sandbox("", "", "", host_time_ns=10**18)


def test_modules_still_initializing_are_loaded_again(tmp_path: Path) -> None:
    """A module the background loader is loading ("coming") is loaded again: the kernel makes that
    wait until the first load finished. Live and built-in modules are skipped."""
    sysmodule = tmp_path / "sys"
    for name, state in (("live_mod", "live"), ("coming_mod", "coming")):
        (sysmodule / name).mkdir(parents=True)
        (sysmodule / name / "initstate").write_text(state + "\n")
    (sysmodule / "builtin_mod").mkdir()
    lst = tmp_path / "modules.list"
    lst.write_text(
        "kernel/live_mod.ko\nkernel/builtin-mod.ko.xz\nkernel/no-such-pyvm-mod.ko\nkernel/coming_mod.ko\n"
    )
    r = guest.load_listed_modules(lst, sysmodule)
    # the two not live are attempted: neither file exists under /lib/modules on this host
    assert r.listed == 4 and r.loaded == 0
    assert [f.split(":")[0] for f in r.failures] == ["kernel/no-such-pyvm-mod.ko", "kernel/coming_mod.ko"]
    assert guest.load_modules(lst, sysmodule) == r.failures


async def test_prepare_template_waits_for_the_module_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "load_listed_modules", lambda: guest.ModulesLoaded(12, 2, []))
    reaper = Reaper()
    reaper.start()
    try:
        loader, _ = reaper.spawn(["sleep", "0.3"])
        reaper._waiters.pop(loader)  # started by pyvm-init, not by the agent
        a = agent_mod.Agent(reaper, agent_mod.Config(modules_loader_pid=loader))
        start = time.monotonic()
        r = await a.prepare_template()
        assert time.monotonic() - start >= 0.25
        assert r == agent_mod.TemplateReport(12, 2, (), caches_dropped=False)
        assert a._modules_ready
        # idempotent, and the loader is not waited for twice
        assert await a.prepare_template() == r
    finally:
        reaper.stop()


async def test_prepare_template_refused_once_the_sandbox_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "load_listed_modules", lambda: guest.ModulesLoaded())
    a = agent_mod.Agent(Reaper())
    a.share_mount = "/run/pyvm/shared"
    with pytest.raises(FailedPrecondition, match="before CreateSandbox"):
        await a.prepare_template()


async def test_prepare_template_reports_a_loader_that_does_not_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(guest, "load_listed_modules", lambda: guest.ModulesLoaded(1, 0, []))
    monkeypatch.setattr(agent_mod, "LOADER_WAIT", 0.1)
    reaper = Reaper()
    reaper.start()
    loader, fut = reaper.spawn(["sleep", "30"])
    try:
        r = await agent_mod.Agent(reaper, agent_mod.Config(modules_loader_pid=loader)).prepare_template()
        assert r.failures == (f"module loader (pid {loader}) still running after 0.1 s",)
    finally:
        os.kill(loader, 9)
        await asyncio.wait_for(fut, 10)
        reaper.stop()
