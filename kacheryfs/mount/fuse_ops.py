"""The FUSE operations: translate kernel requests into `FileSystemView` and `StagingArea` calls, and back.

A daemon running as root mounts two FUSE connections: the read-only hash views at `<mnt>`
(`HashViewOperations`, told that nothing there needs an open, so the kernel answers opens
and closes itself) and the writable staging area mounted on `<mnt>/staging`
(`StagingOperations`, which needs every open and close). A user's daemon cannot mount the
second inside the first, and serves both on one (`SharedOperations`). Thin on purpose:
what exists and what it holds is decided in `kacheryfs.vfs` and `kacheryfs.staging`. This
module only speaks FUSE — stat dicts, file handles, errno — and sets the kernel cache up
for immutable content. Every kacheryfs error becomes its `errno`; any other exception is
logged with its traceback and becomes EIO (never mfusepy's default EINVAL, which hides bugs
as "Invalid argument").
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import mfusepy

from kacheryfs.errors import InvalidURL, KacheryError, NotFound
from kacheryfs.mount.idle_poll import POLLING
from kacheryfs.mount.passthrough import KEPT_BYTES, Passthrough, Unavailable, may_register_backing_files
from kacheryfs.mount.session import (
    FLUSH_SLOT,
    KNOWN_VERSIONS,
    OPEN_SLOT,
    OPENDIR_SLOT,
    RELEASE_SLOT,
    Session,
    pin_thread_state,
)
from kacheryfs.staging import StagingArea
from kacheryfs.vfs import STAGING_VIEW, XATTR_PREFIX, FileInfo, FileSystemView

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


# Reads of ~1 MiB (the measured difference between 1.1 and 1.8+ GB/s), just under 1 MiB: libfuse
# splices a reply only when the reply plus three pages fits a pipe, and a pipe grows past
# /proc/sys/fs/pipe-max-size (1 MiB) only with CAP_SYS_RESOURCE; a 1 MiB read then falls back
# to pread + writev. 252 pages fit: a blob in the page cache reads ~25 % faster (median
# 2.6 vs 2.1 GB/s here).
MAX_READ = 1008 << 10
BLOCK_SIZE = 1 << 20  # st_blksize: tells cp, cat and stdio to read in large blocks
DIR_SIZE = 4096  # what ext4 reports, so `du` of a snapshot matches its copy
# Content has no time; a fixed one keeps rsync and make stable. 2019-01-01, kachery's birth year.
FIXED_TIME_NS = 1546300800 * 10**9

_XATTR_PREFIX = XATTR_PREFIX.encode()  # every attribute the mount has starts with it
_FUSE_READDIR_PLUS = 1  # fuse_readdir_flags: the kernel wants attributes with the entries
_FUSE_FILL_DIR_PLUS = 2  # fuse_fill_dir_flags: these attributes are complete
_FUSE_CAP_SPLICE_WRITE, _FUSE_CAP_SPLICE_MOVE = 1 << 7, 1 << 8  # libfuse's conn.want bits
_LISTINGS_KEPT = 256  # snapshot directory listings kept by the hash views, ready for the filler
_Entry = tuple[bytes, Any, int]  # a listing's entry as the filler takes it: name, packed stat or None, fill flags


def _translated(method: F) -> F:
    """Turn the view's errors into errno for the kernel, logging each with its path and reason."""

    @functools.wraps(method)
    def wrapper(self: _Operations, path: str, *args: Any) -> Any:
        try:
            return method(self, path, *args)
        except (NotFound, InvalidURL) as err:
            # A malformed name is simply a name that does not exist: ENOENT, no network touched.
            _log_failure(logging.INFO, f"{method.__name__} {path}: {err}")
            raise mfusepy.FuseOSError(err.errno) from err
        except KacheryError as err:
            _log_failure(logging.WARNING, f"{method.__name__} {path}: {err}")
            self.view.record_error(f"{method.__name__} {path}: {err}")
            raise mfusepy.FuseOSError(err.errno) from err
        except mfusepy.FuseOSError:
            raise
        except OSError as err:
            # The store's own file failed (disk error, blob removed under us): pass its errno on.
            _log_failure(logging.WARNING, f"{method.__name__} {path}: {err}")
            self.view.record_error(f"{method.__name__} {path}: {err}")
            raise mfusepy.FuseOSError(err.errno or errno.EIO) from err
        except Exception as err:
            log.exception("%s %s: unexpected error", method.__name__, path)
            self.view.record_error(f"{method.__name__} {path}: unexpected {type(err).__name__}: {err}")
            raise mfusepy.FuseOSError(errno.EIO) from err

    return wrapper  # type: ignore[return-value]


def _log_failure(level: int, message: str) -> None:
    """Log a failed request, once a _QUIET_FOR for the same path and reason (debug in between).

    A program that retries a path in a loop, or probes names that do not exist, would
    otherwise write a line per try to the daemon's log.
    """
    now = time.monotonic()
    with _logged_lock:
        last = _logged.get(message)
        quiet = last is not None and now - last < _QUIET_FOR
        if not quiet:
            _logged[message] = now
            _logged.move_to_end(message)
            if len(_logged) > _LOGGED_KEPT:
                _logged.popitem(last=False)
    log.log(logging.DEBUG if quiet else level, "%s", message)


_QUIET_FOR = 60.0  # seconds
_LOGGED_KEPT = 1024  # failures remembered, the last logged first to go
_logged: collections.OrderedDict[str, float] = collections.OrderedDict()
_logged_lock = threading.Lock()


# What any filesystem answers in ordinary use (mkdir -p, rmdir of a full directory, a lookup
# before a create): passed on as it is, not logged as a failure nor kept for `kacheryfs status`.
_ORDINARY_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR,
                              errno.EACCES, errno.EPERM, errno.EXDEV, errno.ENAMETOOLONG, errno.EINVAL})  # fmt: skip


