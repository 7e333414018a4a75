"""Find the bytes a URL names: local store first, then each channel in order, verified.

The first copy whose hash verifies wins and is committed to the local store; a copy that
fails is discarded with a warning and the next channel is tried. A channel that is down is
skipped without a request until it is due for another try (`remote.health`). Concurrent
requests for the same blob share one download. Manifests are parsed once and kept (they
are immutable).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from kacheryfs import manifest
from kacheryfs.errors import (
    AuthError,
    ChannelMisconfigured,
    ChannelUnavailable,
    HashMismatch,
    InvalidManifest,
    KacheryError,
    NotADirectory,
    NotFound,
    QuotaExceeded,
    StoreFull,
)
from kacheryfs.manifest import DirNode, FileEntry
from kacheryfs.remote.health import TrackedChannel
from kacheryfs.store import LocalStore
from kacheryfs.store.md5_index import Md5Indexer
from kacheryfs.uri import KacheryURL, as_url

if TYPE_CHECKING:
    from kacheryfs.config import Config
    from kacheryfs.remote import Channel

log = logging.getLogger(__name__)
T = TypeVar("T")

ProgressBar = Callable[[int | None, str], AbstractContextManager[Callable[[int], None] | None]]
_MANIFEST_CACHE = 256
MANIFEST_MAX = 1 << 30  # bytes: ten million files' manifest; a larger blob is not read as one
# What one channel may answer that sends us on to the next one (never to the caller as such);
# ChannelMisconfigured is a channel with no password to sign with (its password_env is not set).
_CHANNEL_FAILURES = (ChannelUnavailable, AuthError, QuotaExceeded, ChannelMisconfigured)
# The kinds of failure a failed fetch is raised as, when all its channels failed the same way.
_FAILURE_KINDS = (HashMismatch, AuthError, QuotaExceeded, ChannelMisconfigured)
_ENOSPC_FREE = 64 << 20  # bytes to free when a fetch hits a full disk of unknown need


@dataclass(frozen=True)
class BlobRef:
    """A blob a URL resolves to: algorithm, digest, size when known, and a display name."""

    alg: str
    digest: str
    size: int | None = None
    name: str = ""


@dataclass
class Stats:
    """What the resolver has done, for `kacheryfs status`."""

    hits: int = 0
    misses: int = 0
    fetches_in_progress: int = 0
    lookups_in_progress: int = 0  # names being looked for on the channels (a stat of a blob not here)
    errors: int = 0  # reads and lookups that failed (not "not found"), each once
    bytes_by_channel: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_error: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "fetches_in_progress": self.fetches_in_progress,
            "lookups_in_progress": self.lookups_in_progress,
            "errors": self.errors,
            "bytes_by_channel": dict(self.bytes_by_channel),
            "last_error": self.last_error,
        }


class Resolver:
    """Turns URLs into local blob paths, fetching and verifying what is missing."""

    def __init__(self, store: LocalStore, channels: Sequence[Channel] = ()) -> None:
        self.store = store
        # each skipped while it is down, so a dead channel costs one failure a while, not one a blob
        self.channels = [c if isinstance(c, TrackedChannel) else TrackedChannel(c) for c in channels]
        self.stats = Stats()
        self.md5_index: Md5Indexer | None = None  # set by long-lived processes (the mount daemon)
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], Future[Path]] = {}
        self._finding: dict[tuple[str, str], Future[tuple[str, int] | None]] = {}  # lookups under way
        self._manifests: OrderedDict[tuple[str, str], DirNode] = OrderedDict()
        # Manifests that failed validation, with the reason: their bytes (checked) never change, nor will the verdict.
        self._invalid: OrderedDict[tuple[str, str], str] = OrderedDict()

    @classmethod
    def from_config(cls, config: Config, fr: str | Sequence[str] | None = None) -> Resolver:
        """A resolver over the configured store and read channels (`fr` overrides the order)."""
        channels: list[Channel] = []
        for c in config.read_channels(fr):  # type: ignore[arg-type]
            from kacheryfs.remote import HttpChannel  # only when there is a channel: requests is slow to import

            channels.append(HttpChannel(c.name, c.url, c.channel, c.password, timeout=config.channel_timeout))
        return cls(LocalStore.from_config(config), channels)

    # -- URLs ----------------------------------------------------------------------
    def blob_ref(self, url: KacheryURL | str) -> BlobRef:
        """The blob a file URL names (a sha1dir sub-path is looked up in its manifest)."""
        url = as_url(url)
        if not url.is_dir:
            return BlobRef(url.alg, url.hash, self.store.size(url.alg, url.hash), url.basename)
        snapshot, path = self._in_snapshot(url)
        entry = snapshot.resolve_file(path)
        return BlobRef(entry.alg, entry.digest, entry.size, _basename(path, url))

    def dir_node(self, url: KacheryURL | str) -> DirNode:
        """The directory a `sha1dir://` URL names."""
        url = as_url(url)
        if not url.is_dir:
            raise NotADirectory(f"{url} is a file URL, not a directory URL")
        snapshot, path = self._in_snapshot(url)
        return snapshot.resolve_dir(path)

    def resolve(self, url: KacheryURL | str) -> BlobRef | DirNode:
        """What a URL names: a blob or a directory of a snapshot."""
        url = as_url(url)
        if not url.is_dir:
            return self.blob_ref(url)
        snapshot, path = self._in_snapshot(url)
        found = snapshot.resolve(path)
        if isinstance(found, FileEntry):
            return BlobRef(found.alg, found.digest, found.size, _basename(path, url))
        return found

    def _in_snapshot(self, url: KacheryURL) -> tuple[DirNode, str]:
        """A snapshot URL's manifest and the sub-path the URL names in it: the one before the
        query, unless the snapshot holds the name with the query put back (a file `c?d`)."""
        snapshot = self.manifest(url.alg, url.hash)
        literal = url.literal_path
        if literal is not None:
            with contextlib.suppress(NotFound, NotADirectory):
                snapshot.resolve(literal)
                return snapshot, literal
        return snapshot, url.path

    def cached_manifest(self, alg: str, digest: str) -> DirNode | None:
        """The manifest if it was parsed already (no I/O), else None."""
        return self._manifests.get((alg, digest))

    def manifest(self, alg: str, digest: str) -> DirNode:
        """The parsed, validated manifest stored under (alg, digest).

        Both verdicts are kept (the last _MANIFEST_CACHE of each): a path in an invalid
        snapshot, asked again and again, costs neither a read nor a parse of it again.
        """
        key = (alg, digest)
        with self._lock:
            if key in self._manifests:
                self._manifests.move_to_end(key)
                return self._manifests[key]
            reason = self._invalid.get(key)
        if reason is not None:
            raise InvalidManifest(reason)
        found = self.find(alg, digest)  # the size first: a data file's hash given as a snapshot's is never read
        if found is not None and found[1] > MANIFEST_MAX:
            where, size = found
            reason = f"{alg}://{digest} has {size:,} bytes, more than any directory manifest (a file's hash?)"
            if where == "local":  # a channel's word is not checked: another may say otherwise later
                self._remember(self._invalid, key, reason)
            raise InvalidManifest(reason)
        with self.open_blob(alg, digest) as f:
            if not f.read(64).lstrip().startswith(b"{"):
                raise InvalidManifest(f"{alg}://{digest} is not a directory manifest (not a JSON object)")
            f.seek(0)
            data = f.read()
        try:
            node = manifest.parse(data)
        except InvalidManifest as err:
            if hashlib.new(alg, data).hexdigest() == digest:  # not a blob damaged on disk, which a repair may mend
                self._remember(self._invalid, key, str(err))
            raise
        self._remember(self._manifests, key, node)
        return node

    def _remember(self, cache: OrderedDict[tuple[str, str], Any], key: tuple[str, str], value: object) -> None:
        with self._lock:
            cache[key] = value
            while len(cache) > _MANIFEST_CACHE:
                cache.popitem(last=False)

    # -- blobs ---------------------------------------------------------------------
    def ensure(self, alg: str, digest: str, size: int | None = None, progress: ProgressBar | None = None) -> Path:
        """The local path of a blob, fetched from the channels first if needed.

        `progress(size, description)` may give a context yielding a callback for bytes received.
        """
        path = self.store.blob_path(alg, digest)
        if path.exists():
            self.stats.hits += 1
            self.store.cache.note_access(path)
            return path
        return self._once(self._inflight, (alg, digest), lambda: self._fetch_counted(alg, digest, size, progress))

    def _fetch_counted(self, alg: str, digest: str, size: int | None, progress: ProgressBar | None) -> Path:
        """`ensure` of a blob that is not here (counted as a miss and a fetch in progress)."""
        with self._lock:
            self.stats.misses += 1
            self.stats.fetches_in_progress += 1
        try:
            try:
                return self._fetch(alg, digest, size, progress)
            except StoreFull:
                # the disk filled up below the cache bounds: make room once and try again
                # (only blobs a channel holds, and only if that can make the room: see Cache.evict)
                freed, _ = self.store.cache.evict(free_at_least=max(size or 0, _ENOSPC_FREE), need=size or 0)
                if not freed:
                    raise
                return self._fetch(alg, digest, size, progress)
        finally:
            with self._lock:
                self.stats.fetches_in_progress -= 1

    def _once(self, under_way: dict[tuple[str, str], Future[T]], key: tuple[str, str], work: Callable[[], T]) -> T:
        """`work()` for the first thread to ask for `key`; the threads that ask while it runs
        wait for it and get its result, or its error (16 readers of one blob: one download)."""
        with self._lock:
            future = under_way.get(key)
            owner = future is None
            if owner:
                future = under_way[key] = Future()
        assert future is not None
        if not owner:
            return future.result()
        try:
            result = work()
        except BaseException as err:
            future.set_exception(err)  # the waiters hold the future; this thread re-raises it
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                del under_way[key]

    def open_blob(
        self, alg: str, digest: str, size: int | None = None, progress: ProgressBar | None = None
    ) -> BinaryIO:
        """The blob open for reading (fetched first if needed). While it is open the cache
        cannot evict it; one evicted between its fetch and this open is fetched again."""
        for _attempt in range(2):
            self.ensure(alg, digest, size, progress)
            try:
                blob = self.store.open(alg, digest)
            except NotFound:
                continue
            actual = os.fstat(blob.fileno()).st_size
            if size is not None and actual != size:  # a manifest that gives a wrong size
                blob.close()
                raise InvalidManifest(f"{alg}://{digest} has {actual} bytes, where {size} were expected")
            return blob
        raise NotFound(f"{alg}://{digest} keeps being evicted as soon as it is fetched: is the cache bound too small?")

    def _fetch(self, alg: str, digest: str, size: int | None, progress: ProgressBar | None) -> Path:
        if not self.channels:
            raise NotFound(f"{alg}://{digest} is not in the local store {self.store.root} and no channel is configured")
        failures: list[tuple[str, KacheryError]] = []
        for channel in self.channels:
            down = channel.down_error()
            if down is not None:  # skipped before a temp file is made for it
                failures.append((channel.name, down))
                continue
            started = time.monotonic()
            bar = progress(size, f"{digest[:10]}… from {channel.name}") if progress else contextlib.nullcontext()
            # A blob fetched by sha1 is verified by sha1 alone; md5 (the slower digest) would
            # halve the download speed: the daemon indexes it afterwards (md5_index).
            with self.store.writer(md5=alg == "md5", size_hint=size) as writer, bar as received:
                try:
                    channel.fetch(alg, digest, writer, expected_size=size, progress=received)
                    digests = writer.commit(expect_alg=alg, expect_hash=digest, expect_size=size, remote=channel.name)
                except NotFound as err:
                    failures.append((channel.name, err))
                    result = "not found"
                except HashMismatch as err:
                    failures.append((channel.name, err))
                    log.warning(
                        "channel %s served wrong bytes for %s://%s: %s; discarded", channel.name, alg, digest, err
                    )
                    result = "hash mismatch"
                except _CHANNEL_FAILURES as err:
                    failures.append((channel.name, err))
                    result = f"error: {err}"
                else:
                    if digests.md5 is None and self.md5_index is not None:
                        self.md5_index.add(digests.sha1)
                    self.stats.bytes_by_channel[channel.name] += digests.size
                    _log_fetch(alg, digest, channel.name, digests.size, started, "ok")
                    return self.store.blob_path(alg, digest)
            _log_fetch(alg, digest, channel.name, writer.size, started, result)
        raise self.failed(_failure(f"{alg}://{digest}", "fetch", failures))

    def failed(self, error: KacheryError) -> KacheryError:
        """Count a failed fetch or lookup (for `kacheryfs status`) and return its error.

        A NotFound is an answer, not a failure: it is returned uncounted. The error is marked
        (`counted`), so that whoever sees it again can tell."""
        if not isinstance(error, NotFound):
            with self._lock:
                self.stats.errors += 1
                self.stats.last_error = str(error)
            error.counted = True
        return error

    def read_range(self, alg: str, digest: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob; from the local store if present, else from a channel.

        A range fetched from a channel cannot be verified against the whole-file hash.
        """
        if self.store.has(alg, digest):
            with self.store.open(alg, digest) as f:
                f.seek(start)
                return f.read(max(0, end - start))
        failures: list[tuple[str, KacheryError]] = []
        for channel in self.channels:
            try:
                return channel.read_range(alg, digest, start, end)
            except (NotFound, *_CHANNEL_FAILURES) as err:
                failures.append((channel.name, err))
        raise _failure(f"{alg}://{digest}", "read", failures)

    def find(self, alg: str, digest: str) -> tuple[str, int] | None:
        """(where, size) of a blob without downloading it: 'local' or a channel name.

        None when every channel answered "not found"; an error when none has it and some
        could not be asked (a miss then is not a fact worth remembering).
        """
        size = self.store.size(alg, digest)
        if size is not None:
            return "local", size
        return self._once(self._finding, (alg, digest), lambda: self._ask_channels(alg, digest))

    def _ask_channels(self, alg: str, digest: str) -> tuple[str, int] | None:
        """`find` of a blob that is not here: each channel in turn."""
        failures: list[tuple[str, KacheryError]] = []
        self._count_lookups(+1)
        try:
            for channel in self.channels:
                try:
                    size = channel.check(alg, digest)
                except _CHANNEL_FAILURES as err:
                    if not isinstance(err, ChannelUnavailable):  # a channel down is logged once, by itself
                        log.warning("channel %s: %s", channel.name, err)
                    failures.append((channel.name, err))
                    continue
                if size is not None:
                    return channel.name, size
        finally:
            self._count_lookups(-1)
        if failures:
            raise self.failed(_failure(f"{alg}://{digest}", "locate", failures))
        return None

    def _count_lookups(self, change: int) -> None:
        with self._lock:  # threads of the mount look names up side by side: no change may be lost
            self.stats.lookups_in_progress += change

    def status(self) -> dict[str, object]:
        """The counters and each channel's state, for `kacheryfs status`.

        `errors` counts reads and lookups that failed, each once; `channel_failures`, the
        requests that found a channel unreachable (a read another channel then served
        counts there only).
        """
        return {
            **self.stats.as_dict(),
            "channel_failures": sum(channel.failures for channel in self.channels),
            "channel_states": [channel.status() for channel in self.channels],
        }


