"""The staging area: a writable directory whose files become blobs when they are closed.

Files live in a backing directory on disk (write-through), so nothing dropped there is
lost if the daemon dies. That directory is created private (0700) and must not be edited
directly: staged files share their inodes with blobs, and only this module knows when to
unshare them. A symlink counts as its target; a target outside the staging dir is stored as
a copy, never linked (the store must not share bytes it does not own).

Writes that arrive in order are hashed as they arrive, so a close costs almost nothing;
anything else is hashed at close. A closed file is ingested by hard link (the staged file
and the blob share their bytes) and remembered in an extended attribute of the backing
file. Before the first change to a file whose bytes are a blob's,
the sharing is broken (copy-on-write) and every handle open on it is moved to the copy, so
a stored blob never changes. A hard link is a second name of the same backing file (no copy):
the names share its bytes, record and URL until a change through one of them, which gives
that name a copy of its own the same way, while the other names keep theirs — a staged name,
like a blob, changes only through itself. After start, `recover()` (in the background: the mount
answers meanwhile, and asking for a URL ingests on demand) ingests whatever a crash left
unfinished.

Two rules keep a blob from ever holding other bytes than its hash says, whatever the
threads do: a file is linked into the store only while no handle has unsaved changes to it
(`OpenFile.dirty`), and a hash is used only if nothing changed the file while it was taken
(`_Hashing.stale`). Both are checked under one lock, the lock every change starts under.

It knows nothing of FUSE: paths are relative to the staging root, errors are OSError or
kacheryfs errors; `kacheryfs.mount.fuse_ops` translates.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from kacheryfs import manifest
from kacheryfs.errors import InvalidInput, KacheryError, NotFound
from kacheryfs.hashing import Digests, Hasher, hash_file
from kacheryfs.manifest import FileEntry
from kacheryfs.store import LocalStore
from kacheryfs.store.md5_index import Md5Indexer
from kacheryfs.upload_queue import UploadQueue
from kacheryfs.uri import KacheryURL, file_url

log = logging.getLogger(__name__)

RECORD_XATTR = "user.kacheryfs.ingested"  # on the backing file: what it was ingested as
URL_XATTR = "user.kachery.url"
_PUBLIC_XATTRS = ("user.kachery.url", "user.kachery.sha1", "user.kachery.size", "user.kachery.uploaded")
_COW_SUFFIX = ".kacheryfs-cow"
_FUSE_HIDDEN = ".fuse_hidden"  # libfuse renames a file removed while open to this, and removes it on release
_UTIME_NOW, _UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
_MD5_INLINE_MAX = 1 << 20  # smaller files get their md5 at close: cheaper than a trip through the indexer
_REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC  # flags that must not act again when a handle moves
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _fd_path(fd: int) -> str:
    """A path that opens or links the very file behind `fd`, whatever its name is now."""
    return f"/proc/self/fd/{fd}"


@dataclass(eq=False)
class _Hashing:
    """A hash of one inode's bytes under way; `stale` once they may have changed under it."""

    ino: int
    stale: bool = False


@dataclass(eq=False)
class OpenFile:
    """One open handle on a staged file, and the running hash of what was written in order."""

    fd: int
    rel: str  # kept current across renames
    flags: int
    ino: int
    opener: int | None = None  # the process that opened it, whose closes ingest
    dirty: bool = False  # changed since opened or since its last flush: the file has no URL now
    hasher: Hasher | None = None  # every write so far continued where it left off
    hashing: _Hashing | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # orders this handle's writes and flush

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY


