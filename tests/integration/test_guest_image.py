"""Boot the built guest images under QEMU (TCG, UEFI pflash) and check their contracts.

Floor: ``PYVM-FLOOR-READY <uptime>`` on the console, then a line shell (``@@RC=<n>`` after each line).
Agent guest: ``PYVM-AGENT-ENTRY <uptime>`` printed by /opt/pyvm/bin/pyvm-init right before it runs
``shim.guestagent`` as PID 1. Needs the images: ``.venv/bin/pyvm guest build --arch all``
(hack/setup.sh runs it). Every QEMU started here is killed, pass or fail.

Run as a script to time boots: ``python tests/integration/test_guest_image.py ARCH [N]``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

GUEST_ROOT = Path(os.environ.get("PYVM_GUEST_ROOT", "/var/lib/pyvm/guest"))
BUILD_HINT = "build it with: .venv/bin/pyvm guest build --arch all (or hack/build-guest.sh)"

FIRMWARE = {
    "x86_64": ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    "aarch64": ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
}


def image_dir(arch: str) -> Path:
    d = GUEST_ROOT / arch / "current"
    if not (d / "manifest.json").exists():
        pytest.skip(f"no guest image for {arch} under {GUEST_ROOT}: {BUILD_HINT}")
    return d


class Guest:
    """One QEMU process with its serial console on pipes; lines are timestamped on the host."""

    def __init__(self, argv: list[str], t0: float) -> None:
        self.t0 = t0
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.log.append(line)
            self.lines.put((time.monotonic() - self.t0, line))
        self.lines.put((time.monotonic() - self.t0, "\0EOF"))

    def expect(self, prefix: str, timeout: float) -> tuple[float, str]:
        """Wait for a console line containing ``prefix``; return (seconds since QEMU start, line)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {prefix!r} within {timeout}s; console:\n" + "\n".join(self.log[-40:])
                )
            try:
                t, line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line == "\0EOF":
                raise AssertionError(f"QEMU exited before {prefix!r}; console:\n" + "\n".join(self.log[-40:]))
            if prefix in line:
                return t, line

    def sh(self, command: str, timeout: float = 30) -> tuple[int, list[str]]:
        """Run one line through the floor's line shell; return (rc, output lines)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            _t, line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line == "\0EOF":
                raise AssertionError("QEMU exited during " + command)
            if "@@RC=" in line:
                before, _, rc = line.partition("@@RC=")
                if before:
                    out.append(before)
                return int(rc.strip()), out
            out.append(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def qemu_argv(
    arch: str, kernel: Path, initrd: Path, append: str, vars_copy: Path, disk: Path | None
) -> list[str]:
    code, _ = FIRMWARE[arch]
    mem = "512M"
    if arch == "x86_64":
        argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg,memory-backend=ram0"]
        console = "ttyS0"
    else:
        argv = [
            "qemu-system-aarch64",
            "-machine",
            "virt,accel=tcg,memory-backend=ram0",
            "-cpu",
            "max,pauth-impdef=on",
        ]
        console = "ttyAMA0"
    argv += [
        "-object", f"memory-backend-memfd,id=ram0,size={mem},share=on", "-m", mem, "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", f"console={console} quiet {append}".strip(),
    ]  # fmt: skip
    if disk is not None:
        argv += [
            "-drive", f"file={disk},if=none,id=root,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=root",
        ]  # fmt: skip
    return argv


@contextmanager
def boot(arch: str, image: Path, *, floor: bool, append: str = "") -> Iterator[Guest]:
    """Boot the floor or the agent guest of ``image``; the QEMU is killed on exit, whatever happens."""
    manifest = json.loads((image / "manifest.json").read_text())
    with tempfile.TemporaryDirectory(prefix="pyvm-guest-test-") as tmp:
        vars_copy = Path(tmp) / "vars.fd"
        shutil.copyfile(FIRMWARE[arch][1], vars_copy)
        disk = None if floor or manifest["layout"] != "disk" else image / "rootfs.img"
        initrd = image / ("floor-initrd.img" if floor else "initrd.img")
        argv = qemu_argv(arch, image / "vmlinuz", initrd, append, vars_copy, disk)
        guest = Guest(argv, time.monotonic())
        try:
            yield guest
        finally:
            guest.kill()


ARCHES = ["x86_64", "aarch64"]
BOOT_TIMEOUT = 180  # TCG on 2 shared cores; typical is 5-15 s


@pytest.mark.vm
@pytest.mark.parametrize("arch", ARCHES)
def test_floor_boots_and_runs_commands(arch: str) -> None:
    image = image_dir(arch)
    manifest = json.loads((image / "manifest.json").read_text())
    with boot(arch, image, floor=True) as g:
        _t, line = g.expect("PYVM-FLOOR-READY", BOOT_TIMEOUT)
        float(line.split("PYVM-FLOOR-READY", 1)[1].split()[0])
        rc, out = g.sh("uname -r")
        assert rc == 0 and out == [manifest["kernel"]["release"]]
        rc, out = g.sh("grep -c MemTotal /proc/meminfo; ls -d /sys/devices/system/memory/memory0")
        assert rc == 0 and out == ["1", "/sys/devices/system/memory/memory0"]
        rc, _ = g.sh("false")
        assert rc == 1
        rc, out = g.sh("grep -c -e '^virtio_pci ' -e '^virtio_console ' -e '^virtio_mem ' /proc/modules")
        assert rc == 0 and out == ["3"]


@pytest.mark.vm
@pytest.mark.parametrize("arch", ARCHES)
def test_floor_poweroff(arch: str) -> None:
    with boot(arch, image_dir(arch), floor=True, append="pyvm.floor=poweroff") as g:
        g.expect("PYVM-FLOOR-READY", BOOT_TIMEOUT)
        assert g.proc.wait(timeout=60) == 0


@pytest.mark.vm
@pytest.mark.parametrize("arch", ARCHES)
def test_agent_guest_reaches_entrypoint(arch: str) -> None:
    with boot(arch, image_dir(arch), floor=False) as g:
        g.expect("PYVM-AGENT-ENTRY", BOOT_TIMEOUT)
        # the console must show no init errors before the marker
        assert not [line for line in g.log if line.startswith("pyvm-init:")], g.log


def _bench(arch: str, runs: int) -> None:
    image = GUEST_ROOT / arch / "current"
    manifest = json.loads((image / "manifest.json").read_text())
    for _ in range(runs):
        with boot(arch, image, floor=True, append="pyvm.floor=poweroff") as g:
            t, line = g.expect("PYVM-FLOOR-READY", BOOT_TIMEOUT)
            print(f"{arch} floor: {t:.2f}s to marker ({line.strip()})", flush=True)
        with boot(arch, image, floor=False, append="pyvm.init=poweroff") as g:
            t, line = g.expect("PYVM-AGENT-ENTRY", BOOT_TIMEOUT)
            print(f"{arch} agent ({manifest['layout']}): {t:.2f}s to entry ({line.strip()})", flush=True)


if __name__ == "__main__":
    _bench(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