def _staged(method: F) -> F:
    """`_translated`, with the ordinary refusals of a staging call logged at debug level only."""

    @functools.wraps(method)
    def wrapper(self: _Operations, path: str, *args: Any) -> Any:
        try:
            return method(self, path, *args)
        except mfusepy.FuseOSError:
            raise
        except OSError as err:
            if err.errno not in _ORDINARY_ERRNOS:
                raise  # disk full, I/O error: logged and reported by _translated
            log.debug("%s %s: %s", method.__name__, path, err)
            raise mfusepy.FuseOSError(err.errno) from err

    return _translated(wrapper)  # type: ignore[return-value]


class _Operations(mfusepy.Operations):
    """What both connections share: kernel cache timeouts, reads of ~1 MiB (MAX_READ), nanosecond times."""

    use_ns = True  # timestamps in nanoseconds (mfusepy's future default)

    def __init__(
        self,
        view: FileSystemView,
        *,
        entry_timeout: float = 86400.0,
        attr_timeout: float = 86400.0,
        negative_timeout: float = 5.0,
        on_init: Callable[[], None] | None = None,
    ) -> None:
        self.view = view  # also where failures are kept for `kacheryfs status`
        self.entry_timeout, self.attr_timeout, self.negative_timeout = entry_timeout, attr_timeout, negative_timeout
        self._on_init = on_init

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if config_3 is not None:
            config_3.entry_timeout = self.entry_timeout
            config_3.attr_timeout = self.attr_timeout
            config_3.negative_timeout = self.negative_timeout
        if conn_info is not None:
            conn_info.max_read = MAX_READ  # must match -o max_read, or libfuse3 refuses the mount
            # Reads answered from a descriptor (read_buf) are spliced into the reply, not copied
            # through a buffer (see MAX_READ for the size that allows it).
            conn_info.want |= conn_info.capable & (_FUSE_CAP_SPLICE_WRITE | _FUSE_CAP_SPLICE_MOVE)
        if self._on_init is not None:
            self._on_init()


class HashViewOperations(_Operations):
    """The read-only hash views (mount with `raw_fi=True`, read-only, under `HashViewFUSE`).

    Nothing here ever changes. Where the kernel can read a blob's file itself (passthrough,
    `kacheryfs.mount.passthrough`), each open names the store's file and no read ever comes
    here. Elsewhere the kernel is told to stop asking: the first open answers ENOSYS, which
    the kernel takes as "this filesystem needs no open" — from then on opens, closes and
    their flushes cost no request at all and the page cache is kept across opens (FUSE's
    no-open mode). Reads then come without a handle: the view keeps one descriptor per blob
    being read (`FileSystemView.blob_fd`).
    """

    def __init__(self, view: FileSystemView, *, use_passthrough: bool = True, **kwargs: Any) -> None:
        super().__init__(view, **kwargs)
        self._uid, self._gid = os.getuid(), os.getgid()
        self.passthrough: Passthrough | None = None  # set at INIT when the session allows it
        self._backing_files: Passthrough | None = None  # the same, never unset: it lets go of files opened
        why = _why_no_passthrough(use_passthrough)
        if why is not None:
            self.no_passthrough(why)

    def use_passthrough(self, kernel: Passthrough) -> None:
        """Open files through `kernel` from now on (at INIT, once its hook is installed)."""
        self.passthrough = self._backing_files = self.view.kernel_reads = kernel

    @property
    def wants_passthrough(self) -> bool:
        """Whether kernel passthrough may still be had (nothing has ruled it out yet)."""
        return not self.view.daemon_reads_why

    def no_passthrough(self, why: str) -> None:
        """Go without kernel passthrough, for the reason given (kept for `kacheryfs status`)."""
        self.passthrough = self.view.kernel_reads = None
        self.view.daemon_reads_why = why
        log.info("kernel passthrough off (%s): reads are served by the daemon", why)

    def attrs(self, info: FileInfo) -> dict[str, int]:
        """The stat fields of one path: read-only modes, fixed times, blocks that make `du` right."""
        if info.is_dir:
            mode, size, nlink = stat.S_IFDIR | 0o555, DIR_SIZE, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o444, info.size, 1
        return {
            "st_mode": mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_blksize": BLOCK_SIZE,
            "st_uid": self._uid,
            "st_gid": self._gid,
            "st_atime": FIXED_TIME_NS,
            "st_mtime": FIXED_TIME_NS,
            "st_ctime": FIXED_TIME_NS,
        }

    @_translated
    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        return self.attrs(self.view.stat(path))

    @_translated
    def fill_stat(self, path: str, st: Any) -> None:
        """`getattr` written straight into libfuse's struct stat (every first lookup of a file comes here).

        The same fields as `attrs` gives, from a struct made once per kind: a lookup costs
        one copy and two stores instead of a dict and a setattr per field.
        """
        info = self.view.stat(path)
        if info.is_dir:
            ctypes.memmove(ctypes.addressof(st), self._packed_dir, _STAT_SIZE)
        else:
            ctypes.memmove(ctypes.addressof(st), self._packed_file, _STAT_SIZE)
            st.st_size, st.st_blocks = info.size, (info.size + 511) // 512

    @functools.cached_property
    def _packed_dir(self) -> bytes:
        """Every directory's struct stat."""
        return _packed_stat(self.attrs(FileInfo(is_dir=True)))

    @functools.cached_property
    def _packed_file(self) -> bytes:
        """Every file's struct stat, but its size and blocks."""
        return _packed_stat(self.attrs(FileInfo(is_dir=False)))

    @_translated
    def readdir(self, path: str, fh: int) -> list[Any]:
        return [".", "..", *((name, self.attrs(info), 0) for name, info in self.view.readdir(path))]

    @_translated
    def open(self, path: str, fi: Any) -> int:
        if not _read_only(fi.flags):
            raise mfusepy.FuseOSError(errno.EROFS)  # content-addressed files cannot change
        kernel = self.passthrough
        if kernel is not None:
            try:
                # No keep_cache: the kernel refuses passthrough with any open flag but a few.
                fi.fh = kernel.open(self.view.blob_of(path), lambda: self.view.open(path))
                return 0
            except Unavailable as err:
                self.no_passthrough(str(err))
        # The first open of a mount without passthrough lands here: fetch (so its errors show at
        # open, as they would anywhere), then ENOSYS, which the kernel takes as success plus
        # "never again".
        self.view.blob_fd(path)
        raise mfusepy.FuseOSError(errno.ENOSYS)

    def release(self, path: str, fi: Any) -> int:
        # Releases come from the kernel to `HashViewFUSE`'s low-level release; libfuse calls this
        # one itself when the reply to a first open fails (the open was interrupted).
        if self._backing_files is not None:
            self._backing_files.release(fi.fh)  # a handle it does not know is nothing to it
        return 0

    @_translated
    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fi: Any) -> int:
        # No bytes pass through Python: libfuse reads them from the blob's own descriptor
        # straight into its reply.
        _point_at_fd(bufpp, self.view.blob_fd(path), size, offset)
        return 0

    def flush(self, path: str, fi: Any) -> int:
        # ENOSYS once, and the kernel stops sending a FLUSH at every close(): blobs have nothing to flush.
        raise mfusepy.FuseOSError(errno.ENOSYS)

    @_translated
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        try:
            return self.view.getxattr(path, name)
        except NotFound:
            # ENODATA, "no such attribute". Never ENOSYS: libfuse would stop asking for any xattr.
            raise mfusepy.FuseOSError(errno.ENODATA) from None

    @_translated
    def listxattr(self, path: str) -> list[str]:
        return self.view.listxattr(path)

    @_translated
    def statfs(self, path: str) -> dict[str, int]:
        return _statfs(self.view.resolver.store.root)  # the disk that holds the store


