"""``pyvm guest build``: resolve the inputs, hash them, build what is missing, install atomically.

Layers and their caches (under ``CACHE_ROOT/guest-build``):
  debs/, kernel/    downloaded .debs and the unpacked kernel (per pinned package version)
  <arch>/base-<key> the debootstrap'd base rootfs (``rootfs.base_key``): minutes; rarely rebuilt
  wheels/           the agent's Python dependencies (protobuf's compiled wheel per architecture,
                    pyroute2's pure-Python one)
Final assembly (agent code, init, initramfs, root disk) reruns whenever the build hash changes and
takes seconds. Installed: ``GUEST_ROOT/<arch>/<hash>/`` and the ``current`` symlink, both replaced
by rename so a failed build never leaves a half-written ``current``.
"""

from __future__ import annotations

import compileall
import datetime
import fcntl
import hashlib
import io
import json
import os
import py_compile
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shim import paths
from shim.errors import FailedPrecondition, InvalidArgument
from shim.guestimage import apt, ext4, guest_init, initramfs, kernel, rootfs
from shim.guestimage.arch import Arch
from shim.guestimage.proc import need_tool, run
from shim.guestimage.progress import Progress

#: bump when the output format changes in a way the source digest would not show
BUILDER_VERSION = 1
LAYOUTS = ("disk", "initramfs")
#: "disk" (small busybox initramfs + read-only ext4 root on virtio-blk + tmpfs overlay) won over the
#: whole rootfs in one 34 MiB zstd initramfs, measured QEMU start -> PYVM-AGENT-ENTRY under TCG with
#: UEFI (4 paired runs, median): x86_64 OVMF 9.1 s vs 11.5 s, aarch64 AAVMF 7.1 s vs 11.8 s. Also, crun
#: cannot pivot_root out of an initramfs root (the rootfs mount cannot be pivoted).
DEFAULT_LAYOUT = "disk"
#: the agent package files copied into the guest (relative to the repository root)
AGENT_SOURCES = (
    "shim/__init__.py",
    "shim/errors.py",
    "shim/ids.py",
    "shim/log.py",
    "shim/_pb",
    "shim/ttrpc",
    "shim/guestagent",
)
#: the agent's Python dependencies, versions equal to the host's. protobuf's compiled (upb) wheel:
#: the pure-python implementation cost ~0.5 s of agent imports under TCG, upb ~0.15 s (measured with
#: PYTHONPROFILEIMPORTTIME in the guest). It is the abi3 build for CPython >= 3.9 and manylinux2014
#: (glibc 2.17): bookworm has python3.11 and glibc 2.36. No structlog: shim.log falls back to the
#: stdlib without it (its import was another ~0.25 s). pyroute2 (pure Python, no dependencies): the
#: agent configures the pod's network with it, imported only when CreateSandbox carries interfaces.
WHEELS = {"protobuf": "6.33.6", "pyroute2": "0.9.7"}
#: WHEELS that exist only as a pure-Python (py3-none-any) wheel; the others must be the compiled one
PURE_PYTHON_WHEELS = frozenset({"pyroute2"})
WHEEL_PLATFORM = "manylinux2014_{machine}"
GUEST_LIB = "opt/pyvm/lib"
#: /opt/pyvm/bin/pyvm-init, PID 1 after switch_root: runs guest_init.py (installed as pyvm_init)
INIT_STUB = f"""#!/usr/bin/python3 -S
import sys
sys.path.insert(0, "/{GUEST_LIB}")
import pyvm_init
pyvm_init.main()
"""
SOURCE_DATE_EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "1704067200"))
REPO_ROOT = Path(__file__).resolve().parents[2]


def build_cache() -> Path:
    return paths.CACHE_ROOT / "guest-build"


def agent_files(repo: Path = REPO_ROOT) -> dict[str, Path]:
    """Relative path -> file, for every agent source file present now (others are being written)."""
    found: dict[str, Path] = {}
    for rel in AGENT_SOURCES:
        p = repo / rel
        if p.is_file():
            found[rel] = p
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix in (".py", ".typed") and "__pycache__" not in f.parts:
                    found[f.relative_to(repo).as_posix()] = f
    return found


