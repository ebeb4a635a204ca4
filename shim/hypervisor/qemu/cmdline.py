"""The QEMU command line, built from small pure parts.

Each part is a frozen dataclass that validates its inputs in ``__post_init__`` (raising
:class:`~shim.errors.InvalidArgument`) and renders itself with ``to_args()``. :func:`vm_command`
composes the parts for a sandbox from the configuration; nothing here touches the filesystem or
starts anything, so every line is unit-tested without a VM.

Why some options are what they are:

- ``-nodefaults -no-user-config -display none``: no implicit NIC (no PXE option ROM for OVMF to load),
  no VGA, no floppy/CD, no host config files. ``-no-reboot``: a guest reboot or panic (``panic=-1``)
  ends QEMU, which the driver reports as the VM's exit.
- All guest RAM is ``memory-backend-memfd,share=on`` (boot RAM, every DIMM, the virtio-mem region):
  virtiofsd maps guest memory; a private backend kills it at the first I/O that touches it.
- ``-boot strict=on``: OVMF tries only what we give it (the fw_cfg kernel), never a network boot.
- Sockets (QMP, agent, console) are QEMU-side servers with ``wait=off`` so QEMU never blocks on us.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shim.config import Config
from shim.errors import InvalidArgument
from shim.paths import AGENT_PORT_NAME, LOG_PORT_NAME, SHARE_TAG, SandboxDir

MiB = 1024 * 1024
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")


class Part(Protocol):
    def to_args(self) -> list[str]: ...


def esc(value: str | Path) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (a comma is written ``,,``)."""
    s = str(value)
    if any(c in s for c in "\n\r\0"):
        raise InvalidArgument(f"QEMU option value {s!r} contains a control character", value=s)
    return s.replace(",", ",,")


def _check_id(kind: str, value: str) -> None:
    if not _ID.match(value):
        raise InvalidArgument(
            f"{kind} {value!r} is not a valid QEMU id (a letter, then up to 31 of A-Z a-z 0-9 _ . -)",
            value=value,
        )


def _check_abs(kind: str, path: Path | str) -> Path:
    p = Path(path)
    if not p.is_absolute():
        raise InvalidArgument(f"{kind} must be an absolute path, got {str(path)!r}", value=str(path))
    return p


