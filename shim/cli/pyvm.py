"""The `pyvm` node tool. Each subcommand lives in the module that owns it; this file only dispatches.

Exit codes: 0 ok, 1 the check/operation failed, 2 bad invocation or configuration.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, help). The module defines ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "check": ("shim.cli.check", "can this host run pyvm? which accelerator really works?"),
    "env": ("shim.cli.env", "print the effective configuration, guest assets and versions"),
    "guest": ("shim.cli.guest", "build or inspect the guest images"),
    "template": ("shim.cli.template", "build, list or delete VM templates (fast pod start)"),
    "install": ("shim.cli.install", "register pyvm in containerd's config"),
    "uninstall": ("shim.cli.install", "remove pyvm from containerd's config"),
    "monitor": ("shim.cli.monitor", "serve the metrics of every pyvm sandbox on this node"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvm", description="pyvm: each pod in its own QEMU VM.")
    from shim import __version__

    parser.add_argument("--version", action="version", version=f"pyvm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_unavailable=module)
            continue
        adder = getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments
        adder(p)
        p.set_defaults(_run=getattr(mod, f"run_{name}", None) or mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(
            f"pyvm {args.command}: not available in this build ({args._unavailable} missing)", file=sys.stderr
        )
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
