"""The guest image builder (``pyvm guest build``).

Builds, per architecture, a Debian cloud kernel, a "floor" initramfs (busybox + virtio modules + a
console line shell, for benchmarks and QEMU-driver tests) and the agent guest (a debootstrap'd
bookworm minbase with python3, crun and pyvm's guest agent). Everything is cached by a hash of its
inputs and installed under ``GUEST_ROOT/<arch>/<hash>/`` with an atomic ``current`` symlink.

Only ``shim.paths``, ``shim.errors`` and ``shim.log`` may be imported from the rest of pyvm.
"""

from shim.guestimage.arch import ARCHES, Arch, host_arch

__all__ = ["ARCHES", "Arch", "host_arch"]
