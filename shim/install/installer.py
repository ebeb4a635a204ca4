"""`pyvm install` / `pyvm uninstall` on a node: the file side of registering pyvm with containerd.

Files next to containerd's config (``config.toml`` stands for whatever ``--containerd-config`` names):

- ``config.toml.pyvm-backup``: the bytes of the config as they were before the *first* install that
  changed anything. Never overwritten by later installs.
- ``config.toml.pyvm-state.json``: what we did: whether an original existed, the backup's name and the
  SHA-256 of the file as we last wrote it. Its presence means "installed by pyvm".

``uninstall`` restores the backup byte for byte (or deletes a file we created) when the config still has
the hash we wrote; if someone edited it since, it removes only our runtime table, keeps their edits and
says so, and moves the backup aside so a later install starts from a clean slate.

Every error is a ``ShimError`` whose message names the file and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shim.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from shim.install import containerd_config as cc

DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
BACKUP_SUFFIX = ".pyvm-backup"
STATE_SUFFIX = ".pyvm-state.json"


def backup_path(config: Path) -> Path:
    return config.with_name(config.name + BACKUP_SUFFIX)


def state_path(config: Path) -> Path:
    return config.with_name(config.name + STATE_SUFFIX)


@dataclass(frozen=True)
class InstallState:
    original_existed: bool
    installed_sha256: str
    runtime_name: str
    version: int

    def dump(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Outcome:
    """What an install/uninstall did (or would do, on a dry run)."""

    changed: bool
    config: Path
    diff: str
    #: human-readable lines, in order, for the CLI to print
    messages: tuple[str, ...]
    dry_run: bool = False


def install(
    config: Path,
    entry: cc.RuntimeEntry,
    *,
    dry_run: bool = False,
    new_version: int | None = None,
) -> Outcome:
    """Register ``entry`` in containerd's ``config``; idempotent.

    ``new_version`` is the schema used when ``config`` does not exist (default: from the installed
    containerd's major version, 2 if unknown). Raises ``InvalidArgument``/``PermissionDenied``/
    ``FailedPrecondition`` with the file and the fix; nothing is written on error or on a dry run.
    """
    before_bytes = _read(config)
    messages: list[str] = []
    before = "" if before_bytes is None else _decode(before_bytes, config)
    doc = None if before_bytes is None else cc.parse(before, str(config))
    if doc is None or cc.is_blank(doc):
        version = new_version or detect_config_version()[0]
        if doc is None:
            doc = cc.new_document(version)
            messages.append(f"{config} does not exist; creating it (config version {version})")
        else:
            doc.add("version", version)  # only comments in it: keep them
            messages.append(f"{config} holds no settings; adding 'version = {version}'")
    else:
        version = cc.schema_version(doc, str(config))
    changed = cc.apply(doc, version, entry, str(config))
    header = cc.table_header(version, entry.name)
    if not changed:
        return Outcome(
            False,
            config,
            "",
            (f"pyvm is already registered in {config} ([{header}]); nothing changed",),
            dry_run,
        )
    after = cc.dumps(doc)
    diff = cc.unified_diff(before, after, str(config))
    if dry_run:
        messages.append(f"dry run: would register [{header}] in {config}; nothing written")
        return Outcome(True, config, diff, tuple(messages), True)

    _check_writable(config)
    state_file = state_path(config)
    old_state = _load_state(config)
    backup = backup_path(config)
    if old_state is None:
        if backup.exists():
            # a leftover from an uninstall that could not restore it; never overwrite a backup
            aside = _move_aside(backup)
            messages.append(f"moved an older backup {backup} aside to {aside}")
        if before_bytes is not None:
            shutil.copy2(config, backup)
            messages.append(f"saved the original as {backup}")
        original_existed = before_bytes is not None
    else:
        original_existed = old_state.original_existed
        messages.append(f"keeping the backup of the pre-install original ({backup})")
    _atomic_write(config, after.encode(), like=config if before_bytes is not None else None)
    state = InstallState(original_existed, _sha256(after.encode()), entry.name, version)
    _atomic_write(state_file, state.dump().encode(), like=None)
    messages.append(f"registered [{header}] in {config}")
    return Outcome(True, config, diff, tuple(messages))


def uninstall(config: Path, *, name: str = cc.RUNTIME_NAME, dry_run: bool = False) -> Outcome:
    """Undo ``install``: restore the original bytes if the config is as we left it, else remove our table."""
    state = _load_state(config)
    current_bytes = _read(config)
    backup = backup_path(config)
    messages: list[str] = []

    if state is not None and current_bytes is not None and _sha256(current_bytes) == state.installed_sha256:
        if state.original_existed:
            original = _read(backup)
            if original is None:
                raise NotFound(
                    f"cannot restore {config}: the backup {backup} is gone. Restore the file by hand or "
                    f"delete {state_path(config)} and run `pyvm uninstall` again to remove only pyvm's table",
                    path=str(backup),
                )
            diff = cc.unified_diff(_decode(current_bytes, config), _decode(original, backup), str(config))
            if dry_run:
                return Outcome(True, config, diff, (f"dry run: would restore {config} from {backup}",), True)
            _check_writable(config)
            _atomic_write(config, original, like=backup)
            backup.unlink()
            state_path(config).unlink()
            return Outcome(True, config, diff, (f"restored the original {config} from {backup}",))
        diff = cc.unified_diff(_decode(current_bytes, config), "", str(config))
        if dry_run:
            return Outcome(True, config, diff, (f"dry run: would remove {config} (pyvm created it)",), True)
        _check_writable(config)
        config.unlink()
        state_path(config).unlink()
        return Outcome(True, config, diff, (f"removed {config} (pyvm created it; no config existed before)",))

    if current_bytes is None:
        if state is not None and not dry_run:
            _check_writable(config)
            state_path(config).unlink()
        return Outcome(False, config, "", (f"{config} does not exist; nothing to uninstall",), dry_run)

    before = _decode(current_bytes, config)
    doc = cc.parse(before, str(config))
    version = cc.schema_version(doc, str(config))
    header = cc.table_header(version, name)
    if not cc.remove(doc, version, name):
        if state is not None and not dry_run:
            _check_writable(config)
            state_path(config).unlink()
            if backup.exists():
                aside = _move_aside(backup)
                messages.append(f"moved the pre-install backup aside to {aside}")
        return Outcome(
            False, config, "", (*messages, f"pyvm is not registered in {config}; nothing changed"), dry_run
        )
    after = cc.dumps(doc)
    diff = cc.unified_diff(before, after, str(config))
    if state is not None:
        messages.append(
            f"{config} was changed since `pyvm install`, so the original is not restored byte for byte: "
            f"removing only [{header}] and keeping the other edits"
        )
    else:
        messages.append(f"{config} was not written by `pyvm install`; removing only [{header}]")
    if dry_run:
        return Outcome(True, config, diff, (*messages, "dry run: nothing written"), True)
    _check_writable(config)
    _atomic_write(config, after.encode(), like=config)
    if state is not None:
        state_path(config).unlink()
        if backup.exists():
            aside = _move_aside(backup)
            messages.append(f"the pre-install original stays available as {aside}")
    messages.append(f"removed [{header}] from {config}")
    return Outcome(True, config, diff, tuple(messages))


def detect_config_version(containerd: str = "containerd") -> tuple[int, str]:
    """Config schema for the installed containerd: 3 for 2.x, else 2. Returns (version, reason)."""
    exe = shutil.which(containerd)
    if exe is None:
        return 2, "containerd not found on PATH; assuming 1.6/1.7 (config version 2)"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return 2, f"`{exe} --version` failed ({exc}); assuming config version 2"
    # "containerd github.com/containerd/containerd 1.6.20~ds1 <commit>" / "containerd containerd.io 2.0.0 <c>"
    for word in out.split():
        head = word.lstrip("v").split(".")[0]
        if head.isdigit() and "." in word:
            major = int(head)
            return (3 if major >= 2 else 2), f"containerd {word}"
    return 2, f"could not read a version from {out.strip()!r}; assuming config version 2"


def restart_containerd(*, host_pid1: bool = False, timeout: float = 120) -> tuple[bool, str]:
    """Restart containerd through systemd. Returns (done, message).

    With ``host_pid1`` the command runs in the host's namespaces through ``nsenter -t 1`` (the
    installer DaemonSet: hostPID and privileged). Without systemd, says what to do instead.
    """
    argv = ["systemctl", "restart", "containerd"]
    if host_pid1:
        argv = ["nsenter", "--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid", "--", *argv]
    elif shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        return False, (
            "systemd is not running here, so containerd was not restarted: restart it yourself "
            "(e.g. `service containerd restart`, or stop and start the containerd process)"
        )
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"`{' '.join(argv)}` failed: {exc}; restart containerd yourself"
    if proc.returncode != 0:
        return False, (
            f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}; "
            "see `journalctl -u containerd`"
        )
    return True, "restarted containerd (systemctl restart containerd)"


# -- files ------------------------------------------------------------------------------------------


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise InvalidArgument(
            f"{path} is a directory, not containerd's config file; pass the file with --containerd-config",
            path=str(path),
        ) from exc
    except PermissionError as exc:
        raise PermissionDenied(
            f"cannot read {path}: permission denied; run as root (e.g. `sudo pyvm ...`)", path=str(path)
        ) from exc
    except NotADirectoryError as exc:
        raise InvalidArgument(
            f"{path}: a parent of this path is not a directory; check --containerd-config", path=str(path)
        ) from exc


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{path} is not UTF-8 text (byte {exc.start}); containerd's config must be a TOML text file",
            path=str(path),
        ) from exc


def _check_writable(config: Path) -> None:
    parent = config.parent
    if not parent.is_dir():
        raise NotFound(
            f"cannot write {config}: the directory {parent} does not exist; create it (mkdir -p {parent}) "
            f"or pass another --containerd-config",
            path=str(config),
        )
    if not os.access(parent, os.W_OK) or (config.exists() and not os.access(config, os.W_OK)):
        raise PermissionDenied(
            f"cannot write {config}: permission denied; run as root (e.g. `sudo pyvm ...`)",
            path=str(config),
        )


def _atomic_write(path: Path, data: bytes, *, like: Path | None) -> None:
    """Replace ``path`` with ``data`` atomically, keeping the mode/owner of ``like`` (else 0644)."""
    mode, owner = 0o644, None
    if like is not None:
        with contextlib.suppress(FileNotFoundError):
            st = like.stat()
            mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if owner is not None and os.geteuid() == 0:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_state(config: Path) -> InstallState | None:
    path = state_path(config)
    data = _read(path)
    if data is None:
        return None
    try:
        raw = json.loads(data)
        return InstallState(
            original_existed=bool(raw["original_existed"]),
            installed_sha256=str(raw["installed_sha256"]),
            runtime_name=str(raw.get("runtime_name", cc.RUNTIME_NAME)),
            version=int(raw.get("version", 2)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(
            f"{path} (pyvm's install record) is damaged ({exc}); compare {config} with "
            f"{backup_path(config)} by hand, then delete {path}",
            path=str(path),
        ) from exc


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}")
    n = 0
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}.{n}")
    os.replace(path, aside)
    return aside


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
