"""``pyvm template``: VM templates, booted once and restored by every pod VM that matches them.

pyvm template build [--config FILE] [--vcpus LIST] [--force]   make (or confirm) the templates
pyvm template show  [--config FILE] [--vcpus LIST] [--json]    the templates on disk; which are used
pyvm template rm    [--config FILE] [--vcpus LIST] [--all]     delete the ones no pod would use (or all)

A template matches one configuration (devices, sizes, kernel parameters, QEMU, firmware and guest image
files); after any of them changes, build again. Pods boot cold while no template matches.

``--vcpus`` (e.g. ``1,2`` or ``all`` = 1 up to this host's CPUs) makes one template per vCPU count: a
CRI pod with CPU limits gets ceil(quota/period) vCPUs (capped at the host's CPUs) when that is more
than the configured ``vcpus``, and only a template of that size can be restored for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from shim.errors import InvalidArgument, ShimError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="template_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="make the templates of the configured pod VM (no-op when they exist)")
    b.add_argument("--force", action="store_true", help="build again even if a matching template exists")
    s = sub.add_parser("show", help="list the templates; mark those the configuration uses")
    s.add_argument("--json", action="store_true")
    r = sub.add_parser("rm", help="delete templates the configuration does not use")
    r.add_argument("--all", action="store_true", help="delete every template of the configuration's arch")
    for p in (b, s, r):
        p.add_argument("--config", type=Path, default=None, help="pyvm configuration (default: the node's)")
        p.add_argument(
            "--vcpus",
            default="",
            metavar="LIST",
            help="vCPU counts to have templates for: N[,N...] or 'all' (default: the configuration's)",
        )


def vcpu_variants(spec: str, configured: int, host_cpus: int) -> list[int]:
    """The vCPU counts ``--vcpus`` names (always including the configured one), sorted."""
    if not spec:
        return [configured]
    if spec == "all":
        return sorted({configured, *range(1, host_cpus + 1)})
    try:
        wanted = {int(x) for x in spec.split(",") if x.strip()}
    except ValueError:
        raise InvalidArgument(f"--vcpus {spec!r}: want N[,N...] or 'all'", value=spec) from None
    if not wanted or min(wanted) < 1 or max(wanted) > 255:
        raise InvalidArgument(f"--vcpus {spec!r}: every count must be 1..255", value=spec)
    return sorted(wanted | {configured})


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
        verdict = asyncio.run(accel.verdict_for(cfg.hypervisor))
        variants = [
            cfg if v == cfg.hypervisor.vcpus else config_mod.with_overrides(cfg, vcpus=v)
            for v in vcpu_variants(args.vcpus, cfg.hypervisor.vcpus, os.cpu_count() or 1)
        ]
        if args.template_command == "build":
            for c in variants:
                _build_one(c, verdict, args.force)
            return 0
        used = {t.key for c in variants if (t := store.find(c, verdict.accel)) is not None}
        if args.template_command == "show":
            rows = [dict(t.info(), used=t.key in used) for t in store.list_templates(cfg)]
            if args.json:
                print(json.dumps({"used": sorted(used), "templates": rows}, indent=2))
            else:
                for r in rows:
                    vcpus = _vcpus_of(r)
                    mark = "*" if r["used"] else " "
                    print(
                        f"{mark} {r['key']}  {float(str(r['disk_bytes'])) / 2**20:6.0f} MiB  {vcpus}  {r['dir']}"
                    )
                if not used:
                    print(
                        "(no template matches the configuration: pods boot cold; run `pyvm template build`)"
                    )
            return 0
        keep = [] if args.all else [t for t in store.list_templates(cfg) if t.key in used]
        for d in tmpl.remove(cfg, keep=keep):
            print(f"removed {d}")
        return 0
    except InvalidArgument as exc:
        print(f"pyvm template {args.template_command}: {exc}", file=sys.stderr)
        return 2
    except ShimError as exc:
        print(f"pyvm template {args.template_command}: {exc}", file=sys.stderr)
        return 1


def _build_one(cfg: Any, verdict: Any, force: bool) -> None:
    from shim.sandbox import template as tmpl

    vcpus = cfg.hypervisor.vcpus
    print(f"building the VM template ({verdict.accel}, {vcpus} vCPU) ...", file=sys.stderr, flush=True)
    res = asyncio.run(tmpl.build(cfg, force=force, verdict=verdict))
    info = res.template.info()
    if not res.built:
        print(f"up to date: {info['dir']} ({vcpus} vCPU)")
        return
    st = res.stats
    print(
        f"built {info['dir']} ({vcpus} vCPU): {st['ram_bytes'] / 2**20:.0f} MiB guest RAM, "
        f"{st['state_bytes'] / 2**20:.1f} MiB device state, in {st['build_s']:.1f} s "
        f"(agent ready after {st['agent_ready_s']:.1f} s; a trial restore answered in "
        f"{st['trial_restore_s']:.2f} s, attempt {st['attempts']:.0f})"
    )


def _vcpus_of(row: dict[str, Any]) -> str:
    argv = (row.get("material") or {}).get("argv") or []
    try:
        return f"{argv[argv.index('-smp') + 1]} vCPU"
    except (ValueError, IndexError):
        return "? vCPU"
