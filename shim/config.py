"""The host-side configuration of pyvm: one typed, validated, frozen object, loaded once.

Sources, first hit wins (the file found replaces the built-in defaults key by key):

1. an explicit path (containerd's runtime option ``ConfigPath``, ``pyvm check --config FILE``);
2. the ``PYVM_CONFIG`` environment variable;
3. ``/etc/pyvm/configuration.toml`` (:data:`shim.paths.DEFAULT_CONFIG`) if it exists;
4. the built-in defaults for the host architecture (identical to ``config/configuration*.toml``;
   a unit test keeps them in step).

A file may set ``[hypervisor] arch``; the defaults it is merged over are then that architecture's.
Every bad value, unknown key or impossible combination raises :class:`~shim.errors.InvalidArgument`
naming the key, the value and what is valid. Whether the files named here exist is a property of the
host, not of the configuration: :mod:`shim.platform` checks that (``pyvm check``, VM start).

Units: memory in MiB, timeouts in seconds *at native (KVM) speed*; the driver multiplies them by the
accelerator's speed factor (:meth:`Timeouts.scaled`). Only host-side settings live here; the guest
image knows nothing of this file.
"""

from __future__ import annotations

import os
import platform as _platform
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shim.errors import InvalidArgument
from shim.paths import DEFAULT_CONFIG, TEMPLATE_ROOT, guest_dir

ARCHES = ("x86_64", "aarch64")
MACHINES = {"x86_64": ("q35",), "aarch64": ("virt",)}
ACCELERATORS = ("auto", "kvm", "tcg")
HOTPLUG = ("acpi", "virtio-mem", "none")
SHARED_FS = ("virtio-fs", "none")
VIRTIOFS_CACHE = ("auto", "always", "none")
#: guest memory is handed out in multiples of this (the smallest Linux memory block of both arches)
MEMORY_ALIGN_MIB = 2


@dataclass(frozen=True)
class HypervisorConfig:
    """``[hypervisor]``: QEMU, firmware, guest assets, CPU and memory."""

    path: Path
    arch: str
    machine_type: str
    accelerator: str
    #: -cpu model when the accelerator is KVM / TCG
    cpu_kvm: str
    cpu_tcg: str
    #: TCG translation-block cache in MiB (``-accel tcg,tb-size=N``); 0 = QEMU's default (1 GiB).
    #: Unused under KVM.
    tcg_tb_size: int
    #: UEFI firmware: [] (direct kernel boot, no ACPI on arm64) or [code (read-only), vars template]
    pflashes: tuple[Path, ...]
    kernel: Path
    initrd: Path | None
    #: read-only raw root disk (virtio-blk); None when the guest runs from its initrd
    image: Path | None
    kernel_params: str
    vcpus: int
    default_memory: int
    memory_slots: int
    max_memory: int
    memory_hotplug: str

    @property
    def firmware_code(self) -> Path | None:
        return self.pflashes[0] if self.pflashes else None

    @property
    def firmware_vars(self) -> Path | None:
        return self.pflashes[1] if len(self.pflashes) > 1 else None


@dataclass(frozen=True)
class SharedFsConfig:
    """``[shared_fs]``: the virtio-fs daemon that exports the sandbox share."""

    kind: str
    daemon: Path
    cache: str
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Timeouts:
    """``[timeouts]``: seconds at native speed; :meth:`scaled` adapts them to the accelerator."""

    boot: float
    agent: float
    qmp: float
    shutdown: float

    def scaled(self, factor: float) -> Timeouts:
        """These timeouts multiplied by ``factor`` (>= 1; the accelerator probe's speed factor)."""
        f = max(1.0, float(factor))
        return Timeouts(
            boot=self.boot * f, agent=self.agent * f, qmp=self.qmp * f, shutdown=self.shutdown * f
        )


@dataclass(frozen=True)
class RuntimeConfig:
    """``[runtime]``: shim behaviour."""

    #: annotation prefixes/keys a pod may use to override settings (used by later layers)
    enable_annotations: tuple[str, ...] = ()


@dataclass(frozen=True)
class FactoryConfig:
    """``[factory]``: VM templating. A template is one VM booted to agent-ready and saved (device
    state + guest RAM); a pod whose VM matches it restores it instead of cold-booting firmware, kernel
    and agent. Trade-off (why it can be switched off): every VM restored from one template shares the
    template's boot_id and the kernel layout (KASLR) and heap contents of the moment it was saved; the
    wall clock and the kernel RNG are reset from the host at restore."""

    enable_template: bool = True
    #: where ``pyvm template build`` writes templates: <path>/<arch>/<key>/
    template_path: Path = TEMPLATE_ROOT