_STAT_SIZE = ctypes.sizeof(mfusepy.c_stat)


def _packed_stat(attrs: dict[str, int]) -> bytes:
    """A struct stat holding `attrs`, as bytes."""
    st = mfusepy.c_stat()
    mfusepy.set_st_attrs(st, attrs, use_ns=True)
    return bytes(st)


def _why_no_passthrough(wanted: bool) -> str | None:
    """Why this daemon cannot ask for kernel passthrough; None if it may."""
    if not wanted:
        return "[mount] passthrough = false"
    version = mfusepy._libfuse.fuse_version()
    if version not in KNOWN_VERSIONS:
        return f"libfuse {version // 100}.{version % 100} is not one whose session this daemon knows"
    if not may_register_backing_files():
        return "the daemon needs CAP_SYS_ADMIN: run it as root"
    return None


def _read_only(flags: int) -> bool:
    """Whether an open asks for reading only (anything else is EROFS on the hash views)."""
    return flags & os.O_ACCMODE == os.O_RDONLY


def _writes_only(flags: int) -> bool:
    """Whether the kernel may skip its page cache for this handle: written through, never read back.

    A write-only open (cp, rsync, tar x) then costs no copy into pages of the mount's own
    cache, which the bytes would only pass through on their way to the staged file. Handles
    that may read or mmap keep the cache.
    """
    return flags & os.O_ACCMODE == os.O_WRONLY


class StagingOperations(_Operations):
    """The writable staging area, mounted on its own at `<mnt>/staging` (under `StagingFUSE`).

    Its own connection because it needs what the hash views turn off: every open, flush and
    release (a file is ingested when its writer closes it).
    """

    def __init__(self, view: FileSystemView, **kwargs: Any) -> None:
        super().__init__(view, **kwargs)
        if view.staging is None:
            raise ValueError("StagingOperations needs a view with a staging area")
        self.staging: StagingArea = view.staging

    @_staged  # a name too long (ENAMETOOLONG) is the caller's business, as ENOENT is
    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        try:
            st = self.staging.stat(_rel(path))
        except NotFound:
            # Every name about to be created is looked up first: no line in the log for each.
            raise mfusepy.FuseOSError(errno.ENOENT) from None
        return _stat_attrs(st)

    @_translated
    def readdir(self, path: str, fh: int) -> list[Any]:
        return [".", "..", *((name, _stat_attrs(st), 0) for name, st in self.staging.readdir(_rel(path)))]

    @_translated
    def open(self, path: str, fi: Any) -> int:
        fi.fh = self.staging.open(_rel(path), fi.flags, _caller())
        fi.direct_io = _writes_only(fi.flags)
        return 0  # no keep_cache: staged files change

    @_translated
    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fi: Any) -> int:
        _point_at_fd(bufpp, fi.fh, size, offset)  # the staged file's own descriptor, as for blobs
        return 0

    def opendir(self, path: str) -> int:
        # Defined so that libfuse sends directory opens on (mfusepy skips what an Operations
        # class leaves undefined): the FUSE class gives each its handle and one listing.
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    @_translated
    def release(self, path: str, fi: Any) -> int:
        self.staging.release(fi.fh)
        return 0

    @_staged
    def create(self, path: str, mode: int, fi: Any) -> int:
        fi.fh = self.staging.create(_rel(path), fi.flags, mode, _caller())
        fi.direct_io = _writes_only(fi.flags)
        return 0

    @_staged
    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        return self.staging.write(fi.fh, data, offset)

    @_staged
    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        self.staging.truncate(_rel(path), length)
        return 0

    @_staged
    def flush(self, path: str, fi: Any) -> int:
        if self.staging.owns(fi.fh):
            self.staging.flush(fi.fh, _caller())  # ingest now: the URL is ready when close() returns
        return 0

    @_staged
    def fsync(self, path: str, datasync: int, fi: Any) -> int:
        if self.staging.owns(fi.fh):
            self.staging.fsync(fi.fh, bool(datasync))
        return 0

    @_staged
    def unlink(self, path: str) -> int:
        self.staging.unlink(_rel(path))
        return 0

    @_staged
    def mkdir(self, path: str, mode: int) -> int:
        self.staging.mkdir(_rel(path), mode)
        return 0

    @_staged
    def rmdir(self, path: str) -> int:
        self.staging.rmdir(_rel(path))
        return 0

    @_staged
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        # A rename out of staging never gets here: another mount, so the kernel answers EXDEV.
        self.staging.rename(_rel(old), _rel(new), flags)
        return 0

    @_staged
    def chmod(self, path: str, mode: int) -> int:
        self.staging.chmod(_rel(path), mode)
        return 0

    @_staged
    def chown(self, path: str, uid: int, gid: int) -> int:
        self.staging.chown(_rel(path), uid, gid)
        return 0

    @_staged
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self.staging.utimens(_rel(path), times)
        return 0

    @_staged
    def symlink(self, target: str, source: str) -> int:
        self.staging.symlink(source, _rel(target))
        return 0

    @_staged
    def readlink(self, path: str) -> str:
        return self.staging.readlink(_rel(path))

    @_staged
    def link(self, target: str, source: str) -> int:
        # tar x, cp -a and rsync -H do not fall back to copying: a link is a second name
        # (StagingArea.link). A directory (EPERM) or a source on another mount (EXDEV) the
        # kernel refuses before asking.
        self.staging.link(_rel(source), _rel(target))
        return 0

    @_staged
    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)  # device files and fifos cannot become blobs

    @_translated
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        try:
            return self.staging.getxattr(_rel(path), name)
        except NotFound:
            raise mfusepy.FuseOSError(errno.ENODATA) from None  # never ENOSYS: see HashViewOperations

    @_translated
    def listxattr(self, path: str) -> list[str]:
        return self.staging.listxattr(_rel(path))

    @_translated
    def statfs(self, path: str) -> dict[str, int]:
        return _statfs(self.staging.root)


