"""The staging area: a writable directory whose files become blobs when they are closed.

Files live in a backing directory on disk (write-through), so nothing dropped there is
lost if the daemon dies. Writes that arrive in order are hashed as they arrive, so a close
costs almost nothing; anything else is hashed at close. A closed file is ingested by hard
link (the staged file and the blob share their bytes) and remembered in an extended
attribute of the backing file; before the first write to an ingested file the sharing is
broken (copy-on-write), so a stored blob never changes. On start, `recover()` ingests
whatever a crash left unfinished.

It knows nothing of FUSE: paths are relative to the staging root, errors are OSError or
kacheryfs errors; `kacheryfs.mount.fuse_ops` translates.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kacheryfs import manifest
from kacheryfs.errors import NotFound
from kacheryfs.hashing import Digests, Hasher, hash_file
from kacheryfs.manifest import FileEntry
from kacheryfs.store import LocalStore
from kacheryfs.upload_queue import UploadQueue
from kacheryfs.uri import KacheryURL, file_url

log = logging.getLogger(__name__)

RECORD_XATTR = "user.kacheryfs.ingested"  # on the backing file: what it was ingested as
URL_XATTR = "user.kachery.url"
_PUBLIC_XATTRS = ("user.kachery.url", "user.kachery.sha1", "user.kachery.size", "user.kachery.uploaded")
_COW_SUFFIX = ".kacheryfs-cow"
_UTIME_NOW, _UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


@dataclass
class OpenFile:
    """One open handle on a staged file, and the running hash of what was written in order."""

    fd: int
    rel: str
    writable: bool
    hasher: Hasher | None = None
    in_order: bool = True  # every write so far continued where the hash left off
    dirty: bool = False


class StagingArea:
    """A write-through directory that ingests closed files into a LocalStore."""

    def __init__(self, root: Path, store: LocalStore, uploads: UploadQueue | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.uploads = uploads
        self._handles: dict[int, OpenFile] = {}
        self._writers: dict[int, int] = {}  # inode → open writable handles
        self._lock = threading.Lock()

    def owns(self, fh: int) -> bool:
        """True for a handle this area opened."""
        return fh in self._handles

    def status(self) -> dict[str, object]:
        """The staging dir and its upload queue, for `kacheryfs status`."""
        queue = self.uploads.pending() if self.uploads is not None else []
        return {
            "dir": str(self.root),
            "open_for_write": sum(self._writers.values()),
            "uploads_pending": len(queue),
            "uploads_failing": [f"{q['sha1']}: {q['error']}" for q in queue if q.get("error")][:10],
        }

    # -- paths -----------------------------------------------------------------------
    def real(self, rel: str) -> str:
        """The backing path of a staging path ('' is the staging root)."""
        parts = [p for p in rel.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise NotFound(f"invalid staging path {rel!r}")
        return os.path.join(self.root, *parts)

    def stat(self, rel: str) -> os.stat_result:
        return os.lstat(self.real(rel))

    def readdir(self, rel: str) -> list[tuple[str, os.stat_result]]:
        out = []
        with os.scandir(self.real(rel)) as entries:
            for entry in entries:
                if not entry.name.endswith(_COW_SUFFIX):
                    out.append((entry.name, entry.stat(follow_symlinks=False)))
        return out

    # -- files -------------------------------------------------------------------------
    def create(self, rel: str, flags: int, mode: int) -> int:
        fd = os.open(self.real(rel), flags | os.O_CREAT | os.O_CLOEXEC, mode & 0o7777)
        return self._track(fd, rel, flags)

    def open(self, rel: str, flags: int) -> int:
        path = self.real(rel)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            self._unshare(path, truncate=bool(flags & os.O_TRUNC))
        fd = os.open(path, flags | os.O_CLOEXEC)
        return self._track(fd, rel, flags)

    def _track(self, fd: int, rel: str, flags: int) -> int:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        handle = OpenFile(fd, rel, writable)
        if writable:
            st = os.fstat(fd)
            # hash in order from byte 0: possible only when the file starts empty
            handle.in_order = st.st_size == 0 and not flags & os.O_APPEND
            with self._lock:
                self._writers[st.st_ino] = self._writers.get(st.st_ino, 0) + 1
        self._handles[fd] = handle
        return fd

    def read(self, fh: int, size: int, offset: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        handle = self._handles[fh]
        written = os.pwrite(fh, data, offset)
        if not handle.dirty:
            handle.dirty = True
            _forget_record(fh)
        if handle.in_order:
            if handle.hasher is None:
                handle.hasher = Hasher()
            if offset == handle.hasher.size and written == len(data):
                handle.hasher.update(data)
            else:
                handle.in_order = False
        return written

    def truncate(self, rel: str, length: int) -> None:
        """truncate(2) or ftruncate(2): the FUSE high-level API passes only the path."""
        path = self.real(rel)
        ino = os.lstat(path).st_ino
        open_handles = [h for h in list(self._handles.values()) if h.writable and os.fstat(h.fd).st_ino == ino]
        if open_handles:
            os.truncate(path, length)  # already unshared when opened; ingested at the next close
            for handle in open_handles:
                handle.dirty = True
                if handle.hasher is None or handle.hasher.size != length:
                    handle.in_order = length == 0 and handle.hasher is None
            _forget_record(path)
            return
        self._unshare(path, truncate=length == 0)
        os.truncate(path, length)
        self._ingest(rel, path)

    def flush(self, fh: int) -> None:
        """A close(2): ingest what was written, so its URL is ready when close returns."""
        handle = self._handles.get(fh)
        if handle is None or not handle.dirty:
            return
        digests = None
        if handle.in_order and handle.hasher is not None and handle.hasher.size == os.fstat(fh).st_size:
            digests = handle.hasher.finish()
        elif handle.hasher is not None:
            handle.hasher.finish()  # stop its threads
        handle.hasher, handle.in_order, handle.dirty = None, False, False
        self._ingest(handle.rel, self.real(handle.rel), digests, fd=fh)

    def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        try:
            if handle is not None and handle.writable:
                if handle.dirty:
                    self._handles[fh] = handle
                    try:
                        self.flush(fh)
                    finally:
                        del self._handles[fh]
                ino = os.fstat(fh).st_ino
                with self._lock:
                    left = self._writers.get(ino, 1) - 1
                    if left:
                        self._writers[ino] = left
                    else:
                        self._writers.pop(ino, None)
        finally:
            os.close(fh)

    # -- names -------------------------------------------------------------------------
    def unlink(self, rel: str) -> None:
        os.unlink(self.real(rel))

    def mkdir(self, rel: str, mode: int) -> None:
        os.mkdir(self.real(rel), mode & 0o7777)

    def rmdir(self, rel: str) -> None:
        os.rmdir(self.real(rel))

    def rename(self, old: str, new: str) -> None:
        os.rename(self.real(old), self.real(new))

    def chmod(self, rel: str, mode: int) -> None:
        os.chmod(self.real(rel), mode & 0o7777)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        os.chown(self.real(rel), uid, gid, follow_symlinks=False)

    def utimens(self, rel: str, times_ns: tuple[int, int] | None) -> None:
        path = self.real(rel)
        record = _read_record(path)
        st = os.lstat(path)
        now = time.time_ns()
        atime, mtime = times_ns if times_ns is not None else (_UTIME_NOW, _UTIME_NOW)
        # libfuse passes `touch`'s "now" and "leave alone" as their special nanosecond values
        atime = now if atime == _UTIME_NOW else st.st_atime_ns if atime == _UTIME_OMIT else atime
        mtime = now if mtime == _UTIME_NOW else st.st_mtime_ns if mtime == _UTIME_OMIT else mtime
        os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        if record is not None and _valid_digests(record, st) is not None:  # same bytes: keep the record valid
            _write_record(path, Digests(record["size"], record["sha1"], record.get("md5")))

    def symlink(self, target: str, rel: str) -> None:
        os.symlink(target, self.real(rel))

    def readlink(self, rel: str) -> str:
        return os.readlink(self.real(rel))

    # -- URLs --------------------------------------------------------------------------
    def getxattr(self, rel: str, name: str) -> bytes:
        """`user.kachery.url|sha1|size|uploaded`; NotFound when not (yet) available."""
        if name not in _PUBLIC_XATTRS:
            raise NotFound(f"no attribute {name}")
        path = self.real(rel)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            url, size = self.dir_url(rel)
            values = {"url": str(url), "sha1": url.hash, "size": str(size)}
            sha1 = url.hash
        elif stat.S_ISREG(st.st_mode):
            digests = self.digests(rel)
            values = {"url": str(file_url("sha1", digests.sha1, os.path.basename(path))),
                      "sha1": digests.sha1, "size": str(digests.size)}  # fmt: skip
            sha1 = digests.sha1
        else:
            raise NotFound(f"{rel} is neither a file nor a directory")
        key = name.removeprefix("user.kachery.")
        if key == "uploaded":
            return (self.uploads.state(sha1) if self.uploads else "no: no upload channel ([staging] to)").encode()
        return values[key].encode()

    def listxattr(self, rel: str) -> list[str]:
        path = self.real(rel)
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and (self._is_open_for_write(st.st_ino) or _valid_record(path, st) is None):
            return []
        return list(_PUBLIC_XATTRS)

    def digests(self, rel: str) -> Digests:
        """The digests of an ingested file; NotFound while it is open for writing."""
        path = self.real(rel)
        st = os.lstat(path)
        if self._is_open_for_write(st.st_ino):
            raise NotFound(f"{rel} is still open for writing: its URL exists once it is closed")
        record = _valid_record(path, st)
        if record is None:
            return self._ingest(rel, path)
        return record

    def dir_url(self, rel: str) -> tuple[KacheryURL, int]:
        """The sha1dir URL of a staging directory's current contents (manifest stored now)."""
        path = Path(self.real(rel))

        def entry(file: Path) -> FileEntry:
            digests = self.digests(str(file.relative_to(self.root)))
            return FileEntry(digests.size, digests.sha1)

        node = manifest.build(path, entry)
        digests = self.store.put_bytes(manifest.serialize(node))
        self._keep_until_uploaded(digests.sha1)
        label = path.name if rel.strip("/") else self.root.name
        return KacheryURL("sha1", digests.sha1, True, label), node.total_size()

    def _is_open_for_write(self, ino: int) -> bool:
        with self._lock:
            return self._writers.get(ino, 0) > 0

    # -- ingest ------------------------------------------------------------------------
    def _ingest(self, rel: str, path: str, digests: Digests | None = None, fd: int | None = None) -> Digests:
        if digests is None:
            digests = hash_file(path)
        self.store.link_existing(path, digests)
        _write_record(fd if fd is not None else path, digests)
        self._keep_until_uploaded(digests.sha1)
        log.info("staged %s → sha1://%s (%d bytes)", rel, digests.sha1, digests.size)
        return digests

    def _keep_until_uploaded(self, sha1: str) -> None:
        self.store.cache.pin("sha1", sha1, reason="staging")
        if self.uploads is not None:
            self.uploads.enqueue(sha1)

    def _unshare(self, path: str, *, truncate: bool) -> None:
        """Give `path` its own inode before it is written, if its bytes are also a blob's."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return
        tmp = path + _COW_SUFFIX
        if truncate:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, stat.S_IMODE(st.st_mode))
            os.close(fd)
        else:
            shutil.copy2(path, tmp)
        os.rename(tmp, path)

    def recover(self) -> int:
        """Ingest every staged file that a crash left without a valid record; how many."""
        count = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                if name.endswith(_COW_SUFFIX):
                    os.unlink(path)  # a copy-on-write interrupted before its rename: the original is intact
                    continue
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and _valid_record(path, st) is None:
                    self._ingest(os.path.relpath(path, self.root), path)
                    count += 1
        return count


def _read_record(target: str | int) -> dict | None:
    try:
        return json.loads(os.getxattr(target, RECORD_XATTR))
    except OSError:
        return None


def _valid_record(path: str, st: os.stat_result) -> Digests | None:
    """The recorded digests, if the file has not changed since they were recorded."""
    record = _read_record(path)
    return None if record is None else _valid_digests(record, st)


def _valid_digests(record: dict, st: os.stat_result) -> Digests | None:
    if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return None
    return Digests(record["size"], record["sha1"], record.get("md5"))


def _write_record(target: str | int, digests: Digests) -> None:
    st = os.stat(target) if isinstance(target, str) else os.fstat(target)
    record = {"sha1": digests.sha1, "md5": digests.md5, "size": digests.size, "mtime_ns": st.st_mtime_ns}
    os.setxattr(target, RECORD_XATTR, json.dumps(record).encode())


def _forget_record(fd: int | str) -> None:
    try:
        os.removexattr(fd, RECORD_XATTR)
    except OSError as err:
        if err.errno != errno.ENODATA:
            raise
