"""Write a large blob into a store temp file past the page cache, hashing the bytes on their way.

Storing or fetching a big blob is bound by its digests and by the disk. Through the page
cache the bytes also cost a memcpy into fresh cache pages and a writeback before the
fsync; measured here, a 1 GiB store took twice as long that way as hashing and writing the
same bytes with O_DIRECT. A `Sink` gathers the bytes in a ring of page-aligned buffers;
sha1, md5 and the writer each take every full buffer on a thread of their own, and a buffer
is reused once all of them are done with it. The digests are of the very bytes written, so
a source that changes meanwhile cannot put a blob under a wrong hash. `copy` reads a local
file straight into the ring, with O_DIRECT too.
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

MIN_SIZE = 64 << 20  # smaller blobs go through the page cache: as fast, and they stay cached
CHUNK = 8 << 20
_BUFFERS = 4  # 32 MiB in flight per blob: the producer runs ahead of the slowest consumer, memory stays bounded
_COPY_BUFFERS = 8  # a local copy, one at a time: reads from disk run further ahead
_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of any logical block size we meet


def open_sink(dst_path: Path, dst_fd: int, *, md5: bool = True, buffers: int = _BUFFERS) -> Sink | None:
    """A Sink filling the empty temp file `dst_path`; None where its filesystem takes no O_DIRECT.

    `dst_fd` is the temp file's ordinary descriptor: unaligned tails go through it, and the
    caller's fsync of it makes everything durable.
    """
    try:
        out = os.open(dst_path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.EMFILE, errno.ENFILE):
            raise
        return None  # no O_DIRECT here: the ordinary writes do
    try:
        return Sink(out, dst_fd, md5, buffers)
    except BaseException:
        os.close(out)
        raise


def copy(
    src_fd: int, dst_path: Path, dst_fd: int, *, md5: bool = True, progress: Callable[[int], None] | None = None
) -> Digests | None:
    """Copy the open regular file `src_fd` (from its start) into the empty temp file `dst_path`.

    Returns None, with nothing written, when the file is small or the temp file's
    filesystem takes no O_DIRECT; the caller copies then.
    """
    st = os.fstat(src_fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size < MIN_SIZE:
        return None
    sink = open_sink(dst_path, dst_fd, md5=md5, buffers=_COPY_BUFFERS)
    if sink is None:
        return None
    src = _direct_reader(src_fd)
    try:
        offset = 0
        while not sink.failed:
            space = sink.space()  # a whole buffer, page-aligned: what an O_DIRECT read needs
            try:
                n = os.preadv(src, [space], offset)
            except OSError as err:
                if err.errno != errno.EINVAL or src == src_fd:
                    raise
                os.close(src)
                src = src_fd  # the source's filesystem opened O_DIRECT but cannot read so
                n = os.preadv(src, [space], offset)
            del space
            sink.advance(n)
            offset += n
            if progress is not None and n:
                progress(n)
            if n == 0:
                break  # its end; a short read before it (a network filesystem) goes on, unaligned reads buffered
        return sink.finish()
    finally:
        sink.close()
        if src != src_fd:
            os.close(src)


def _direct_reader(fd: int) -> int:
    """A second, O_DIRECT descriptor of the same open file; `fd` itself when there is none."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return fd


