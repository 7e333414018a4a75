#!/usr/bin/env bash
# Install everything, then run the whole test suite (real mounts need root and /dev/fuse).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check kacheryfs tests scripts
exec python3 -m pytest -q "$@"
