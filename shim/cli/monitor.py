"""`pyvm monitor`: serve the metrics of every pyvm sandbox on this node (see ``shim.monitor``)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from shim import log
from shim.paths import run_root

DEFAULT_LISTEN = "127.0.0.1:8090"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ADDR",
        help=f"HOST:PORT to serve /metrics, /sandboxes on (default {DEFAULT_LISTEN}; ':PORT' = all interfaces)",
    )
    parser.add_argument(
        "--run-root",
        type=Path,
        default=None,
        help="pyvm run root whose sbs/*/metrics.sock are scraped (default: $PYVM_RUN_ROOT or /run/pyvm)",
    )
    parser.add_argument(
        "--scrape-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="give up on a shim's socket after this long and count a failure (default 2)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    from shim.monitor.server import parse_listen, run_monitor

    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        print(f"pyvm monitor: {exc}", file=sys.stderr)
        return 2
    if args.scrape_timeout <= 0:
        print("pyvm monitor: --scrape-timeout must be positive", file=sys.stderr)
        return 2
    log.configure(level=args.log_level)
    root = args.run_root if args.run_root is not None else run_root()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_monitor(host, port, run_root=root, scrape_timeout=args.scrape_timeout, stop=stop)

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"pyvm monitor: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    return 0
