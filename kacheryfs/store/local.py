"""The local content-addressed store: blobs under `<root>/<alg>/aa/bb/cc/<hash>`.

The layout is the one every kachery generation kept, so an existing kachery storage dir
works as it is. Writes go to a locked temp file in `<root>/tmp/`, are hashed while they are
copied, fsynced and linked into place; an existing blob is success, a crash leaves only a
temp file that the next `LocalStore` removes. Each blob is indexed under sha1 and md5.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from kacheryfs.errors import HashMismatch, InvalidInput, NotFound, StoreError, store_error
from kacheryfs.hashing import CHUNK, Digests, Hasher, hash_file, write_all
from kacheryfs.store import direct
from kacheryfs.store.cache import DIGESTS_XATTR, Cache, CacheLimits, blob_file, blob_path
from kacheryfs.uri import ALGORITHMS, check_hash, is_hash

if TYPE_CHECKING:
    from kacheryfs.config import Config

TEMP_DIR = "tmp"
TEMP_SUFFIX = ".part"


class BlobWriter:
    """A temp file being filled with one blob, hashed as it is written.

    `commit()` verifies it and links it into place; `abort()` (or leaving the `with`
    block) removes it. Holds an exclusive flock on the temp file so `cleanup_temp` in
    another process never deletes it while it is being written.
    """

    def __init__(self, store: LocalStore, fd: int, path: Path, md5: bool = True, size_hint: int | None = None) -> None:
        self.store, self.fd, self.path = store, fd, path
        self._md5 = md5
        self._hasher = Hasher(md5=md5)
        self._digests: Digests | None = None
        # A large blob written in pieces (a download, an upload) goes past the page cache, as copies do.
        self._sink = direct.open_sink(path, fd, md5=md5) if (size_hint or 0) >= direct.MIN_SIZE else None
        self._written_back = 0  # bytes whose writeback to disk has been started
        self.closed = False
        self.grouped = False  # sealed and handed to a CommitGroup, which links and closes it

    @property
    def size(self) -> int:
        """Bytes written so far."""
        if self._digests is not None:
            return self._digests.size
        return self._sink.size if self._sink is not None else self._hasher.size

    def _check_open(self) -> None:
        if self.closed or self._digests is not None:
            raise StoreError(f"{self.path} is complete or aborted: nothing more can be written to it")

    def write(self, chunk: bytes) -> None:
        """Append `chunk` (immutable bytes: the digest threads read it later)."""
        self._check_open()
        if self._sink is not None:
            try:
                self._sink.write(chunk)
            except OSError as err:
                self.abort()
                raise store_error(err, f"writing {self.path}") from err
            return
        self._hasher.update(chunk)
        try:
            write_all(self.fd, chunk)
        except OSError as err:
            self.abort()
            raise store_error(err, f"writing {self.path}") from err
        pending = self._hasher.size - self._written_back
        if pending >= _KERNEL_COPY:  # so the fsync at commit has little left to wait for
            _start_writeback(self.fd, self._written_back, pending)
            self._written_back = self._hasher.size

    def expect_size(self, size: int) -> None:
        """The blob will be `size` bytes (a download's Content-Length): a large one, of which
        nothing is written yet, then goes past the page cache."""
        if self._sink is None and self.size == 0 and self._digests is None and size >= direct.MIN_SIZE:
            with suppress(OSError):  # no O_DIRECT descriptor to be had: the ordinary writes do
                self._sink = direct.open_sink(self.path, self.fd, md5=self._md5)

    def space(self) -> memoryview | None:
        """Where the next bytes may be received in place (then `advance`), or None: use `write`.

        Only a large blob written past the page cache has such room: a network read goes
        straight into the buffer its digests and its disk write are made from.
        """
        self._check_open()
        if self._sink is None:
            return None
        try:
            return self._sink.space()
        except OSError as err:
            self.abort()
            raise store_error(err, f"writing {self.path}") from err

    def advance(self, n: int) -> None:
        """`n` bytes were received at the start of the last `space()`."""
        assert self._sink is not None
        try:
            self._sink.advance(n)
        except OSError as err:
            self.abort()
            raise store_error(err, f"writing {self.path}") from err

    def write_from(self, src: BinaryIO, progress: Callable[[int], None] | None = None) -> None:
        """Append everything `src` yields."""
        while chunk := src.read(CHUNK):
            self.write(chunk)
            if progress is not None:
                progress(len(chunk))

    def copy_file(self, src_fd: int, progress: Callable[[int], None] | None = None) -> None:
        """Append the rest of an open regular file (all of it, from its start, into a fresh
        writer), copied in the kernel or past the page cache where it can be.

        The bytes hashed are the bytes written (read back from our own temp file, or the very
        buffers written), never re-read from the source, so a source changed during the copy
        cannot put a blob under the wrong hash. A large file into a fresh writer is copied
        past the page cache (`direct`); the rest by copy_file_range.
        """
        self._check_open()
        if self._sink is not None:  # a writer sized for the ring: the file goes through it
            with os.fdopen(os.dup(src_fd), "rb") as src:
                self.write_from(src, progress)  # type: ignore[arg-type]
            return
        try:
            if self._hasher.size == 0:
                if os.fstat(src_fd).st_size < CHUNK:  # a small file: two syscalls, where a kernel copy takes four
                    while chunk := os.read(src_fd, CHUNK):
                        self.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
                    return
                self._digests = direct.copy(src_fd, self.path, self.fd, md5=self._md5, progress=progress)
                if self._digests is not None:
                    return
            while True:
                try:
                    copied = os.copy_file_range(src_fd, self.fd, _KERNEL_COPY)
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    with os.fdopen(os.dup(src_fd), "rb") as src:
                        self.write_from(src, progress)  # type: ignore[arg-type]
                    return
                if copied == 0:
                    return
                start = self._hasher.size
                for offset in range(start, start + copied, CHUNK):
                    self._hasher.update(os.pread(self.fd, min(CHUNK, start + copied - offset), offset))
                if copied == _KERNEL_COPY:  # more may follow; after a short copy the commit's fsync comes next
                    _start_writeback(self.fd, start, copied)
                if progress is not None:
                    progress(copied)
        except OSError as err:
            self.abort()
            raise store_error(err, f"writing {self.path}") from err

    def commit(
        self,
        *,
        expect_alg: str | None = None,
        expect_hash: str | None = None,
        expect_size: int | None = None,
        remote: str | None = None,
    ) -> Digests:
        """fsync, check the expectations, and link the blob in under both of its hashes
        (`remote`: the channel it came from, see `BlobWriter.seal`)."""
        digests = self.seal(expect_alg=expect_alg, expect_hash=expect_hash, expect_size=expect_size, remote=remote)
        try:
            os.fsync(self.fd)
            self.store._link_into_place(self.path, digests)
        except OSError as err:
            raise store_error(err, f"committing {self.path}") from err
        finally:
            self.abort()
        return digests

    def seal(
        self,
        *,
        expect_alg: str | None = None,
        expect_hash: str | None = None,
        expect_size: int | None = None,
        remote: str | None = None,
    ) -> Digests:
        """Finish the blob and check the expectations: it is then read-only, its digests noted
        on it, ready to be made durable and linked. On any failure the writer is aborted.

        `remote` names a channel that holds a copy (it was fetched from there): only such
        blobs may be evicted, see `Cache`.
        """
        try:
            digests = self._finish()
            if expect_size is not None and digests.size != expect_size:
                raise HashMismatch(f"expected {expect_size} bytes, got {digests.size}")
            got = digests.get(expect_alg or "sha1")
            if expect_hash is not None and got != expect_hash.lower():
                raise HashMismatch(f"expected {expect_alg}:{expect_hash}, got {got}")
            os.fchmod(self.fd, 0o444)
            _record_digests(self.fd, digests, remote)
        except OSError as err:
            self.abort()
            raise store_error(err, f"writing {self.path}") from err
        except BaseException:
            self.abort()
            raise
        return digests

    def _finish(self) -> Digests:
        if self._digests is None:
            if self._sink is not None:
                try:
                    self._digests = self._sink.finish()
                finally:
                    self._sink.close()
            else:
                self._digests = self._hasher.finish()
        return self._digests

    def abort(self) -> None:
        """Close and remove the temp file (idempotent)."""
        if not self.closed:
            self.closed = True
            if self._sink is not None and self._digests is None:
                self._sink.close()  # its threads stop; what they had not written is not wanted
            else:
                self._finish()
            with suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.grouped:
            self.abort()


class LocalStore:
    """Blobs on local disk, addressed by (alg, hex digest)."""

    def __init__(self, root: str | Path, *, limits: CacheLimits | None = None, clean: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self._root = str(self.root)
        self.cache = Cache(self.root, limits)
        try:
            (self.root / TEMP_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot create the storage dir {self.root}: {err.strerror}; "
                "give a writable directory (--storage-dir, $KACHERY_STORAGE_DIR or storage_dir in the config)"
            ) from err
        if clean:
            self.cleanup_temp()

    @classmethod
    def from_config(cls, config: Config) -> LocalStore:
        """The store the configuration names, with its cache bounds."""
        return cls(
            config.storage_dir,
            limits=CacheLimits(config.cache_max_size, config.min_free_space, config.track_access),
        )

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- reading -------------------------------------------------------------------
    def blob_path(self, alg: str, digest: str) -> Path:
        return blob_path(self.root, alg, digest)

    def blob_file(self, alg: str, digest: str) -> str:
        """`blob_path` as a string, made faster (opens and reads ahead take it)."""
        return blob_file(self._root, alg, digest)

    def size(self, alg: str, digest: str) -> int | None:
        """Size of the blob, or None when this store does not have it."""
        try:
            return os.stat(self.blob_file(alg, digest)).st_size  # a string path: it is on the way of first opens
        except FileNotFoundError:
            return None
        except OSError as err:
            raise store_error(err, f"reading {alg}:{digest}") from err

    def noted_digests(self, alg: str, digest: str) -> Digests | None:
        """The digests noted on a blob when it was stored (md5 may still be None), or None."""
        path = self.blob_path(alg, digest)
        try:
            note = json.loads(os.getxattr(path, DIGESTS_XATTR))
            return Digests(note["size"], note["sha1"], note["md5"])
        except FileNotFoundError as err:
            raise NotFound(f"{alg}://{digest} is not in the local store {self.root}") from err
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def digests(self, alg: str, digest: str) -> Digests:
        """Size, sha1 and md5 of a stored blob: from its note, else by hashing it, noted then
        (blobs stored by older kachery versions carry no note; staged ones get their md5 later)."""
        noted = self.noted_digests(alg, digest)
        if noted is not None and noted.md5 is not None:
            return noted
        path = self.blob_file(alg, digest)
        digests = hash_file(path)
        if getattr(digests, alg) == digest:  # a damaged blob gets no note that would vouch for it
            with suppress(OSError):  # a note is a shortcut: a read-only store goes without
                _renote(path, digests)
        return digests

    def add_md5(self, sha1: str, md5: str) -> None:
        """Index a stored blob under its md5 too, once that is known (staging hashes it later)."""
        final = self.blob_path("sha1", sha1)
        digests = Digests(os.stat(final).st_size, sha1, check_hash("md5", md5))
        self._index_md5(final, digests)
        _renote(final, digests)

    def note_remote(self, alg: str, digest: str, channel: str) -> None:
        """Note that `channel` holds a copy of this blob (it was uploaded there): it may now be
        evicted, being fetchable again."""
        try:
            fd = os.open(self.blob_file(alg, digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            note = _noted(fd)
            if note:
                note["remote"] = channel
                with suppress(OSError):
                    os.setxattr(fd, DIGESTS_XATTR, json.dumps(note).encode())
            else:  # stored before notes were kept, or noted nowhere: note it whole
                _record_digests(fd, hash_file(self.blob_path(alg, digest)), channel)
        finally:
            os.close(fd)

    def has(self, alg: str, digest: str) -> bool:
        return self.size(alg, digest) is not None

    def open_fd(self, alg: str, digest: str) -> int:
        """A read-only fd on the blob, holding a shared flock so it is not evicted while open."""
        path = self.blob_file(alg, digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise NotFound(f"{alg}://{digest} is not in the local store {self.root}") from err
        except OSError as err:
            raise store_error(err, f"opening {alg}:{digest}") from err
        fcntl.flock(fd, fcntl.LOCK_SH)
        self.cache.note_access(path)
        return fd

    def open(self, alg: str, digest: str) -> BinaryIO:
        """An open binary file for the blob (see `open_fd`); NotFound when absent."""
        return os.fdopen(self.open_fd(alg, digest), "rb")

    def iter_blobs(self, alg: str = "sha1") -> Iterator[tuple[str, Path]]:
        """Every (digest, path) stored under `alg`."""
        base = self.root / alg
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if is_hash(alg, name):
                    yield name, Path(dirpath) / name

    # -- writing -------------------------------------------------------------------
    def writer(self, md5: bool = True, size_hint: int | None = None) -> BlobWriter:
        """A fresh locked temp file in this store's filesystem (`md5=False`: sha1 only, the
        md5 index is then added later, see `add_md5`; `size_hint`: the bytes expected, so a
        large blob can be written past the page cache)."""
        while True:
            path = self.root / TEMP_DIR / f"kfs-{os.urandom(8).hex()}{TEMP_SUFFIX}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise store_error(err, f"creating a temp file in {self.root / TEMP_DIR}") from err
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                try:
                    return BlobWriter(self, fd, path, md5, size_hint)
                except OSError as err:
                    os.close(fd)
                    os.unlink(path)
                    raise store_error(err, f"opening {path}") from err
            # another process's cleanup_temp locked and removed it between our open and flock
            os.close(fd)

    def put_stream(
        self,
        src: BinaryIO,
        *,
        expect_alg: str | None = None,
        expect_hash: str | None = None,
        expect_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Digests:
        """Store everything `src` yields; HashMismatch (and nothing stored) if it is not what was expected."""
        with self.writer() as w:
            w.write_from(src, progress)
            return w.commit(expect_alg=expect_alg, expect_hash=expect_hash, expect_size=expect_size)

    def put_bytes(self, data: bytes) -> Digests:
        return self.put_stream(io.BytesIO(data), expect_size=len(data))

    def put_file(
        self,
        path: str | Path,
        *,
        hard_link: bool = False,
        progress: Callable[[int], None] | None = None,
        group: CommitGroup | None = None,
    ) -> Digests:
        """Store a local file (by hard link when asked and possible, else by copy).

        In a `group` (see `LocalStore.group`), a copied blob is linked in when the group is.
        """
        path = Path(path)
        try:
            if hard_link:
                before = os.stat(path)
                digests = hash_file(path)
                if self._try_hard_link(path, digests, before):
                    return digests
            with open(path, "rb", buffering=0) as src, self.writer() as w:
                w.copy_file(src.fileno(), progress)
                return w.commit() if group is None else group.add(w)
        except FileNotFoundError as err:
            raise NotFound(f"no such file: {path}") from err
        except IsADirectoryError as err:
            raise InvalidInput(f"{path} is a directory: store it with store_dir or kachery-store") from err
        except PermissionError as err:
            raise StoreError(f"cannot read {path}: permission denied") from err

    def link_existing(self, path: str | Path, digests: Digests) -> None:
        """Add a file whose digests are known as a blob, sharing its bytes (hard link) when possible.

        The caller guarantees the bytes will not change under the blob (staging breaks the
        sharing before it writes again).
        """
        if self._try_hard_link(Path(path), digests):
            _renote(path, digests)
            return
        with open(path, "rb", buffering=0) as src, self.writer() as w:
            w.copy_file(src.fileno())
            w.commit(expect_alg="sha1", expect_hash=digests.sha1, expect_size=digests.size)

    def _try_hard_link(self, path: Path, digests: Digests, before: os.stat_result | None = None) -> bool:
        """Link `path` in as the blob `digests`; False (nothing linked) when a copy is needed.

        With `before` (the file's stat before it was hashed), a file that changed meanwhile
        is unlinked again: its bytes may not be the ones hashed.
        """
        final = self.blob_path("sha1", digests.sha1)
        if self.cache.limits.bounded and not final.exists():
            self.cache.make_room(digests.size)
        try:
            _link(path, final)
        except FileExistsError:
            return True
        except OSError:
            return False  # another filesystem or no link support: copy instead
        if before is not None:
            after = os.stat(final)
            if (after.st_ino, after.st_size, after.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
                os.unlink(final)
                return False
        self._index_md5(final, digests)
        return True

    @contextmanager
    def group(self) -> Iterator[CommitGroup]:
        """Commits made durable together, for many small blobs at once (see `CommitGroup`).

        Leaving the block links in what is left; leaving it by an exception drops the blobs
        not yet linked.
        """
        group = CommitGroup(self)
        try:
            yield group
        except BaseException:
            group.abort()
            raise
        group.flush()

    def _link_into_place(self, temp: Path, digests: Digests, *, sync: bool = True) -> None:
        final = self.blob_path("sha1", digests.sha1)
        if self.cache.limits.bounded and not final.exists():
            self.cache.make_room(digests.size)
        try:
            _link(temp, final)
        except FileExistsError:
            pass  # the blob is already stored: success
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            os.replace(temp, final)  # filesystems without hard links
        if sync:
            _fsync_dir(final.parent)
        self._index_md5(final, digests)

    def _index_md5(self, final: Path, digests: Digests) -> None:
        if digests.md5 is None:
            return
        md5_path = self.blob_path("md5", digests.md5)
        try:
            _link(final, md5_path)
        except FileExistsError:
            pass
        except OSError:  # no hard links here: a copy, written aside and renamed into place
            with open(final, "rb", buffering=0) as src, self.writer() as w:
                w.copy_file(src.fileno())
                os.fchmod(w.fd, 0o444)
                os.fsync(w.fd)
                os.replace(w.path, md5_path)

    # -- maintenance ---------------------------------------------------------------
    def cleanup_temp(self) -> int:
        """Remove temp files left by crashed writers (those no live writer holds locked)."""
        removed = 0
        tmp = self.root / TEMP_DIR
        for entry in os.scandir(tmp):
            if not entry.name.endswith(TEMP_SUFFIX):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            else:
                with suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
            finally:
                os.close(fd)
        return removed


class CommitGroup:
    """Blobs made durable together: what storing a directory of many small files needs.

    A single commit costs two fsyncs, the blob's and then its directory's: about 1 ms of disk
    here, most of the time a small file takes. A group takes sealed writers (`add`) and, every
    `MAX_FILES` blobs or `MAX_BYTES` bytes and at the end (`flush`), makes all their bytes
    durable with one sync of the store's filesystem, links them into place, and makes the
    links durable with a second sync. As with single commits, no blob is ever linked before
    its bytes are on disk: a crash leaves the group's temp files, which the next LocalStore
    removes. One thread uses a group.
    """

    MAX_FILES = 128  # each holds a descriptor until the group is linked
    MAX_BYTES = 256 << 20

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self._sealed: list[tuple[BlobWriter, Digests]] = []
        self._bytes = 0

    def add(self, writer: BlobWriter) -> Digests:
        """Seal `writer` (see `BlobWriter.seal`); its blob is linked in at the next flush."""
        digests = writer.seal()
        writer.grouped = True
        self._sealed.append((writer, digests))
        self._bytes += digests.size
        if len(self._sealed) >= self.MAX_FILES or self._bytes >= self.MAX_BYTES:
            self.flush()
        return digests

    def flush(self) -> None:
        """Make the sealed blobs durable and link them in."""
        sealed, self._sealed, self._bytes = self._sealed, [], 0
        if not sealed:
            return
        try:
            if not _syncfs(sealed[0][0].fd):
                for w, _ in sealed:
                    os.fsync(w.fd)
            for w, digests in sealed:
                self.store._link_into_place(w.path, digests, sync=False)
            if not _syncfs(sealed[0][0].fd):  # the links, and the directories made for them
                blobs = {(alg, h) for _, d in sealed for alg, h in (("sha1", d.sha1), ("md5", d.md5)) if h}
                for parent in {os.path.dirname(self.store.blob_file(alg, h)) for alg, h in blobs}:
                    _fsync_dir(Path(parent))
        except OSError as err:
            raise store_error(err, f"committing {len(sealed)} blobs to {self.store.root}") from err
        finally:
            for w, _ in sealed:
                w.abort()

    def abort(self) -> None:
        """Drop the blobs not yet linked."""
        sealed, self._sealed, self._bytes = self._sealed, [], 0
        for w, _ in sealed:
            w.abort()


def _syncfs(fd: int) -> bool:
    """Make everything on the filesystem `fd` is on durable; False where there is no syncfs."""
    if not hasattr(_libc, "syncfs"):
        return False
    if _libc.syncfs(fd) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return False
    raise OSError(err, os.strerror(err))


_KERNEL_COPY = 16 * CHUNK
_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing these pages to disk now, so the final fsync has little left to wait for."""
    if hasattr(_libc, "sync_file_range"):
        _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE)


def _link(src: Path, dst: Path) -> None:
    """os.link, making the fan-out directories of `dst` only when they are missing (rarely)."""
    try:
        os.link(src, dst)
    except FileNotFoundError:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)


def _record_digests(fd: int, digests: Digests, remote: object = None) -> None:
    """Note both digests on the blob itself, so `kachery-info` need not hash it again, and the
    channel known to hold a copy (`remote`)."""
    note: dict[str, object] = {"size": digests.size, "sha1": digests.sha1, "md5": digests.md5}
    if remote:
        note["remote"] = remote
    with suppress(OSError):  # a filesystem without user xattrs: the digests get recomputed when asked
        os.setxattr(fd, DIGESTS_XATTR, json.dumps(note).encode())


def _renote(path: str | Path, digests: Digests) -> None:
    """Note these digests on the file at `path`, keeping the channel its note names."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _record_digests(fd, digests, _noted(fd).get("remote"))
    finally:
        os.close(fd)


def _noted(fd: int) -> dict[str, object]:
    try:
        note = json.loads(os.getxattr(fd, DIGESTS_XATTR))
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["ALGORITHMS", "BlobWriter", "CommitGroup", "LocalStore"]
