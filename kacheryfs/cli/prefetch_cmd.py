"""Fetch files or whole sha1dir snapshots into the local store, in parallel and verified.

Blobs already present are skipped, so running it again resumes an interrupted prefetch.
A progress bar (files, bytes, rate, ETA) is shown on a terminal.

examples:
  kacheryfs prefetch sha1dir://<hash>.ds001 --fr lab --jobs 16
  kacheryfs prefetch sha1://<hash>/a.npy sha1://<hash>/b.npy
"""

from __future__ import annotations

import argparse
import sys

from kacheryfs import api
from kacheryfs.cli.common import add_config_args, add_fr, human


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("urls", nargs="+", metavar="URL")
    add_fr(p)
    p.add_argument("--jobs", "-j", type=int, default=8, help="parallel downloads (default 8)")
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    settings = {"config_file": args.config, "storage_dir": args.storage_dir}
    with api.config(**{k: str(v) for k, v in settings.items() if v is not None}):
        result = api.prefetch(*args.urls, fr=args.fr, jobs=args.jobs)
    print(
        f"fetched {result.fetched} blobs ({human(result.fetched_bytes)}), {result.present} already present",
        file=sys.stderr,
    )
    return 0