def digest_files(files: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel].read_bytes()).digest())
    return h.hexdigest()


def builder_digest() -> str:
    """Digest of this builder's own source (init scripts, trim rules...): a change rebuilds the image."""
    here = Path(__file__).resolve().parent
    return digest_files({f.name: f for f in sorted(here.glob("*.py"))})


@dataclass
class Inputs:
    """Everything the image is a function of. ``hash()`` names the installed directory."""

    arch: str
    layout: str
    kernel: str  # name=version
    busybox: str
    base_key: str
    wheels: dict[str, str]  # filename -> sha256
    agent_digest: str
    builder_digest: str
    builder_version: int = BUILDER_VERSION
    extra: dict[str, str] = field(default_factory=dict)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def fetch_wheels(cache: Path, arch: Arch, progress: Progress) -> dict[str, Path]:
    """The CPython 3.11 ``manylinux2014_<arch>`` wheels of WHEELS (``py3-none-any`` for
    PURE_PYTHON_WHEELS), downloaded once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    platform = WHEEL_PLATFORM.format(machine=arch.name)

    def present(name: str, version: str) -> list[Path]:
        tag = "py3-none-any" if name in PURE_PYTHON_WHEELS else f"*-manylinux*_{arch.name}"
        return sorted(cache.glob(f"{name}-{version}-{tag}.whl"))

    found: dict[str, Path] = {}
    for name, version in WHEELS.items():
        matches = present(name, version)
        if not matches:
            with progress.step(f"pip download {name}=={version} ({platform}, cp311)"):
                run(
                    [
                        sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--platform", platform, "--implementation", "cp",
                        "--python-version", "3.11", "--abi", "cp311", "-d", cache, f"{name}=={version}",
                    ]
                )  # fmt: skip
            matches = present(name, version)
        if not matches:
            raise FailedPrecondition(f"no {platform} cp311 wheel of {name}=={version} on the package index")
        found[name] = matches[-1]
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _set_mtimes(root: Path, mtime: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))


def install_agent(staging: Path, files: dict[str, Path], wheels: dict[str, Path]) -> None:
    """Agent code + unpacked wheels under /opt/pyvm/lib, byte-compiled (hash-based .pyc), and the init."""
    lib = staging / GUEST_LIB
    lib.mkdir(parents=True, exist_ok=True)
    for whl in wheels.values():
        with zipfile.ZipFile(whl) as z:
            z.extractall(lib)
    for rel, src in files.items():
        dst = lib / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    for pkg in ("shim", "shim/_pb", "shim/ttrpc", "shim/guestagent"):
        init = lib / pkg / "__init__.py"
        if (lib / pkg).is_dir() and not init.exists():
            init.write_text("")
    # pyvm-init's code is the module pyvm_init, byte-compiled with the rest: a script run directly is
    # compiled from source at every boot (~0.05 s under TCG, measured)
    shutil.copyfile(guest_init.__file__, lib / "pyvm_init.py")
    # the guest's python3 is 3.11 like the builder's, so the .pyc the builder writes are valid there;
    # unchecked-hash: no mtime check, no stat per import, same bytes every build
    # ddir: tracebacks name the guest path, and the .pyc do not embed the build directory
    compileall.compile_dir(
        str(lib),
        ddir="/" + GUEST_LIB,
        quiet=2,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    bindir = staging / "opt" / "pyvm" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    (bindir / "pyvm-init").write_text(INIT_STUB)
    (bindir / "pyvm-init").chmod(0o755)
    _set_mtimes(staging / "opt" / "pyvm", SOURCE_DATE_EPOCH)


def clamp_new_mtimes(root: Path, since: float, mtime: int) -> None:
    """Give everything this build touched (files and the directories they went into) one fixed mtime.

    Base-layer files keep theirs: the stdlib's timestamp-validated .pyc files depend on them.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames, "."]:
            p = os.path.join(dirpath, n)
            if os.lstat(p).st_mtime >= since:
                os.utime(p, (mtime, mtime), follow_symlinks=False)


