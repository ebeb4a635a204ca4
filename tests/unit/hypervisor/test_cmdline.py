"""QEMU command-line builders: exact argv for typical configs, and each validation error."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim import config
from shim.errors import InvalidArgument
from shim.hypervisor.qemu import cmdline as c
from shim.paths import SandboxDir

SD = SandboxDir("sb1", Path("/run/pyvm/sbs/sb1"))
G86 = "/var/lib/pyvm/guest/x86_64/current"
GA = "/var/lib/pyvm/guest/aarch64/current"


def _cfg(arch: str, **over: object) -> config.Config:
    g = G86 if arch == "x86_64" else GA
    base = {"kernel": f"{g}/vmlinuz", "initrd": f"{g}/initrd.img", "image": f"{g}/rootfs.img"}
    base.update(over)
    return config.with_overrides(config.defaults(arch), **base)


COMMON_TAIL = [
    "-chardev",
    "socket,id=qmp0,path=/run/pyvm/sbs/sb1/qmp.sock,server=on,wait=off",
    "-mon",
    "chardev=qmp0,mode=control",
    "-chardev",
    "file,id=console0,path=/run/pyvm/sbs/sb1/console.log",
    "-serial",
    "chardev:console0",
    "-device",
    "virtio-serial-pci,id=vser0",
    "-chardev",
    "socket,id=agent0,path=/run/pyvm/sbs/sb1/agent.sock,server=on,wait=off",
    "-device",
    "virtserialport,bus=vser0.0,chardev=agent0,name=io.pyvm.agent.0",
    "-chardev",
    "file,id=guestlog0,path=/run/pyvm/sbs/sb1/guest.log",
    "-device",
    "virtserialport,bus=vser0.0,chardev=guestlog0,name=io.pyvm.log.0",
    "-chardev",
    "socket,id=vfs0,path=/run/pyvm/sbs/sb1/virtiofsd.sock",
    "-device",
    "vhost-user-fs-pci,chardev=vfs0,tag=pyvm-shared,queue-size=1024",
]
BASE = [
    "-name",
    "pyvm-sb1,debug-threads=on",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-boot",
    "strict=on",
]


def test_x86_default_argv_exact() -> None:
    argv = c.vm_command(_cfg("x86_64"), SD, "tcg").argv()
    assert argv == [
        "/usr/bin/qemu-system-x86_64",
        *BASE,
        "-machine",
        "q35,memory-backend=ram0",
        "-accel",
        "tcg,thread=multi,tb-size=32",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        "2048M,slots=10,maxmem=16384M",
        "-object",
        "memory-backend-memfd,id=ram0,size=2048M,share=on",
        "-drive",
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "-drive",
        "if=pflash,format=raw,unit=1,file=/run/pyvm/sbs/sb1/efivars.fd",
        "-kernel",
        f"{G86}/vmlinuz",
        "-initrd",
        f"{G86}/initrd.img",
        "-append",
        "console=ttyS0 panic=-1 quiet",
        "-drive",
        f"if=none,id=rootfs,file={G86}/rootfs.img,format=raw,readonly=on",
        "-device",
        "virtio-blk-pci,drive=rootfs,id=rootfs-blk,romfile=",
        *COMMON_TAIL,
    ]


def test_arm64_kvm_virtio_mem_argv_exact() -> None:
    cfg = _cfg(
        "aarch64",
        memory_hotplug="virtio-mem",
        image="",
        kernel_params="quiet",
        vcpus=2,
        default_memory=1024,
        max_memory=3072,
    )
    argv = c.vm_command(cfg, SD, "kvm", console_socket=SD.root / "console.sock").argv()
    assert argv == [
        "/usr/bin/qemu-system-aarch64",
        *BASE,
        "-machine",
        "virt,gic-version=host,memory-backend=ram0",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-smp",
        "2",
        "-m",
        "1024M,maxmem=3072M",
        "-object",
        "memory-backend-memfd,id=ram0,size=1024M,share=on",
        "-drive",
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd",
        "-drive",
        "if=pflash,format=raw,unit=1,file=/run/pyvm/sbs/sb1/efivars.fd",
        "-kernel",
        f"{GA}/vmlinuz",
        "-initrd",
        f"{GA}/initrd.img",
        "-append",
        "console=ttyAMA0 panic=-1 quiet",
        *COMMON_TAIL[:4],
        "-chardev",
        "socket,id=console0,path=/run/pyvm/sbs/sb1/console.sock,server=on,wait=off,"
        "logfile=/run/pyvm/sbs/sb1/console.log,logappend=on",
        "-serial",
        "chardev:console0",
        *COMMON_TAIL[8:],
        "-object",
        "memory-backend-memfd,id=vmem0-ram,size=2048M,share=on",
        "-device",
        "virtio-mem-pci,id=vmem0,memdev=vmem0-ram,requested-size=0M",
    ]


def test_arm64_tcg_uses_gic3_and_pauth_impdef_and_no_shared_fs() -> None:
    cfg = config.with_overrides(_cfg("aarch64"), memory_hotplug="none", max_memory=2048)
    from dataclasses import replace

    cfg = replace(cfg, shared_fs=replace(cfg.shared_fs, kind="none"))
    argv = c.vm_command(cfg, SD, "tcg").argv()
    assert argv[argv.index("-machine") + 1] == "virt,gic-version=3,memory-backend=ram0"
    assert argv[argv.index("-cpu") + 1] == "max,pauth-impdef=on"
    assert argv[argv.index("-m") + 1] == "2048M"
    assert "vhost-user-fs-pci" not in " ".join(argv)


def test_commas_in_paths_are_escaped() -> None:
    assert c.Pflash(Path("/a,b/code"), Path("/v")).to_args()[1].endswith("file=/a,,b/code")
    assert c.Qmp(Path("/x,y/q.sock")).to_args()[1] == "socket,id=qmp0,path=/x,,y/q.sock,server=on,wait=off"


def test_memory_backend_qmp_args() -> None:
    assert c.MemoryBackend("mem3", 512).qmp_args() == {
        "qom-type": "memory-backend-memfd",
        "id": "mem3",
        "size": 512 << 20,
        "share": True,
    }


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: c.Machine("pc", "tcg"), "use 'q35' or 'virt'"),
        (lambda: c.Machine("q35", "hvf"), "'kvm' or 'tcg'"),
        (lambda: c.Machine("virt", "tcg"), "needs gic-version"),
        (lambda: c.Machine("q35", "tcg", gic_version="3"), "no GIC"),
        (lambda: c.Machine("q35", "tcg", memory_backend="9bad"), "not a valid QEMU id"),
        (lambda: c.Machine("q35", "tcg", tb_size_mib=-1), "tb-size"),
        (lambda: c.Cpu("max;rm -rf"), "MODEL"),
        (lambda: c.Smp(0), "vcpus must be"),
        (lambda: c.Memory(0), "memory size"),
        (lambda: c.Memory(512, slots=300, max_mib=1024), "slots must be"),
        (lambda: c.Memory(1024, max_mib=512), "below the boot memory"),
        (lambda: c.Memory(512, slots=4), "need max memory above"),
        (lambda: c.MemoryBackend("m", 0), "size"),
        (lambda: c.Pflash(Path("code.fd"), Path("/v")), "absolute"),
        (lambda: c.Pflash(Path("/c"), Path("/c")), "different"),
        (lambda: c.Kernel(Path("/k"), None, "a\nb"), "single line"),
        (lambda: c.RootDisk(Path("rootfs.img")), "absolute"),
        (lambda: c.AgentPort(Path("/s"), name="bad name"), "port name"),
        (lambda: c.VirtioFs(Path("/s"), tag="x" * 40), "tag"),
        (lambda: c.VirtioFs(Path("/s"), queue_size=100), "queue size"),
        (lambda: c.VirtioMem(3), "multiple of 2"),
        (lambda: c.VirtioMem(1024, requested_mib=2048), "outside"),
        (lambda: c.Console(Path("log")), "absolute"),
        (lambda: c.esc("a\nb"), "control character"),
    ],
)
def test_validation_errors(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match=match):
        make()


def test_guest_log_port_is_a_file_chardev_on_the_agent_bus() -> None:
    args = c.LogPort(SD.guest_log).to_args()
    assert args == [
        "-chardev",
        "file,id=guestlog0,path=/run/pyvm/sbs/sb1/guest.log",
        "-device",
        "virtserialport,bus=vser0.0,chardev=guestlog0,name=io.pyvm.log.0",
    ]
    with pytest.raises(InvalidArgument):
        c.LogPort(Path("relative.log"))


def test_tcg_tb_size_caps_the_translation_cache_under_tcg_only() -> None:
    assert c.Machine("q35", "tcg", tb_size_mib=64).to_args()[-1] == "tcg,thread=multi,tb-size=64"
    assert c.Machine("q35", "tcg", tb_size_mib=0).to_args()[-1] == "tcg,thread=multi"  # QEMU's default
    assert c.Machine("q35", "kvm", tb_size_mib=64).to_args()[-1] == "kvm"
    argv = c.vm_command(_cfg("x86_64", tcg_tb_size=0), SD, "tcg").argv()
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