_STAGING_ROOT = "/" + STAGING_VIEW
_STAGING_ROOT_BYTES = _STAGING_ROOT.encode()


def _in_staging(path: str) -> str | None:
    """A path of a shared connection as the staging area's own mount would see it ("/" for its
    root); None for a path outside it."""
    if path == _STAGING_ROOT:
        return "/"
    if path.startswith(_STAGING_ROOT + "/"):
        return path[len(_STAGING_ROOT) :]
    return None


class SharedOperations(HashViewOperations):
    """The hash views and the staging area on one connection (under `SharedFUSE`).

    For a daemon that cannot mount `<mnt>/staging` apart: without root, that mount is made by
    fusermount3, which runs as root, and a FUSE mount lets no other user in (root included;
    see `daemon.staging_apart`). Each path goes to the operations of its part. The price:
    going without opens is a whole connection's choice, and staging needs its opens, so here
    every open of a blob is a request (answered at once for a blob in the store).
    """

    def __init__(self, view: FileSystemView, *, use_passthrough: bool = True, **kwargs: Any) -> None:
        super().__init__(view, use_passthrough=use_passthrough, **kwargs)
        if self.wants_passthrough:
            self.no_passthrough("the staging area shares the mount's connection")
        kwargs.pop("on_init", None)  # called once, by this connection's INIT
        self.staged = StagingOperations(view, **kwargs)

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        inner = _in_staging(path)  # each part translates its own errors
        return super().getattr(path, fh) if inner is None else self.staged.getattr(inner, fh)

    def readdir(self, path: str, fh: int) -> list[Any]:
        inner = _in_staging(path)
        if inner is not None:
            return self.staged.readdir(inner, fh)
        entries = super().readdir(path, fh)
        if path == "/":  # the staging folder as it is, not as the hash views would list a folder
            entries = [STAGING_VIEW if e[0] == STAGING_VIEW else e for e in entries]
        return entries

    def opendir(self, path: str) -> int:
        return 0  # defined so that directory opens reach SharedFUSE, which tells the two parts apart

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def open(self, path: str, fi: Any) -> int:
        inner = _in_staging(path)
        return self._open_blob(path, fi) if inner is None else self.staged.open(inner, fi)

    @_translated
    def _open_blob(self, path: str, fi: Any) -> int:
        if not _read_only(fi.flags):
            raise mfusepy.FuseOSError(errno.EROFS)
        self.view.blob_fd(path)  # fetched now, so that its errors show at open
        fi.keep_cache = 1  # a blob never changes: the page cache stays across opens
        return 0

    # Told apart by handle, not path: libfuse passes no path for a file it no longer finds by
    # name, and a staged file's handle must still be read, let go of (and its bytes ingested).
    def read_buf(self, path: str | None, bufpp: Any, size: int, offset: int, fi: Any) -> int:
        if fi.fh == _BLOB_HANDLE:
            return super().read_buf(path, bufpp, size, offset, fi)
        return self.staged.read_buf(path, bufpp, size, offset, fi)

    def release(self, path: str | None, fi: Any) -> int:
        return 0 if fi.fh == _BLOB_HANDLE else self.staged.release(path, fi)

    def flush(self, path: str | None, fi: Any) -> int:
        # Never ENOSYS here: the kernel would stop flushing staged files too.
        return 0 if fi.fh == _BLOB_HANDLE else self.staged.flush(path, fi)

    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        return 0 if fi.fh == _BLOB_HANDLE else self.staged.fsync(path, datasync, fi)

    def _to_change(self, path: str, *, root: int = errno.EBUSY) -> str:
        """The staging path of `path` for a change; EROFS outside staging, `root` for its root."""
        inner = _in_staging(path)
        if inner is None:
            raise mfusepy.FuseOSError(errno.EROFS)
        if inner == "/" and root:
            raise mfusepy.FuseOSError(root)
        return inner

    def create(self, path: str, mode: int, fi: Any) -> int:
        return self.staged.create(self._to_change(path, root=errno.EEXIST), mode, fi)

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        return self.staged.write(self._to_change(path), data, offset, fi)

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        return self.staged.truncate(self._to_change(path, root=errno.EISDIR), length, fh)

    def unlink(self, path: str) -> int:
        return self.staged.unlink(self._to_change(path))

    def mkdir(self, path: str, mode: int) -> int:
        return self.staged.mkdir(self._to_change(path, root=errno.EEXIST), mode)

    def rmdir(self, path: str) -> int:
        return self.staged.rmdir(self._to_change(path))

    def mknod(self, path: str, mode: int, dev: int) -> int:
        return self.staged.mknod(self._to_change(path, root=errno.EEXIST), mode, dev)

    def chmod(self, path: str, mode: int) -> int:
        return self.staged.chmod(self._to_change(path, root=0), mode)

    def chown(self, path: str, uid: int, gid: int) -> int:
        return self.staged.chown(self._to_change(path, root=0), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        return self.staged.utimens(self._to_change(path, root=0), times)

    def symlink(self, target: str, source: str) -> int:
        return self.staged.symlink(self._to_change(target, root=errno.EEXIST), source)

    def readlink(self, path: str) -> str:
        inner = _in_staging(path)
        if inner is None:
            raise mfusepy.FuseOSError(errno.EINVAL)  # nothing in the hash views is a link
        return self.staged.readlink(inner)

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        return self.staged.rename(*self._both_inside(old, new), flags)

    def link(self, target: str, source: str) -> int:
        new, existing = self._both_inside(target, source)
        return self.staged.link(new, existing)

    def _both_inside(self, a: str, b: str) -> tuple[str, str]:
        """Staging paths of both ends of a rename or link: EXDEV across the parts, as two mounts would say."""
        if (_in_staging(a) is None) != (_in_staging(b) is None):
            raise mfusepy.FuseOSError(errno.EXDEV)
        return self._to_change(a), self._to_change(b)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        inner = _in_staging(path)
        return super().getxattr(path, name, position) if inner is None else self.staged.getxattr(inner, name, position)

    def listxattr(self, path: str) -> list[str]:
        inner = _in_staging(path)
        return super().listxattr(path) if inner is None else self.staged.listxattr(inner)

    def statfs(self, path: str) -> dict[str, int]:
        inner = _in_staging(path)
        return super().statfs(path) if inner is None else self.staged.statfs(inner)


def _rel(path: str) -> str:
    """The path inside the staging area of a path on its mount ('' for the root)."""
    return path.strip("/")


def _statfs(root: os.PathLike[str] | str) -> dict[str, int]:
    """The space of the disk that holds `root`, so `df` and `cp` see it."""
    st = os.statvfs(root)
    return {
        "f_bsize": BLOCK_SIZE, "f_frsize": st.f_frsize, "f_blocks": st.f_blocks, "f_bfree": st.f_bfree,
        "f_bavail": st.f_bavail, "f_files": st.f_files, "f_ffree": st.f_ffree, "f_namemax": 255,
    }  # fmt: skip


_PROCESS_OF: dict[int, int] = {}  # thread id → process id, as /proc last said (a cp -r asks ~20,000 times)


def _caller() -> int | None:
    """The process making the current request (the kernel names its thread: map it to its process)."""
    tid = mfusepy.fuse_get_context()[2]
    known = _PROCESS_OF.get(tid)
    if known is not None:
        return known
    try:
        with open(f"/proc/{tid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Tgid:"):
                    if len(_PROCESS_OF) > 4096:  # thread ids are reused: keep the memory short
                        _PROCESS_OF.clear()
                    _PROCESS_OF[tid] = pid = int(line.split()[1])
                    return pid
    except (OSError, ValueError):
        pass  # gone already, or from another pid namespace
    return None


def _stat_attrs(st: os.stat_result) -> dict[str, int]:
    """The stat fields of a staged file, as its backing file has them."""
    return {
        "st_mode": st.st_mode, "st_nlink": 1 if stat.S_ISREG(st.st_mode) else st.st_nlink, "st_size": st.st_size,
        "st_blocks": st.st_blocks, "st_blksize": BLOCK_SIZE, "st_uid": st.st_uid, "st_gid": st.st_gid,
        "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
    }  # fmt: skip


# libfuse 3.14's fuse_buf / fuse_bufvec (fuse_common.h). mfusepy declares fuse_bufvec.buf as a
# pointer where C has an inline array, so its struct cannot be used.
_FUSE_BUF_IS_FD, _FUSE_BUF_FD_SEEK = 1 << 1, 1 << 2


class _FuseBuf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]  # fmt: skip