def install_modules(staging: Path, kt: kernel.KernelTree, *, full: bool) -> list[str]:
    """Kernel modules into the rootfs (the whole tree, or only the boot set) and /etc/pyvm/modules.list."""
    dest = staging / "usr" / "lib" / "modules" / kt.kver
    deps = kt.modules_dep()
    order = deps.load_order(initramfs.AGENT_MODULES, missing_ok=True)
    early = deps.load_order(initramfs.AGENT_EARLY_MODULES, missing_ok=True)
    if full:
        shutil.copytree(kt.moddir, dest, symlinks=True)
    else:
        dest.mkdir(parents=True)
        for rel in order:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kt.moddir / rel, dest / rel)
        dep_lines = [
            line
            for line in (kt.moddir / "modules.dep").read_text().splitlines()
            if line.split(":")[0] in order
        ]
        (dest / "modules.dep").write_text("\n".join(dep_lines) + "\n")
    for stale in ("build", "source"):
        if (dest / stale).is_symlink():
            (dest / stale).unlink()
    (staging / "etc" / "pyvm").mkdir(parents=True, exist_ok=True)
    (staging / "etc" / "pyvm" / "modules.list").write_text("".join(f"{m}\n" for m in order))
    (staging / "etc" / "pyvm" / "modules-early.list").write_text("".join(f"{m}\n" for m in early))
    return order


def make_ext4(staging: Path, out: Path, uuid_seed: str) -> None:
    """A read-only-use ext4 image of ``staging`` labelled ROOT_LABEL, reproducible for the same tree."""
    mkfs = need_tool("mkfs.ext4", "e2fsprogs")
    used = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(staging) for f in fs)
    size_mb = int(used * 1.25 / 2**20) + 64
    u = hashlib.sha256(uuid_seed.encode()).hexdigest()
    uuid = f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:32]}"
    env = {
        **os.environ,
        "E2FSPROGS_FAKE_TIME": str(SOURCE_DATE_EPOCH),
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
    }
    run(
        [
            mkfs, "-q", "-F", "-t", "ext4", "-L", initramfs.ROOT_LABEL, "-U", uuid,
            "-O", "^has_journal,^metadata_csum", "-m", "0", "-i", "8192", "-b", "4096",
            "-E", f"hash_seed={uuid},root_owner=0:0", "-d", staging, out, f"{size_mb}M",
        ],
        env=env,
    )  # fmt: skip
    ext4.clamp_inode_times(out, SOURCE_DATE_EPOCH)


def resolve_packages(arch: Arch, cache: Path) -> tuple[apt.Package, apt.Package, list[apt.Package]]:
    """(kernel, busybox-static, base-layer pins): apt candidates, memoised until apt's lists change."""
    stamp = apt.lists_stamp()
    memo = cache / f"resolved-{arch.name}.json"
    try:
        data = json.loads(memo.read_text())
        if data["stamp"] == stamp and data["include"] == list(rootfs.INCLUDE):
            return (
                apt.Package(**data["kernel"]),
                apt.Package(**data["busybox"]),
                [apt.Package(**p) for p in data["pins"]],
            )
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        pass
    apt.ensure_arch(arch)
    kpkg = apt.resolve_kernel(arch)
    found = apt.candidates(["busybox-static", *rootfs.INCLUDE], arch)
    bpkg = found["busybox-static"][0]
    pins = [found[n][0] for n in rootfs.INCLUDE]
    if apt.lists_stamp() == stamp:  # no apt-get update ran meanwhile
        cache.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            "stamp": stamp,
            "include": list(rootfs.INCLUDE),
            "kernel": asdict(kpkg),
            "busybox": asdict(bpkg),
        }
        doc["pins"] = [asdict(p) for p in pins]
        tmp = memo.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.rename(memo)
    return kpkg, bpkg, pins


