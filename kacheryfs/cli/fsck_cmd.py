"""Re-hash every blob of the local store and report corrupt or misplaced ones.

With --repair they move to <store>/quarantine/ so the next read fetches a good copy, and
each running mount of the store is told to let go of those it holds; leftover temp files
of crashed writers are removed either way.

examples:
  kacheryfs fsck
  kacheryfs fsck --repair --jobs 4
"""

from __future__ import annotations

import argparse
import os
import sys

from kacheryfs.cli.common import add_config_args, config_from, human
from kacheryfs.store import LocalStore
from kacheryfs.store.fsck import fsck


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repair", action="store_true", help="move bad blobs to the quarantine folder")
    p.add_argument("--jobs", "-j", type=int, help="hashing threads (default: number of CPUs)")
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    store = LocalStore(config_from(args).storage_dir)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, file=sys.stderr, desc="fsck")
    try:
        report = fsck(store, repair=args.repair, jobs=args.jobs, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    for path in report.corrupt:
        print(f"corrupt: {path}")
    for path in report.misplaced:
        print(f"misplaced: {path}")
    for path in report.quarantined:
        print(f"quarantined: {path}")
    if report.quarantined:
        _tell_live_mounts(store)
    print(
        f"checked {report.checked} blobs ({human(report.checked_bytes)}): {report.corrupt_blobs} corrupt, "
        f"{len(report.misplaced)} misplaced; {report.temp_removed} temp files removed",
        file=sys.stderr,
    )
    return 0 if report.ok or args.repair else 4


def _tell_live_mounts(store: LocalStore) -> None:
    """A mount of this store may hold a quarantined blob's file (open, or kept for the kernel)
    and go on serving its bytes: each is told to let go of blobs moved out of the store, or,
    where that cannot be done, the user is told what to do."""
    from kacheryfs.mount.daemon import RECHECK_SIGNAL, mounts_of_store

    found, silent = mounts_of_store(store.root)
    for where in silent:
        print(f"warning: the mount at {where} did not answer; if it uses this store, unmount it and mount it again",
              file=sys.stderr)  # fmt: skip
    for where, status in found.items():
        if status.get("recheck_signal") != RECHECK_SIGNAL.name:  # an older daemon: the signal would end it
            why = "its kacheryfs is older than this one and cannot be told"
        else:
            try:
                os.kill(int(str(status["pid"])), RECHECK_SIGNAL)
            except OSError as err:
                why = f"it cannot be told: {err.strerror}"
            else:
                print(f"told the mount at {where} to let go of the quarantined blobs", file=sys.stderr)
                continue
        print(
            f"warning: the mount at {where} uses this store and may go on serving the quarantined bytes of "
            f"blobs it has read ({why}): unmount it and mount it again",
            file=sys.stderr,
        )
