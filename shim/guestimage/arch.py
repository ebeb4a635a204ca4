"""The architectures pyvm builds guests for, and every per-architecture fact the builder needs."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from shim.errors import InvalidArgument


@dataclass(frozen=True)
class Arch:
    #: pyvm's name (``uname -m``): the directory under GUEST_ROOT
    name: str
    #: Debian's name
    deb: str
    #: the metapackage whose dependency pins the concrete kernel package
    kernel_meta: str
    #: serial console device the host passes as ``console=``
    console: str
    #: binfmt_misc entry (qemu-user-static) that runs this arch's binaries on a foreign host
    binfmt: str

    @property
    def is_native(self) -> bool:
        return self.name == host_arch()


ARCHES: dict[str, Arch] = {
    "x86_64": Arch("x86_64", "amd64", "linux-image-cloud-amd64", "ttyS0", "qemu-x86_64"),
    "aarch64": Arch("aarch64", "arm64", "linux-image-cloud-arm64", "ttyAMA0", "qemu-aarch64"),
}


def host_arch() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def get_arch(name: str) -> Arch:
    """:raises InvalidArgument: for an architecture pyvm does not build."""
    try:
        return ARCHES[name]
    except KeyError:
        raise InvalidArgument(f"unknown guest architecture {name!r} (known: {', '.join(ARCHES)})") from None