class StagingArea:
    """A write-through directory that ingests closed files into a LocalStore."""

    def __init__(self, root: Path, store: LocalStore, uploads: UploadQueue | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._root_real = os.path.realpath(self.root)
        self.store = store
        self.uploads = uploads
        self.md5_index = Md5Indexer(store)
        self._handles: dict[int, OpenFile] = {}
        self._hashing: dict[int, set[_Hashing]] = {}  # inode → hashes of it under way
        # Guards the two dicts, every start of a change and every link into the store.
        self._lock = threading.Lock()

    def owns(self, fh: int) -> bool:
        """True for a handle this area opened."""
        return fh in self._handles

    def status(self) -> dict[str, object]:
        """The staging dir and its upload queue, for `kacheryfs status`."""
        queue = self.uploads.pending() if self.uploads is not None else []
        with self._lock:
            changing = sum(1 for h in self._handles.values() if h.dirty)
        return {
            "dir": str(self.root),
            "open_for_write": changing,
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

    def new_name(self, rel: str) -> str:
        """`real` of a name about to be made: InvalidInput unless a manifest can hold it."""
        try:
            rel.encode()
        except UnicodeEncodeError:
            raise InvalidInput(f"{rel!r}: a staged name must be valid UTF-8 (manifests are JSON)") from None
        return self.real(rel)

    def stat(self, rel: str) -> os.stat_result:
        try:
            return os.lstat(self.real(rel))
        except FileNotFoundError:
            # A name about to be created is looked up first: ordinary, not an error to report.
            raise NotFound(f"no staged file {rel!r}") from None

    def readdir(self, rel: str) -> list[tuple[str, os.stat_result]]:
        out = []
        with os.scandir(self.real(rel)) as entries:
            for entry in entries:
                # Never shown: copies under way, files already removed (a crash's are cleared by recover()).
                if not entry.name.endswith(_COW_SUFFIX) and not entry.name.startswith(_FUSE_HIDDEN):
                    with suppress(FileNotFoundError):  # removed while listed
                        out.append((entry.name, entry.stat(follow_symlinks=False)))
        return out

    # -- files -------------------------------------------------------------------------
    def create(self, rel: str, flags: int, mode: int, opener: int | None = None) -> int:
        path = self.new_name(rel)
        with self._lock:  # creates, renames and unlinks all hold it: a name found missing stays so
            try:
                self._break_sharing(path, os.lstat(path), truncate=bool(flags & os.O_TRUNC))
                new = False
            except FileNotFoundError:
                new = True
            fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, mode & 0o7777)
            return self._track(fd, rel, flags, opener, changed=True, new=new)

    def open(self, rel: str, flags: int, opener: int | None = None) -> int:
        path = self.real(rel)
        if flags & os.O_ACCMODE == os.O_RDONLY or not flags & os.O_TRUNC:
            # Nothing changes yet: a write-only open of a blob's file is unshared at its first write.
            fd = os.open(path, flags | os.O_CLOEXEC)
            with self._lock:
                return self._track(fd, rel, flags, opener, changed=False)
        with self._lock:  # O_TRUNC changes the bytes at once
            self._break_sharing(path, os.lstat(path), truncate=True)
            fd = os.open(path, flags | os.O_CLOEXEC)
            return self._track(fd, rel, flags, opener, changed=True)

    def _track(self, fd: int, rel: str, flags: int, opener: int | None, *, changed: bool, new: bool = False) -> int:
        handle = OpenFile(fd, rel, flags, os.fstat(fd).st_ino, opener)
        self._handles[fd] = handle
        if changed:
            self._start_change(handle, new=new)
        return fd

    def read(self, fh: int, size: int, offset: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        handle = self._handles[fh]
        with handle.lock:
            if not handle.dirty:
                with self._lock:
                    self._break_sharing(self.real(handle.rel), os.fstat(fh), truncate=False)
                    self._start_change(handle)
            written = os.pwrite(fh, data, offset)
            hasher = handle.hasher
            if hasher is not None:
                if offset == hasher.size and written == len(data):
                    hasher.update(data)
                else:
                    handle.hasher = None
                    hasher.finish()  # stop its threads: this file is hashed at close
            return written

    def truncate(self, rel: str, length: int) -> None:
        """truncate(2) or ftruncate(2): the FUSE high-level API passes only the path."""
        path = self.real(rel)
        with self._lock:
            self._break_sharing(path, os.lstat(path), truncate=length == 0)
            os.truncate(path, length)
            ino = os.lstat(path).st_ino
            # An in-order hash that already ends at the new length is still right (cp of a
            # sparse tail, ftruncate to the size written); every other hash of it is not.
            spare = {h.hashing for h in self._on_inode(ino) if h.hasher is not None and h.hasher.size == length}
            self._changed(ino, spare=spare)
            _forget_record(path)
            busy = any(h.dirty for h in self._on_inode(ino))
        if not busy:  # no writer will close it: ingest now
            with suppress(NotFound):
                self._ingest_now(rel)

    def flush(self, fh: int, closer: int | None = None) -> None:
        """A close(2) by process `closer`: ingest what was written, so its URL is ready when close returns.

        Every close of a copy of the descriptor flushes, also the one a forked child makes
        at exec (O_CLOEXEC): only the opener's closes ingest, or a file still being written
        would get the URL of half its bytes, and a copy-on-write at each fork. The last
        close (release) ingests whoever makes it.
        """
        handle = self._handles.get(fh)
        if handle is None or (closer is not None and handle.opener is not None and closer != handle.opener):
            return
        with handle.lock:
            if not handle.dirty:
                return
            hasher, hashing = handle.hasher, handle.hashing
            handle.hasher = None
            digests = hasher.finish() if hasher is not None else None
            st = os.fstat(fh)
            if digests is None or hashing is None or hashing.stale or digests.size != st.st_size:
                with self._lock:
                    self._unwatch(hashing)
                    hashing = handle.hashing = self._watch(handle.ino)
                digests = _hash_fd(fh, st.st_size)
            else:
                digests = _with_md5(fh, digests)
            self._commit(fh, handle.rel, hashing, digests, handle)

    def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    def release(self, fh: int) -> None:
        handle = self._handles.get(fh)
        try:
            if handle is not None and handle.dirty:
                self.flush(fh)  # the last close: ingest, also when the opener's closes came before the writes
        finally:
            with self._lock:
                self._handles.pop(fh, None)
                if handle is not None:
                    self._unwatch(handle.hashing)
            if handle is not None and handle.hasher is not None:
                handle.hasher.finish()
            os.close(fh)

    # -- names -------------------------------------------------------------------------
    def unlink(self, rel: str) -> None:
        with self._lock:  # a name must not change between its check and its link into the store
            os.unlink(self.real(rel))

    def mkdir(self, rel: str, mode: int) -> None:
        os.mkdir(self.new_name(rel), mode & 0o7777)

    def rmdir(self, rel: str) -> None:
        os.rmdir(self.real(rel))

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """rename(2) and renameat2(2)'s RENAME_NOREPLACE / RENAME_EXCHANGE (tools rely on both)."""
        with self._lock:  # with the handles' names, which flush and copy-on-write go by
            old_path, new_path = self.real(old), self.new_name(new)
            ino = _inode(old_path)
            if not flags and ino is not None and ino == _inode(new_path) and old_path != new_path:
                # Two names of one file (hard links): rename(2) would leave both, but the kernel
                # now knows the old name's node as the new name and no longer `old`: so must we.
                os.unlink(old_path)
            else:
                _rename(old_path, new_path, flags)  # of two names of one file: EEXIST or, exchanged, nothing
            moves = [(old, new), (new, old)] if flags & RENAME_EXCHANGE else [(old, new)]
            renamed = {}
            for handle in self._handles.values():
                for src, dst in moves:
                    if handle.rel == src or handle.rel.startswith(src.rstrip("/") + "/"):
                        renamed[handle] = dst + handle.rel[len(src) :]
                        break
            for handle, rel in renamed.items():
                handle.rel = rel

    def chmod(self, rel: str, mode: int) -> None:
        with self._lock:  # never between the reading and the putting back of a mode (_owner_may_write)
            os.chmod(self.real(rel), mode & 0o7777)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        os.chown(self.real(rel), uid, gid, follow_symlinks=False)

    def utimens(self, rel: str, times_ns: tuple[int, int] | None) -> None:
        path = self.real(rel)
        now = time.time_ns()
        atime, mtime = times_ns if times_ns is not None else (_UTIME_NOW, _UTIME_NOW)
        with self._lock:
            st = os.lstat(path)
            record = _valid_record(path, st) if stat.S_ISREG(st.st_mode) else None
            # libfuse passes `touch`'s "now" and "leave alone" as their special nanosecond values
            atime = now if atime == _UTIME_NOW else st.st_atime_ns if atime == _UTIME_OMIT else atime
            mtime = now if mtime == _UTIME_NOW else st.st_mtime_ns if mtime == _UTIME_OMIT else mtime
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)
            if record is not None and not any(h.dirty for h in self._on_inode(st.st_ino)):
                _write_record(path, record)  # same bytes, new time: the record stays valid

    def link(self, existing: str, rel: str) -> None:
        """link(2): `rel` becomes a second name of the staged file `existing` (see the module doc).

        A file with unsaved writes is copied instead: what its writer writes next is a change
        through the writer's name only, so the new name holds the bytes written so far. Bytes
        are not shared by changes because each name is a node of its own to the kernel, which
        keeps its size: the other names would show stale sizes and cut reads short. Mode,
        owner and times stay shared, as link(2) has them; the other names show a change of
        them once the kernel asks again (attr_timeout).
        """
        source, path = self.real(existing), self.new_name(rel)
        if self._through_link(os.path.dirname(source)) or self._through_link(os.path.dirname(path)):
            # A name outside the staging dir would let its owner change a blob; the kernel says EXDEV too.
            raise OSError(errno.EXDEV, "a hard link in staging must stay in the staging dir", rel)
        with self._lock:
            st = os.lstat(source)
            if not (stat.S_ISREG(st.st_mode) and any(h.dirty for h in self._on_inode(st.st_ino))):
                os.link(source, path, follow_symlinks=False)  # of a directory: EPERM, as the kernel says
                return
            tmp = self._copy_name(st)
            with _owner_may_write(self.root):
                os.close(_copy_file(source, st, tmp, empty=False))
                try:
                    _rename(tmp, path, RENAME_NOREPLACE)  # EEXIST, as link(2), when `rel` exists
                except BaseException:
                    os.unlink(tmp)
                    raise
        with suppress(NotFound):  # a new file nobody writes: its URL now, as for any closed file
            self._ingest_now(rel)

    def symlink(self, target: str, rel: str) -> None:
        with self._lock:
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
        if stat.S_ISREG(st.st_mode) and (self._is_changing(st.st_ino) or _valid_record(path, st) is None):
            return []
        return list(_PUBLIC_XATTRS)

    def digests(self, rel: str) -> Digests:
        """The digests of a staged file (ingested now if needed); NotFound while it is being changed."""
        path = self.real(rel)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or self._through_link(path):
            return self._link_target_digests(path)
        if self._is_changing(st.st_ino):
            raise NotFound(f"{rel} is still open for writing: its URL exists once it is closed")
        record = _valid_record(path, st)
        return record if record is not None else self._ingest_now(rel)

    def dir_url(self, rel: str) -> tuple[KacheryURL, int]:
        """The sha1dir URL of a staging directory's current contents (manifest stored now)."""
        path = Path(self.real(rel))

        def entry(file: Path) -> FileEntry:
            if file.name.endswith(_COW_SUFFIX):
                raise NotFound(f"{file.parent} is being changed: ask again")
            digests = self.digests(str(file.relative_to(self.root)))
            return FileEntry(digests.size, digests.sha1)

        node = manifest.build(path, entry)
        digests = self.store.put_bytes(manifest.serialize(node))
        with self._lock:
            self._keep_until_uploaded(digests.sha1)
        label = path.name if rel.strip("/") else self.root.name
        return KacheryURL("sha1", digests.sha1, True, label), node.total_size()

    def _link_target_digests(self, path: str) -> Digests:
        """A symlink in a staged tree (a file's or a directory's above it) counts as its
        target, as `kachery-store` follows it."""
        target = os.path.realpath(path)
        if not os.path.isfile(target):
            raise NotFound(f"{path} is a symlink to no file")
        if self._inside(target):
            return self.digests(os.path.relpath(target, self._root_real))
        digests = self.store.put_file(target)  # outside staging: a copy, never a link to bytes we do not own
        with self._lock:
            self._keep_until_uploaded(digests.sha1)
        return digests

    def _inside(self, real_path: str) -> bool:
        """True when a resolved path lies in the staging dir."""
        return os.path.commonpath([real_path, self._root_real]) == self._root_real

    def _through_link(self, path: str) -> bool:
        """True when a backing path passes through a symlink (itself or a directory above it)."""
        as_named = os.path.normpath(os.path.join(self._root_real, os.path.relpath(path, self.root)))  # the root too
        return os.path.realpath(path) != as_named

    def _is_changing(self, ino: int) -> bool:
        with self._lock:
            return any(h.dirty for h in self._on_inode(ino))

    # -- ingest ------------------------------------------------------------------------
    def _ingest_now(self, rel: str) -> Digests:
        """Hash a staged file nobody is changing and store it; NotFound if it changed meanwhile."""
        path = self.real(rel)
        if self._through_link(path):
            raise NotFound(f"{rel} leads through a symlink: it is stored as its target")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            with self._lock:
                st = os.fstat(fd)
                if any(h.dirty for h in self._on_inode(st.st_ino)):
                    raise NotFound(f"{rel} is still open for writing: its URL exists once it is closed")
                hashing = self._watch(st.st_ino)
            try:
                digests = _hash_fd(fd, st.st_size)
            except BaseException:
                with self._lock:
                    self._unwatch(hashing)
                raise
            if not self._commit(fd, rel, hashing, digests, None):
                raise NotFound(f"{rel} changed while it was being hashed: ask again")
            return digests
        finally:
            os.close(fd)

    def _commit(self, fd: int, rel: str, hashing: _Hashing, digests: Digests, handle: OpenFile | None) -> bool:
        """Store the file behind `fd` (named `rel`) under `digests`, unless it changed since.

        `handle` (a flush) has its changes closed here, whatever happens: a skipped file is
        ingested by the writer still changing it, or on the next look at its URL.
        """
        with self._lock:
            rel = handle.rel if handle is not None else rel  # renamed while hashed
            self._unwatch(hashing)
            if handle is not None:
                handle.dirty, handle.hashing = False, None
                self._changed(hashing.ino)  # its writes may lie under another handle's hash
            if hashing.stale or any(h.dirty for h in self._on_inode(hashing.ino)):
                log.debug("ingest of inode %d skipped: it changed while being hashed", hashing.ino)
                return False
            st, path = os.fstat(fd), self.real(rel)
            removed = _inode(path) != st.st_ino or os.path.basename(path).startswith(_FUSE_HIDDEN)
            if removed or st.st_size != digests.size:
                return False  # removed while open (nothing to keep), or changed outside the mount
            if not self._inside(os.path.realpath(path)):
                # Reached through a symlinked directory: a link would let its owner change a blob.
                log.warning("%s is not ingested: it lies outside the staging dir %s", rel, self.root)
                return False
            # Pinned before it is stored and queued after: a crash in between never leaves a
            # stored blob unpinned, nor a queued one missing; the record (last) makes it final.
            self.store.cache.pin("sha1", digests.sha1, reason="staging")
            self.store.link_existing(path, digests)  # by name: names change only under the lock
            if self.uploads is not None:
                self.uploads.enqueue(digests.sha1)
            _write_record(fd, digests, st.st_mtime_ns)
        if digests.md5 is None:
            self.md5_index.add(digests.sha1)  # md5 halves the write speed: large files get it afterwards
        log.debug("staged %s → sha1://%s (%d bytes)", rel, digests.sha1, digests.size)
        return True

    def _keep_until_uploaded(self, sha1: str) -> None:
        self.store.cache.pin("sha1", sha1, reason="staging")
        if self.uploads is not None:
            self.uploads.enqueue(sha1)

    # -- with the lock held --------------------------------------------------------------
    def _on_inode(self, ino: int) -> list[OpenFile]:
        return [h for h in self._handles.values() if h.ino == ino]

    def _watch(self, ino: int) -> _Hashing:
        hashing = _Hashing(ino)
        self._hashing.setdefault(ino, set()).add(hashing)
        return hashing

    def _unwatch(self, hashing: _Hashing | None) -> None:
        if hashing is None:
            return
        watching = self._hashing.get(hashing.ino)
        if watching is not None:
            watching.discard(hashing)
            if not watching:
                del self._hashing[hashing.ino]

    def _changed(self, ino: int, spare: Collection[_Hashing | None] = ()) -> None:
        """The bytes of `ino` change now: every hash of them under way is stale."""
        for hashing in self._hashing.get(ino, ()):
            if hashing not in spare:
                hashing.stale = True

    def _start_change(self, handle: OpenFile, *, new: bool = False) -> None:
        """`handle` is about to change its file (already unshared): drop the URL, start a hash."""
        self._changed(handle.ino)
        if not new:  # a file just created has no record
            _forget_record(handle.fd)
        handle.dirty = True
        handle.hasher = Hasher(md5=False)  # in order from byte 0; a write anywhere else drops it
        handle.hashing = self._watch(handle.ino)

    def _copy_name(self, st: os.stat_result) -> str:
        """Where a copy of the file `st` is made before it takes a name (under the lock): in the
        staging root, and short, as a name of 255 bytes leaves no room for a suffix."""
        return os.path.join(self.root, f".{st.st_ino}{_COW_SUFFIX}")

    def _break_sharing(self, path: str, st: os.stat_result, *, truncate: bool) -> None:
        """Give the name `path` of the file `st` an inode of its own before a change through it,
        if its bytes are also a blob's or another name's (a hard link).

        The copy takes the name (when `path` is still it) and the handles opened through that
        name are moved to it, so the blob and the other names (with their handles) keep their
        bytes whatever is written next.
        """
        if not stat.S_ISREG(st.st_mode):
            return
        handles = [h for h in self._on_inode(st.st_ino) if self.real(h.rel) == path]
        try:
            named = os.lstat(path).st_ino == st.st_ino
        except FileNotFoundError:
            named = False
        if not named and not handles:
            return
        source = path if named else _fd_path(handles[0].fd)
        if st.st_nlink < 2 and _read_record(source) is None:
            return  # nobody else's bytes: no other name, and no blob's (a blob's file has a record)
        tmp = self._copy_name(st)
        with _owner_may_write(self.root):  # the copy is made there, also when it is 0555
            dst = _copy_file(source, st, tmp, empty=truncate)
            if named:
                try:
                    with _owner_may_write(os.path.dirname(path)):  # into a 0555 folder too
                        os.rename(tmp, path)
                except BaseException:
                    os.close(dst)
                    with suppress(OSError):
                        os.unlink(tmp)
                    raise
        try:
            new_ino = os.fstat(dst).st_ino
            for handle in handles:
                moved = os.open(_fd_path(dst), (handle.flags & ~_REOPEN_DROP) | os.O_CLOEXEC)
                os.dup2(moved, handle.fd, inheritable=False)  # the kernel's handle now names the copy
                os.close(moved)
                handle.ino = new_ino
                self._unwatch(handle.hashing)
                handle.hashing = self._watch(new_ino) if handle.hashing is not None else None
            if not named:
                with _owner_may_write(self.root):
                    os.unlink(tmp)
        finally:
            os.close(dst)
        log.debug("copy-on-write of %s (%d bytes) before it changes", path, 0 if truncate else st.st_size)

    # -- recovery ----------------------------------------------------------------------
    def recover(self) -> int:
        """Ingest every staged file that a crash left without a valid record; how many.

        Safe while the mount is in use: each step takes the lock every change takes, and a
        file being written is left to its writer's close.
        """
        count = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    count += self._recover_file(path, name)
                except (NotFound, FileNotFoundError):
                    continue  # being written (its close ingests it), or removed meanwhile
                except (OSError, KacheryError) as err:  # one unreadable file must not stop the rest
                    log.warning("could not ingest %s left by the last run: %s", path, err)
        return count

    def _recover_file(self, path: str, name: str) -> int:
        """Recover one backing file; 1 if it had to be ingested."""
        if name.endswith(_COW_SUFFIX) or name.startswith(_FUSE_HIDDEN):
            # An interrupted copy-on-write (the original is intact), or a file removed while
            # open that libfuse did not get to delete: unless this run made it and uses it.
            with self._lock:  # copy-on-write runs whole under it
                if not self._on_inode(os.lstat(path).st_ino):
                    os.unlink(path)
            return 0
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return 0
        recorded = _valid_record(path, st)
        if recorded is None or not self.store.has("sha1", recorded.sha1):
            self._ingest_now(os.path.relpath(path, self.root))
            return 1
        self._index_md5_if_missing(recorded.sha1)
        if self.uploads is not None and self.uploads.state(recorded.sha1).startswith("no"):
            with self._lock:  # not queued for this channel (say, [staging] to changed): queue it
                self._keep_until_uploaded(recorded.sha1)
        return 0

    def _index_md5_if_missing(self, sha1: str) -> None:
        """Queue the md5 index of a staged blob whose md5 a crash kept from being noted."""
        with suppress(NotFound):
            noted = self.store.noted_digests("sha1", sha1)
            if noted is None or noted.md5 is None:
                self.md5_index.add(sha1)


def _hash_fd(fd: int, size: int) -> Digests:
    """Digests of an open file: with its md5 when it is small."""
    return hash_file(_fd_path(fd), md5=size <= _MD5_INLINE_MAX)


def _with_md5(fd: int, digests: Digests) -> Digests:
    """`digests` with the md5 of the file behind `fd` added, when it is small enough to read now."""
    if digests.md5 is not None or digests.size > _MD5_INLINE_MAX:
        return digests
    try:
        reader = os.open(_fd_path(fd), os.O_RDONLY | os.O_CLOEXEC)  # `fd` may be write-only
    except OSError:
        return digests  # not readable by us (mode 0200): the md5 indexer gets it later
    try:
        return Digests(digests.size, digests.sha1, hashlib.md5(os.pread(reader, digests.size, 0)).hexdigest())
    finally:
        os.close(reader)


def _inode(path: str) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def _copy_file(source: str, st: os.stat_result, tmp: str, *, empty: bool) -> int:
    """A new file `tmp` with the owner and mode of `st` and (unless `empty`) the bytes of `source`; its descriptor."""
    dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if not empty:
            src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _copy_bytes(src, dst, st.st_size)
            finally:
                os.close(src)
        with suppress(PermissionError):
            os.fchown(dst, st.st_uid, st.st_gid)
        os.fchmod(dst, stat.S_IMODE(st.st_mode))
    except BaseException:
        os.close(dst)
        raise
    return dst


def _copy_bytes(src: int, dst: int, size: int) -> None:
    """Copy `size` bytes between two files, in the kernel where the filesystem allows."""
    copied = 0
    try:
        while copied < size and (n := os.copy_file_range(src, dst, size - copied)):
            copied += n
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    while copied < size and (n := os.sendfile(dst, src, copied, size - copied)):
        copied += n


_libc = ctypes.CDLL(None, use_errno=True)


def _rename(old: str, new: str, flags: int) -> None:
    if not flags:
        os.rename(old, new)
        return
    at_fdcwd = -100
    if _libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old, None, new)


