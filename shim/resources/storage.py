"""Host side of container storage: mount rootfs and bind mounts inside the sandbox's virtio-fs share.

Layout under ``SandboxDir.share`` (the guest sees it at ``GUEST_SHARE_DIR``)::

    <share>/<cid>/rootfs        the container's rootfs (overlay from the snapshotter, or a bind)
    <share>/<cid>/mounts/<n>    the n-th entry of the OCI spec's ``mounts`` when it is a bind mount

**Propagation (measured on this host, virtiofsd 7.2 ``-o sandbox=namespace``).** virtiofsd sets up its
sandbox (``unshare(CLONE_NEWNS)``, ``mount --make-rslave /``, bind of the source, ``pivot_root``) when
QEMU connects. A mount made on the host under the share *afterwards* reaches virtiofsd only if the
share's host mount is **shared**: with the host's mounts private (as here: no ``shared:`` tag in
``/proc/self/mountinfo``) virtiofsd's copy never sees new mounts and the guest finds an empty
``rootfs``. :meth:`SandboxStorage.prepare_share` therefore bind-mounts the share onto itself and gives it
a fresh peer group (``--make-private`` then ``--make-shared``); virtiofsd's copy becomes its slave
(``master:N`` in virtiofsd's mountinfo) and sees every later mount and unmount. It must run **before**
virtiofsd starts. The fresh peer group also keeps our mounts from propagating into the rest of the host
on systemd hosts, where ``/`` is shared.

Everything here is blocking (mount(2) through ctypes; ``mount(8)`` only for overlay option strings too
long for one page); the sandbox layer calls it from a worker thread. Every operation is idempotent:
mounting what is mounted is a no-op and unmounting what is gone succeeds, so a retried Create or a
``delete`` after a crash converge on the same state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.errors import Internal, InvalidArgument
from shim.log import get_logger
from shim.paths import SandboxDir

log = get_logger(__name__)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

#: option -> (clear?, flag), as containerd's ``parseMountOptions`` (mount_linux.go)
_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION_OPTIONS: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}
#: mount(2) copies at most one page of option data
_MAX_DATA = os.sysconf("SC_PAGE_SIZE") - 1


# -- domain types -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RootfsMount:
    """One ``containerd.types.Mount`` of ``CreateTaskRequest.rootfs`` (decoded by the api layer)."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class SharedMount:
    """A spec bind mount made visible to the guest."""

    index: int  #: position in the spec's ``mounts``
    destination: str
    source: str  #: host path the spec named
    host_path: Path  #: where it is mounted inside the share
    guest_path: str  #: the same place as the guest sees it
    readonly: bool


@dataclass(frozen=True)
class SharedMounts:
    """The result of :meth:`SandboxStorage.share_mounts`."""

    shared: tuple[SharedMount, ...] = ()
    #: (spec destination, why it was not shared): sockets, FIFOs and devices cannot cross virtio-fs
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def guest_paths(self) -> dict[str, str]:
        """Spec destination -> guest source path (for :func:`shim.resources.spec.rewrite_spec`).

        If two entries share a destination the later one wins, as the later mount hides the earlier.
        """
        return {m.destination: m.guest_path for m in self.shared}

    @property
    def by_index(self) -> dict[int, str]:
        return {m.index: m.guest_path for m in self.shared}


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    fstype: str
    source: str
    optional: tuple[str, ...] = field(default=())

    @property
    def shared(self) -> bool:
        return any(o.startswith("shared:") for o in self.optional)


# -- mountinfo --------------------------------------------------------------------------------------


