#!/usr/bin/env bash
# Install everything kacheryfs needs on a bare Debian/Ubuntu machine; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 attr rsync nginx curl openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: kacheryfs needs Python >= 3.11" >&2; exit 1; }
# Reinstall when the installed kacheryfs is not this checkout (e.g. a fresh clone in CI).
if ! "$PY" -c 'import os, sys, kacheryfs, mfusepy, aiohttp, requests, pytest, hypothesis
sys.exit(os.path.dirname(kacheryfs.__file__) != os.path.abspath("kacheryfs"))' >/dev/null 2>&1 \
   || ! command -v kachery-store >/dev/null; then
  echo "setup: installing the kacheryfs Python package and its dependencies" >&2
  "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
fi

# mount(8) runs fstab helpers with PATH=/usr/local/bin:/bin:/usr/bin: make `kacheryfs` findable there.
scripts=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
if [ "$(id -u)" -eq 0 ] && [ -x "$scripts/kacheryfs" ] && [ "$scripts" != /usr/local/bin ] \
   && [ ! -e /usr/local/bin/kacheryfs ]; then
  ln -s "$scripts/kacheryfs" /usr/local/bin/kacheryfs
fi
