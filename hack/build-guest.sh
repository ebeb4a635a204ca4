#!/usr/bin/env bash
# Build (or confirm up to date) the guest images for every architecture pyvm supports.
# Cached: an unchanged rebuild is a no-op; see `pyvm guest build --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/pyvm guest build --arch all "$@"
