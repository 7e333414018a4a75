"""The filesystem view of hash URLs: what exists at each mount path, what it is, how to open it.

This is the one place that decides the mount's layout (DESIGN.md section 5):

    /sha1/<hash>[.<ext>]                   one blob (the suffix is ignored)
    /md5/<hash>[.<ext>]
    /sha1dir/<hash>[.<label>]/<sub/path>   a directory snapshot

It knows nothing of FUSE: it answers with `FileInfo` values, file descriptors and xattr
bytes, and raises `kacheryfs.errors`; the adapter in `kacheryfs.mount.fuse_ops` translates.
Anything that may touch the network runs in a worker thread and is waited for with a
deadline (`fetch_timeout`), so a slow channel costs a caller EIO, never a hang.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

from kacheryfs.errors import ChannelUnavailable, InvalidManifest, InvalidURL, IsADirectory, KacheryError, NotFound
from kacheryfs.manifest import DirNode, FileEntry
from kacheryfs.resolver import Resolver
from kacheryfs.staging import StagingArea
from kacheryfs.store import Usage
from kacheryfs.uri import HEX_LENGTH, KacheryURL, file_url, is_hash

T = TypeVar("T")
log = logging.getLogger(__name__)

BLOB_VIEWS = ("sha1", "md5")  # /<alg>/<hash>[.<ext>]
SNAPSHOT_VIEW = "sha1dir"  # /sha1dir/<hash>[.<label>]/<sub/path>
STAGING_VIEW = "staging"  # /staging/...: writable; files become blobs when closed
TOP_LEVEL = (*BLOB_VIEWS, SNAPSHOT_VIEW)  # the read-only views

XATTR_PREFIX = "user.kachery."
STATUS_XATTR = XATTR_PREFIX + "status"  # on the mount root: the daemon's counters as JSON
PID_XATTR = XATTR_PREFIX + "pid"  # on the mount root: the daemon's pid, cheap (readiness checks poll it)
_USAGE_MAX_AGE = 30.0  # seconds a status may report the store's size from an earlier count
_RECENT_ERRORS = 20
_LARGE_FILE = 8 << 20  # bytes from which an open blob is advised sequential
_BLOB_FDS = 256  # blobs whose descriptor is kept for reads (each also held from eviction)
_FD_GRACE = 1.0  # seconds a descriptor let go stays open for a reply still being sent from it
_FDS_RETIRED = 1024  # ... unless this many were let go since (64 FUSE threads: none still reads it)
_SIBLING_MAX = 1 << 20  # files below this size have their siblings read ahead ...
_SIBLING_FILES, _SIBLING_BYTES = 256, 32 << 20  # ... at most this many, this many bytes per directory
_WARM_THREADS = 8  # parallel reads ahead: the disk serves many random reads at once faster than one by one
_WARM_TASKS_MAX = 4 * _WARM_THREADS  # read-ahead tasks queued at most: four directories' worth
_NEXT_NAMES = 1024  # snapshot directories whose subdirectories' order is kept
_SNAPSHOT_INFOS = 100_000  # snapshot paths whose FileInfo is kept (a dict hit instead of a walk)
_SHA1_XATTR = XATTR_PREFIX + "sha1"


class KernelReads(Protocol):
    """The blobs whose files the kernel reads itself (`kacheryfs.mount.passthrough`), as the view sees them."""

    def __len__(self) -> int:
        """How many blobs are held."""
        ...

    def let_go_of_replaced(self, replaced: Callable[[Hashable, tuple[int, int]], bool]) -> int:
        """Let go of those whose file in the store `replaced(blob, (st_dev, st_ino))` says is another now."""
        ...


@dataclass(frozen=True)
class FileInfo:
    """What one path is: a directory, or a file whose bytes are the blob (alg, digest).

    `size` is the file's size; for a directory in a snapshot, the total size of the files
    below it. `url` is None for the root and the lookup-only view directories.
    """

    is_dir: bool
    size: int = 0
    url: KacheryURL | None = None
    alg: str = ""
    digest: str = ""
    sha1: str | None = None
    md5: str | None = None

    def xattrs(self) -> dict[str, bytes]:
        """The `user.kachery.*` attributes of this path (none for paths without a URL)."""
        if self.url is None:
            return {}
        # fsencode: a name that is not UTF-8 comes back as the bytes it is
        out = {XATTR_PREFIX + "url": os.fsencode(str(self.url)), XATTR_PREFIX + "size": str(self.size).encode()}
        if self.sha1:
            out[XATTR_PREFIX + "sha1"] = self.sha1.encode()
        if self.md5:
            out[XATTR_PREFIX + "md5"] = self.md5.encode()
        return out


_ROOT = FileInfo(is_dir=True)


def _file_info(
    alg: str, digest: str, size: int, name: str, sha1: str | None = None, md5: str | None = None
) -> FileInfo:
    return FileInfo(
        is_dir=False,
        size=size,
        url=file_url(alg, digest, name),
        alg=alg,
        digest=digest,
        sha1=sha1 if sha1 else (digest if alg == "sha1" else None),
        md5=md5 if md5 else (digest if alg == "md5" else None),
    )


def _check_size(info: FileInfo, actual: int | None) -> None:
    """InvalidManifest if a blob here (`actual` bytes; None: not here) is not the size its path
    shows: `ls` and `rsync` would believe one size and `cat` read another."""
    if actual is not None and actual != info.size:
        raise InvalidManifest(f"{info.url}: the manifest says {info.size} bytes, its blob has {actual}")


def _entry_info(entry: FileEntry, name: str) -> FileInfo:
    return _file_info(entry.alg, entry.digest, entry.size, name, entry.sha1, entry.md5)


def _dir_info(url: KacheryURL, node: DirNode) -> FileInfo:
    # The snapshot root's sha1 is its manifest's; a subdirectory has no manifest of its own.
    return FileInfo(is_dir=True, size=node.total_size(), url=url, sha1=None if url.path else url.hash)


def _warm_files(blobs: Iterator[str]) -> None:
    """Bring blobs' inodes and bytes into the page cache, taking the next from `blobs` until none
    is left (one not stored here is passed over).

    Several threads share one iterator, so the blobs are warmed in their order, several at a
    time; a pool task per blob cost more interpreter time than the read ahead saved.
    """
    for blob in blobs:
        try:
            fd = os.open(blob, os.O_RDONLY | os.O_NOATIME)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _in_page_cache(fd: int) -> bool:
    """Whether the first page of a (non-empty) file is in the page cache: asked, never read.

    A read with RWF_NOWAIT would answer too, but under writeback pressure it sometimes reads
    a cold page in all the same and then says "cached". cachestat(2) (Linux 6.5) is one
    syscall; mincore(2) on a one-page mapping, three, where there is no cachestat.
    """
    global _has_cachestat
    if _has_cachestat:
        stat = _CacheStat()
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_FIRST_PAGE), ctypes.byref(stat), 0) == 0:
            return stat.nr_cache > 0
        if ctypes.get_errno() != errno.ENOSYS:
            return False  # cannot tell: take it as cold
        _has_cachestat = False
    addr = _libc.mmap(None, _PAGE, _PROT_READ, _MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        return False
    try:
        resident = ctypes.c_ubyte()
        return _libc.mincore(ctypes.c_void_p(addr), _PAGE, ctypes.byref(resident)) == 0 and bool(resident.value & 1)
    finally:
        _libc.munmap(ctypes.c_void_p(addr), _PAGE)


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recent")]


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_SYS_CACHESTAT = 451  # the same number on every architecture (a syscall added after 5.x's unification)
_has_cachestat = True
_PAGE = os.sysconf("SC_PAGE_SIZE")
_FIRST_PAGE = _CacheStatRange(0, 1)  # read-only to the kernel: shared by every thread
_PROT_READ, _MAP_SHARED, _MAP_FAILED = 1, 1, ctypes.c_void_p(-1).value


def split_path(path: str) -> list[str]:
    """'/sha1dir/H.x/a/b' → ['sha1dir', 'H.x', 'a', 'b']."""
    return [p for p in path.split("/") if p]


def parse_blob_name(alg: str, name: str) -> str:
    """The digest in a blob view's file name `<hash>[.<ext>]`; InvalidURL when malformed."""
    digest, suffix = name[: HEX_LENGTH[alg]], name[HEX_LENGTH[alg] :]
    if not is_hash(alg, digest) or (suffix and not suffix.startswith(".")):
        raise InvalidURL(f"{name!r} is not <{alg} hash>[.<ext>]")
    return digest.lower()