def _read_record(target: str | int) -> dict | None:
    try:
        return json.loads(os.getxattr(target, RECORD_XATTR))
    except (OSError, ValueError):
        return None


def _valid_record(path: str, st: os.stat_result) -> Digests | None:
    """The recorded digests, if the file has not changed since they were recorded."""
    record = _read_record(path)
    if record is None or record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return None
    return Digests(record["size"], record["sha1"], record.get("md5"))


def _write_record(target: str | int, digests: Digests, mtime_ns: int | None = None) -> None:
    if mtime_ns is None:
        mtime_ns = (os.stat(target) if isinstance(target, str) else os.fstat(target)).st_mtime_ns
    record = {"sha1": digests.sha1, "md5": digests.md5, "size": digests.size, "mtime_ns": mtime_ns}
    try:
        os.setxattr(target, RECORD_XATTR, json.dumps(record).encode())
    except PermissionError:
        with _owner_may_write(target):  # a read-only file (cp of a 0444 file, git's objects)
            os.setxattr(target, RECORD_XATTR, json.dumps(record).encode())


def _forget_record(target: int | str) -> None:
    try:
        try:
            os.removexattr(target, RECORD_XATTR)
        except PermissionError:
            with _owner_may_write(target):
                os.removexattr(target, RECORD_XATTR)
    except OSError as err:
        if err.errno != errno.ENODATA:
            raise


@contextmanager
def _owner_may_write(target: str | int) -> Iterator[None]:
    """Let a daemon that is not root change a file or directory of its own whose mode keeps
    its owner out (0444, 0555) for a moment, as root could anyway; the mode is put back.

    Setting an attribute needs write permission, and so does a copy-on-write's new name in
    a directory. Only the time of the mode's change moves (not the mtime a record keeps).
    """
    st = os.stat(target)
    mode = stat.S_IMODE(st.st_mode)
    lift = os.geteuid() != 0 and st.st_uid == os.geteuid() and not mode & stat.S_IWUSR
    if lift:
        os.chmod(target, mode | stat.S_IWUSR)
    try:
        yield
    finally:
        if lift:
            os.chmod(target, mode)