def _check_mib(kind: str, value: int, *, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InvalidArgument(f"{kind} must be an integer number of MiB >= {lo}, got {value!r}", value=value)


@dataclass(frozen=True)
class Base:
    """Options every pyvm VM has."""

    name: str = "pyvm"

    def to_args(self) -> list[str]:
        return [
            "-name",
            f"{esc(self.name)},debug-threads=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-boot",
            "strict=on",
        ]


@dataclass(frozen=True)
class Machine:
    """``-machine`` and ``-accel``. ``virt`` (arm64) needs a GIC version; ``q35`` must not have one.

    ``tb_size_mib`` caps TCG's translation-block cache (QEMU's default is 1 GiB of anonymous memory
    per VM, of which an idle agent guest touches ~110 MiB); 0 keeps QEMU's default. Ignored under KVM.
    """

    type: str
    accel: str
    memory_backend: str | None = None
    gic_version: str | None = None
    tb_size_mib: int = 0

    def __post_init__(self) -> None:
        if self.type not in ("q35", "virt"):
            raise InvalidArgument(
                f"machine type {self.type!r} is not supported: use 'q35' or 'virt'", value=self.type
            )
        if self.accel not in ("kvm", "tcg"):
            raise InvalidArgument(f"accelerator {self.accel!r} must be 'kvm' or 'tcg'", value=self.accel)
        if self.type == "virt" and self.gic_version not in ("2", "3", "host", "max"):
            raise InvalidArgument(
                f"machine virt needs gic-version '2', '3', 'host' or 'max', got {self.gic_version!r}",
                value=self.gic_version,
            )
        if self.type == "q35" and self.gic_version is not None:
            raise InvalidArgument("machine q35 has no GIC: gic_version must be None", value=self.gic_version)
        if self.memory_backend is not None:
            _check_id("memory backend id", self.memory_backend)
        if (
            isinstance(self.tb_size_mib, bool)
            or not isinstance(self.tb_size_mib, int)
            or self.tb_size_mib < 0
        ):
            raise InvalidArgument(
                f"TCG tb-size must be an integer number of MiB >= 0, got {self.tb_size_mib!r}",
                value=self.tb_size_mib,
            )

    def to_args(self) -> list[str]:
        opts = [self.type]
        if self.gic_version:
            opts.append(f"gic-version={self.gic_version}")
        if self.memory_backend:
            opts.append(f"memory-backend={self.memory_backend}")
        accel = "kvm" if self.accel == "kvm" else "tcg,thread=multi"
        if self.accel == "tcg" and self.tb_size_mib:
            accel += f",tb-size={self.tb_size_mib}"
        return ["-machine", ",".join(opts), "-accel", accel]


@dataclass(frozen=True)
class Cpu:
    model: str

    def __post_init__(self) -> None:
        if not re.match(
            r"^[A-Za-z0-9][A-Za-z0-9_.+-]*(,[A-Za-z0-9_.+-]+(=[A-Za-z0-9_.+-]+)?)*$", self.model or ""
        ):
            raise InvalidArgument(
                f"CPU model {self.model!r} is not of the form MODEL[,feature[=value]...]", value=self.model
            )

    def to_args(self) -> list[str]:
        return ["-cpu", self.model]


@dataclass(frozen=True)
class Smp:
    cpus: int

    def __post_init__(self) -> None:
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or not 1 <= self.cpus <= 255:
            raise InvalidArgument(f"vcpus must be 1..255, got {self.cpus!r}", value=self.cpus)

    def to_args(self) -> list[str]:
        return ["-smp", str(self.cpus)]


@dataclass(frozen=True)
class MemoryBackend:
    """``-object memory-backend-memfd,...,share=on`` (also the QMP ``object-add`` arguments).

    With ``mem_path`` it is ``memory-backend-file`` on that file instead, still ``share=on``: VM
    templates keep boot RAM in a memfd the shim creates and hands over as ``/proc/self/fd/N``, so the
    saved RAM can be written before QEMU starts (restore) or read after it stopped (template build).
    """

    id: str
    size_mib: int
    mem_path: Path | None = None

    def __post_init__(self) -> None:
        _check_id("memory backend id", self.id)
        _check_mib(f"memory backend {self.id} size", self.size_mib)
        if self.mem_path is not None:
            _check_abs("memory backend file", self.mem_path)

    def to_args(self) -> list[str]:
        if self.mem_path is not None:
            return [
                "-object",
                f"memory-backend-file,id={self.id},size={self.size_mib}M,mem-path={esc(self.mem_path)},share=on",
            ]
        return ["-object", f"memory-backend-memfd,id={self.id},size={self.size_mib}M,share=on"]

    def qmp_args(self) -> dict[str, object]:
        return {"qom-type": "memory-backend-memfd", "id": self.id, "size": self.size_mib * MiB, "share": True}


@dataclass(frozen=True)
class Memory:
    """Boot RAM (``-m SIZE[,slots=N][,maxmem=M]``) on its memfd backend.

    ``slots`` > 0 (pc-dimm) needs ``max_mib`` > ``size_mib``; virtio-mem needs ``max_mib`` but no slots.
    """

    size_mib: int
    slots: int = 0
    max_mib: int | None = None
    backend_id: str = "ram0"
    mem_path: Path | None = None

    def __post_init__(self) -> None:
        _check_mib("memory size", self.size_mib)
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or not 0 <= self.slots <= 255:
            raise InvalidArgument(f"memory slots must be 0..255, got {self.slots!r}", value=self.slots)
        if self.max_mib is not None:
            _check_mib("max memory", self.max_mib)
            if self.max_mib < self.size_mib:
                raise InvalidArgument(
                    f"max memory {self.max_mib} MiB is below the boot memory {self.size_mib} MiB",
                    value=self.max_mib,
                )
        if self.slots and (self.max_mib is None or self.max_mib == self.size_mib):
            raise InvalidArgument(
                f"memory slots={self.slots} need max memory above the boot memory ({self.size_mib} MiB)",
                value=self.max_mib,
            )
        _check_id("memory backend id", self.backend_id)

    @property
    def backend(self) -> MemoryBackend:
        return MemoryBackend(self.backend_id, self.size_mib, self.mem_path)

    def to_args(self) -> list[str]:
        m = f"{self.size_mib}M"
        if self.slots:
            m += f",slots={self.slots}"
        if self.max_mib is not None and self.max_mib > self.size_mib:
            m += f",maxmem={self.max_mib}M"
        return ["-m", m, *self.backend.to_args()]


@dataclass(frozen=True)
class Pflash:
    """UEFI firmware: read-only code and the VM's own writable copy of the variable store."""

    code: Path
    vars: Path

    def __post_init__(self) -> None:
        _check_abs("firmware code", self.code)
        _check_abs("firmware vars", self.vars)
        if Path(self.code) == Path(self.vars):
            raise InvalidArgument("firmware code and vars must be different files", value=str(self.code))

    def to_args(self) -> list[str]:
        return [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={esc(self.code)}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={esc(self.vars)}",
        ]


@dataclass(frozen=True)
class Kernel:
    kernel: Path
    initrd: Path | None = None
    append: str = ""

    def __post_init__(self) -> None:
        _check_abs("kernel", self.kernel)
        if self.initrd is not None:
            _check_abs("initrd", self.initrd)
        if any(c in self.append for c in "\n\r\0"):
            raise InvalidArgument("kernel command line must be a single line", value=self.append)

    def to_args(self) -> list[str]:
        # -kernel/-initrd/-append are plain values, not key=value lists: no comma escaping
        args = ["-kernel", str(self.kernel)]
        if self.initrd is not None:
            args += ["-initrd", str(self.initrd)]
        if self.append:
            args += ["-append", self.append]
        return args


@dataclass(frozen=True)
class KernelBootRom:
    """What ``-kernel`` leaves in a q35 machine besides the kernel: the ``linuxboot_dma.bin`` option
    ROM (a RAM block, so part of the migration stream). A restored VM is past its boot; it gets this
    ROM instead of ``-kernel``/``-initrd``, so QEMU does not keep a copy of them (~15 MiB per VM)."""

    name: str = "linuxboot_dma.bin"

    def to_args(self) -> list[str]:
        return ["-option-rom", self.name]


@dataclass(frozen=True)
class RootDisk:
    """The guest image as a read-only raw virtio-blk disk."""

    path: Path
    id: str = "rootfs"

    def __post_init__(self) -> None:
        _check_abs("root disk image", self.path)
        _check_id("root disk id", self.id)

    def to_args(self) -> list[str]:
        return [
            "-drive",
            f"if=none,id={self.id},file={esc(self.path)},format=raw,readonly=on",
            "-device",
            f"virtio-blk-pci,drive={self.id},id={self.id}-blk,romfile=",
        ]


@dataclass(frozen=True)
class AgentPort:
    """virtio-serial port ``name`` backed by a unix socket on which QEMU listens."""

    socket: Path
    name: str = AGENT_PORT_NAME
    id: str = "agent0"

    def __post_init__(self) -> None:
        _check_abs("agent socket", self.socket)
        _check_id("agent chardev id", self.id)
        if not re.match(r"^[A-Za-z0-9_.-]+$", self.name):
            raise InvalidArgument(f"virtio-serial port name {self.name!r} is not valid", value=self.name)

    def to_args(self) -> list[str]:
        return [
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            f"socket,id={self.id},path={esc(self.socket)},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev={self.id},name={self.name}",
        ]


@dataclass(frozen=True)
class LogPort:
    """virtio-serial port ``name`` (on ``AgentPort``'s bus) whose guest writes land in the host file
    ``log``: the guest agent's log, kept per sandbox. A ``file`` chardev never blocks the guest and
    counts as a connected host, so the agent's non-blocking writes always go through."""

    log: Path
    name: str = LOG_PORT_NAME
    id: str = "guestlog0"

    def __post_init__(self) -> None:
        _check_abs("guest log", self.log)
        _check_id("guest log chardev id", self.id)
        if not re.match(r"^[A-Za-z0-9_.-]+$", self.name):
            raise InvalidArgument(f"virtio-serial port name {self.name!r} is not valid", value=self.name)

    def to_args(self) -> list[str]:
        return [
            "-chardev",
            f"file,id={self.id},path={esc(self.log)}",
            "-device",
            f"virtserialport,bus=vser0.0,chardev={self.id},name={self.name}",
        ]


@dataclass(frozen=True)
class VirtioFs:
    socket: Path
    tag: str = SHARE_TAG
    queue_size: int = 1024
    id: str = "vfs0"

    def __post_init__(self) -> None:
        _check_abs("virtiofsd socket", self.socket)
        _check_id("virtio-fs chardev id", self.id)
        if not re.match(r"^[A-Za-z0-9_.-]{1,36}$", self.tag):
            raise InvalidArgument(
                f"virtio-fs tag {self.tag!r} is not valid (1-36 of A-Z a-z 0-9 _ . -)", value=self.tag
            )
        if self.queue_size not in (64, 128, 256, 512, 1024):
            raise InvalidArgument(
                f"virtio-fs queue size {self.queue_size} must be a power of 2 in 64..1024",
                value=self.queue_size,
            )

    def to_args(self) -> list[str]:
        return [
            "-chardev",
            f"socket,id={self.id},path={esc(self.socket)}",
            "-device",
            f"vhost-user-fs-pci,chardev={self.id},tag={self.tag},queue-size={self.queue_size}",
        ]

    def qmp_chardev(self) -> dict[str, object]:
        """``chardev-add`` arguments of the chardev (hot-plug after a template restore)."""
        addr = {"type": "unix", "data": {"path": str(self.socket)}}
        return {"id": self.id, "backend": {"type": "socket", "data": {"addr": addr, "server": False}}}

    def qmp_device(self, bus: str) -> dict[str, object]:
        """``device_add`` arguments of the device on the hot-plug port ``bus``."""
        return {
            "driver": "vhost-user-fs-pci",
            "id": f"{self.id}-dev",
            "chardev": self.id,
            "tag": self.tag,
            "queue-size": self.queue_size,
            "bus": bus,
        }


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class TapNic:
    """A virtio-net NIC backed by the tap device QEMU inherits as ``fd`` (opened by the shim in the
    pod's network namespace, see shim.resources.network), with the pod interface's ``mac``. No option
    ROM: the firmware never boots from the network (``-boot strict=on``) and iPXE costs boot time."""

    fd: int
    mac: str
    index: int = 0

    def __post_init__(self) -> None:
        if self.fd < 3:
            raise InvalidArgument(f"tap fd {self.fd} must be an inherited descriptor (>= 3)", value=self.fd)
        if not _MAC.match(self.mac):
            raise InvalidArgument(f"MAC {self.mac!r} is not aa:bb:cc:dd:ee:ff (lower case)", value=self.mac)
        if not 0 <= self.index < 64:
            raise InvalidArgument(f"NIC index {self.index} must be 0..63", value=self.index)

    @property
    def id(self) -> str:
        return f"nic{self.index}"

    @property
    def netdev_id(self) -> str:
        return f"net{self.index}"

    def to_args(self) -> list[str]:
        return [
            "-netdev",
            f"tap,id={self.netdev_id},fd={self.fd}",
            "-device",
            f"virtio-net-pci,netdev={self.netdev_id},id={self.id},mac={self.mac},romfile=",
        ]

    def qmp_netdev(self) -> dict[str, object]:
        """``netdev_add`` arguments (hot-plug after a template restore; QEMU inherited ``fd``)."""
        return {"type": "tap", "id": self.netdev_id, "fd": str(self.fd)}

    def qmp_device(self, bus: str) -> dict[str, object]:
        """``device_add`` arguments of the NIC on the hot-plug port ``bus``."""
        return {
            "driver": "virtio-net-pci",
            "id": self.id,
            "netdev": self.netdev_id,
            "mac": self.mac,
            "romfile": "",
            "bus": bus,
        }


@dataclass(frozen=True)
class HotplugPort:
    """An empty PCIe root port for a device added after start: VM templates cannot carry the virtio-fs
    device (QEMU 7.2 cannot migrate vhost-user-fs) nor the pod's NIC (its tap belongs to one pod), so
    a restored VM gets them here."""

    id: str = "rp-hp0"
    chassis: int = 1

    def __post_init__(self) -> None:
        _check_id("hot-plug port id", self.id)
        if not 1 <= self.chassis <= 255:
            raise InvalidArgument(f"PCIe chassis {self.chassis} must be 1..255", value=self.chassis)

    def to_args(self) -> list[str]:
        return ["-device", f"pcie-root-port,id={self.id},bus=pcie.0,chassis={self.chassis}"]


@dataclass(frozen=True)
class Incoming:
    """``-incoming defer``: QEMU waits for ``migrate-incoming`` (a template restore) before running."""

    def to_args(self) -> list[str]:
        return ["-incoming", "defer"]


@dataclass(frozen=True)
class VirtioMem:
    """One virtio-mem device over a memfd region of ``region_mib``, starting unplugged."""

    region_mib: int
    id: str = "vmem0"
    backend_id: str = "vmem0-ram"
    requested_mib: int = 0

    def __post_init__(self) -> None:
        _check_mib("virtio-mem region", self.region_mib, lo=2)
        if self.region_mib % 2:
            raise InvalidArgument(
                f"virtio-mem region {self.region_mib} MiB must be a multiple of 2 MiB", value=self.region_mib
            )
        if not 0 <= self.requested_mib <= self.region_mib:
            raise InvalidArgument(
                f"virtio-mem requested size {self.requested_mib} MiB outside 0..{self.region_mib} MiB",
                value=self.requested_mib,
            )
        _check_id("virtio-mem id", self.id)
        _check_id("virtio-mem backend id", self.backend_id)

    def to_args(self) -> list[str]:
        return [
            *MemoryBackend(self.backend_id, self.region_mib).to_args(),
            "-device",
            f"virtio-mem-pci,id={self.id},memdev={self.backend_id},requested-size={self.requested_mib}M",
        ]


@dataclass(frozen=True)
class Qmp:
    socket: Path

    def __post_init__(self) -> None:
        _check_abs("QMP socket", self.socket)

    def to_args(self) -> list[str]:
        return [
            "-chardev",
            f"socket,id=qmp0,path={esc(self.socket)},server=on,wait=off",
            "-mon",
            "chardev=qmp0,mode=control",
        ]


@dataclass(frozen=True)
class Console:
    """The serial console: always logged to ``log``; optionally also a socket (tests' line shell)."""

    log: Path
    socket: Path | None = None

    def __post_init__(self) -> None:
        _check_abs("console log", self.log)
        if self.socket is not None:
            _check_abs("console socket", self.socket)

    def to_args(self) -> list[str]:
        if self.socket is None:
            dev = f"file,id=console0,path={esc(self.log)}"
        else:
            dev = f"socket,id=console0,path={esc(self.socket)},server=on,wait=off,logfile={esc(self.log)},logappend=on"
        return ["-chardev", dev, "-serial", "chardev:console0"]


@dataclass(frozen=True)
class QemuCommand:
    binary: Path
    parts: tuple[Part, ...] = field(default_factory=tuple)

    def argv(self) -> list[str]:
        args = [str(self.binary)]
        for p in self.parts:
            args += p.to_args()
        return args


def console_device(arch: str) -> str:
    return "ttyAMA0" if arch == "aarch64" else "ttyS0"


def kernel_cmdline(arch: str, extra: str = "", more: Sequence[str] = ()) -> str:
    """The runtime's own parameters first, then the configuration's, then the caller's."""
    words = [f"console={console_device(arch)}", "panic=-1", *extra.split(), *more]
    return " ".join(w for w in words if w)


class Boot(enum.Enum):
    """How a VM starts. ``COLD``: firmware, kernel, agent. ``TEMPLATE``: the same, to be saved as a
    template (RAM in a file, no virtio-fs device, no NIC, empty hot-plug ports). ``RESTORE``: the
    template's command line plus ``-incoming defer``; the virtio-fs device and the pod's NIC (one at
    most) are hot-plugged once it runs."""

    COLD = "cold"
    TEMPLATE = "template"
    RESTORE = "restore"


#: the hot-plug ports of template and restored VMs: the virtio-fs device, the pod's NIC
HOTPLUG_PORT = HotplugPort()
NIC_HOTPLUG_PORT = HotplugPort("rp-hp1", chassis=2)


def vm_command(
    cfg: Config,
    sdir: SandboxDir,
    accel: str,
    *,
    console_socket: Path | None = None,
    extra_kernel_params: Sequence[str] = (),
    boot: Boot = Boot.COLD,
    ram_path: Path | None = None,
    nics: Sequence[TapNic] = (),
) -> QemuCommand:
    """The whole command line of the sandbox VM described by ``cfg`` in ``sdir`` under ``accel``.

    ``boot`` TEMPLATE/RESTORE need ``ram_path``: the file holding boot RAM (see :class:`MemoryBackend`).
    ``nics`` are on the command line of a COLD boot; a restored VM gets them hot-plugged instead.
    """
    hv = cfg.hypervisor
    templated = boot is not Boot.COLD
    if templated and ram_path is None:
        raise InvalidArgument(f"a {boot.value} boot needs the file of its boot RAM (ram_path)")
    mem_path = ram_path if templated else None
    gic = None if hv.machine_type == "q35" else ("host" if accel == "kvm" else "3")
    if hv.memory_hotplug == "acpi":
        memory = Memory(hv.default_memory, hv.memory_slots, hv.max_memory, mem_path=mem_path)
    elif hv.memory_hotplug == "virtio-mem":
        memory = Memory(hv.default_memory, 0, hv.max_memory, mem_path=mem_path)
    else:
        memory = Memory(hv.default_memory, mem_path=mem_path)
    parts: list[Part] = [
        Base(f"pyvm-{sdir.sandbox_id[:24]}"),
        Machine(hv.machine_type, accel, memory.backend_id, gic, hv.tcg_tb_size),
        Cpu(hv.cpu_kvm if accel == "kvm" else hv.cpu_tcg),
        Smp(hv.vcpus),
        memory,
    ]
    if hv.pflashes:
        parts.append(Pflash(hv.pflashes[0], sdir.efivars))
    if boot is Boot.RESTORE:
        if hv.machine_type == "q35":  # arm64 virt loads the kernel through fw_cfg only: nothing to keep
            parts.append(KernelBootRom())
    else:
        append = kernel_cmdline(hv.arch, hv.kernel_params, extra_kernel_params)
        parts.append(Kernel(hv.kernel, hv.initrd, append))
    if hv.image is not None:
        parts.append(RootDisk(hv.image))
    parts += [
        Qmp(sdir.qmp_sock),
        Console(sdir.console_log, console_socket),
        AgentPort(sdir.agent_sock),
        LogPort(sdir.guest_log),
    ]
    if cfg.shared_fs.kind == "virtio-fs" and not templated:
        parts.append(VirtioFs(sdir.virtiofsd_sock))
    if hv.memory_hotplug == "virtio-mem":
        parts.append(VirtioMem(hv.max_memory - hv.default_memory))
    if templated:
        parts += [HOTPLUG_PORT, NIC_HOTPLUG_PORT]
    else:
        parts += list(nics)
    if boot is Boot.RESTORE:
        parts.append(Incoming())
    return QemuCommand(hv.path, tuple(parts))


__all__ = [
    "AgentPort",
    "HOTPLUG_PORT",
    "NIC_HOTPLUG_PORT",
    "Base",
    "Boot",
    "Console",
    "HotplugPort",
    "Incoming",
    "Cpu",
    "Kernel",
    "KernelBootRom",
    "LogPort",
    "Machine",
    "Memory",
    "MemoryBackend",
    "MiB",
    "Part",
    "Pflash",
    "QemuCommand",
    "Qmp",
    "RootDisk",
    "Smp",
    "TapNic",
    "VirtioFs",
    "VirtioMem",
    "console_device",
    "esc",
    "kernel_cmdline",
    "vm_command",
]
