"""``pyvm template``: VM templates, booted once and restored by every pod VM that matches them.

pyvm template build [--config FILE] [--force]   make (or confirm) the template of the configured pod VM
pyvm template show  [--config FILE] [--json]    the templates on disk; which one the configuration uses
pyvm template rm    [--config FILE] [--all]     delete templates the configuration no longer uses (or all)

A template matches one configuration (devices, sizes, kernel parameters, QEMU, firmware and guest image
files); after any of them changes, build again. Pods boot cold while no template matches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from shim.errors import InvalidArgument, ShimError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="template_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="make the template of the configured pod VM (no-op when it exists)")
    b.add_argument("--force", action="store_true", help="build again even if a matching template exists")
    s = sub.add_parser("show", help="list the templates; mark the one the configuration uses")
    s.add_argument("--json", action="store_true")
    r = sub.add_parser("rm", help="delete templates the configuration does not use")
    r.add_argument("--all", action="store_true", help="delete every template of the configuration's arch")
    for p in (b, s, r):
        p.add_argument("--config", type=Path, default=None, help="pyvm configuration (default: the node's)")


def run(args: argparse.Namespace) -> int:
    from shim import config as config_mod
    from shim import log as shimlog
    from shim.hypervisor.qemu import template as store
    from shim.platform import accel
    from shim.sandbox import template as tmpl

    shimlog.configure(level="warning")  # the driver's info lines are for shims; this prints a summary
    try:
        cfg = config_mod.load(args.config)
        if not cfg.factory.enable_template and args.template_command == "build":
            print(
                f"pyvm template build: [factory] enable_template is false in {cfg.source or 'the defaults'};"
                " pods would not use a template",
                file=sys.stderr,
            )
            return 2
        verdict = accel.resolve(
            cfg.hypervisor.accelerator, asyncio.run(accel.get_verdict(accel.target_for(cfg.hypervisor)))
        )
        current = store.find(cfg, verdict.accel)
        if args.template_command == "build":
            print(f"building the VM template ({verdict.accel}) ...", file=sys.stderr, flush=True)
            res = asyncio.run(tmpl.build(cfg, force=args.force, verdict=verdict))
            info = res.template.info()
            if res.built:
                st = res.stats
                print(
                    f"built {info['dir']}: {st['ram_bytes'] / 2**20:.0f} MiB guest RAM, "
                    f"{st['state_bytes'] / 2**20:.1f} MiB device state, in {st['build_s']:.1f} s "
                    f"(agent ready after {st['agent_ready_s']:.1f} s; a trial restore answered in "
                    f"{st['trial_restore_s']:.2f} s, attempt {st['attempts']:.0f})"
                )
            else:
                print(f"up to date: {info['dir']}")
            return 0
        if args.template_command == "show":
            rows = [
                dict(t.info(), used=current is not None and t.key == current.key)
                for t in store.list_templates(cfg)
            ]
            if args.json:
                print(json.dumps({"used": current.key if current else None, "templates": rows}, indent=2))
            else:
                for r in rows:
                    mark = "*" if r["used"] else " "
                    print(f"{mark} {r['key']}  {float(str(r['disk_bytes'])) / 2**20:6.0f} MiB  {r['dir']}")
                if current is None:
                    print(
                        "(no template matches the configuration: pods boot cold; run `pyvm template build`)"
                    )
            return 0
        removed = tmpl.remove(cfg, keep=None if args.all else current)
        for d in removed:
            print(f"removed {d}")
        return 0
    except InvalidArgument as exc:
        print(f"pyvm template {args.template_command}: {exc}", file=sys.stderr)
        return 2
    except ShimError as exc:
        print(f"pyvm template {args.template_command}: {exc}", file=sys.stderr)
        return 1
