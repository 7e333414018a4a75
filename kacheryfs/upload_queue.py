"""Upload blobs to a channel in the background, from a queue kept on disk across restarts.

One file per blob under `<store>/upload-queue/` holds its attempts and last error; a blob
leaves the queue (and loses its "staging" pin, so the cache may evict it) only once the
channel has it. Failures are retried with exponential backoff and jitter.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from kacheryfs.errors import KacheryError
from kacheryfs.store import LocalStore
from kacheryfs.uri import check_hash, is_hash

if TYPE_CHECKING:
    from kacheryfs.remote import Channel

log = logging.getLogger(__name__)

QUEUE_DIR = "upload-queue"
DONE_DIR = "done"
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


class UploadQueue:
    """A persisted queue of sha1 blobs to upload to one channel."""

    def __init__(self, store: LocalStore, channel: Callable[[], Channel]) -> None:
        self.store = store
        self._channel_factory = channel
        self.dir = store.root / QUEUE_DIR
        (self.dir / DONE_DIR).mkdir(parents=True, exist_ok=True)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the queue -------------------------------------------------------------------
    def enqueue(self, sha1: str) -> None:
        sha1 = check_hash("sha1", sha1)
        entry = self.dir / sha1
        if entry.exists() or (self.dir / DONE_DIR / sha1).exists():
            return
        _write_json(entry, {"attempts": 0, "error": "", "next_try": 0.0})
        self._wake.set()

    def state(self, sha1: str) -> str:
        """'yes', 'pending' or 'failed: <reason>' (still being retried)."""
        if (self.dir / DONE_DIR / sha1).exists():
            return "yes"
        entry = _read_json(self.dir / sha1)
        if entry is None:
            return "no: not queued"
        return f"failed: {entry['error']}" if entry.get("error") else "pending"

    def pending(self) -> list[dict[str, object]]:
        """Every queued blob with its attempts and last error, for `kacheryfs status`."""
        out = []
        for name in sorted(os.listdir(self.dir)):
            if is_hash("sha1", name) and (entry := _read_json(self.dir / name)) is not None:
                out.append({"sha1": name, **entry})
        return out

    # -- the worker ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kacheryfs-upload", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        channel = None
        while not self._stop.is_set():
            soonest = BACKOFF_MAX
            for item in self.pending():
                if self._stop.is_set():
                    return
                wait = float(item["next_try"]) - time.time()  # type: ignore[arg-type]
                if wait > 0:
                    soonest = min(soonest, wait)
                    continue
                channel = channel or self._channel_factory()
                self._upload(channel, str(item["sha1"]), int(item["attempts"]))  # type: ignore[call-overload]
                soonest = 0
            self._wake.wait(soonest)
            self._wake.clear()

    def _upload(self, channel: Channel, sha1: str, attempts: int) -> None:
        path = self.store.blob_path("sha1", sha1)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            # Staged and then removed before it was ever stored (a crash between the two):
            # there is nothing to upload, and retrying would never end.
            log.warning("sha1://%s left the upload queue: it is no longer in the local store", sha1)
            self._done(sha1, uploaded=False)
            return
        try:
            channel.upload("sha1", sha1, path, size)
        except (KacheryError, OSError) as err:
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempts) * random.uniform(0.5, 1.0)
            log.warning("upload of sha1://%s to %s failed (%s); retrying in %.0f s", sha1, channel.name, err, delay)
            _write_json(self.dir / sha1, {"attempts": attempts + 1, "error": str(err), "next_try": time.time() + delay})
            return
        self._done(sha1, uploaded=True)
        log.info("uploaded sha1://%s to %s", sha1, channel.name)

    def _done(self, sha1: str, *, uploaded: bool) -> None:
        if uploaded:
            (self.dir / DONE_DIR / sha1).touch()
        with suppress(FileNotFoundError):
            os.unlink(self.dir / sha1)
        self.store.cache.unpin("sha1", sha1, reason="staging")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
