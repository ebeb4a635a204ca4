"""``pyvm guest``: build or inspect the guest images (kernel, floor initramfs, agent guest).

pyvm guest build [--arch x86_64|aarch64|all] [--force] [--layout disk|initramfs]
pyvm guest show [--arch ...]
"""

from __future__ import annotations

import argparse
import json
import sys

from shim.errors import ShimError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="guest_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build (or confirm up to date) and install the guest images")
    b.add_argument("--arch", default="host", help="x86_64, aarch64, all, or host (default)")
    b.add_argument("--force", action="store_true", help="rebuild the final image even if up to date")
    b.add_argument("--layout", choices=("disk", "initramfs"), default=None, help="agent guest root layout")
    s = sub.add_parser("show", help="print the manifest of the current guest image")
    s.add_argument("--arch", default="host", help="x86_64, aarch64, all, or host (default)")


def _arches(spec: str) -> list[str]:
    from shim.guestimage.arch import ARCHES, host_arch

    if spec == "all":
        return list(ARCHES)
    return [host_arch() if spec == "host" else spec]


def run(args: argparse.Namespace) -> int:
    from shim.guestimage import builder
    from shim.guestimage.arch import get_arch

    try:
        arches = [get_arch(a) for a in _arches(args.arch)]
        if args.guest_command == "build":
            for arch in arches:
                builder.build(arch, layout=args.layout or builder.DEFAULT_LAYOUT, force=args.force)
            return 0
        rc = 0
        for arch in arches:
            manifest = builder.read_manifest(arch)
            if manifest is None:
                print(
                    f"no guest image for {arch.name}: run `pyvm guest build --arch {arch.name}`",
                    file=sys.stderr,
                )
                rc = 1
                continue
            print(json.dumps(manifest, indent=2))
        return rc
    except ShimError as exc:
        print(f"pyvm guest {args.guest_command}: {exc}", file=sys.stderr)
        return 2 if type(exc).__name__ == "InvalidArgument" else 1
