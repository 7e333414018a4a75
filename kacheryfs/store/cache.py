"""Keep the local store within its bounds: LRU eviction, pins, and cheap recency tracking.

Eviction runs at insert time (before a blob is linked in), so the store never overshoots
`max_size`. What is never evicted: a blob some process holds open (readers take a shared
flock; eviction needs an exclusive one), a pinned blob or anything inside a pinned
snapshot (`<root>/pins/`), a blob pinned by staging until it is uploaded, and a blob no
channel is known to hold: one stored here and never uploaded may be the only copy there
is. A blob's note (`DIGESTS_XATTR`) names the channel it was fetched from or uploaded to;
a blob without a note (an older store) is evicted only under a bound the user set.
Recency is the blob's atime, set in batches by `note_access`, never once per read.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kacheryfs import manifest
from kacheryfs.errors import InvalidManifest, StoreFull, store_error
from kacheryfs.uri import ALGORITHMS, check_hash, is_hash

log = logging.getLogger(__name__)

PINS_DIR = "pins"
_FLUSH_EVERY = 5.0  # seconds between batched atime updates
_RECENT_ENOUGH = 60.0  # an atime this fresh is not rewritten: LRU needs no finer clock
DIGESTS_XATTR = "user.kacheryfs.digests"  # a blob's note: {"size", "sha1", "md5", "remote"}
_WRITTEN_MAX = 100_000  # remembered atime writes, so the memory stays bounded
_RESCAN_AFTER = 30.0  # seconds before the usage total is re-read from disk (other processes insert too)


@dataclass(frozen=True)
class CacheLimits:
    """Bounds of the store; None / 0 means unbounded."""

    max_size: int | None = None
    min_free_space: int = 0
    track_access: bool = True  # off only to measure what recency tracking costs

    @property
    def bounded(self) -> bool:
        return self.max_size is not None or self.min_free_space > 0


@dataclass
class Blob:
    """One stored blob (one inode, possibly under several names)."""

    paths: list[Path]
    size: int
    atime: float


@dataclass(frozen=True)
class Usage:
    """What `kacheryfs du` reports."""

    total_bytes: int
    blobs: int
    pinned_bytes: int
    pinned_blobs: int


class Cache:
    """Eviction, pins and recency for the store rooted at `root`."""

    def __init__(self, root: Path, limits: CacheLimits | None = None) -> None:
        self.root = root
        self.limits = limits or CacheLimits()
        self.pins_dir = root / PINS_DIR
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._touched: set[str] = set()
        self._written: dict[str, float] = {}  # path → when its atime was last written
        self._usage: int | None = None
        self._usage_at = 0.0

    # -- recency -------------------------------------------------------------------
    def note_access(self, path: str | os.PathLike[str]) -> None:
        """Remember that a blob was used; atimes are written in batches, at most _FLUSH_EVERY late."""
        if not self.limits.track_access:
            return
        path = os.fspath(path)
        with self._lock:
            first = not self._touched
            self._touched.add(path)
        if first:
            timer = threading.Timer(_FLUSH_EVERY, self.flush_access)
            timer.daemon = True
            timer.start()

    def flush_access(self) -> None:
        """Write the remembered accesses as atimes now (once per blob per _RECENT_ENOUGH)."""
        with self._lock:
            touched, self._touched = self._touched, set()
            now = time.monotonic()
            if len(self._written) > _WRITTEN_MAX:
                self._written.clear()
            due = [p for p in touched if now - self._written.get(p, -_RECENT_ENOUGH) >= _RECENT_ENOUGH]
            self._written.update((p, now) for p in due)
        for path in due:
            _touch_atime(path)

    # -- pins ----------------------------------------------------------------------
    def pin(self, alg: str, digest: str, *, is_dir: bool = False, reason: str = "user") -> None:
        """Keep a blob (or, for a snapshot manifest, its whole tree) from eviction.

        A pin is an empty file whose name says it all (`pins`): creating it is atomic, where a
        file with contents took a write aside and a rename, the most of a staged file's ingest.
        """
        path = f"{self.pins_dir}/{alg}-{check_hash(alg, digest)}{'.dir' if is_dir else ''}.{reason}"
        try:
            try:
                _create(path)
            except FileNotFoundError:
                self.pins_dir.mkdir(parents=True, exist_ok=True)
                _create(path)
        except FileExistsError:
            pass  # pinned already (perhaps by another user of a shared store, whose file this is)
        except OSError as err:
            raise store_error(err, f"pinning {alg}://{digest}") from err

    def unpin(self, alg: str, digest: str, *, reason: str = "user") -> bool:
        """Remove a pin; True if there was one."""
        removed = False
        for suffix in (f".{reason}", f".dir.{reason}"):
            try:
                os.unlink(self.pins_dir / f"{alg}-{check_hash(alg, digest)}{suffix}")
                removed = True
            except FileNotFoundError:
                continue
            except OSError as err:
                raise store_error(err, f"unpinning {alg}://{digest}") from err
        return removed

    def pins(self) -> Iterator[tuple[str, str, bool, str]]:
        """Every pin as (alg, digest, is_dir, reason)."""
        if not self.pins_dir.is_dir():
            return
        for entry in os.scandir(self.pins_dir):
            if entry.name.endswith(".tmp"):
                continue  # left by an older kacheryfs, which wrote pins aside first
            alg, _, rest = entry.name.partition("-")
            digest, _, tail = rest.partition(".")
            if alg in ALGORITHMS and is_hash(alg, digest):
                is_dir = tail.startswith("dir.")
                yield alg, digest, is_dir, tail.removeprefix("dir.")

    def pinned_paths(self) -> set[Path]:
        """Every blob path that must not be evicted because of a pin."""
        out: set[Path] = set()
        for alg, digest, is_dir, _reason in self.pins():
            path = blob_path(self.root, alg, digest)
            out.add(path)
            if not is_dir or not path.exists():
                continue
            try:
                node = manifest.parse(path.read_bytes())
            except (InvalidManifest, OSError) as err:
                log.warning("pinned snapshot %s:%s cannot be read (%s); only its manifest is kept", alg, digest, err)
                continue
            for _rel, entry in node.walk():
                out.add(blob_path(self.root, entry.alg, entry.digest))
        return out

    # -- usage and eviction ----------------------------------------------------------
    def scan(self) -> dict[tuple[int, int], Blob]:
        """Every blob by inode (a blob indexed under sha1 and md5 is one inode)."""
        blobs: dict[tuple[int, int], Blob] = {}
        for alg in ALGORITHMS:
            for dirpath, _dirs, files in os.walk(self.root / alg):
                for name in files:
                    if not is_hash(alg, name):
                        continue
                    path = Path(dirpath) / name
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key in blobs:
                        blobs[key].paths.append(path)
                    else:
                        blobs[key] = Blob([path], st.st_size, st.st_atime)
        return blobs

    def usage(self) -> Usage:
        blobs = self.scan()
        pinned = self.pinned_paths()
        pinned_blobs = [b for b in blobs.values() if any(p in pinned for p in b.paths)]
        return Usage(
            sum(b.size for b in blobs.values()), len(blobs), sum(b.size for b in pinned_blobs), len(pinned_blobs)
        )

    def make_room(self, incoming: int) -> None:
        """Evict least-recently-used blobs so `incoming` more bytes fit within the limits."""
        if not self.limits.bounded:
            return
        with self._lock:
            fresh = self._usage is not None and time.monotonic() - self._usage_at < _RESCAN_AFTER
            if fresh and self._fits(self._usage or 0, incoming):
                self._usage = (self._usage or 0) + incoming
                return
        freed, evicted = self.evict(incoming)
        if evicted:
            log.info("evicted %d blobs (%d bytes) to make room for %d bytes", evicted, freed, incoming)

    def evict(
        self, incoming: int = 0, free_at_least: int = 0, *, need: int = 0, include_local: bool = False
    ) -> tuple[int, int]:
        """Evict down to the limits, leaving room for `incoming` bytes and freeing at least
        `free_at_least` (used when the disk filled up below the limits); (bytes freed, blobs evicted).

        Only blobs a channel holds are evicted (`include_local`: also those stored here and
        never uploaded). StoreFull, with nothing evicted, when what could be evicted would
        not make the room: for `incoming` within the limits, or for `need` bytes on the disk.
        """
        # One eviction at a time in a process: two would lock each other's candidates and
        # take them for open blobs.
        with self._evict_lock:
            return self._evict(incoming, free_at_least, need, include_local)

    def _evict(self, incoming: int, free_at_least: int, need: int, include_local: bool) -> tuple[int, int]:
        self.flush_access()
        blobs = self.scan()
        usage = sum(b.size for b in blobs.values())
        pinned = self.pinned_paths()
        unpinned = [b for b in blobs.values() if not any(p in pinned for p in b.paths)]
        candidates = [b for b in unpinned if include_local or self._may_evict(b.paths[0])]
        evictable = sum(b.size for b in candidates)
        free = _free_bytes(self.root)
        if (incoming and not self._fits(usage - evictable, incoming, freed=evictable)) or evictable + free < need:
            local_only = len(unpinned) - len(candidates)
            raise StoreFull(
                f"the store {self.root} cannot make room for {max(incoming, need)} bytes: evicting all it may "
                f"would free {evictable} of {usage} bytes; the rest is pinned, or {local_only} blobs stored here "
                f"and never uploaded, kept as they may be the only copies (limits: "
                f"cache.max_size={self.limits.max_size}, cache.min_free_space={self.limits.min_free_space})"
            )
        freed = evicted = 0
        for blob in sorted(candidates, key=lambda b: b.atime):
            if freed >= free_at_least and self._fits(usage - freed, incoming):
                break
            if not _remove_unless_open(blob.paths):
                continue
            freed += blob.size
            evicted += 1
        with self._lock:
            self._usage, self._usage_at = usage - freed + incoming, time.monotonic()
        if not self._fits(usage - freed, incoming) and incoming:
            raise StoreFull(
                f"the store cannot make room for {incoming} bytes: everything left is pinned, open or never uploaded "
                f"(cache.max_size={self.limits.max_size}, cache.min_free_space={self.limits.min_free_space})"
            )
        return freed, evicted

    def _fits(self, usage: int, incoming: int, *, freed: int = 0) -> bool:
        """Whether `incoming` more bytes keep the store within its limits, at `usage` and with
        `freed` bytes more free on the disk than now (an eviction being weighed)."""
        if self.limits.max_size is not None and usage + incoming > self.limits.max_size:
            return False
        if self.limits.min_free_space:
            if _free_bytes(self.root) + freed - incoming < self.limits.min_free_space:
                return False
        return True

    def _may_evict(self, path: Path) -> bool:
        """Whether a blob may be evicted without `include_local`: a channel holds it (its note
        says so), or, in a bounded store, nothing is known of it (stored before notes were
        kept, as by the original kachery, or on a filesystem without user xattrs: the bound
        the user set then rules, as it always did)."""
        note = _note(path)
        if note is None:
            return self.limits.bounded
        return bool(note.get("remote"))


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _UTIME_NOW, _UTIME_OMIT = -100, (1 << 30) - 1, (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_NOW_OMIT = (_Timespec * 2)(_Timespec(0, _UTIME_NOW), _Timespec(0, _UTIME_OMIT))


def _touch_atime(path: str) -> None:
    """Set the atime to now and leave the mtime: one syscall (os.utime needs a stat first)."""
    _libc.utimensat(_AT_FDCWD, os.fsencode(path), _NOW_OMIT, 0)


def _note(path: Path) -> dict[str, object] | None:
    """A blob's note (see DIGESTS_XATTR), or None when it has none that can be read."""
    try:
        note = json.loads(os.getxattr(path, DIGESTS_XATTR))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def _free_bytes(root: Path) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def _remove_unless_open(paths: list[Path]) -> bool:
    """Unlink every name of a blob unless a reader holds it (shared flock); True if removed."""
    try:
        fd = os.open(paths[0], os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # open in the mount (or another reader): never evicted
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as err:
                raise store_error(err, "evicting a blob") from err
        return True
    finally:
        os.close(fd)


def _create(path: str) -> None:
    """Create an empty file; FileExistsError if there is one (whose permissions then do not matter)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))


def blob_path(root: Path, alg: str, digest: str) -> Path:
    """Where a blob lives under a store root: `<alg>/aa/bb/cc/<hash>`, as every kachery wrote it."""
    return Path(blob_file(str(root), alg, digest))


def blob_file(root: str, alg: str, digest: str) -> str:
    """`blob_path` as a string: it is on the path of every open, where pathlib cost ~10 µs."""
    digest = check_hash(alg, digest)
    return f"{root}/{alg}/{digest[0:2]}/{digest[2:4]}/{digest[4:6]}/{digest}"
