"""Show how much the local store holds: total size, pinned size, number of blobs.

examples:
  kacheryfs du
  kacheryfs du --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from kacheryfs.cli.common import add_config_args, config_from, human
from kacheryfs.store import LocalStore


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    usage = LocalStore.from_config(config).cache.usage()
    if args.json:
        print(json.dumps({"storage_dir": str(config.storage_dir), **dataclasses.asdict(usage)}))
        return 0
    bound = human(config.cache_max_size) if config.cache_max_size else "unbounded"
    print(f"store:  {config.storage_dir}")
    print(f"total:  {human(usage.total_bytes)} in {usage.blobs} blobs (max {bound})")
    print(f"pinned: {human(usage.pinned_bytes)} in {usage.pinned_blobs} blobs")
    return 0
