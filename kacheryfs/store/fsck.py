"""Check every blob of a store against its name; quarantine the bad ones on request.

Each inode is hashed once (a blob indexed under sha1 and md5 is one inode), with its
sha1 when it has a sha1 name, else its md5, on as many threads as there are CPUs
(hashlib releases the GIL). Quarantined blobs move to `<root>/quarantine/`, so the next
read fetches a good copy again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kacheryfs.errors import store_error
from kacheryfs.hashing import CHUNK
from kacheryfs.store.cache import Blob
from kacheryfs.store.local import LocalStore

QUARANTINE_DIR = "quarantine"


@dataclass
class FsckReport:
    """What fsck found (and, with repair, moved away)."""

    checked: int = 0
    checked_bytes: int = 0
    corrupt_blobs: int = 0  # by inode: `corrupt` lists every name, md5 ones too
    corrupt: list[Path] = field(default_factory=list)
    misplaced: list[Path] = field(default_factory=list)
    temp_removed: int = 0
    quarantined: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.misplaced


def _expected(path: Path, root: Path) -> tuple[str, str] | None:
    """(alg, digest) a blob path claims, or None when it sits in the wrong directory."""
    rel = path.relative_to(root).parts
    alg, digest = rel[0], rel[-1]
    if rel[1:4] != (digest[0:2], digest[2:4], digest[4:6]):
        return None
    return alg, digest


def _digest(path: Path, alg: str) -> str:
    h = hashlib.new(alg)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check(blob: Blob, root: Path) -> tuple[list[Path], list[Path]]:
    """(corrupt names, misplaced names) of one inode."""
    claims = {p: _expected(p, root) for p in blob.paths}
    misplaced = [p for p, c in claims.items() if c is None]
    named = {c for c in claims.values() if c is not None}
    algs = {alg for alg, _ in named}
    # sha1 when the blob has a sha1 name: the md5 link shares its bytes, so one hash proves both
    alg = "sha1" if "sha1" in algs else "md5"
    if not named:
        return [], misplaced
    actual = _digest(blob.paths[0], alg)
    bad = any(a == alg and d != actual for a, d in named)
    return (list(blob.paths) if bad else []), misplaced


def fsck(store: LocalStore, *, repair: bool = False, jobs: int | None = None,
         progress: Callable[[int], None] | None = None) -> FsckReport:  # fmt: skip
    """Re-hash every blob; with `repair`, move corrupt and misplaced ones to quarantine."""
    report = FsckReport()
    report.temp_removed = store.cleanup_temp()
    blobs = list(store.cache.scan().values())
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2, thread_name_prefix="kachery-fsck") as pool:
        for blob, (corrupt, misplaced) in zip(blobs, pool.map(lambda b: _check(b, store.root), blobs), strict=True):
            report.checked += 1
            report.checked_bytes += blob.size
            report.corrupt_blobs += bool(corrupt)
            report.corrupt.extend(corrupt)
            report.misplaced.extend(misplaced)
            if progress:
                progress(blob.size)
    if repair and (report.corrupt or report.misplaced):
        try:
            report.quarantined = _quarantine(store.root, report.corrupt + report.misplaced)
        except OSError as err:
            raise store_error(err, "moving bad blobs to quarantine") from err
    return report


def _quarantine(root: Path, paths: list[Path]) -> list[Path]:
    """Move `paths` to `<root>/quarantine/`; where each went."""
    quarantine = root / QUARANTINE_DIR
    quarantine.mkdir(exist_ok=True)
    moved = []
    for path in paths:
        target = quarantine / f"{path.relative_to(root).parts[0]}-{path.name}"
        if path.exists():
            os.replace(path, target)
            moved.append(target)
    return moved