@dataclass(frozen=True)
class Config:
    hypervisor: HypervisorConfig
    shared_fs: SharedFsConfig
    timeouts: Timeouts
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)
    #: the file this was loaded from; None for the built-in defaults
    source: Path | None = None


# -------------------------------------------------------------------------------------------------
# Built-in defaults (the single owner of default values; config/*.toml mirror them)


def _default_tables(arch: str) -> dict[str, dict[str, Any]]:
    gdir = guest_dir(arch)
    if arch == "aarch64":
        hv: dict[str, Any] = {
            "path": "/usr/bin/qemu-system-aarch64",
            "arch": "aarch64",
            "machine_type": "virt",
            "cpu_kvm": "host",
            # plain `max` spends ~70 % of a TCG boot emulating QARMA pointer authentication
            "cpu_tcg": "max,pauth-impdef=on",
            "pflashes": ["/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"],
        }
    else:
        hv = {
            "path": "/usr/bin/qemu-system-x86_64",
            "arch": "x86_64",
            "machine_type": "q35",
            "cpu_kvm": "host",
            "cpu_tcg": "max",
            "pflashes": ["/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"],
        }
    hv.update(
        {
            "accelerator": "auto",
            "kernel": str(gdir / "vmlinuz"),
            "initrd": str(gdir / "initrd.img"),
            "image": str(gdir / "rootfs.img"),
            # 32: every MiB of it a VM ever used stays resident; one idle CRI pod (template restore)
            # measured 139 MiB beyond guest RAM at 64 and 101 at 16, whose flushes made
            # `ctr run --rm true` 3.0 s instead of 2.1 s (hack/bench-e2e.py)
            "tcg_tb_size": 32,
            # quiet: the kernel's boot log on the emulated UART costs ~0.4 s under TCG (measured)
            "kernel_params": "quiet",
            "vcpus": 1,
            "default_memory": 2048,
            "memory_slots": 10,
            "max_memory": 16384,
            "memory_hotplug": "acpi",
        }
    )
    return {
        "hypervisor": hv,
        "shared_fs": {
            "kind": "virtio-fs",
            "daemon": "/usr/lib/qemu/virtiofsd",
            "cache": "auto",
            "extra_args": [],
        },
        "timeouts": {"boot": 10.0, "agent": 10.0, "qmp": 5.0, "shutdown": 5.0},
        "runtime": {"enable_annotations": []},
        "factory": {"enable_template": True, "template_path": str(TEMPLATE_ROOT)},
    }


def host_arch() -> str:
    m = _platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def defaults(arch: str | None = None) -> Config:
    """The built-in configuration for ``arch`` (default: the host's)."""
    a = arch or host_arch()
    if a not in ARCHES:
        a = "x86_64"
    return _build(_default_tables(a), source=None)


# -------------------------------------------------------------------------------------------------
# Loading


