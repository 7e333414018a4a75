"""Evict least-recently-used blobs down to the cache bounds now, and report what was freed.

Pinned blobs, blobs a mount is reading and blobs no channel is known to hold (stored here and
never uploaded, staged ones included: they may be the only copy) are kept; --include-local
evicts the last ones too.

examples:
  kacheryfs gc                                  # bounds from [cache] in the config
  kacheryfs gc --max-size "20 GiB"
"""

from __future__ import annotations

import argparse

from kacheryfs.cli.common import add_config_args, config_from, human
from kacheryfs.config import parse_size
from kacheryfs.store import CacheLimits, LocalStore


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-size", help='evict down to this size (e.g. "20 GiB"; default: [cache] max_size)')
    p.add_argument(
        "--include-local",
        action="store_true",
        help="also evict blobs stored here that no channel is known to hold (they cannot be fetched again)",
    )
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    max_size = parse_size(args.max_size, "--max-size") if args.max_size else config.cache_max_size
    limits = CacheLimits(max_size, config.min_free_space)
    if not limits.bounded:
        print("kacheryfs gc: no bound set: give --max-size or set [cache] max_size in the config")
        return 2
    store = LocalStore(config.storage_dir, limits=limits)
    freed, evicted = store.cache.evict(include_local=args.include_local)
    usage = store.cache.usage()
    print(f"evicted {evicted} blobs, freed {human(freed)}; store now {human(usage.total_bytes)} in {usage.blobs} blobs")
    return 0
