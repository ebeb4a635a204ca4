"""`pyvm env [--json]`: the effective configuration, guest assets, versions and accelerator verdict.

Read-only and fast: it never boots a VM. The accelerator verdict comes from the probe cache that
`pyvm check` (and the first sandbox) fills; without one it says so. Each fact is gathered on its own
and imports what it needs lazily, so one missing piece (no QEMU, no guest image, a broken config)
turns that field into "unknown" with the reason instead of failing the whole command.

Exit codes: 0 printed (even with unknown fields), 2 the configuration file is invalid.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object (stable keys)")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="pyvm configuration to report on (default: $PYVM_CONFIG, then /etc/pyvm/configuration.toml)",
    )


def run(args: argparse.Namespace) -> int:
    report, config_error = gather(args.config)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        _print_text(report)
    if config_error:
        print(f"pyvm env: {config_error}", file=sys.stderr)
        return 2
    return 0


def gather(config_path: Path | None = None) -> tuple[dict[str, Any], str | None]:
    """Every fact as a JSON-ready dict, plus the configuration error if the config is invalid.

    Keys: config_path, config_source, accelerator, accelerator_reason, qemu_path, qemu_version,
    firmware, guest_image_hash, guest_image_dir, versions, unknown_reasons (field -> why unknown).
    """
    reasons: dict[str, str] = {}
    report: dict[str, Any] = {}

    cfg, path, config_error = _load_config(config_path, reasons)
    report["config_path"] = str(path) if path else None
    report["config_source"] = (
        "built-in defaults (no configuration file found)" if cfg is not None and path is None else str(path)
    )
    hv = getattr(cfg, "hypervisor", None)
    arch = getattr(hv, "arch", None) or _host_arch()
    report["arch"] = arch

    qemu_path = str(getattr(hv, "path", "") or shutil.which(f"qemu-system-{arch}") or f"qemu-system-{arch}")
    report["qemu_path"] = qemu_path
    report["qemu_version"] = _field("qemu_version", reasons, lambda: _qemu_version(Path(qemu_path)))
    report["firmware"] = _field("firmware", reasons, lambda: _firmware(hv))
    accel = _field("accelerator", reasons, lambda: _accelerator(hv))
    report["accelerator"] = accel["accel"] if isinstance(accel, dict) else accel
    report["accelerator_reason"] = (
        accel.get("reason") if isinstance(accel, dict) else reasons.get("accelerator")
    )
    report["accelerator_speed_factor"] = accel.get("speed_factor") if isinstance(accel, dict) else None
    guest = _field("guest_image_hash", reasons, lambda: _guest(arch))
    report["guest_image_hash"] = guest["hash"] if isinstance(guest, dict) else guest
    report["guest_image_dir"] = guest.get("dir") if isinstance(guest, dict) else None
    report["guest_kernel"] = guest.get("kernel") if isinstance(guest, dict) else None
    report["memory"] = (
        {
            "default_mib": hv.default_memory,
            "max_mib": hv.max_memory,
            "slots": hv.memory_slots,
            "hotplug": hv.memory_hotplug,
        }
        if hv is not None
        else None
    )
    report["enable_annotations"] = list(
        getattr(getattr(cfg, "runtime", None), "enable_annotations", ()) or []
    )
    report["versions"] = _versions(reasons)
    report["unknown_reasons"] = reasons
    return report, config_error


# -- the facts --------------------------------------------------------------------------------------


def _field(name: str, reasons: dict[str, str], fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # one broken probe must not hide the others; the reason is reported
        from shim.errors import ShimError

        plain = isinstance(exc, (RuntimeError, ShimError)) and type(exc) is not NotImplementedError
        reasons[name] = str(exc) if plain else f"{type(exc).__name__}: {exc}"
        return UNKNOWN


def _load_config(explicit: Path | None, reasons: dict[str, str]) -> tuple[Any, Path | None, str | None]:
    from shim import paths

    path = explicit or (Path(os.environ["PYVM_CONFIG"]) if os.environ.get("PYVM_CONFIG") else None)
    if path is None and paths.DEFAULT_CONFIG.exists():
        path = paths.DEFAULT_CONFIG
    try:
        from shim import config
    except ImportError as exc:
        reasons["config"] = f"shim.config is not available in this build ({exc})"
        return None, path, None
    try:
        return config.load(path), path, None
    except Exception as exc:
        reasons["config"] = str(exc)
        return None, path, f"{exc}. Fix the file or point --config/PYVM_CONFIG at a valid one"


def _host_arch() -> str:
    m = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _qemu_version(path: Path) -> str:
    try:
        from shim.platform import host
    except ImportError:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10)
        first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
        if out.returncode != 0 or "version" not in first:
            raise RuntimeError(f"`{path} --version` failed: {out.stderr.strip()[:200]}") from None
        return first.split("version", 1)[1].split()[0]
    return host.qemu_info(path).version


def _firmware(hv: Any) -> dict[str, Any]:
    if hv is None:
        raise RuntimeError("no valid configuration, so the firmware is not known")
    pflashes = [str(p) for p in getattr(hv, "pflashes", ())]
    return {
        "pflashes": pflashes,
        "mode": "UEFI pflash" if pflashes else "none (direct kernel boot, QEMU's default BIOS on x86)",
        "present": all(Path(p).is_file() for p in pflashes),
    }


def _accelerator(hv: Any) -> dict[str, Any]:
    if hv is None:
        raise RuntimeError("no valid configuration, so the accelerator cannot be looked up")
    from shim.platform import accel

    if hv.accelerator != "auto":
        return {"accel": hv.accelerator, "reason": f"forced by hypervisor.accelerator = {hv.accelerator!r}"}
    verdict = accel.load_cached(accel.target_for(hv))
    if verdict is None:
        raise RuntimeError("not probed yet on this host with this QEMU and kernel; run `pyvm check`")
    return {"accel": verdict.accel, "reason": verdict.reason, "speed_factor": verdict.speed_factor}


def _guest(arch: str) -> dict[str, Any]:
    from shim import paths

    current = paths.guest_dir(arch)
    manifest = current / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise RuntimeError(f"no guest image installed ({manifest} missing); run `pyvm guest build`") from None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{manifest} cannot be read: {exc}") from exc
    if not data.get("hash"):
        raise RuntimeError(f"{manifest} has no 'hash'")
    return {
        "hash": data["hash"],
        "dir": str(current.resolve()),
        "kernel": (data.get("kernel") or {}).get("release"),
    }


def _versions(reasons: dict[str, str]) -> dict[str, Any]:
    from shim import __version__

    versions: dict[str, Any] = {
        "pyvm": __version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    exe = shutil.which("containerd")
    if exe is None:
        versions["containerd"] = UNKNOWN
        reasons["versions.containerd"] = "containerd not found on PATH"
    else:
        try:
            out = subprocess.run(
                [exe, "--version"], capture_output=True, text=True, timeout=10
            ).stdout.split()
            versions["containerd"] = out[2] if len(out) > 2 else UNKNOWN
        except (OSError, subprocess.SubprocessError) as exc:
            versions["containerd"] = UNKNOWN
            reasons["versions.containerd"] = str(exc)
    return versions


def _print_text(report: dict[str, Any]) -> None:
    reasons = report["unknown_reasons"]

    def show(label: str, key: str, value: Any = None) -> None:
        v = report.get(key) if value is None else value
        extra = f"  ({reasons[key]})" if key in reasons else ""
        print(f"{label:<18} {v if v is not None else '-'}{extra}")

    show("config", "config_source", report["config_source"])
    if "config" in reasons:
        print(f"{'':<18} config problem: {reasons['config']}")
    show("arch", "arch")
    accel = report["accelerator"]
    reason = report.get("accelerator_reason")
    show("accelerator", "accelerator", f"{accel}  [{reason}]" if reason and accel != UNKNOWN else accel)
    show("qemu", "qemu_version", f"{report['qemu_version']} ({report['qemu_path']})")
    fw = report["firmware"]
    show(
        "firmware", "firmware", fw if not isinstance(fw, dict) else (", ".join(fw["pflashes"]) or fw["mode"])
    )
    show("guest image", "guest_image_hash")
    if report.get("guest_image_dir"):
        print(f"{'':<18} {report['guest_image_dir']} (kernel {report.get('guest_kernel')})")
    if report.get("memory"):
        m = report["memory"]
        print(
            f"{'memory':<18} default {m['default_mib']} MiB, max {m['max_mib']} MiB, hotplug {m['hotplug']}"
        )
    print(f"{'annotations':<18} {', '.join(report['enable_annotations']) or 'none enabled'}")
    for name, v in report["versions"].items():
        extra = f"  ({reasons['versions.' + name]})" if "versions." + name in reasons else ""
        print(f"{name + ' version':<18} {v}{extra}")
