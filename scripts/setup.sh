#!/usr/bin/env bash
# Install everything kacheryfs needs on a bare Debian/Ubuntu machine; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
packages=(fuse3 attr rsync nginx curl openssl)
# A Python whose packages the OS manages (PEP 668) gets a project venv: that needs python3-venv.
externally_managed() {
  "$PY" -c 'import os, sys, sysconfig
sys.exit(sys.prefix != sys.base_prefix or not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'
}
if [ ! -x .venv/bin/python ] && externally_managed; then
  packages+=(python3-venv python3-pip)
fi
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

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: kacheryfs needs Python >= 3.11" >&2; exit 1; }
if [ ! -x .venv/bin/python ] && externally_managed; then
  echo "setup: $PY is managed by the OS: installing into a project venv, .venv" >&2
  "$PY" -m venv .venv
fi
. scripts/env.sh
# Reinstall when the installed kacheryfs is not this checkout (e.g. a fresh clone in CI).
if ! "$PY" -c 'import os, sys, kacheryfs, mfusepy, aiohttp, requests, pytest, hypothesis
sys.exit(os.path.dirname(kacheryfs.__file__) != os.path.abspath("kacheryfs"))' >/dev/null 2>&1 \
   || ! command -v kachery-store >/dev/null; then
  echo "setup: installing the kacheryfs Python package and its dependencies" >&2
  "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
fi
# An editable install compiles nothing, and with PYTHONDONTWRITEBYTECODE set every command
# would compile the package again at each start (~25 ms): compile it now, as pip does for a
# regular install (only what changed since).
"$PY" -m compileall -q kacheryfs >/dev/null

# mount(8) runs fstab helpers with PATH=/usr/local/bin:/bin:/usr/bin: make `kacheryfs` findable there.
scripts=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
if [ "$(id -u)" -eq 0 ] && [ -x "$scripts/kacheryfs" ] && [ "$scripts" != /usr/local/bin ] \
   && { [ ! -e /usr/local/bin/kacheryfs ] || [ -L /usr/local/bin/kacheryfs ]; }; then
  ln -sfn "$scripts/kacheryfs" /usr/local/bin/kacheryfs
fi