class _FuseBufvec(ctypes.Structure):
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t), ("buf", _FuseBuf * 1)]


_libc = ctypes.CDLL(None)
_libc.calloc.restype = ctypes.c_void_p
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_BUFVEC_ALLOC = ctypes.sizeof(_FuseBufvec) + 64  # zeroed slack: fields a later libfuse may append


def _point_at_fd(bufpp: Any, fd: int, size: int, offset: int) -> None:
    """Answer a read_buf call with a buffer that is `size` bytes of `fd` at `offset`.

    libfuse frees the vector with free() after replying, so it is allocated with the C heap.
    """
    addr = _libc.calloc(1, _BUFVEC_ALLOC)
    if not addr:
        raise MemoryError("no memory for a fuse_bufvec")
    vec = _FuseBufvec.from_address(addr)
    vec.count = 1
    buf = vec.buf[0]
    buf.size, buf.flags, buf.fd, buf.pos = size, _FUSE_BUF_IS_FD | _FUSE_BUF_FD_SEEK, fd, offset
    ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = addr


# libfuse's low-level open, flush, release and opendir (the slots wrapped): request, inode, file info.
# Called through this type, libfuse runs with the GIL let go.
_LowLevelFileOp = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(mfusepy.fuse_file_info))
# On the read-only hash views the wrappers call libfuse with the GIL held (PYFUNCTYPE, PyDLL):
# a reply never waits, nor does the high level there (nothing takes a path's lock for a change),
# its open comes straight back into Python on this thread, and each GIL let go for a call was a
# wait to take it back behind the daemon's other threads. Where staging shares the connection
# the high level may wait for a path a rename holds, and the rename's Python for the GIL: there
# the originals are called with the GIL let go (`_LowLevelFileOp`).
_LowLevelFileOpCall = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(mfusepy.fuse_file_info))
_libfuse = ctypes.PyDLL(mfusepy._libfuse._name)
_libfuse.fuse_reply_buf.restype, _libfuse.fuse_reply_buf.argtypes = (
    ctypes.c_int,
    [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t],
)
_libfuse.fuse_reply_err.restype, _libfuse.fuse_reply_err.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]
_INODES_KEPT = 100_000  # inodes whose blob is remembered for opens answered at the low level
_BLOB_HANDLE = 1 << 62  # a blob's handle on a shared connection (a staged file's is its descriptor)
_libfuse.fuse_reply_open.restype = ctypes.c_int
_libfuse.fuse_reply_open.argtypes = [ctypes.c_void_p, ctypes.POINTER(mfusepy.fuse_file_info)]


