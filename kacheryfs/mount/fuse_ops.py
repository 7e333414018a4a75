"""The FUSE operations class: translates kernel requests into `FileSystemView` calls, and back.

Thin on purpose: what exists and what it holds is decided in `kacheryfs.vfs`. This module
only speaks FUSE — stat dicts, file handles, errno — and sets the kernel cache up for
immutable content. Every kacheryfs error becomes its `errno`; any other exception is logged
with its traceback and becomes EIO (never mfusepy's default EINVAL, which hides bugs as
"Invalid argument").
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

import mfusepy

from kacheryfs.errors import InvalidURL, KacheryError, NotFound
from kacheryfs.vfs import FileInfo, FileSystemView

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

MAX_READ = 1 << 20  # 1 MiB reads: the measured difference between 1.1 and 1.8+ GB/s
BLOCK_SIZE = 1 << 20  # st_blksize: tells cp, cat and stdio to read in large blocks
DIR_SIZE = 4096  # what ext4 reports, so `du` of a snapshot matches its copy
# Content has no time; a fixed one keeps rsync and make stable. 2019-01-01, kachery's birth year.
FIXED_TIME_NS = 1546300800 * 10**9

_FUSE_READDIR_PLUS = 1  # fuse_readdir_flags: the kernel wants attributes with the entries
_FUSE_FILL_DIR_PLUS = 2  # fuse_fill_dir_flags: these attributes are complete


def _translated(method: F) -> F:
    """Turn the view's errors into errno for the kernel, logging each with its path and reason."""

    @functools.wraps(method)
    def wrapper(self: KacheryOperations, path: str, *args: Any) -> Any:
        try:
            return method(self, path, *args)
        except (NotFound, InvalidURL) as err:
            # A malformed name is simply a name that does not exist: ENOENT, no network touched.
            log.info("%s %s: %s", method.__name__, path, err)
            raise mfusepy.FuseOSError(err.errno) from err
        except KacheryError as err:
            log.warning("%s %s: %s", method.__name__, path, err)
            self.view.record_error(f"{method.__name__} {path}: {err}")
            raise mfusepy.FuseOSError(err.errno) from err
        except mfusepy.FuseOSError:
            raise
        except OSError as err:
            # The store's own file failed (disk error, blob removed under us): pass its errno on.
            log.warning("%s %s: %s", method.__name__, path, err)
            self.view.record_error(f"{method.__name__} {path}: {err}")
            raise mfusepy.FuseOSError(err.errno or errno.EIO) from err
        except Exception as err:
            log.exception("%s %s: unexpected error", method.__name__, path)
            self.view.record_error(f"{method.__name__} {path}: unexpected {type(err).__name__}: {err}")
            raise mfusepy.FuseOSError(errno.EIO) from err

    return wrapper  # type: ignore[return-value]


class KacheryOperations(mfusepy.Operations):
    """mfusepy operations over a FileSystemView (mount with `raw_fi=True`)."""

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
        self.view = view
        self.entry_timeout, self.attr_timeout, self.negative_timeout = entry_timeout, attr_timeout, negative_timeout
        self._on_init = on_init
        self._uid, self._gid = os.getuid(), os.getgid()

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

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        # Hash paths never change: let the kernel keep names and attributes for long;
        # an unknown hash may be uploaded later, so a miss is remembered only briefly.
        if config_3 is not None:
            config_3.entry_timeout = self.entry_timeout
            config_3.attr_timeout = self.attr_timeout
            config_3.negative_timeout = self.negative_timeout
        if conn_info is not None:
            conn_info.max_read = MAX_READ  # must match -o max_read, or libfuse3 refuses the mount
        if self._on_init is not None:
            self._on_init()

    @_translated
    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        return self.attrs(self.view.stat(path))

    @_translated
    def readdir(self, path: str, fh: int) -> list[Any]:
        entries: list[Any] = [".", ".."]
        entries += [(name, self.attrs(info), 0) for name, info in self.view.readdir(path)]
        return entries

    @_translated
    def open(self, path: str, fi: Any) -> int:
        if fi.flags & os.O_ACCMODE != os.O_RDONLY:
            raise mfusepy.FuseOSError(errno.EROFS)  # content-addressed files cannot change
        fi.fh = self.view.open(path)
        fi.keep_cache = 1  # immutable: page cache stays valid across opens
        return 0

    @_translated
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        return os.pread(fi.fh, size, offset)

    @_translated
    def release(self, path: str, fi: Any) -> int:
        self.view.release(fi.fh)
        return 0

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
        return {"f_bsize": BLOCK_SIZE, "f_frsize": BLOCK_SIZE, "f_namemax": 255}


class FUSE(mfusepy.FUSE):
    """mfusepy's FUSE, also answering READDIRPLUS: entries go out with their full attributes.

    mfusepy sends only the mode with each entry, so `ls -l` then looks every entry up
    again; sending all attributes makes a first `ls -l` of 10,000 files ~4× cheaper.
    """

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        if not flags & _FUSE_READDIR_PLUS or path is None:
            return super().readdir_fuse_3(path, buf, filler, offset, fip, flags)
        items = self.operations.readdir(path.decode(self.encoding, self.errors), fip.contents.fh)
        for item in items:
            if isinstance(item, str):
                if filler(buf, item.encode(self.encoding, self.errors), None, 0, 0) != 0:
                    break
                continue
            name, attrs, _offset = item
            st = mfusepy.c_stat()
            mfusepy.set_st_attrs(st, attrs, use_ns=True)
            if filler(buf, name.encode(self.encoding, self.errors), st, 0, _FUSE_FILL_DIR_PLUS) != 0:
                break
        return 0
