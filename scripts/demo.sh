#!/usr/bin/env bash
# Install everything, mount kacheryfs on its default local store, and read a stored file
# and a directory snapshot through the mount with ordinary tools.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh

mnt=$("$PY" -c 'from kacheryfs.mount.paths import default_mountpoint; print(default_mountpoint())')
demo=$(mktemp -d)
trap 'rm -rf "$demo"' EXIT
mkdir -p "$demo/ds001/subdir1"
echo "hello from kacheryfs" > "$demo/ds001/subdir1/file1.txt"
"$PY" -c 'import numpy; numpy.save("'"$demo"'/ds001/array.npy", numpy.arange(12).reshape(3, 4))'

file_url=$(kachery-store "$demo/ds001/subdir1/file1.txt")
dir_url=$(kachery-store "$demo/ds001")
echo "stored: $file_url"
echo "stored: $dir_url"

if ! mountpoint -q "$mnt"; then
  mkdir -p "$mnt"
  kacheryfs mount "$mnt"
fi
echo "mounted at $mnt (unmount with: kacheryfs umount $mnt)"

snapshot=$("$PY" -c 'import sys, kacheryfs.mount.paths as p; print(p.mount_path(sys.argv[1], sys.argv[2]))' "$dir_url" "$mnt")
blob=$("$PY" -c 'import sys, kacheryfs.mount.paths as p; print(p.mount_path(sys.argv[1], sys.argv[2]))' "$file_url" "$mnt")
set -x
ls -lR "$snapshot"
cat "$snapshot/subdir1/file1.txt"
cat "$blob"
getfattr -n user.kachery.url "$snapshot/subdir1/file1.txt"
"$PY" -c "import numpy, sys; print(numpy.load(sys.argv[1]))" "$snapshot/array.npy"
kacheryfs status "$mnt"