def _open_the_high_level_way(original: Any, opening: dict[int, int], req: int, ino: int, fi: Any) -> None:
    """libfuse's own low-level open, with the inode noted for this thread: the high level's
    `open` that it calls gets only the path, and remembers the inode's blob."""
    opening[threading.get_ident()] = ino
    try:
        original(req, ino, fi)
    finally:
        opening.pop(threading.get_ident(), None)


def _request_begins() -> None:
    """Each request's first step, on a libfuse thread: its Python thread state kept, idle polling told."""
    pin_thread_state()
    POLLING.on_request()


class _FUSE(mfusepy.FUSE):
    """mfusepy's FUSE, also answering READDIRPLUS: entries go out with their full attributes.

    mfusepy sends only the mode with each entry, so `ls -l` then looks every entry up
    again; sending all attributes makes a first `ls -l` of 10,000 files ~4× cheaper.
    A listing is built once and paged from (`_listing`), not rebuilt for every page.
    """

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        _request_begins()
        return super()._wrapper(func, *args, **kwargs)

    def getxattr(self, path: bytes, name: bytes, value: Any, size: int, *args: Any) -> int:
        if not name.startswith(_XATTR_PREFIX):
            # Answered here, not by the view. `ls -l` asks every file for security.selinux and
            # system.posix_acl_access: EOPNOTSUPP ("no labels or ACLs on this filesystem") makes
            # it stop asking for the rest of the mount; ENODATA would cost two requests per file.
            return -(errno.ENODATA if name.startswith(b"user.") else errno.EOPNOTSUPP)
        return super().getxattr(path, name, value, size, *args)

    def _listing(self, path: bytes, fip: Any, offset: int) -> list[_Entry]:
        """The entries of `path` for a READDIR from `offset` on."""
        raise NotImplementedError

    def _entries(self, path: bytes, fh: int) -> list[_Entry]:
        """The operations' listing of `path`, made ready for the filler once (names encoded, stats packed)."""
        entries = []
        for item in self.operations.readdir(path.decode(self.encoding, self.errors), fh):
            if isinstance(item, str):
                entries.append((item.encode(self.encoding, self.errors), None, 0))
                continue
            name, attrs, _offset = item
            st = mfusepy.c_stat()
            mfusepy.set_st_attrs(st, attrs, use_ns=True)
            entries.append((name.encode(self.encoding, self.errors), st, _FUSE_FILL_DIR_PLUS))
        return entries

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        if path is None:
            return super().readdir_fuse_3(path, buf, filler, offset, fip, flags)
        entries = self._listing(path, fip, offset)
        plus = flags & _FUSE_READDIR_PLUS  # else a plain READDIR: the kernel wants names and modes only
        for index in range(offset, len(entries)):
            # Each entry carries the offset of the next one. libfuse then replies at once, with
            # the entry's node id; at offset 0 it buffers the listing and sends the entries
            # without one, and the kernel looks every entry up again. Every page of a kept
            # listing is this loop alone: a filler call per entry, nothing built.
            name, st, fill_flags = entries[index]
            if filler(buf, name, st, index + 1, fill_flags if plus else 0) != 0:
                break
        return 0


