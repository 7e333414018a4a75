#!/usr/bin/env bash
# Install everything, then run the whole test suite (real mounts need root and /dev/fuse).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
"$PY" -m ruff check kacheryfs tests scripts
exec "$PY" -m pytest -q "$@"