def resolve(arch: Arch, layout: str, progress: Progress) -> tuple[Inputs, dict[str, Any]]:
    """Pin every input (apt candidates, wheels, sources) and compute the build hash."""
    cache = build_cache()
    with progress.step("resolving pinned versions (apt)"):
        kpkg, bpkg, pins = resolve_packages(arch, cache)
    wheels = fetch_wheels(cache / "wheels", arch, progress)
    files = agent_files()
    inputs = Inputs(
        arch=arch.name,
        layout=layout,
        kernel=kpkg.pin,
        busybox=bpkg.pin,
        base_key=rootfs.base_key(arch, pins),
        wheels={p.name: _sha256(p) for p in wheels.values()},
        agent_digest=digest_files(files),
        builder_digest=builder_digest(),
    )
    return inputs, {"kernel": kpkg, "busybox": bpkg, "wheels": wheels, "files": files, "pins": pins}


def build(arch: Arch, *, layout: str = DEFAULT_LAYOUT, force: bool = False) -> Path:
    """Build and install the guest for ``arch``; return the installed directory.

    One build per architecture at a time (a lock under the cache); a second one waits, then finds
    the image up to date.

    :raises FailedPrecondition: a host tool or package is missing (the message says which).
    :raises Internal: a build step failed (the message has the command and its output tail).
    """
    if layout not in LAYOUTS:
        raise InvalidArgument(f"unknown guest layout {layout!r} (known: {', '.join(LAYOUTS)})")
    lock_path = build_cache() / f"{arch.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(arch, layout, force)


