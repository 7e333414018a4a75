"""Copy a large file into a store temp file past the page cache, hashing the bytes on their way.

Storing a big file is bound by the slower digest (md5) and by the disk. Through the page
cache the copy also costs a memcpy into fresh cache pages on both sides and a writeback
before the fsync; measured here, a 1 GiB store took twice as long that way as reading,
hashing and writing the same bytes with O_DIRECT. One thread reads chunks into a ring of
page-aligned buffers; sha1, md5 and the writer each take every chunk on a thread of their
own, and a buffer is reused once all of them are done with it. The digests are of the very
bytes written, so a source that changes during the copy cannot put a blob under a wrong hash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from kacheryfs.hashing import Digests

MIN_SIZE = 64 << 20  # smaller files go through the page cache: as fast, and the blob stays cached
CHUNK = 8 << 20
_BUFFERS = 8  # 64 MiB in flight: the reader runs ahead of the slowest consumer, memory stays bounded
_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of any logical block size we meet


def copy(
    src_fd: int, dst_path: Path, dst_fd: int, *, md5: bool = True, progress: Callable[[int], None] | None = None
) -> Digests | None:
    """Copy the open regular file `src_fd` (from its start) into the empty temp file `dst_path`.

    `dst_fd` is the temp file's ordinary descriptor: the unaligned tail goes through it, and
    the caller's fsync of it makes everything durable. Returns None, with nothing written,
    when the file is small or this filesystem takes no O_DIRECT; the caller copies then.
    """
    st = os.fstat(src_fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size < MIN_SIZE:
        return None
    try:
        out = os.open(dst_path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return None
        raise
    try:
        src = _direct_reader(src_fd)
        try:
            return _Pipeline(src, src_fd, out, dst_fd, md5).run(progress)
        finally:
            if src != src_fd:
                os.close(src)
    except _Unsupported:
        os.ftruncate(dst_fd, 0)
        return None
    finally:
        os.close(out)


class _Unsupported(Exception):
    """O_DIRECT was accepted at open but refused at the first write: copy another way."""


def _direct_reader(fd: int) -> int:
    """A second, O_DIRECT descriptor of the same open file; `fd` itself when there is none."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return fd


class _Pipeline:
    """The reader (the caller's thread) and one thread per consumer of every chunk."""

    def __init__(self, src: int, src_buffered: int, out: int, out_buffered: int, md5: bool) -> None:
        self.src, self.src_buffered, self.out, self.out_buffered = src, src_buffered, out, out_buffered
        self.hashes = {"sha1": hashlib.sha1()}
        if md5:
            self.hashes["md5"] = hashlib.md5()
        self.buffers = [mmap.mmap(-1, CHUNK) for _ in range(_BUFFERS)]
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(_BUFFERS):
            self.free.put(index)
        self.users = [0] * _BUFFERS  # consumers still to finish with each buffer
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self, progress: Callable[[int], None] | None) -> Digests:
        consumers = [self._hash(h) for h in self.hashes.values()] + [self._write]
        queues: list[queue.SimpleQueue[tuple[int, int, int] | None]] = [queue.SimpleQueue() for _ in consumers]
        threads = [
            threading.Thread(target=self._consume, args=(work, q), name="kachery-direct", daemon=True)
            for work, q in zip(consumers, queues, strict=True)
        ]
        for t in threads:
            t.start()
        offset = 0
        try:
            while self.error is None:
                index = self.free.get()
                n = self._read(index, offset)
                if n == 0:
                    break
                self.users[index] = len(queues)
                for q in queues:
                    q.put((index, n, offset))
                offset += n
                if progress is not None:
                    progress(n)
                if n < CHUNK:
                    break  # a short read of a regular file: its end
        finally:
            for q in queues:
                q.put(None)
            for t in threads:
                t.join()
            for buf in self.buffers:
                with contextlib.suppress(BufferError):  # a view still held by an error's traceback: freed with it
                    buf.close()
        if self.error is not None:
            raise self.error
        sha1 = self.hashes["sha1"].hexdigest()
        return Digests(offset, sha1, self.hashes["md5"].hexdigest() if "md5" in self.hashes else None)

    def _read(self, index: int, offset: int) -> int:
        try:
            return os.preadv(self.src, [self.buffers[index]], offset)
        except OSError as err:
            if err.errno != errno.EINVAL or self.src == self.src_buffered:
                raise
            self.src = self.src_buffered  # the source's filesystem opened O_DIRECT but cannot read so
            return os.preadv(self.src, [self.buffers[index]], offset)

    def _consume(
        self, work: Callable[[memoryview, int], None], q: queue.SimpleQueue[tuple[int, int, int] | None]
    ) -> None:
        while (item := q.get()) is not None:
            index, n, offset = item
            try:
                if self.error is None:
                    work(memoryview(self.buffers[index])[:n], offset)
            except BaseException as err:  # handed to the reader, which stops and raises it
                self.error = self.error or err
            finally:
                with self.lock:
                    self.users[index] -= 1
                    done = self.users[index] == 0
                if done:
                    self.free.put(index)

    def _hash(self, h: hashlib._Hash) -> Callable[[memoryview, int], None]:
        return lambda data, _offset: h.update(data)  # hashlib lets go of the GIL on big buffers

    def _write(self, data: memoryview, offset: int) -> None:
        aligned = len(data) & ~(_ALIGN - 1)
        done = 0
        if aligned:
            try:
                done = os.pwrite(self.out, data[:aligned], offset)
            except OSError as err:
                if err.errno == errno.EINVAL and offset == 0:
                    raise _Unsupported from err
                raise
        while done < len(data):  # the unaligned tail, or the rest of a short write
            done += os.pwrite(self.out_buffered, data[done:], offset + done)
