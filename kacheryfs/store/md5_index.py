"""Index blobs under md5 in the background, for blobs stored with their sha1 alone.

Staging hashes only sha1 while a file is written (md5 is the slow digest: it would halve
the write speed); the md5 name is added here afterwards, one blob at a time.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading

from kacheryfs.hashing import CHUNK
from kacheryfs.store.local import LocalStore

log = logging.getLogger(__name__)


class Md5Indexer:
    """A worker thread that computes the md5 of queued sha1 blobs and links their md5 name."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, sha1: str) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kacheryfs-md5", daemon=True)
                self._thread.start()
        self._queue.put(sha1)

    def wait(self) -> None:
        """Block until everything queued so far is indexed."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            sha1 = self._queue.get()
            try:
                self._index(sha1)
            except OSError as err:  # a blob evicted or unreadable: its md5 name waits for the next ingest
                log.warning("md5 index of sha1://%s failed: %s", sha1, err)
            finally:
                self._queue.task_done()

    def _index(self, sha1: str) -> None:
        noted = self.store.noted_digests("sha1", sha1)
        if noted is not None and noted.md5 is not None:
            return
        h = hashlib.md5()
        with open(self.store.blob_path("sha1", sha1), "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        self.store.add_md5(sha1, h.hexdigest())