def _build_locked(arch: Arch, layout: str, force: bool) -> Path:
    progress = Progress(f"guest {arch.name}")
    t0 = time.monotonic()
    inputs, pinned = resolve(arch, layout, progress)
    h = inputs.hash()
    arch_root = paths.GUEST_ROOT / arch.name
    final = arch_root / h
    current = arch_root / "current"
    if (final / "manifest.json").exists() and not force:
        if os.path.realpath(current) != str(final.resolve()):
            _point_current(arch_root, h)
            progress.say(f"switched current -> {h}")
        progress.say(f"up to date: {final}")
        return final

    cache = build_cache()
    with progress.step(f"kernel {inputs.kernel}"):
        kt = kernel.prepare(pinned["kernel"], arch, cache)
    with progress.step(f"busybox {inputs.busybox}"):
        bb_root = cache / "busybox" / f"{pinned['busybox'].version}_{arch.deb}"
        if not (bb_root / "bin" / "busybox").exists():
            tmp_bb = bb_root.with_name(bb_root.name + ".tmp")
            shutil.rmtree(tmp_bb, ignore_errors=True)
            apt.extract(apt.download(pinned["busybox"], arch, cache / "debs"), tmp_bb)
            shutil.rmtree(bb_root, ignore_errors=True)
            tmp_bb.rename(bb_root)
        busybox = bb_root / "bin" / "busybox"
        applets = initramfs.busybox_applets(busybox)
    base = rootfs.build_base(arch, cache, progress, pinned["pins"])

    arch_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{h}-", dir=arch_root))
    try:
        out = work / "out"
        out.mkdir()
        with progress.step("floor initramfs"):
            buf = io.BytesIO()
            floor_modules = initramfs.write_busybox_initramfs(
                buf, busybox=busybox, applets=applets, kernel=kt, modules=initramfs.FLOOR_MODULES,
                init=initramfs.FLOOR_INIT, mtime=SOURCE_DATE_EPOCH,
            )  # fmt: skip
            (out / "floor-initrd.img").write_bytes(initramfs.compress(buf.getvalue(), "gzip"))
        shutil.copyfile(kt.vmlinuz, out / "vmlinuz")
        staging = work / "rootfs"
        with progress.step("copying the base rootfs"):
            run(["cp", "-a", "--reflink=auto", base.root, staging])
        with progress.step(f"agent code ({len(pinned['files'])} files) + wheels + init"):
            started = time.time() - 2
            install_agent(staging, pinned["files"], pinned["wheels"])
            agent_modules = install_modules(staging, kt, full=(layout == "disk"))
            clamp_new_mtimes(staging, started, SOURCE_DATE_EPOCH)
        if layout == "disk":
            with progress.step("root disk image (ext4)"):
                make_ext4(staging, out / "rootfs.img", h)
            with progress.step("disk-root initramfs"):
                buf = io.BytesIO()
                initramfs.write_busybox_initramfs(
                    buf, busybox=busybox, applets=applets, kernel=kt, modules=initramfs.DISK_INIT_MODULES,
                    init=initramfs.DISK_INIT, mtime=SOURCE_DATE_EPOCH,
                )  # fmt: skip
                (out / "initrd.img").write_bytes(initramfs.compress(buf.getvalue(), "gzip"))
        else:
            with progress.step("whole-rootfs initramfs (zstd)"):
                init = staging / "init"
                if init.exists() or init.is_symlink():
                    init.unlink()
                init.symlink_to("opt/pyvm/bin/pyvm-init")
                buf = io.BytesIO()
                initramfs.write_tree_initramfs(buf, staging)
                (out / "initrd.img").write_bytes(initramfs.compress(buf.getvalue(), "zstd"))
        manifest: dict[str, Any] = {
            "arch": arch.name,
            "hash": h,
            "layout": layout,
            "kernel": {
                "package": pinned["kernel"].name,
                "version": pinned["kernel"].version,
                "release": kt.kver,
            },
            "console": arch.console,
            "busybox": inputs.busybox,
            "base_layer": base.key,
            "debian_packages": base.packages,
            "protobuf": WHEELS["protobuf"],
            "protobuf_implementation": "upb",
            "wheels": inputs.wheels,
            "agent_source_digest": inputs.agent_digest,
            "agent_files": sorted(pinned["files"]),
            "agent_entrypoint": "python3 -m shim.guestagent (via /opt/pyvm/bin/pyvm-init)",
            "root_label": initramfs.ROOT_LABEL if layout == "disk" else None,
            # what a host may rely on (see initramfs.py and guest_init.py)
            "floor": {
                "ready_marker": "PYVM-FLOOR-READY",
                "poweroff_cmdline": "pyvm.floor=poweroff",
                "rc_marker": "@@RC=",
            },
            "agent_entry_marker": "PYVM-AGENT-ENTRY",
            "disk": {"device": "virtio-blk, read-only", "file": "rootfs.img"} if layout == "disk" else None,
            "floor_modules": floor_modules,
            "agent_modules": agent_modules,
            "agent_early_modules": list(initramfs.AGENT_EARLY_MODULES),
            "builder_digest": inputs.builder_digest,
            "builder_version": BUILDER_VERSION,
            "inputs": asdict(inputs),
            "files": {p.name: p.stat().st_size for p in sorted(out.iterdir())},
            "build_seconds": round(time.monotonic() - t0, 1),
            "built_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        with progress.step("installing"):
            previous = os.path.basename(os.path.realpath(current)) if current.is_symlink() else None
            if final.exists():
                shutil.rmtree(final)
            out.rename(final)
            _point_current(arch_root, h)
            _prune(arch_root, keep={h, previous})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in manifest["files"].items())
    progress.say(f"built {final} ({sizes})")
    return final


def _point_current(arch_root: Path, h: str) -> None:
    tmp = arch_root / f".current-{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(h)
    os.replace(tmp, arch_root / "current")


def _prune(arch_root: Path, keep: set[str | None]) -> None:
    """Drop installed images other than ``keep`` (the new one and the one a running VM may still use)."""
    for d in arch_root.iterdir():
        if d.name not in keep and not d.name.startswith(".") and d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)


def read_manifest(arch: Arch) -> dict[str, Any] | None:
    path = paths.GUEST_ROOT / arch.name / "current" / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