class HashViewFUSE(_FUSE):
    """The hash views' connection: listings kept by the kernel, and opens of known blobs answered at once.

    The operations define no opendir, so libfuse answers OPENDIR itself, in C; its high-level
    API then never passes cache_readdir to the kernel (libfuse 3.14), and the kernel would
    ask for every listing again at every open — two READDIRPLUS round trips per directory.
    At INIT, before any other request, the session's low-level opendir is wrapped so that
    its reply carries FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE (`_keep_listings_in_kernel`): a
    snapshot's listings never change. Directories cannot go without an open the way files
    do: libfuse's readdir needs the handle its opendir made (a no-opendir ENOSYS crashes it).
    The listings read once are kept here too, by path, ready for the filler.

    With kernel passthrough every open of a file comes here (`HashViewOperations.open`).
    The first open of an inode takes the high-level way (its path, the view, the blob's
    backing file); later opens of it, while the blob's backing file is registered, are
    answered by the low-level open itself from the inode alone (`_answer_known_opens`):
    a dict lookup and a reply (here ~100 µs an open of a cached file, against 220–400 µs the
    high-level way).
    """

    def __init__(self, operations: Any, mountpoint: str, *args: Any, **kwargs: Any) -> None:
        self._listings: collections.OrderedDict[bytes, list[_Entry]] = collections.OrderedDict()
        self._listings_lock = threading.Lock()
        self._mountpoint = os.path.realpath(mountpoint)  # as libfuse keeps it
        self._low_level: list[Any] = []  # the wrappers libfuse calls: kept alive as long as the mount
        self._blob_of_inode: dict[int, Any] = {}  # inode → the blob its first open named
        self._opening: dict[int, int] = {}  # thread → the inode whose open it passes to the high level
        self._init_hook: Passthrough | None = None  # without passthrough: the hook that amends INIT
        super().__init__(operations, mountpoint, *args, **kwargs)  # mounts and runs the loop: all above first

    def init_fuse_3(self, conn: Any, config: Any) -> None:
        super().init_fuse_3(conn, config)
        try:
            session = Session.current(self._mountpoint)
        except Exception as err:  # best effort: a failure here must not fail INIT
            session = None
            log.debug("libfuse's session not found: %s", err)
        operations = self.operations
        if session is None:
            log.info("this libfuse's session is not the one known: the kernel will ask for listings again")
            operations.no_passthrough("this libfuse's session is not the one known")
            return
        self._amend(session)
        if operations.wants_passthrough:
            # Idle backing files hold their blobs against eviction: never more than a quarter of the cache.
            max_size = operations.view.resolver.store.cache.limits.max_size
            kernel = Passthrough.install(session, kept_bytes=min(KEPT_BYTES, (max_size or KEPT_BYTES * 4) // 4))
            if kernel is None:
                operations.no_passthrough("libfuse's I/O hook is taken")
            else:
                operations.use_passthrough(kernel)
                self._answer_known_opens(session, kernel)
        else:
            self._init_hook = Passthrough.install(session, passthrough=False)  # kept: libfuse calls it
            if self._init_hook is None:
                log.info("libfuse's I/O hook is taken: the kernel looks names up one at a time per directory")

    def _wrap(
        self, session: Session, slot: int, wrapper: Callable[[Any], Callable[..., None]], *, gil_free: bool = False
    ) -> None:
        """Replace a low-level op of the session by `wrapper(original)`; `gil_free`: the original
        is called with the GIL let go (see _LowLevelFileOpCall)."""
        original = (_LowLevelFileOp if gil_free else _LowLevelFileOpCall)(session.ops[slot])
        callback = _LowLevelFileOp(wrapper(original))
        self._low_level.append(callback)
        session.ops[slot] = ctypes.cast(callback, ctypes.c_void_p).value

    def _amend(self, session: Session) -> None:
        """What this connection changes in libfuse's low-level ops at INIT (before any other request)."""
        self._keep_listings_in_kernel(session)

    def _keep_listings_in_kernel(self, session: Session) -> None:
        """Wrap libfuse's low-level opendir of this session."""

        def wrapper(original: Any) -> Callable[..., None]:
            def opendir(req: int, ino: int, fi: Any) -> None:
                _request_begins()  # as in _wrapper
                try:
                    fi.contents.cache_readdir = 1  # the kernel keeps the listing it reads…
                    fi.contents.keep_cache = 1  # …across opens too
                finally:
                    original(req, ino, fi)  # replies: every OPENDIR gets its answer, whatever happened above

            return opendir

        self._wrap(session, OPENDIR_SLOT, wrapper)

    def _answer_known_opens(self, session: Session, kernel: Passthrough) -> None:
        """Wrap libfuse's low-level open and release: an inode opened before is answered from its blob alone."""
        blob_of_inode, opening = self._blob_of_inode, self._opening

        def open_wrapper(original: Any) -> Callable[..., None]:
            def open_(req: int, ino: int, fi: Any) -> None:
                # Exactly one reply, whatever happens: ours, or the high level's.
                reply = None
                try:
                    _request_begins()
                    blob = blob_of_inode.get(ino)
                    if blob is not None and _read_only(fi.contents.flags) and self.operations.passthrough is kernel:
                        reply = kernel.reopen(blob)
                except Exception:
                    log.exception("open of inode %d from its blob", ino)
                if reply is not None:
                    handle, out = reply
                    if _libfuse.fuse_reply_buf(req, out, len(out)) != 0:
                        kernel.release(handle)  # the open was interrupted: no release will come for it
                    return
                _open_the_high_level_way(original, opening, req, ino, fi)

            return open_

        def release_wrapper(_original: Any) -> Callable[..., None]:
            # Every handle of this connection is the kernel's (`Passthrough.open` or `reopen`), so
            # every release is answered here: the high level's would only add a path lookup and a
            # second call into Python. Its count of a node's opens then stays up, which matters
            # only to a file unlinked while open, and nothing here is ever unlinked.
            def release(req: int, ino: int, fi: Any) -> None:
                try:
                    _request_begins()
                    kernel.release(fi.contents.fh)
                except Exception:
                    log.exception("release of inode %d", ino)
                finally:
                    _libfuse.fuse_reply_err(req, 0)  # every request gets its answer

            return release

        self._wrap(session, OPEN_SLOT, open_wrapper)
        self._wrap(session, RELEASE_SLOT, release_wrapper)

    def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        if path is None:
            return super().getattr_fuse_3(path, buf, fip)
        self.operations.fill_stat(path.decode(self.encoding, self.errors), buf.contents)
        return 0

    def open(self, path: bytes, fip: Any) -> int:
        result = super().open(path, fip)
        kernel = self.operations.passthrough
        ino = self._opening.get(threading.get_ident())
        if result == 0 and kernel is not None and ino is not None:
            blob = kernel.blob_of(fip.contents.fh)
            if blob is not None:
                if len(self._blob_of_inode) >= _INODES_KEPT:
                    self._blob_of_inode.clear()
                self._blob_of_inode[ino] = blob  # a path's blob never changes, nor an inode's path
        return result

    def _listing(self, path: bytes, fip: Any, offset: int) -> list[_Entry]:
        with self._listings_lock:
            items = self._listings.get(path)
            if items is not None:
                self._listings.move_to_end(path)
                return items
        items = self._entries(path, 0)
        with self._listings_lock:
            self._listings[path] = items  # a snapshot's listing never changes
            if len(self._listings) > _LISTINGS_KEPT:
                self._listings.popitem(last=False)
        return items


class StagingFUSE(_FUSE):
    """The staging connection: directory handles of our own, a listing per open (it may change)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._dir_handles = itertools.count(1)
        self._staged_listings: dict[int, list[_Entry] | None] = {}  # open directory handle → its listing, once built
        super().__init__(*args, **kwargs)  # mounts and runs the loop: everything above must exist first

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        # mfusepy drops renameat2's flags: `mv -n` (RENAME_NOREPLACE) would then overwrite.
        decode = self.encoding, self.errors
        return self.operations.rename(old.decode(*decode), new.decode(*decode), flags)

    def opendir(self, path: bytes, fip: Any) -> int:
        result = super().opendir(path, fip)
        fip.contents.fh = handle = next(self._dir_handles)
        self._staged_listings[handle] = None
        return result

    def releasedir(self, path: bytes | None, fip: Any) -> int:
        self._staged_listings.pop(fip.contents.fh, None)
        return super().releasedir(path, fip)

    def _listing(self, path: bytes, fip: Any, offset: int) -> list[_Entry]:
        fh = fip.contents.fh
        items = self._staged_listings.get(fh)
        if items is None or offset == 0:  # read from the start again (rewinddir): as it is now
            items = self._entries(path, fh)
            if fh in self._staged_listings:
                self._staged_listings[fh] = items
        return items


def _blob_open_reply(fi: Any) -> None:
    """An open of a blob on the shared connection: its handle, its pages kept, and no FLUSH at
    its close (a blob has nothing to flush: the close then costs the reader no round trip)."""
    fi.fh, fi.keep_cache, fi.noflush = _BLOB_HANDLE, 1, 1


class SharedFUSE(HashViewFUSE, StagingFUSE):
    """Both parts on one connection (`SharedOperations`): each directory goes the way of its path.

    A hash-view directory's listing is kept by the kernel (as `HashViewFUSE` does, but for
    its directories only: `_keep_hash_listings_in_kernel`); a staged one gets a handle and a
    listing per open (`StagingFUSE`). Every original low-level op wrapped here is called
    with the GIL let go (see _LowLevelFileOpCall).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._opening_dirs: dict[int, Any] = {}  # thread → the low-level file info of the opendir it runs
        super().__init__(*args, **kwargs)  # mounts and runs the loop: everything above must exist first

    def _amend(self, session: Session) -> None:
        self._keep_hash_listings_in_kernel(session)
        self._answer_blob_opens(session)

    def _keep_hash_listings_in_kernel(self, session: Session) -> None:
        """Wrap libfuse's low-level opendir: `opendir` below marks the reply of a hash view's.

        The high level passes its opendir a file info of its own and replies with the
        low-level one, copying only the handle over: the marks go on the low-level one, which
        `opendir` finds by thread.
        """
        opening_dirs = self._opening_dirs

        def wrapper(original: Any) -> Callable[..., None]:
            def opendir(req: int, ino: int, fi: Any) -> None:
                try:
                    _request_begins()
                    opening_dirs[threading.get_ident()] = fi
                finally:
                    try:
                        original(req, ino, fi)  # replies: every OPENDIR gets its answer
                    finally:
                        opening_dirs.pop(threading.get_ident(), None)

            return opendir

        self._wrap(session, OPENDIR_SLOT, wrapper, gil_free=True)

    def _answer_blob_opens(self, session: Session) -> None:
        """Wrap libfuse's low-level open, flush and release: blobs need no trip into Python.

        A blob's inode, once opened the high-level way (`open`), is answered at once by the
        low-level open (read-only, page cache kept, handle _BLOB_HANDLE); a flush or release
        of that handle is answered at once too. Everything else, and all of staging, goes on
        to the high level. (The high level's count of a node's opens then stays up: that
        matters only to a file unlinked while open, and no blob is ever unlinked.)
        """
        known, opening = self._blob_of_inode, self._opening

        def open_wrapper(original: Any) -> Callable[..., None]:
            def open_(req: int, ino: int, fi: Any) -> None:
                answer = False
                try:
                    _request_begins()
                    answer = ino in known and _read_only(fi.contents.flags)
                except Exception:
                    log.exception("open of inode %d", ino)
                if answer:
                    _blob_open_reply(fi.contents)
                    _libfuse.fuse_reply_open(req, fi)  # interrupted or not, there is nothing to undo
                    return
                _open_the_high_level_way(original, opening, req, ino, fi)

            return open_

        def blob_handles_answered(original: Any) -> Callable[..., None]:
            def flush_or_release(req: int, ino: int, fi: Any) -> None:
                if fi.contents.fh == _BLOB_HANDLE:
                    _libfuse.fuse_reply_err(req, 0)  # a blob has nothing to flush, nor to let go of
                else:
                    original(req, ino, fi)

            return flush_or_release

        self._wrap(session, OPEN_SLOT, open_wrapper, gil_free=True)
        self._wrap(session, FLUSH_SLOT, blob_handles_answered, gil_free=True)
        self._wrap(session, RELEASE_SLOT, blob_handles_answered, gil_free=True)

    def open(self, path: bytes, fip: Any) -> int:
        result = super().open(path, fip)
        ino = self._opening.get(threading.get_ident())
        if result == 0 and not self._staged(path):
            _blob_open_reply(fip.contents)
            if ino is not None:
                if len(self._blob_of_inode) >= _INODES_KEPT:
                    self._blob_of_inode.clear()
                self._blob_of_inode[ino] = True  # a blob's inode keeps its path, and its bytes
        return result

    def _staged(self, path: bytes) -> bool:
        # As _in_staging, on the bytes libfuse gives: every getattr asks, before any decoding.
        return path == _STAGING_ROOT_BYTES or path.startswith(_STAGING_ROOT_BYTES + b"/")

    def opendir(self, path: bytes, fip: Any) -> int:
        if self._staged(path):
            return StagingFUSE.opendir(self, path, fip)
        reply = self._opening_dirs.get(threading.get_ident())
        if reply is not None:
            reply.contents.cache_readdir = 1  # the kernel keeps the listing it reads…
            reply.contents.keep_cache = 1  # …across opens too: a snapshot's never changes
        fip.contents.fh = 0
        return 0

    def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        if path is None or self._staged(path):
            return mfusepy.FUSE.getattr_fuse_3(self, path, buf, fip)
        return HashViewFUSE.getattr_fuse_3(self, path, buf, fip)

    def _listing(self, path: bytes, fip: Any, offset: int) -> list[_Entry]:
        if self._staged(path):
            return StagingFUSE._listing(self, path, fip, offset)
        return HashViewFUSE._listing(self, path, fip, offset)
