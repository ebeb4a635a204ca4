"""`pyvm install` / `pyvm uninstall`: register pyvm in containerd's config.toml (or take it out again).

Exit codes (as ``shim.cli.pyvm``): 0 done or nothing to do, 1 the operation failed (e.g. the restart),
2 bad invocation or configuration (missing/unreadable/unparsable file, permissions).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from shim import paths
from shim.errors import ShimError

if TYPE_CHECKING:
    from shim.install import installer as installer_mod

EPILOG = """\
Files kept next to the containerd config: <config>.pyvm-backup (the original before the first
install; never overwritten) and <config>.pyvm-state.json (what pyvm wrote). `pyvm uninstall` restores
the original byte for byte if the config is unchanged since install, else removes only pyvm's table.
"""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--containerd-config",
        type=Path,
        default=None,
        metavar="PATH",
        help="containerd's config file (default: /etc/containerd/config.toml)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the unified diff of the change and write nothing"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="restart containerd (systemctl) if the config changed; otherwise you are told to",
    )
    parser.add_argument("--runtime-name", default="pyvm", help="CRI runtime handler name (default: pyvm)")
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def add_install_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument(
        "--config-path",
        type=Path,
        default=paths.DEFAULT_CONFIG,
        metavar="PATH",
        help=f"pyvm configuration passed to the shim as the ConfigPath option (default: {paths.DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--runtime-path",
        default=None,
        metavar="PATH",
        help="absolute path of containerd-shim-pyvm-v2 if it is not on containerd's PATH",
    )
    parser.add_argument(
        "--config-version",
        type=int,
        choices=(2, 3),
        default=None,
        help="schema for a config created from scratch (default: 3 for containerd 2.x, else 2)",
    )
    parser.add_argument(
        "--skip-config-check",
        action="store_true",
        help="register even if --config-path does not exist yet (e.g. it is installed later)",
    )


def add_uninstall_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)


def run_install(args: argparse.Namespace) -> int:
    from shim.install import containerd_config as cc
    from shim.install import installer

    config = args.containerd_config or installer.DEFAULT_CONTAINERD_CONFIG
    cfg_path: Path = args.config_path
    if not cfg_path.is_absolute():
        return _fail(f"--config-path {cfg_path} must be absolute: the shim does not run in this directory")
    if not args.skip_config_check and not cfg_path.is_file():
        return _fail(
            f"pyvm configuration {cfg_path} does not exist: install it first (from config/configuration.toml "
            f"in the pyvm sources, e.g. `install -D -m 0644 config/configuration.toml {cfg_path}`), pass "
            f"another --config-path, or add --skip-config-check"
        )
    if args.runtime_path is not None and not Path(args.runtime_path).is_absolute():
        return _fail(f"--runtime-path {args.runtime_path} must be an absolute path")
    entry = cc.RuntimeEntry(config_path=str(cfg_path), name=args.runtime_name, runtime_path=args.runtime_path)
    return _change(
        config,
        lambda: installer.install(config, entry, dry_run=args.dry_run, new_version=args.config_version),
        args,
    )


def run_uninstall(args: argparse.Namespace) -> int:
    from shim.install import installer

    config = args.containerd_config or installer.DEFAULT_CONTAINERD_CONFIG
    return _change(
        config, lambda: installer.uninstall(config, name=args.runtime_name, dry_run=args.dry_run), args
    )


def _change(config: Path, change: Callable[[], installer_mod.Outcome], args: argparse.Namespace) -> int:
    """Run ``change`` (an install or uninstall of ``config``) and report it: exit 2 for what the
    invocation or the files got wrong (``ShimError``), 1 if writing failed."""
    try:
        outcome = change()
    except ShimError as exc:
        return _fail(str(exc))
    except OSError as exc:  # disk full, read-only fs, ...: not a bad invocation
        print(f"pyvm: writing {exc.filename or config} failed: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return _finish(outcome, args)


def _finish(outcome: installer_mod.Outcome, args: argparse.Namespace) -> int:
    from shim.install import installer

    if outcome.dry_run and outcome.diff:
        sys.stdout.write(outcome.diff)
    for line in outcome.messages:
        print(line)
    if not outcome.changed or outcome.dry_run:
        return 0
    if args.restart:
        ok, message = installer.restart_containerd()
        print(message, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    print(
        "restart containerd for the change to take effect: `systemctl restart containerd` (or run with --restart)"
    )
    return 0


def _fail(message: str) -> int:
    print(f"pyvm: {message}", file=sys.stderr)
    return 2
