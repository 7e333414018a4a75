"""Pin (or unpin) blobs so the cache never evicts them; a sha1dir URL pins its whole snapshot.

A blob not in the local store yet is pinned all the same (it is kept once fetched), with a note.

examples:
  kacheryfs pin sha1dir://<hash>.ds001          # the manifest and every file in it
  kacheryfs pin sha1://<hash>/weights.npy
  kacheryfs unpin sha1dir://<hash>.ds001
"""

from __future__ import annotations

import argparse
import sys

from kacheryfs.cli.common import add_config_args, config_from
from kacheryfs.errors import InvalidManifest
from kacheryfs.resolver import Resolver
from kacheryfs.store import LocalStore
from kacheryfs.uri import KacheryURL, parse_url


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("urls", nargs="+", metavar="URL")
    add_config_args(p)


def run(args: argparse.Namespace) -> int:
    store = LocalStore.from_config(config_from(args))
    urls = [parse_url(u) for u in args.urls]  # all checked before any is changed
    if args.command == "pin":
        for url in urls:
            _check_snapshot(store, url)
    for url in urls:
        if args.command == "unpin":
            if not store.cache.unpin(url.alg, url.hash):
                print(f"kacheryfs unpin: {url} was not pinned")
        else:
            store.cache.pin(url.alg, url.hash, is_dir=url.is_dir)
            if not store.has(url.alg, url.hash):
                note = f"kacheryfs pin: {url} is not in the local store: pinned, it will be kept once fetched"
                print(note, file=sys.stderr)
    return 0


def _check_snapshot(store: LocalStore, url: KacheryURL) -> None:
    """InvalidManifest when `url` names a snapshot whose manifest is here and is none."""
    if not url.is_dir or not store.has(url.alg, url.hash):
        return
    try:
        Resolver(store).manifest(url.alg, url.hash)
    except InvalidManifest as err:
        raise InvalidManifest(f"{url} names no snapshot: {err}") from err
