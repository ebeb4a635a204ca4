#!/usr/bin/env bash
# Set the machine up (hack/setup.sh), then run every check and the whole test suite.
# Extra arguments go to pytest (e.g. ./hack/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
./hack/setup.sh
. .venv/bin/activate
echo "==> static checks"
python hack/gen_proto.py --check
ruff check shim tests hack
lint-imports --no-cache
mypy shim
echo "==> tests"
if [ $# -gt 0 ]; then
  exec python -m pytest "$@"
fi
exec python -m pytest -ra tests