def load(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration (see the module docstring for the source order).

    Raises InvalidArgument for an unreadable, malformed or invalid file, or when an explicitly named
    file (argument or ``PYVM_CONFIG``) does not exist.
    """
    environ = os.environ if env is None else env
    chosen: Path | None = None
    origin = ""
    if path:
        chosen, origin = Path(path), "ConfigPath"
    elif environ.get("PYVM_CONFIG"):
        chosen, origin = Path(environ["PYVM_CONFIG"]), "PYVM_CONFIG"
    elif DEFAULT_CONFIG.exists():
        chosen, origin = DEFAULT_CONFIG, "default location"
    if chosen is None:
        return defaults()
    try:
        raw = chosen.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"configuration file {chosen} (from {origin}) cannot be read: {exc.strerror or exc}",
            key="config",
            value=str(chosen),
        ) from exc
    return loads(raw.decode("utf-8", errors="replace"), source=chosen)


def loads(text: str, *, source: Path | None = None) -> Config:
    """Parse and validate TOML text, merged over the defaults of the arch it names."""
    where = f" in {source}" if source else ""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"configuration{where} is not valid TOML: {exc}", key="config") from exc
    arch = host_arch()
    hv = doc.get("hypervisor")
    if isinstance(hv, dict) and "arch" in hv:
        arch = hv["arch"]
        if arch not in ARCHES:
            raise _bad("hypervisor.arch", arch, f"one of {_alts(ARCHES)}", where)
    elif arch not in ARCHES:
        arch = "x86_64"
    tables = _default_tables(arch)
    for section, values in doc.items():
        if section not in tables:
            raise InvalidArgument(
                f"unknown configuration section [{section}]{where}; valid sections: {_alts(tables)}",
                key=section,
            )
        if not isinstance(values, dict):
            raise _bad(section, values, "a table", where)
        for key, value in values.items():
            if key not in tables[section]:
                raise InvalidArgument(
                    f"unknown configuration key {section}.{key}{where}; "
                    f"valid keys in [{section}]: {_alts(tables[section])}",
                    key=f"{section}.{key}",
                )
            tables[section][key] = value
    return _build(tables, source=source, where=where)


def with_overrides(cfg: Config, **hypervisor: Any) -> Config:
    """A copy of ``cfg`` with ``[hypervisor]`` keys replaced, validated again (tests, annotations)."""
    tables = _to_tables(cfg)
    for key, value in hypervisor.items():
        if key not in tables["hypervisor"]:
            raise InvalidArgument(f"unknown configuration key hypervisor.{key}", key=f"hypervisor.{key}")
        tables["hypervisor"][key] = value
    return _build(tables, source=cfg.source)


def validate(cfg: Config) -> Config:
    """Validate a Config built or modified in code (``dataclasses.replace``) like a loaded one."""
    return _build(_to_tables(cfg), source=cfg.source)


def _to_tables(cfg: Config) -> dict[str, dict[str, Any]]:
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if v is None:
            return ""
        return v

    out: dict[str, dict[str, Any]] = {}
    for name, obj in (
        ("hypervisor", cfg.hypervisor),
        ("shared_fs", cfg.shared_fs),
        ("timeouts", cfg.timeouts),
        ("runtime", cfg.runtime),
        ("factory", cfg.factory),
    ):
        out[name] = {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
    return out


# -------------------------------------------------------------------------------------------------
# Validation


def _alts(values: Any) -> str:
    return ", ".join(repr(v) for v in values)


def _bad(key: str, value: Any, valid: str, where: str = "") -> InvalidArgument:
    return InvalidArgument(f"invalid {key} = {value!r}{where}: must be {valid}", key=key, value=value)


def _build(t: dict[str, dict[str, Any]], *, source: Path | None, where: str = "") -> Config:
    hv, fs, to, rt, fa = t["hypervisor"], t["shared_fs"], t["timeouts"], t["runtime"], t["factory"]

    def choice(sec: str, key: str, allowed: tuple[str, ...], table: dict[str, Any]) -> str:
        v = table[key]
        if not isinstance(v, str) or v not in allowed:
            raise _bad(f"{sec}.{key}", v, f"one of {_alts(allowed)}", where)
        return v

    def text(sec: str, key: str, table: dict[str, Any], *, empty_ok: bool = False) -> str:
        v = table[key]
        if not isinstance(v, str) or (not empty_ok and not v.strip()):
            raise _bad(f"{sec}.{key}", v, "a non-empty string" if not empty_ok else "a string", where)
        if "\n" in v or "\0" in v:
            raise _bad(f"{sec}.{key}", v, "a single line", where)
        return v

    def abspath(sec: str, key: str, table: dict[str, Any], *, optional: bool = False) -> Path | None:
        v = table[key]
        if optional and v in ("", None):
            return None
        if not isinstance(v, str) or not v.startswith("/"):
            what = "an absolute path" + (' or "" for none' if optional else "")
            raise _bad(f"{sec}.{key}", v, what, where)
        if "," in v:
            # QEMU's option syntax would need ",," escaping; refuse rather than guess
            raise _bad(f"{sec}.{key}", v, "a path without commas", where)
        return Path(v)

    def integer(sec: str, key: str, table: dict[str, Any], lo: int, hi: int) -> int:
        v = table[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _bad(f"{sec}.{key}", v, f"an integer from {lo} to {hi}", where)
        return v

    def seconds(key: str) -> float:
        v = to[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
            raise _bad(f"timeouts.{key}", v, "a number of seconds > 0 and <= 3600", where)
        return float(v)

    def strings(sec: str, key: str, table: dict[str, Any]) -> tuple[str, ...]:
        v = table[key]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise _bad(f"{sec}.{key}", v, "a list of non-empty strings", where)
        return tuple(v)

    arch = choice("hypervisor", "arch", ARCHES, hv)
    machine = choice("hypervisor", "machine_type", MACHINES[arch], hv)
    raw_pf = hv["pflashes"]
    if not isinstance(raw_pf, list) or len(raw_pf) not in (0, 2):
        raise _bad(
            "hypervisor.pflashes",
            raw_pf,
            "[] (no UEFI firmware) or two absolute paths: [firmware code (read-only), variable store template]",
            where,
        )
    pflashes: list[Path] = []
    for i, p in enumerate(raw_pf):
        pflashes.append(abspath("hypervisor", "pflashes", {"pflashes": p}) or Path())  # type: ignore[arg-type]
        if i == 1 and pflashes[0] == pflashes[1]:
            raise _bad("hypervisor.pflashes", raw_pf, "two different files (code, vars)", where)
    default_memory = integer("hypervisor", "default_memory", hv, 64, 4 * 1024 * 1024)
    if default_memory % MEMORY_ALIGN_MIB:
        raise _bad(
            "hypervisor.default_memory", default_memory, f"a multiple of {MEMORY_ALIGN_MIB} MiB", where
        )
    max_memory = integer("hypervisor", "max_memory", hv, 64, 16 * 1024 * 1024)
    if max_memory < default_memory:
        raise _bad(
            "hypervisor.max_memory",
            max_memory,
            f"at least hypervisor.default_memory ({default_memory} MiB)",
            where,
        )
    slots = integer("hypervisor", "memory_slots", hv, 0, 255)
    hotplug = choice("hypervisor", "memory_hotplug", HOTPLUG, hv)
    if hotplug != "none" and max_memory == default_memory:
        raise _bad(
            "hypervisor.max_memory",
            max_memory,
            f"larger than default_memory ({default_memory} MiB) when memory_hotplug = {hotplug!r}",
            where,
        )
    if hotplug == "acpi" and slots == 0:
        raise _bad("hypervisor.memory_slots", slots, 'at least 1 when memory_hotplug = "acpi"', where)
    if hotplug == "virtio-mem" and (max_memory - default_memory) % MEMORY_ALIGN_MIB:
        raise _bad(
            "hypervisor.max_memory",
            max_memory,
            f"default_memory + a multiple of {MEMORY_ALIGN_MIB} MiB for virtio-mem",
            where,
        )
    if arch == "aarch64" and hotplug == "acpi" and not pflashes:
        raise InvalidArgument(
            f'invalid configuration{where}: memory_hotplug = "acpi" on aarch64 needs UEFI firmware in '
            'hypervisor.pflashes (e.g. ["/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"]). '
            "QEMU's virt machine creates the acpi-ged device (ACPI Generic Event Device) only when firmware is "
            'loaded; without it every pc-dimm hot-add fails with "memory hotplug is not enabled: missing '
            'acpi-ged device". Set pflashes, or use memory_hotplug = "virtio-mem" or "none".',
            key="hypervisor.pflashes",
            value=[],
            memory_hotplug=hotplug,
        )

    hypervisor = HypervisorConfig(
        path=abspath("hypervisor", "path", hv),  # type: ignore[arg-type]
        arch=arch,
        machine_type=machine,
        accelerator=choice("hypervisor", "accelerator", ACCELERATORS, hv),
        cpu_kvm=text("hypervisor", "cpu_kvm", hv),
        cpu_tcg=text("hypervisor", "cpu_tcg", hv),
        tcg_tb_size=integer("hypervisor", "tcg_tb_size", hv, 0, 4096),
        pflashes=tuple(pflashes),
        kernel=abspath("hypervisor", "kernel", hv),  # type: ignore[arg-type]
        initrd=abspath("hypervisor", "initrd", hv, optional=True),
        image=abspath("hypervisor", "image", hv, optional=True),
        kernel_params=text("hypervisor", "kernel_params", hv, empty_ok=True),
        vcpus=integer("hypervisor", "vcpus", hv, 1, 255),
        default_memory=default_memory,
        memory_slots=slots,
        max_memory=max_memory,
        memory_hotplug=hotplug,
    )
    if hypervisor.initrd is None and hypervisor.image is None:
        raise _bad(
            "hypervisor.initrd", "", "set when hypervisor.image is empty (the guest needs a root)", where
        )
    shared_fs = SharedFsConfig(
        kind=choice("shared_fs", "kind", SHARED_FS, fs),
        daemon=abspath("shared_fs", "daemon", fs),  # type: ignore[arg-type]
        cache=choice("shared_fs", "cache", VIRTIOFS_CACHE, fs),
        extra_args=strings("shared_fs", "extra_args", fs),
    )
    timeouts = Timeouts(**{k: seconds(k) for k in ("boot", "agent", "qmp", "shutdown")})
    runtime = RuntimeConfig(enable_annotations=strings("runtime", "enable_annotations", rt))
    if not isinstance(fa["enable_template"], bool):
        raise _bad("factory.enable_template", fa["enable_template"], "true or false", where)
    factory = FactoryConfig(
        enable_template=fa["enable_template"],
        template_path=abspath("factory", "template_path", fa),  # type: ignore[arg-type]
    )
    return Config(
        hypervisor=hypervisor,
        shared_fs=shared_fs,
        timeouts=timeouts,
        runtime=runtime,
        factory=factory,
        source=source,
    )


__all__ = [
    "ACCELERATORS",
    "ARCHES",
    "Config",
    "FactoryConfig",
    "HypervisorConfig",
    "RuntimeConfig",
    "SharedFsConfig",
    "Timeouts",
    "defaults",
    "host_arch",
    "load",
    "loads",
    "validate",
    "with_overrides",
]