def _basename(path: str, url: KacheryURL) -> str:
    """A good file name for what `path` names in the snapshot of `url`."""
    return path.rsplit("/", 1)[-1] if path else url.basename


def _failure(url: str, doing: str, failures: Sequence[tuple[str, KacheryError]]) -> KacheryError:
    """The one error for a blob no channel gave (`failures`: channel name, its error).

    NotFound when every channel said so; else the kind every other failure shares (wrong
    bytes, credentials refused, over quota), so the exit code says what to fix, or
    ChannelUnavailable when they differ.
    """
    reason = "; ".join(f"{name}: {_describe(err)}" for name, err in failures)
    errors = [err for _, err in failures if not isinstance(err, NotFound)]
    if not errors:
        return NotFound(f"{url} was found in no store or channel ({reason})")
    kinds = {next((k for k in _FAILURE_KINDS if isinstance(err, k)), ChannelUnavailable) for err in errors}
    kind = kinds.pop() if len(kinds) == 1 else ChannelUnavailable
    return kind(f"could not {doing} {url}: {reason}")


def _describe(err: KacheryError) -> str:
    if isinstance(err, NotFound):
        return "not found"
    if isinstance(err, HashMismatch):
        return f"served wrong bytes ({err})"
    return str(err)


def _log_fetch(alg: str, digest: str, channel: str, nbytes: int, started: float, result: str) -> None:
    ms = (time.monotonic() - started) * 1000
    log.info("fetch %s://%s channel=%s bytes=%d ms=%.0f result=%s", alg, digest, channel, nbytes, ms, result)
