"""Upload blobs to one channel in the background, from a queue kept on disk across restarts.

The queue of a channel is an append-only journal, `<store>/upload-queue/<channel>/journal`:
one line per event (`queued`, `uploaded`, `dropped` and a sha1), appended with one write(2)
so a killed daemon loses nothing, and compacted when the queue opens (what is uploaded is
remembered only while the local store still holds the blob, so the journal stays bounded).
Each channel has its own queue: a blob uploaded to one channel is still queued for another.

A blob leaves the queue (and loses its "staging" pin, so the cache may evict it) only once
the channel has it. Failures are retried with exponential backoff and jitter; the worker
survives any error (logged), so a queue that says "pending" is being worked on.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from kacheryfs.errors import ChannelUnavailable, KacheryError
from kacheryfs.store import LocalStore
from kacheryfs.uri import check_hash, is_hash

if TYPE_CHECKING:
    from kacheryfs.remote import Channel

log = logging.getLogger(__name__)

QUEUE_DIR = "upload-queue"
JOURNAL = "journal"
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
_QUEUED, _UPLOADED, _DROPPED = "queued", "uploaded", "dropped"


@dataclass
class _Pending:
    """A queued blob's attempts so far (kept in memory: a restart retries at once)."""

    attempts: int = 0
    error: str = ""
    next_try: float = 0.0


class UploadQueue:
    """A persisted queue of sha1 blobs to upload to the channel named `channel_name`."""

    def __init__(self, store: LocalStore, channel_name: str, channel: Callable[[], Channel]) -> None:
        self.store = store
        self.channel_name = channel_name
        self._channel_factory = channel
        self.dir = store.root / QUEUE_DIR / quote(channel_name, safe="")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the two collections and the journal
        self._pending: dict[str, _Pending] = {}
        self._uploaded: set[str] = set()
        # While the channel cannot be reached: when the next pass may try it, and how many passes found it so.
        self._channel_retry_at, self._channel_misses = 0.0, 0
        self._open_journal()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the journal ---------------------------------------------------------------------
    def _open_journal(self) -> None:
        """Replay the journal, then rewrite it with only what still matters."""
        path = self.dir / JOURNAL
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            event, _, sha1 = line.partition(" ")
            if not is_hash("sha1", sha1):
                continue  # a line cut short by a crash
            if event == _QUEUED and sha1 not in self._uploaded:
                self._pending.setdefault(sha1, _Pending())
            elif event in (_UPLOADED, _DROPPED):
                self._pending.pop(sha1, None)
                if event == _UPLOADED:
                    self._uploaded.add(sha1)
        self._uploaded = {sha1 for sha1 in self._uploaded if self.store.has("sha1", sha1)}
        compacted = [f"{_QUEUED} {s}\n" for s in self._pending] + [f"{_UPLOADED} {s}\n" for s in self._uploaded]
        tmp = path.with_name(JOURNAL + ".tmp")
        tmp.write_text("".join(compacted))
        os.replace(tmp, path)
        self._journal = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def _append(self, event: str, sha1: str) -> None:
        os.write(self._journal, f"{event} {sha1}\n".encode())

    # -- the queue -----------------------------------------------------------------------
    def enqueue(self, sha1: str) -> None:
        """Queue a blob unless this channel has it already (by this queue's knowledge)."""
        sha1 = check_hash("sha1", sha1)
        with self._lock:
            if sha1 in self._pending or sha1 in self._uploaded:
                return
            self._append(_QUEUED, sha1)
            self._pending[sha1] = _Pending()
        self._wake.set()

    def state(self, sha1: str) -> str:
        """'yes', 'pending' or 'failed: <reason>' (still being retried)."""
        with self._lock:
            if sha1 in self._uploaded:
                return "yes"
            entry = self._pending.get(sha1)
        if entry is None:
            return "no: not queued"
        return f"failed: {entry.error}" if entry.error else "pending"

    def pending(self) -> list[dict[str, object]]:
        """Every queued blob with its attempts and last error, for `kacheryfs status`."""
        with self._lock:
            return [{"sha1": sha1, "attempts": p.attempts, "error": p.error, "next_try": p.next_try}
                    for sha1, p in sorted(self._pending.items())]  # fmt: skip

    # -- the worker ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kacheryfs-upload", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        channel: Channel | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                channel = channel or self._channel_factory()
                wait = self._upload_due(channel)
                failures = 0
            except Exception:
                # Never die: a dead worker would leave every blob "pending" forever.
                failures += 1
                wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2**failures)
                log.exception("the upload worker for %s failed; retrying in %.0f s", self.channel_name, wait)
                channel = None
            self._wake.wait(wait)
            self._wake.clear()

    def _upload_due(self, channel: Channel) -> float:
        """Try every blob that is due; how long until the next one is.

        A channel found unreachable ends the pass, and passes wait for the channel's own
        backoff (a new blob queued meanwhile does not end the wait): a dead server costs one
        request per backoff, not one (and a warning) per queued blob. The blob that found it
        so goes to the back of the queue, so one that a server keeps refusing alone never
        holds up the others.
        """
        wait = self._channel_retry_at - time.time()
        if wait > 0:
            return wait
        soonest = BACKOFF_MAX
        with self._lock:
            queued = list(self._pending.items())
        for sha1, entry in queued:
            if self._stop.is_set():
                return 0
            wait = entry.next_try - time.time()
            if wait > 0:
                soonest = min(soonest, wait)
                continue
            if not self._upload(channel, sha1, entry):
                self._channel_misses += 1
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._channel_misses - 1)) * random.uniform(0.5, 1.0)
                self._channel_retry_at = time.time() + delay
                with self._lock:
                    if sha1 in self._pending:
                        self._pending[sha1] = self._pending.pop(sha1)  # to the back
                return delay
            self._channel_misses = 0
            soonest = 0
        return soonest

    def _upload(self, channel: Channel, sha1: str, entry: _Pending) -> bool:
        """Upload one blob; False when the channel could not be reached."""
        path = self.store.blob_path("sha1", sha1)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            # Queued and then removed before it was ever stored (a crash between the two):
            # there is nothing to upload, and retrying would never end.
            log.warning("sha1://%s left the upload queue: it is no longer in the local store", sha1)
            self._done(sha1, _DROPPED)
            return True
        try:
            channel.upload("sha1", sha1, path, size)
        except (KacheryError, OSError) as err:
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**entry.attempts) * random.uniform(0.5, 1.0)
            log.warning("upload of sha1://%s to %s failed (%s); retrying in %.0f s", sha1, channel.name, err, delay)
            with self._lock:
                entry.attempts, entry.error, entry.next_try = entry.attempts + 1, str(err), time.time() + delay
            return not isinstance(err, ChannelUnavailable)
        self.store.note_remote("sha1", sha1, channel.name)
        self._done(sha1, _UPLOADED)
        log.info("uploaded sha1://%s to %s", sha1, channel.name)
        return True

    def _done(self, sha1: str, event: str) -> None:
        with self._lock:
            self._append(event, sha1)
            self._pending.pop(sha1, None)
            if event == _UPLOADED:
                self._uploaded.add(sha1)
        self.store.cache.unpin("sha1", sha1, reason="staging")