def _unescape(value: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for space, ``\\134`` for backslash, ...)."""
    if "\\" not in value:
        return value
    out, i = [], 0
    while i < len(value):
        chunk = value[i + 1 : i + 4]
        if value[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse mountinfo text (proc(5)); lines that do not parse are skipped."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f, r = left.split(), right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        mp = _unescape(f[4])
        if mp.endswith("//deleted"):
            mp = mp[: -len("//deleted")]
        entries.append(
            MountInfo(int(f[0]), int(f[1]), _unescape(f[3]), mp, r[0], _unescape(r[1]), tuple(f[6:]))
        )
    return entries


def read_mountinfo() -> list[MountInfo]:
    # mount points are bytes; keep any that are not UTF-8 round-trippable (os.fsencode undoes it)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mounts_under(path: str | os.PathLike[str], entries: Iterable[MountInfo] | None = None) -> list[MountInfo]:
    """Mounts at or below ``path`` (canonicalised), in mountinfo order (parents before children)."""
    prefix = os.path.realpath(path)
    return [
        e
        for e in (read_mountinfo() if entries is None else entries)
        if e.mount_point == prefix or e.mount_point.startswith(prefix.rstrip("/") + "/")
    ]


def is_mountpoint(path: str | os.PathLike[str], entries: Iterable[MountInfo] | None = None) -> bool:
    real = os.path.realpath(path)
    return any(e.mount_point == real for e in (read_mountinfo() if entries is None else entries))


def unmount_order(entries: Sequence[MountInfo]) -> list[MountInfo]:
    """Deepest mount point first; of mounts stacked on one point, the topmost (latest) first."""
    indexed = list(enumerate(entries))
    indexed.sort(key=lambda ie: (ie[1].mount_point.rstrip("/").count("/"), ie[0]), reverse=True)
    return [e for _, e in indexed]


# -- options ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedOptions:
    flags: int
    propagation: tuple[int, ...]
    data: tuple[str, ...]

    @property
    def is_bind(self) -> bool:
        return bool(self.flags & MS_BIND)


def parse_options(options: Iterable[str]) -> ParsedOptions:
    """Split mount options into mount(2) flags, propagation changes and filesystem data."""
    flags, prop, data = 0, [], []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            clear, flag = _FLAG_OPTIONS[opt]
            flags = flags & ~flag if clear else flags | flag
        elif opt in _PROPAGATION_OPTIONS:
            prop.append(_PROPAGATION_OPTIONS[opt])
        else:
            data.append(opt)
    return ParsedOptions(flags, tuple(prop), tuple(data))


def is_bind_mount(mount: Mapping[str, Any]) -> bool:
    """Whether an OCI spec mount is a bind mount (runc: type ``bind`` or a ``bind``/``rbind`` option)."""
    opts = mount.get("options") or ()
    return mount.get("type") == "bind" or "bind" in opts or "rbind" in opts


# -- syscalls ---------------------------------------------------------------------------------------

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc = lib
    return _libc


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def sys_mount(
    source: str | None, target: str | os.PathLike[str], fstype: str | None, flags: int, data: str | None
) -> None:
    """mount(2). :raises OSError: with the errno."""
    if _c().mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def sys_umount(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2). :raises OSError: with the errno."""
    if _c().umount2(_b(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def _mount_or_raise(
    what: str, source: str | None, target: Path, fstype: str | None, flags: int, data: str | None
) -> None:
    try:
        sys_mount(source, target, fstype, flags, data)
    except OSError as exc:
        raise Internal(
            f"{what}: mount({source!r}, {str(target)!r}, {fstype!r}, {flags:#x}) failed: {exc.strerror}",
            syscall="mount",
            source=source,
            target=str(target),
            fstype=fstype,
            flags=flags,
            data=data,
            errno=exc.errno,
        ) from exc


def unmount(target: str | os.PathLike[str]) -> bool:
    """Unmount one mount at ``target``; falls back to a lazy detach when busy.

    Returns False when nothing was mounted there (or the path is gone).
    :raises Internal: for any other failure.
    """
    try:
        sys_umount(target, UMOUNT_NOFOLLOW)
        return True
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return False
        if exc.errno != errno.EBUSY:
            raise Internal(
                f"umount {target} failed: {exc.strerror}",
                syscall="umount2",
                target=str(target),
                errno=exc.errno,
            ) from exc
    log.warning("mount busy, detaching lazily", target=str(target))
    try:
        sys_umount(target, MNT_DETACH | UMOUNT_NOFOLLOW)
        return True
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return False
        raise Internal(
            f"umount -l {target} failed: {exc.strerror}",
            syscall="umount2",
            target=str(target),
            errno=exc.errno,
        ) from exc


def unmount_tree(path: str | os.PathLike[str], *, rounds: int = 8) -> list[str]:
    """Unmount everything at or below ``path``, deepest first; returns the mount points unmounted.

    Repeats until mountinfo shows nothing left (a propagated or stacked mount may surface after its
    parent goes). :raises Internal: if mounts remain after ``rounds`` passes.
    """
    done: list[str] = []
    for _ in range(rounds):
        left = mounts_under(path)
        if not left:
            return done
        for entry in unmount_order(left):
            if unmount(entry.mount_point):
                done.append(entry.mount_point)
    left = mounts_under(path)
    if left:
        raise Internal(
            f"mounts remain under {path} after unmounting: {[e.mount_point for e in left]}",
            path=str(path),
            remaining=[e.mount_point for e in left],
        )
    return done


def remove_tree(path: Path) -> None:
    """``rm -rf path``, refusing while anything is mounted below it (it would delete volume data)."""
    if not path.exists() and not path.is_symlink():
        return
    left = mounts_under(path)
    if left:
        raise Internal(
            f"refusing to remove {path}: still mounted {[e.mount_point for e in left]}", path=str(path)
        )
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise Internal(f"cannot remove {path}: {exc.strerror}", path=str(path), errno=exc.errno) from exc


# -- the sandbox's share ----------------------------------------------------------------------------


class SandboxStorage:
    """Mounts of one sandbox's containers inside its virtio-fs share (mechanism; no policy)."""

    def __init__(self, sandbox_dir: SandboxDir) -> None:
        self.dir = sandbox_dir

    @property
    def share(self) -> Path:
        return self.dir.share

    def prepare_share(self) -> None:
        """Make the share a mount point of its own, shared with a fresh peer group.

        Call before starting virtiofsd (see the module docstring for why). Idempotent.
        :raises Internal: when a mount call fails.
        """
        self.share.mkdir(parents=True, exist_ok=True)
        real = os.path.realpath(self.share)
        entries = [e for e in read_mountinfo() if e.mount_point == real]
        if entries and entries[-1].shared:
            return
        if not entries:
            _mount_or_raise("share the sandbox dir", real, Path(real), None, MS_BIND, None)
        _mount_or_raise("make the share private", None, Path(real), None, MS_PRIVATE, None)
        _mount_or_raise("make the share shared", None, Path(real), None, MS_SHARED, None)
        log.debug("virtio-fs share is a shared mount", share=real)

    # rootfs -------------------------------------------------------------------------------------
    def rootfs_host_path(self, container_id: str) -> Path:
        return self.dir.container_share(container_id) / "rootfs"

    def rootfs_guest_path(self, container_id: str) -> str:
        return f"{self.dir.guest_container_dir(container_id)}/rootfs"

    def mount_rootfs(
        self, container_id: str, rootfs: Sequence[RootfsMount], bundle: str | os.PathLike[str]
    ) -> str:
        """Mount the container's rootfs inside the share and return its guest path.

        ``rootfs`` is ``CreateTaskRequest.rootfs`` in order (usually one overlay, or one bind); when
        empty, ``<bundle>/rootfs`` is already prepared and is bind-mounted. A no-op when already
        mounted. On failure whatever this call mounted is unmounted again.
        :raises InvalidArgument: for a malformed mount (naming it).
        :raises Internal: when a mount call fails (with the syscall, arguments and errno).
        """
        target = self.rootfs_host_path(container_id)
        mounts = list(rootfs)
        if not mounts:
            src = Path(bundle) / "rootfs"
            if not src.is_dir():
                raise InvalidArgument(
                    f"container {container_id}: no rootfs mounts and {src} is not a directory"
                )
            mounts = [RootfsMount("bind", str(src), "", ("rbind",))]
        for i, m in enumerate(mounts):
            _validate_rootfs_mount(container_id, i, m)
        if is_mountpoint(target):
            return self.rootfs_guest_path(container_id)
        target.mkdir(parents=True, exist_ok=True)
        try:
            for m in mounts:
                _mount_one(m, _subtarget(target, m.target))
        except BaseException:
            try:
                unmount_tree(target)
            except Internal:
                log.exception("rollback of a half-mounted rootfs failed", target=str(target))
            raise
        log.info("rootfs mounted", container_id=container_id, target=str(target), mounts=len(mounts))
        return self.rootfs_guest_path(container_id)

    # spec bind mounts ---------------------------------------------------------------------------
    def share_mounts(self, container_id: str, spec_mounts: Sequence[Mapping[str, Any]]) -> SharedMounts:
        """Bind-mount every bind mount of the OCI spec into ``<share>/<cid>/mounts/<index>``.

        Files and directories are shared (a ``ro`` option makes the host bind read-only too, by a
        bind remount); sockets, FIFOs and device nodes cannot cross virtio-fs and are reported in
        ``skipped``. Non-bind mounts (proc, tmpfs, ...) are left to the guest. Idempotent.
        :raises InvalidArgument: a bind mount without an absolute source/destination, or whose
            source does not exist (names the destination).
        :raises Internal: a mount call failed.
        """
        shared, skipped = [], []
        base = self.dir.container_share(container_id) / "mounts"
        guest_base = f"{self.dir.guest_container_dir(container_id)}/mounts"
        for index, m in enumerate(spec_mounts):
            if not is_bind_mount(m):
                continue
            dest, src = m.get("destination", ""), m.get("source", "")
            if not dest or not str(dest).startswith("/"):
                raise InvalidArgument(
                    f"bind mount #{index} ({src!r}): destination {dest!r} must be an absolute path"
                )
            if not src or not str(src).startswith("/"):
                raise InvalidArgument(f"bind mount {dest}: source {src!r} must be an absolute path")
            try:
                st = os.stat(src)
            except FileNotFoundError:
                raise InvalidArgument(f"bind mount {dest}: source {src} does not exist") from None
            except OSError as exc:
                raise InvalidArgument(f"bind mount {dest}: cannot stat source {src}: {exc.strerror}") from exc
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                why = f"source {src} is a {_kind(st.st_mode)}; only files and directories can be shared with the VM"
                log.warning("bind mount not shared", destination=dest, reason=why)
                skipped.append((dest, why))
                continue
            opts = parse_options(m.get("options") or ())
            readonly = bool(opts.flags & MS_RDONLY)
            host = base / str(index)
            if not is_mountpoint(host):
                _make_placeholder(host, directory=stat.S_ISDIR(st.st_mode))
                _mount_or_raise(f"bind mount {dest}", src, host, None, MS_BIND | (opts.flags & MS_REC), None)
                if readonly:
                    try:
                        _mount_or_raise(
                            f"bind mount {dest} read-only",
                            None,
                            host,
                            None,
                            MS_BIND | MS_REMOUNT | MS_RDONLY,
                            None,
                        )
                    except Internal:
                        unmount(host)
                        raise
            shared.append(SharedMount(index, dest, src, host, f"{guest_base}/{index}", readonly))
        return SharedMounts(tuple(shared), tuple(skipped))

    # teardown -----------------------------------------------------------------------------------
    def unmount_container(self, container_id: str) -> list[str]:
        """Unmount the container's rootfs and bind mounts and remove ``<share>/<cid>``. Idempotent.

        Busy mounts are detached lazily (logged). Returns the mount points unmounted.
        :raises Internal: when something stays mounted (then nothing is deleted).
        """
        path = self.dir.container_share(container_id)
        done = unmount_tree(path)
        remove_tree(path)
        if done:
            log.info("container storage unmounted", container_id=container_id, unmounted=len(done))
        return done


def cleanup_sandbox_share(sandbox_dir: SandboxDir) -> list[str]:
    """Remove every mount left under the sandbox's share (the share's own bind included, deepest
    first, found in /proc/self/mountinfo) and the share directory. For ``delete`` after a crash.

    Returns the mount points unmounted. :raises Internal: when something cannot be unmounted.
    """
    done = unmount_tree(sandbox_dir.share)
    remove_tree(sandbox_dir.share)
    if done:
        log.info("leftover share mounts removed", sandbox_id=sandbox_dir.sandbox_id, unmounted=done)
    return done


# -- helpers ----------------------------------------------------------------------------------------


def _validate_rootfs_mount(container_id: str, i: int, m: RootfsMount) -> None:
    name = f"container {container_id}: rootfs mount #{i} ({m.type or '?'} {m.source or '?'})"
    opts = parse_options(m.options)
    if not m.type and not opts.is_bind:
        raise InvalidArgument(f"{name} has no type")
    if ".." in Path(m.target).parts:
        raise InvalidArgument(f"{name}: target {m.target!r} must stay inside the rootfs (no '..')")
    if m.type == "overlay":
        lower = [o for o in opts.data if o.startswith("lowerdir=")]
        if not lower:
            raise InvalidArgument(f"{name}: overlay without lowerdir")
        for d in lower[-1][len("lowerdir=") :].split(":"):
            if not os.path.isdir(d):
                raise InvalidArgument(f"{name}: overlay lowerdir {d} is not a directory")
        for key in ("upperdir=", "workdir="):
            for o in opts.data:
                if o.startswith(key) and not os.path.isdir(o[len(key) :]):
                    raise InvalidArgument(f"{name}: overlay {key[:-1]} {o[len(key) :]} is not a directory")
    elif opts.is_bind or m.type == "bind":
        if not m.source or not os.path.exists(m.source):
            raise InvalidArgument(f"{name}: bind source {m.source!r} does not exist")


def _subtarget(root: Path, target: str) -> Path:
    rel = target.strip("/")
    return root / rel if rel else root


def _mount_one(m: RootfsMount, target: Path) -> None:
    opts = parse_options(m.options)
    what = f"rootfs {m.type} mount of {m.source}"
    target.mkdir(parents=True, exist_ok=True)
    if opts.is_bind or m.type == "bind":
        _mount_or_raise(what, m.source, target, None, MS_BIND | (opts.flags & MS_REC), None)
        extra = opts.flags & ~(MS_BIND | MS_REC)
        if extra:
            _mount_or_raise(what + " (remount)", None, target, None, MS_BIND | MS_REMOUNT | extra, None)
    else:
        data = ",".join(opts.data)
        if len(data) > _MAX_DATA and m.type == "overlay":
            _mount_long_overlay(m, target)
        else:
            _mount_or_raise(what, m.source or m.type, target, m.type, opts.flags, data or None)
    for p in opts.propagation:
        _mount_or_raise(what + " (propagation)", None, target, None, p, None)


def _mount_long_overlay(m: RootfsMount, target: Path) -> None:
    """Overlay options longer than a page: make lowerdirs relative to their common parent and mount
    from there (containerd's ``compactLowerdirOption``), in a child process so our cwd is untouched."""
    opts = list(m.options)
    li = max(i for i, o in enumerate(opts) if o.startswith("lowerdir="))
    lowers = opts[li][len("lowerdir=") :].split(":")
    common = os.path.commonpath(lowers)
    if common in ("", "/"):
        raise InvalidArgument(f"overlay options of {target} are too long and the lowerdirs share no parent")
    if len(lowers) == 1:
        common = os.path.dirname(common)
    opts[li] = "lowerdir=" + ":".join(os.path.relpath(d, common) for d in lowers)
    argv = ["mount", "-t", "overlay", m.source or "overlay", "-o", ",".join(opts), str(target)]
    r = subprocess.run(argv, cwd=common, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise Internal(
            f"mount overlay on {target} failed: {r.stderr.strip()}",
            argv=argv,
            cwd=common,
            exit_code=r.returncode,
        )


def _make_placeholder(path: Path, *, directory: bool) -> None:
    """A mount point of the right kind: a directory for a directory, an empty file for a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() != directory and (path.exists() or path.is_symlink()):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    if directory:
        path.mkdir(exist_ok=True)
    else:
        path.touch(exist_ok=True)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


__all__ = [
    "MountInfo",
    "ParsedOptions",
    "RootfsMount",
    "SandboxStorage",
    "SharedMount",
    "SharedMounts",
    "cleanup_sandbox_share",
    "is_bind_mount",
    "is_mountpoint",
    "mounts_under",
    "parse_mountinfo",
    "parse_options",
    "read_mountinfo",
    "remove_tree",
    "unmount",
    "unmount_order",
    "unmount_tree",
]