class Sink:
    """Bytes appended in order (`write`, or received in place: `space`, `advance`), hashed and written by threads.

    Not thread-safe: one producer. `finish()` returns the Digests once everything is on its
    way to disk; `close()` (idempotent) stops the threads and releases the O_DIRECT descriptor.
    """

    def __init__(self, direct: int, buffered: int, md5: bool, buffers: int = _BUFFERS) -> None:
        self._direct, self._buffered = direct, buffered  # the temp file, opened O_DIRECT and not
        self._use_direct = True
        self._hashes = {"sha1": hashlib.sha1()}
        if md5:
            self._hashes["md5"] = hashlib.md5()
        self._buffers = [mmap.mmap(-1, CHUNK) for _ in range(buffers)]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(buffers):
            self._free.put(index)
        self._users = [0] * buffers  # consumers still to finish with each buffer
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.size = 0  # bytes accepted
        self._current: int | None = None  # the buffer being filled, and how far
        self._fill = 0
        work = [self._hasher(h) for h in self._hashes.values()] + [self._write]
        self._queues: list[queue.SimpleQueue[tuple[int, int, int] | None]] = [queue.SimpleQueue() for _ in work]
        self._threads = [
            threading.Thread(target=self._consume, args=(w, q), name="kachery-direct", daemon=True)
            for w, q in zip(work, self._queues, strict=True)
        ]
        self._closed = False
        try:
            for t in self._threads:
                t.start()
        except BaseException:
            self._stop()  # the ones started wait for work that will never come
            raise

    @property
    def failed(self) -> bool:
        return self._error is not None

    def write(self, data: bytes | memoryview) -> None:
        """Append `data` (copied into the ring: the caller may reuse it)."""
        view = memoryview(data)
        while view:
            if self._current is None:
                self._current, self._fill = self._take(), 0
            take = min(len(view), CHUNK - self._fill)
            self._buffers[self._current][self._fill : self._fill + take] = view[:take]
            self._fill += take
            self.size += take
            view = view[take:]
            if self._fill == CHUNK:
                self._submit()

    def space(self) -> memoryview:
        """The free end of the buffer being filled, to receive bytes in place (then `advance`)."""
        if self._current is None:
            self._current, self._fill = self._take(), 0
        return memoryview(self._buffers[self._current])[self._fill :]

    def advance(self, n: int) -> None:
        """`n` bytes were put at the start of the last `space()`; a full buffer is handed on."""
        self._fill += n
        self.size += n
        if self._fill == CHUNK:
            self._submit()

    def finish(self) -> Digests:
        """Hand on the last bytes, wait for every consumer, and give the digests (or raise their error)."""
        if self._current is not None:
            self._submit()
        self._stop()
        if self._error is not None:
            raise self._error
        md5 = self._hashes.get("md5")
        return Digests(self.size, self._hashes["sha1"].hexdigest(), md5.hexdigest() if md5 is not None else None)

    def close(self) -> None:
        self._stop()
        if not self._closed:
            self._closed = True
            os.close(self._direct)
            for buf in self._buffers:
                with contextlib.suppress(BufferError):  # a view still held by an error's traceback: freed with it
                    buf.close()

    def _take(self) -> int:
        if self._error is not None:
            raise self._error
        return self._free.get()

    def _submit(self) -> None:
        index, n, self._current = self._current, self._fill, None
        assert index is not None
        offset = self.size - n
        if n == 0:
            self._free.put(index)
            return
        self._users[index] = len(self._queues)
        for q in self._queues:
            q.put((index, n, offset))

    def _stop(self) -> None:
        if any(t.is_alive() for t in self._threads):
            for q in self._queues:
                q.put(None)
            for t in self._threads:
                if t.ident is not None:  # started (a failed start leaves the rest unstarted)
                    t.join()

    def _consume(
        self, work: Callable[[memoryview, int], None], q: queue.SimpleQueue[tuple[int, int, int] | None]
    ) -> None:
        while (item := q.get()) is not None:
            index, n, offset = item
            try:
                if self._error is None:
                    work(memoryview(self._buffers[index])[:n], offset)
            except BaseException as err:  # handed to the producer, which stops and raises it
                self._error = self._error or err
            finally:
                with self._lock:
                    self._users[index] -= 1
                    done = self._users[index] == 0
                if done:
                    self._free.put(index)

    def _hasher(self, h: hashlib._Hash) -> Callable[[memoryview, int], None]:
        return lambda data, _offset: h.update(data)  # hashlib lets go of the GIL on big buffers

    def _write(self, data: memoryview, offset: int) -> None:
        aligned = len(data) & ~(_ALIGN - 1)
        done = 0
        if aligned and self._use_direct:
            try:
                done = os.pwrite(self._direct, data[:aligned], offset)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._use_direct = False  # accepted at open, refused at write: ordinary writes from here on
        while done < len(data):  # the unaligned tail, the rest of a short write, or no O_DIRECT at all
            done += os.pwrite(self._buffered, data[done:], offset + done)
