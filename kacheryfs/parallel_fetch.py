"""Fetch many blobs in parallel into the local store: a file, or every file of a snapshot.

Already-present blobs are skipped, so an interrupted prefetch resumes where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from kacheryfs.errors import KacheryError
from kacheryfs.resolver import BlobRef, Resolver
from kacheryfs.uri import parse_url

log = logging.getLogger(__name__)


@dataclass
class PrefetchResult:
    """What a prefetch did."""

    fetched: int = 0
    fetched_bytes: int = 0
    present: int = 0
    failed: list[str] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)  # beside `failed`, for the caller to classify


def blobs_of(resolver: Resolver, urls: Iterable[str]) -> list[BlobRef]:
    """Every blob the URLs need: files, and for snapshots their manifests and all their files."""
    refs: dict[tuple[str, str], BlobRef] = {}
    for text in urls:
        url = parse_url(text)
        if url.is_dir:
            refs[(url.alg, url.hash)] = BlobRef(url.alg, url.hash)
            found = resolver.resolve(url)
            if isinstance(found, BlobRef):
                refs[(found.alg, found.digest)] = found
            else:
                for rel, entry in found.walk():
                    refs.setdefault((entry.alg, entry.digest), BlobRef(entry.alg, entry.digest, entry.size, rel))
        else:
            refs[(url.alg, url.hash)] = BlobRef(url.alg, url.hash, name=url.basename)
    return list(refs.values())


def fetch_all(
    resolver: Resolver,
    refs: list[BlobRef],
    jobs: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> PrefetchResult:
    """Make every blob local, `jobs` at a time; `progress(files, bytes)` after each one."""
    result = PrefetchResult()
    missing = []
    for ref in refs:
        if resolver.store.has(ref.alg, ref.digest):
            result.present += 1
            if progress:
                progress(1, ref.size or 0)
        else:
            missing.append(ref)
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="kachery-prefetch") as pool:
        futures = {pool.submit(resolver.ensure, ref.alg, ref.digest, ref.size): ref for ref in missing}
        for future in as_completed(futures):
            ref = futures[future]
            try:
                path = future.result()
                size = ref.size if ref.size is not None else path.stat().st_size
            except (KacheryError, OSError) as err:  # OSError: evicted again by a cache smaller than the set
                result.failed.append(f"{ref.alg}://{ref.digest} ({ref.name or 'file'}): {err}")
                result.errors.append(err)
                if progress:
                    progress(1, 0)
                continue
            result.fetched += 1
            result.fetched_bytes += size
            if progress:
                progress(1, size)
    return result
