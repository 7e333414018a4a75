"""`kacheryfs SUBCOMMAND`: serve, mount, umount, status and the other operator commands.

Each subcommand lives in its own module under `kacheryfs.cli` with `add_arguments(parser)`
and `run(args) -> int`; this module only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from kacheryfs.cli.common import EXIT_CODES_HELP, run

# name → (module under kacheryfs.cli, one-line help)
SUBCOMMANDS = {
    "serve": ("serve_cmd", "serve a storage directory over HTTP to other machines"),
    "mount": ("mount_cmd", "mount hash URLs as read-only files (sha1/, md5/, sha1dir/)"),
    "umount": ("umount_cmd", "unmount a kacheryfs mount (also a stale one)"),
    "status": ("status_cmd", "show what a mount's daemon is doing: cache, hits, fetches, errors"),
    "prefetch": ("prefetch_cmd", "fetch files or whole snapshots into the local store, in parallel"),
    "pin": ("pin_cmd", "keep blobs (or whole snapshots) from eviction"),
    "unpin": ("pin_cmd", "undo pin"),
    "gc": ("gc_cmd", "evict least-recently-used blobs down to the cache bounds now"),
    "du": ("du_cmd", "show the size of the local store and how much is pinned"),
    "fsck": ("fsck_cmd", "re-hash every blob; quarantine corrupt ones with --repair"),
}


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="kacheryfs",
        description="Content-addressed storage: serve a store, mount hash URLs as files, manage the cache.",
        epilog="run `kacheryfs SUBCOMMAND --help` for each command's options and examples\n\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
