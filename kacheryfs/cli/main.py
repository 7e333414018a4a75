"""`kacheryfs SUBCOMMAND`: serve, mount, umount, status and the other operator commands.

Each subcommand lives in its own module under `kacheryfs.cli` with `add_arguments(parser)`
and `run(args) -> int`; this module only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kacheryfs.cli.common import EXIT_CODES_HELP, add_version, run

# name → (module under kacheryfs.cli, one-line help)
SUBCOMMANDS = {
    "serve": ("serve_cmd", "serve a storage directory over HTTP to other machines"),
    "mount": ("mount_cmd", "mount hash URLs as read-only files (sha1/, md5/, sha1dir/)"),
    "umount": ("umount_cmd", "unmount a kacheryfs mount (also a stale one)"),
    "status": ("status_cmd", "show what a mount's daemon is doing: cache, hits, fetches, errors"),
    "url": ("url_cmd", "print the hash URL of files or directories under a mount (e.g. in staging/)"),
    "prefetch": ("prefetch_cmd", "fetch files or whole snapshots into the local store, in parallel"),
    "pin": ("pin_cmd", "keep blobs (or whole snapshots) from eviction"),
    "unpin": ("pin_cmd", "undo pin"),
    "gc": ("gc_cmd", "evict least-recently-used blobs down to the cache bounds now"),
    "du": ("du_cmd", "show the size of the local store and how much is pinned"),
    "fsck": ("fsck_cmd", "re-hash every blob; quarantine corrupt ones with --repair"),
}


# Options mount(8) may pass that mean nothing to kacheryfs (it is always nodev, nosuid-safe).
GENERIC_MOUNT_OPTIONS = {
    "rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto", "user", "nouser", "users",
    "_netdev", "nofail", "defaults", "async", "sync", "atime", "noatime", "relatime", "strictatime",
}  # fmt: skip
# fstab option → `kacheryfs mount` flag
_FSTAB_FLAGS = {"config": "--config", "storage_dir": "--storage-dir", "fr": "--fr", "log_file": "--log-file"}


def from_fstab(argv: Sequence[str]) -> list[str]:
    """Translate mount.fuse3's `kacheryfs SOURCE MOUNTPOINT -o OPTS` into `mount MOUNTPOINT ...`.

    An fstab line `kacheryfs /mnt/kachery fuse.kacheryfs config=/etc/kachery.toml,allow_other 0 0`
    reaches us this way on `mount /mnt/kachery`.
    """
    _source, mountpoint, *rest = argv
    out = ["mount", mountpoint]
    options: list[str] = []
    while rest:
        arg = rest.pop(0)
        if arg == "-o" and rest:
            options += rest.pop(0).split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
    for option in options:
        key, eq, value = option.partition("=")
        if key in _FSTAB_FLAGS and eq:
            out += [_FSTAB_FLAGS[key], value]
        elif key == "allow_other":
            out.append("--allow-other")
        elif option and key not in GENERIC_MOUNT_OPTIONS and not key.startswith(("x-", "comment")):
            out += ["-o", option]
    return out


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 3 and argv[0] not in SUBCOMMANDS and any(a.startswith("-o") for a in argv[2:]):
        argv = from_fstab(argv)  # how mount.fuse3 calls us; a mistyped subcommand still gets argparse's error
    p = argparse.ArgumentParser(
        prog="kacheryfs",
        description="Content-addressed storage: serve a store, mount hash URLs as files, manage the cache.",
        epilog="run `kacheryfs SUBCOMMAND --help` for each command's options and examples\n\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(p)
    subs = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    modules = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(f"kacheryfs.cli.{module}")
        sp = subs.add_parser(
            name, help=help_text, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod.add_arguments(sp)
        modules[name] = mod
    args = p.parse_args(argv)
    return modules[args.command].run(args)


def main() -> int:
    return run(_main)
