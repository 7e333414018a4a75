"""Fetch many blobs in parallel into the local store: a file, or every file of a snapshot.

Already-present blobs are skipped, so an interrupted prefetch resumes where it stopped.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    for ref, outcome in _run(lambda ref: resolver.ensure(ref.alg, ref.digest, ref.size), missing, jobs):
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            size = ref.size if ref.size is not None else outcome.stat().st_size
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


def _run(
    fetch: Callable[[BlobRef], Path], refs: list[BlobRef], jobs: int
) -> Iterator[tuple[BlobRef, Path | Exception]]:
    """(ref, its path or what failed) for every ref, `jobs` fetched at a time, as they finish.

    The workers are daemon threads, where a thread pool's are not: Ctrl-C (KeyboardInterrupt
    here) ends the command at once, not after every download queued. A download cut off so
    leaves a temp file, which the store removes the next time it is opened.
    """
    todo: queue.SimpleQueue[BlobRef] = queue.SimpleQueue()
    done: queue.SimpleQueue[tuple[BlobRef, Path | Exception]] = queue.SimpleQueue()
    for ref in refs:
        todo.put(ref)
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                ref = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((ref, fetch(ref)))
            except BaseException as err:  # handed to the caller, which decides: each ref gets its answer
                done.put((ref, err if isinstance(err, Exception) else RuntimeError(f"fetch ended: {err!r}")))

    for _ in range(min(max(1, jobs), len(refs))):
        threading.Thread(target=work, name="kachery-prefetch", daemon=True).start()
    try:
        for _ in refs:
            yield done.get()
    finally:
        stop.set()  # an interrupted caller: no new download starts
