"""Kernel module dependency order from ``modules.dep`` (pure: no I/O beyond the text given)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shim.errors import NotFound


def module_name(path: str) -> str:
    """``kernel/fs/fuse/virtiofs.ko[.xz]`` -> ``virtiofs`` (dashes folded to underscores, as the kernel does)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass(frozen=True)
class ModuleDep:
    #: name -> (path relative to /lib/modules/<kver>, dependency paths as listed)
    entries: dict[str, tuple[str, tuple[str, ...]]]

    @classmethod
    def parse(cls, text: str) -> ModuleDep:
        entries: dict[str, tuple[str, tuple[str, ...]]] = {}
        for line in text.splitlines():
            if ":" not in line:
                continue
            path, _, deps = line.partition(":")
            path = path.strip()
            entries[module_name(path)] = (path, tuple(deps.split()))
        return cls(entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.replace("-", "_") in self.entries

    def path(self, name: str) -> str:
        try:
            return self.entries[name.replace("-", "_")][0]
        except KeyError:
            raise NotFound(f"kernel module {name} is not in modules.dep", module=name) from None

    def load_order(self, wanted: Iterable[str], *, missing_ok: bool = False) -> list[str]:
        """Paths to insmod, in order, so that every module's dependencies are loaded before it.

        Like modprobe, each module's dependency list (which depmod writes closest-first) is loaded
        right to left; duplicates are dropped. Unknown modules raise NotFound unless ``missing_ok``
        (the same list serves kernels where e.g. virtio_pci_legacy_dev does not exist).
        """
        order: list[str] = []
        seen: set[str] = set()
        for name in wanted:
            key = name.replace("-", "_")
            if key not in self.entries:
                if missing_ok:
                    continue
                self.path(key)
            path, deps = self.entries[key]
            for dep in (*reversed(deps), path):
                if dep not in seen:
                    seen.add(dep)
                    order.append(dep)
        return order