def parse_snapshot_name(name: str, subpath: str = "") -> KacheryURL:
    """The URL of `<hash>[.<label>]` (plus a sub-path) under the snapshot view."""
    digest, dot, label = name.partition(".")
    if not is_hash("sha1", digest):
        raise InvalidURL(f"{name!r} is not <sha1 hash>[.<label>]")
    return KacheryURL("sha1", digest.lower(), True, label if dot else None, subpath)


class FileSystemView:
    """The read-only hash views over one Resolver (local store plus channels).

    The staging area, when there is one, is listed at the top as a directory (the mount
    serves it on a connection of its own) and reported by `status()`.
    """

    def __init__(self, resolver: Resolver, *, fetch_timeout: float = 30.0, staging: StagingArea | None = None) -> None:
        self.resolver = resolver
        self.fetch_timeout = fetch_timeout
        self.staging = staging
        self.top_level = TOP_LEVEL + ((STAGING_VIEW,) if staging is not None else ())
        self._started = time.time()
        self._blob_fds: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._blob_fds_lock = threading.Lock()
        self._blob_keys: dict[str, tuple[str, str]] = {}  # path → the blob it names (forever)
        self._blob_sizes: dict[tuple[str, str], int] = {}  # blob → its size, once opened
        self._retired_fds: collections.deque[tuple[float, int]] = collections.deque()
        self.ready = threading.Event()  # set once the whole mount answers (staging included)
        self._warmed: dict[str, bool] = {}  # snapshot directories read ahead → whether none was opened yet
        self._warm_lock = threading.Lock()  # for the two below and _warmed's changes
        self._warm_tasks = 0  # read-ahead tasks queued or running
        self._warm_pool: ThreadPoolExecutor | None = None
        self._next_names: dict[str, dict[str, str]] = {}  # snapshot directory → its subdirectories' successors
        self._snapshot_infos: dict[str, FileInfo] = {}
        self._usage: Usage | None = None
        self._usage_at = -_USAGE_MAX_AGE
        self._counting = False
        self._usage_lock = threading.Lock()
        self.recent_errors: collections.deque[str] = collections.deque(maxlen=_RECENT_ERRORS)
        # Set by the mount when the kernel reads blobs' files itself (passthrough).
        self.kernel_reads: KernelReads | None = None
        self.daemon_reads_why = ""  # otherwise, why not
        # The signal the daemon takes as "let go of held blobs replaced in the store" (see
        # let_go_of_replaced_blobs), shown in the status for `kacheryfs fsck`; None: no such signal.
        self.recheck_signal: str | None = None
        self.staging_shared = False  # set by a mount serving staging on the hash views' connection
        self.idle_poll_status: Callable[[], dict[str, object]] | None = None  # set by the daemon (idle_poll)

    # -- what is at a path -----------------------------------------------------------
    def stat(self, path: str) -> FileInfo:
        """The FileInfo at `path` in a hash view; NotFound (or InvalidURL for a malformed name) otherwise."""
        parts = split_path(path)
        if len(parts) <= 1:
            if not parts or parts[0] in self.top_level:
                return _ROOT  # staging included: the directory its own mount covers
            raise NotFound(f"no {parts[0]!r} at the top of the mount (there are {', '.join(self.top_level)})")
        view, name, rest = parts[0], parts[1], parts[2:]
        if view in BLOB_VIEWS:
            if rest:
                raise NotFound(f"{path}: a blob is a file, it has no entries")
            return self._blob(view, name)
        if view == SNAPSHOT_VIEW:
            info = self._snapshot_infos.get(path)
            if info is None:
                url = parse_snapshot_name(name, "/".join(rest))
                found = self._manifest(url).resolve(url.path)
                info = _entry_info(found, rest[-1]) if isinstance(found, FileEntry) else _dir_info(url, found)
                if len(self._snapshot_infos) >= _SNAPSHOT_INFOS:
                    self._snapshot_infos.clear()
                self._snapshot_infos[path] = info  # a snapshot path means the same thing forever
            return info
        raise NotFound(f"no {view!r} at the top of the mount (there are {', '.join(self.top_level)})")

    def readdir(self, path: str) -> list[tuple[str, FileInfo]]:
        """The entries of a directory with their FileInfo (the view directories list nothing)."""
        parts = split_path(path)
        if not parts:
            return [(name, _ROOT) for name in self.top_level]
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            return []  # lookup-only, so `find` and `updatedb` never crawl a store
        info = self.stat(path)
        if not info.is_dir or info.url is None:
            raise NotFound(f"{path} is not a directory")
        node = self._manifest(info.url).resolve_dir(info.url.path)
        entries = [(name, _entry_info(entry, name)) for name, entry in node.files.items()]
        entries += [(name, _dir_info(info.url.child(name), sub)) for name, sub in node.dirs.items()]
        return entries

    def blob_of(self, path: str) -> tuple[str, str]:
        """(alg, digest) of the blob behind a file's path (a dict hit after the first time).

        InvalidManifest if the blob is here and its size is not the one this path shows (an
        open of it may reuse a descriptor opened under another name, unchecked).
        """
        key = self._blob_keys.get(path)
        if key is None:
            info = self.stat(path)
            if info.is_dir:
                raise IsADirectory(f"{path} is a directory")
            key = (info.alg, info.digest)
            size = self._blob_sizes.get(key)
            if size is None and (size := self.resolver.store.size(*key)) is not None:
                self._known_size(key, size)  # the open that follows need not ask again
            _check_size(info, size)
            if len(self._blob_keys) >= _SNAPSHOT_INFOS:
                self._blob_keys.clear()
            self._blob_keys[path] = key
        return key

    def _known_size(self, key: tuple[str, str], size: int) -> int:
        """Remember the size of a blob here (a blob's size never changes), for the checks of its names."""
        if len(self._blob_sizes) >= _SNAPSHOT_INFOS:
            self._blob_sizes.clear()
        self._blob_sizes[key] = size
        return size

    def open(self, path: str) -> int:
        """A new read-only descriptor on the blob behind `path`, fetched and verified first if needed.

        Its shared lock keeps the blob from eviction until it is closed. Opens of small files
        in a snapshot read the files around them ahead (`_read_ahead_around`).
        """
        info = self.stat(path)
        if info.is_dir:
            raise IsADirectory(f"{path} is a directory")
        store = self.resolver.store
        try:
            fd = store.open_fd(info.alg, info.digest)
            self.resolver.stats.hits += 1
        except NotFound:
            self._bounded(str(info.url), self.resolver.ensure, info.alg, info.digest, info.size)
            fd = store.open_fd(info.alg, info.digest)
        key = (info.alg, info.digest)
        try:
            known = self._blob_sizes.get(key)
            _check_size(info, self._known_size(key, os.fstat(fd).st_size) if known is None else known)
        except InvalidManifest:
            os.close(fd)
            raise
        if 0 < info.size < _SIBLING_MAX:
            try:
                self._read_ahead_around(path, fd)
            except Exception:  # a read ahead is a hint: it never fails an open, nor leaks its fd
                log.debug("read-ahead around %s", path, exc_info=True)
        if info.size >= _LARGE_FILE:
            # FUSE sends reads from several threads at once, slightly out of order, which halves
            # the disk's own readahead; the file is read front to back, so say so.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def blob_fd(self, path: str) -> int:
        """The descriptor the daemon's reads of `path` are served from: one per blob, kept while it is read.

        Without passthrough the mount never hears of opens and closes (FUSE's no-open mode),
        so descriptors are kept for the last _BLOB_FDS blobs read; the lock each holds keeps
        those from eviction. A descriptor let go is closed only after _FD_GRACE seconds or
        _FDS_RETIRED later let-gos: libfuse may still be reading from it for a reply on
        another thread, and its number must not be reused meanwhile.
        """
        key = self.blob_of(path)
        fd = self._kept_fd(key)  # a read of a blob already open (under any name): no stat of the store
        if fd is not None:
            return fd
        fd = self.open(path)  # outside the lock: it may wait for a download
        with self._blob_fds_lock:
            known = self._blob_fds.get(key)
            if known is not None:  # another thread opened it meanwhile
                self._retired_fds.append((time.monotonic(), fd))
                return known
            self._blob_fds[key] = fd
            if len(self._blob_fds) > _BLOB_FDS:
                self._retired_fds.append((time.monotonic(), self._blob_fds.popitem(last=False)[1]))
            self._close_retired(time.monotonic() - _FD_GRACE)
        return fd

    def _kept_fd(self, key: tuple[str, str]) -> int | None:
        with self._blob_fds_lock:
            fd = self._blob_fds.get(key)
            if fd is not None:
                self._blob_fds.move_to_end(key)
            return fd

    def _read_ahead_around(self, path: str, fd: int) -> None:
        """At the first open of a small file in a snapshot directory, read the small files of
        that directory and of the next one ahead, in parallel, from the local store (never from
        a channel).

        Programs that read one small file of a directory mostly read the others next, and then
        the next directory's (`cp -r`, `tar`, a loop over a dataset). Each file costs a few
        random disk reads in the store's fan-out, which in parallel overlap; reaching a
        directory read ahead starts on the one after it, so the disk stays one directory
        ahead of the program. From a warm store (`fd` in the page cache) nothing is read
        ahead: there it would only cost each file its first open's time again.
        """
        parent = path.rpartition("/")[0]
        state = self._warmed.get(parent)
        if state is False or (state is None and _in_page_cache(fd)):
            return  # the common case, without the lock: reached before, or a warm store
        with self._warm_lock:
            state = self._warmed.get(parent)
            if state is False:
                return
            self._mark_read_ahead(parent, reached=True)
        if state is None:  # the first open here: this directory's files, then the next one's
            self._read_dir_ahead(parent)
        following = self._next_dir(parent)
        if following is not None:
            with self._warm_lock:
                if following in self._warmed:
                    return
                self._mark_read_ahead(following, reached=False)
            self._read_dir_ahead(following)

    def _mark_read_ahead(self, directory: str, *, reached: bool) -> None:
        """Remember a directory as read ahead (under `_warm_lock`); `reached`: one of its files was opened."""
        if len(self._warmed) >= _SNAPSHOT_INFOS:
            self._warmed.clear()
        self._warmed[directory] = not reached

    def _read_dir_ahead(self, directory: str) -> None:
        """Queue the small files of a snapshot directory to be read ahead, a few tasks sharing them.

        Nothing is queued while the tasks already queued are a few directories' worth: a
        program that opens one file per directory faster than the disk serves them must not
        grow the queue without bound.
        """
        node = self._snapshot_dir(directory)
        if node is None:
            return
        store, budget, blobs = self.resolver.store, _SIBLING_BYTES, []
        for entry in node.files.values():
            if entry.size >= _SIBLING_MAX:
                continue
            budget -= entry.size
            if budget < 0 or len(blobs) == _SIBLING_FILES:
                break
            blobs.append(store.blob_file(entry.alg, entry.digest))
        tasks = min(_WARM_THREADS, len(blobs))
        with self._warm_lock:
            if self._warm_tasks + tasks > _WARM_TASKS_MAX:
                return
            self._warm_tasks += tasks
        shared = iter(blobs)  # a list iterator's next() is one step under the GIL: safe to share
        pool = self._warmer()
        for _ in range(tasks):
            pool.submit(self._warm, shared)

    def _warm(self, blobs: Iterator[str]) -> None:
        try:
            _warm_files(blobs)
        finally:
            with self._warm_lock:
                self._warm_tasks -= 1

    def _snapshot_dir(self, path: str) -> DirNode | None:
        """The snapshot directory at `path`, from a manifest this machine has; None for anything
        else (a wrong path, or a manifest that only a channel has: a read ahead never waits for one)."""
        parts = split_path(path)
        if len(parts) < 2 or parts[0] != SNAPSHOT_VIEW:
            return None
        try:
            url = parse_snapshot_name(parts[1], "/".join(parts[2:]))
            manifest = self._local_manifest(url)
            return None if manifest is None else manifest.resolve_dir(url.path)
        except (KacheryError, OSError):
            return None  # the open itself reports what is wrong

    def _next_dir(self, path: str) -> str | None:
        """The directory listed after `path` in its parent, in a snapshot; None if it is the last."""
        parent, _, name = path.rpartition("/")
        following = self._next_names.get(parent)
        if following is None:
            node = self._snapshot_dir(parent)
            if node is None:
                return None
            names = list(node.dirs)
            following = dict(zip(names, names[1:], strict=False))  # once per parent: it may have 100,000
            if len(self._next_names) >= _NEXT_NAMES:
                self._next_names.clear()
            self._next_names[parent] = following
        name = following.get(name)
        return None if name is None else f"{parent}/{name}"

    def _warmer(self) -> ThreadPoolExecutor:
        with self._blob_fds_lock:
            if self._warm_pool is None:
                self._warm_pool = ThreadPoolExecutor(_WARM_THREADS, thread_name_prefix="kacheryfs-warm")
            return self._warm_pool

    def let_go_of_replaced_blobs(self) -> int:
        """Let go of the blobs held (kept descriptors, backing files) whose file in the store is no
        longer the one held, as after `kacheryfs fsck --repair` moved it to quarantine: their next
        read opens the store's file anew, or fetches it again. How many.

        Without passthrough, pages the kernel read from such a blob stay in its cache until dropped.
        """
        store = self.resolver.store

        def replaced(key: Hashable, file: tuple[int, int]) -> bool:
            alg, digest = cast(tuple[str, str], key)
            try:
                st = os.stat(store.blob_path(alg, digest))
            except OSError:
                return True
            return (st.st_dev, st.st_ino) != file

        with self._blob_fds_lock:
            gone = [(key, fd) for key, fd in self._blob_fds.items() if replaced(key, _file_of(fd))]
            for key, fd in gone:
                del self._blob_fds[key]
                self._retired_fds.append((time.monotonic(), fd))  # a read may still be using it
        kernel = self.kernel_reads
        return len(gone) + (kernel.let_go_of_replaced(replaced) if kernel is not None else 0)

    def close_blob_fds(self) -> None:
        """Close every kept descriptor (the mount is gone: no read can still use them)."""
        if self._warm_pool is not None:
            self._warm_pool.shutdown(wait=False, cancel_futures=True)
        with self._blob_fds_lock:
            self._retired_fds.extend((0.0, fd) for fd in self._blob_fds.values())
            self._blob_fds.clear()
            self._close_retired(float("inf"))

    def _close_retired(self, before: float) -> None:
        while self._retired_fds and (self._retired_fds[0][0] <= before or len(self._retired_fds) > _FDS_RETIRED):
            os.close(self._retired_fds.popleft()[1])

    def release(self, fd: int) -> None:
        """Close a descriptor from `open`."""
        os.close(fd)

    def getxattr(self, path: str, name: str) -> bytes:
        """One `user.kachery.*` attribute; NotFound when this path does not have it."""
        if not split_path(path) and name in (STATUS_XATTR, PID_XATTR):
            if name == PID_XATTR and not self.ready.is_set():
                raise NotFound("the mount is not ready yet")  # readiness checks poll the pid
            return (json.dumps(self.status()) if name == STATUS_XATTR else str(os.getpid())).encode()
        info = self.stat(path)
        if name == _SHA1_XATTR and self._sha1_unknown(info):
            store = self.resolver.store
            try:
                noted = store.noted_digests(info.alg, info.digest)
                info = dataclasses.replace(info, sha1=(noted or store.digests(info.alg, info.digest)).sha1)
            except NotFound:
                pass  # not fetched yet: its sha1 is known once it is
        try:
            return info.xattrs()[name]
        except KeyError:
            raise NotFound(f"{path} has no attribute {name}") from None

    def listxattr(self, path: str) -> list[str]:
        info = self.stat(path)
        names = list(info.xattrs())
        if self._sha1_unknown(info) and self.resolver.store.has(info.alg, info.digest):
            names.append(_SHA1_XATTR)
        return names + [STATUS_XATTR, PID_XATTR] if not split_path(path) else names

    @staticmethod
    def _sha1_unknown(info: FileInfo) -> bool:
        """A file named by its md5: its sha1 (every file has `user.kachery.sha1`) comes from the
        note stored with the blob, or by hashing it once (noted then), when it is asked for."""
        return not info.is_dir and info.alg == "md5" and not info.sha1

    def record_error(self, message: str) -> None:
        """Keep the reason of a failed operation for `kacheryfs status`."""
        self.recent_errors.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}")

    def status(self) -> dict[str, object]:
        """What the daemon is doing, for `kacheryfs status`."""
        store = self.resolver.store
        usage = self._store_usage()
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self._started, 1),
            "storage_dir": str(store.root),
            "cache_blobs": usage.blobs if usage else None,  # None: still being counted
            "cache_bytes": usage.total_bytes if usage else None,
            "cache_max_bytes": store.cache.limits.max_size,
            "channels": [c.name for c in self.resolver.channels],
            # blobs being read: kept descriptors, or backing files the kernel reads itself
            "blobs_held": len(self._blob_fds if self.kernel_reads is None else self.kernel_reads),
            "reads": "daemon" if self.kernel_reads is None else "kernel (passthrough)",
            "reads_why": self.daemon_reads_why if self.kernel_reads is None else "",
            "fetch_timeout_s": self.fetch_timeout,
            "recheck_signal": self.recheck_signal,
            **self.resolver.status(),
            "recent_errors": list(self.recent_errors),
            "staging": self.staging.status() if self.staging is not None else None,
            "staging_shared": self.staging_shared,
            "idle_poll": self.idle_poll_status() if self.idle_poll_status is not None else None,
        }

    def _store_usage(self) -> Usage | None:
        """The store's size from a count at most _USAGE_MAX_AGE old; a new count runs in the
        background (walking a large store takes seconds: a status must not)."""
        with self._usage_lock:
            fresh = time.monotonic() - self._usage_at < _USAGE_MAX_AGE
            if not fresh and not self._counting:
                self._counting = True
                threading.Thread(target=self._count_usage, name="kacheryfs-du", daemon=True).start()
            return self._usage

    def _count_usage(self) -> None:
        try:
            usage = self.resolver.store.cache.usage()
        finally:
            with self._usage_lock:
                self._counting = False
        with self._usage_lock:
            self._usage, self._usage_at = usage, time.monotonic()

    # -- store and channel access, bounded ---------------------------------------------
    def _blob(self, alg: str, name: str) -> FileInfo:
        digest = parse_blob_name(alg, name)
        size = self.resolver.store.size(alg, digest)
        if size is None:
            # Only the size is needed now; the bytes are fetched on open.
            found = self._bounded(f"{alg}://{digest}", self.resolver.find, alg, digest)
            if found is None:
                raise NotFound(f"{alg}://{digest} is in no store or channel")
            size = found[1]
        return _file_info(alg, digest, size, name)

    def _manifest(self, url: KacheryURL) -> DirNode:
        manifest = self._local_manifest(url)
        if manifest is not None:
            return manifest
        return self._bounded(str(url), self.resolver.manifest, url.alg, url.hash)

    def _local_manifest(self, url: KacheryURL) -> DirNode | None:
        """The snapshot's manifest if this machine has it (parsed once); None if a channel must be asked."""
        cached = self.resolver.cached_manifest(url.alg, url.hash)
        if cached is not None:
            return cached
        if self.resolver.store.has(url.alg, url.hash):
            return self.resolver.manifest(url.alg, url.hash)  # local: no deadline needed
        return None

    def _bounded(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in its own thread, waited for at most fetch_timeout.

        A daemon thread, not a pool: a fetch stuck on a silent channel must not keep the
        process alive after the unmount (its temp file is removed by the next store).
        Concurrency is bounded by FUSE's own thread count.
        """
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # handed to the waiting caller
                future.set_exception(err)

        threading.Thread(target=run, name="kacheryfs-fetch", daemon=True).start()
        try:
            return future.result(timeout=self.fetch_timeout)
        except FutureTimeout:
            error = ChannelUnavailable(
                f"{what}: no answer from the channels within {self.fetch_timeout:g} s (fetch_timeout); "
                "a fetch under way goes on in the background"
            )

        # The caller gets EIO now. The resolver counts most failures of the background itself;
        # whatever it did not count (an answer after all, nothing found, a failure of another
        # kind), the failure the caller saw is counted once it ends.
        def count_unless_counted(done: Future[T]) -> None:
            if not getattr(done.exception(), "counted", False):
                self.resolver.failed(error)

        future.add_done_callback(count_unless_counted)
        raise error


def _file_of(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of the file a descriptor is open on."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


__all__ = ["BLOB_VIEWS", "PID_XATTR", "SNAPSHOT_VIEW", "STATUS_XATTR", "TOP_LEVEL", "FileInfo", "FileSystemView"]
