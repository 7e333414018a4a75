"""Compute sha1 and md5 of a byte stream in one pass, overlapped with copying it.

hashlib releases the GIL on large buffers, so each digest runs on its own thread while
the caller reads and writes: a store costs about as much as the slower digest alone.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20  # 1 MiB: as fast as larger buffers, and friendly to the allocator
_DEPTH = 16  # chunks in flight per digest thread
THREADED_MIN = 4 * CHUNK  # below this, threads cost more than they save


@dataclass(frozen=True)
class Digests:
    """Size and hex digests of one byte string."""

    size: int
    sha1: str
    md5: str | None = None

    def get(self, alg: str) -> str | None:
        return self.sha1 if alg == "sha1" else self.md5 if alg == "md5" else None


class _DigestThread:
    """One hashlib object fed from a bounded queue by a worker thread."""

    def __init__(self, name: str, initial: hashlib._Hash | None = None) -> None:
        self._hash = initial if initial is not None else hashlib.new(name)
        self._queue: queue.Queue[bytes | None] = queue.Queue(_DEPTH)
        self._thread = threading.Thread(target=self._run, name=f"kachery-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        update, get = self._hash.update, self._queue.get
        while (chunk := get()) is not None:
            update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._hash.hexdigest()


class Hasher:
    """Feed chunks with `update`, then `finish()` for the Digests.

    Digests start on the caller's thread and move to worker threads once THREADED_MIN
    bytes have passed (`threaded=True`), so small files cost no threads. Once threaded,
    `update` must be given immutable `bytes` (the workers read them later).
    """

    def __init__(self, md5: bool = True, threaded: bool = True) -> None:
        self.size = 0
        self._may_thread = threaded
        self._sha1: _DigestThread | hashlib._Hash = hashlib.sha1()
        self._md5: _DigestThread | hashlib._Hash | None = hashlib.md5() if md5 else None

    def update(self, chunk: bytes) -> None:
        if self._may_thread and self.size >= THREADED_MIN:
            self._may_thread = False
            self._sha1 = _DigestThread("sha1", self._sha1)  # type: ignore[arg-type]
            if self._md5 is not None:
                self._md5 = _DigestThread("md5", self._md5)  # type: ignore[arg-type]
        self.size += len(chunk)
        self._sha1.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)

    def finish(self) -> Digests:
        return Digests(self.size, self._sha1.hexdigest(), self._md5.hexdigest() if self._md5 is not None else None)


def copy_and_hash(
    src: BinaryIO,
    dst_fd: int | None = None,
    *,
    md5: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Digests:
    """Read `src` to its end, writing every byte to `dst_fd` (if given); return the digests."""
    hasher = Hasher(md5=md5)
    try:
        while chunk := src.read(CHUNK):
            hasher.update(chunk)
            if dst_fd is not None:
                write_all(dst_fd, chunk)
            if progress is not None:
                progress(len(chunk))
    finally:
        digests = hasher.finish()
    return digests


def hash_file(path: str | Path, *, md5: bool = True) -> Digests:
    """Digests of the file at `path`."""
    with open(path, "rb", buffering=0) as f:
        return copy_and_hash(f, None, md5=md5)  # type: ignore[arg-type]


def write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view) :]
