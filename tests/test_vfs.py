"""The filesystem view and the FUSE operations class, called directly: no mount, no kernel."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import stat
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mfusepy
import pytest

from kacheryfs import manifest, vfs
from kacheryfs.errors import (
    ChannelUnavailable,
    HashMismatch,
    InvalidManifest,
    InvalidURL,
    IsADirectory,
    NotADirectory,
    NotFound,
    StoreFull,
)
from kacheryfs.manifest import DirNode, FileEntry
from kacheryfs.mount.fuse_ops import BLOCK_SIZE, FIXED_TIME_NS, MAX_READ, HashViewOperations, _FuseBufvec
from kacheryfs.mount.passthrough import Unavailable
from kacheryfs.resolver import Resolver
from kacheryfs.store import BlobWriter, LocalStore
from kacheryfs.store.cache import DIGESTS_XATTR
from kacheryfs.vfs import PID_XATTR, STATUS_XATTR, FileSystemView

BIG = b"0123456789" * 100_000


class FakeChannel:
    """A channel holding `blobs` (sha1 → bytes) that can be slow or lie; it counts its calls."""

    def __init__(
        self, blobs: dict[str, bytes], *, delay: float = 0.0, serve: bytes | None = None, fail: Exception | None = None
    ) -> None:
        self.name = "fake"
        self.blobs, self.delay, self.serve, self.fail = blobs, delay, serve, fail
        self.checks = self.fetches = 0

    def check(self, alg: str, digest: str) -> int | None:
        self.checks += 1
        return len(self.blobs[digest]) if digest in self.blobs else None

    def fetch(self, alg: str, digest: str, writer: BlobWriter, expected_size: int | None = None, progress=None) -> None:
        self.fetches += 1
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if digest not in self.blobs:
            raise NotFound(f"fake has no {digest}")
        writer.write(self.serve if self.serve is not None else self.blobs[digest])


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def snapshot(store: LocalStore) -> str:
    """The sha1 of a stored manifest: a.txt, sub/big.bin (BIG, stored), sub/remote.dat (not stored)."""
    a = store.put_bytes(b"hello\n")
    big = store.put_bytes(BIG)
    root = DirNode(files={"a.txt": FileEntry(a.size, a.sha1)})
    root.dirs["sub"] = DirNode(
        files={"big.bin": FileEntry(big.size, big.sha1), "remote.dat": FileEntry(6, sha1(b"remote"))}
    )
    return store.put_bytes(manifest.serialize(root)).sha1


@pytest.fixture
def view(store: LocalStore) -> FileSystemView:
    return FileSystemView(Resolver(store), fetch_timeout=2.0)


@pytest.fixture
def ops(view: FileSystemView) -> HashViewOperations:
    return HashViewOperations(view)


# -- the view ------------------------------------------------------------------------
def test_the_root_lists_the_views_and_the_views_list_nothing(view: FileSystemView) -> None:
    assert [name for name, _ in view.readdir("/")] == ["sha1", "md5", "sha1dir"]
    assert view.readdir("/sha1") == [] and view.readdir("/sha1dir") == []
    assert view.stat("/md5").is_dir


def test_a_stored_blob_is_a_file_of_its_size_whatever_its_extension(view: FileSystemView, store: LocalStore) -> None:
    d = store.put_bytes(b"abc")
    for name in (d.sha1, d.sha1 + ".csv", d.sha1.upper() + ".tar.gz"):
        info = view.stat(f"/sha1/{name}")
        assert not info.is_dir and info.size == 3 and info.digest == d.sha1
    assert view.stat(f"/md5/{d.md5}.txt").size == 3


def test_a_file_named_by_its_md5_has_its_sha1_too(view: FileSystemView, store: LocalStore) -> None:
    noted, bare = store.put_bytes(b"noted"), store.put_bytes(b"with no note")
    os.removexattr(store.blob_path("sha1", bare.sha1), DIGESTS_XATTR)  # as an older kachery stored it
    assert store.noted_digests("md5", bare.md5) is None
    for d in (noted, bare):
        path = f"/md5/{d.md5}.txt"
        assert "user.kachery.sha1" in view.listxattr(path)
        assert view.getxattr(path, "user.kachery.sha1") == d.sha1.encode()
    assert store.noted_digests("md5", bare.md5) == bare  # hashed once, then noted


@pytest.mark.parametrize("path", ["/sha1/xyz", "/sha1/" + "a" * 40 + "b", "/md5/" + "a" * 40, "/sha1dir/nothex"])
def test_malformed_names_are_invalid_without_any_channel_call(store: LocalStore, path: str) -> None:
    channel = FakeChannel({})
    with pytest.raises(InvalidURL):
        FileSystemView(Resolver(store, [channel])).stat(path)
    assert channel.checks == channel.fetches == 0


def test_an_unknown_hash_or_name_is_not_found(view: FileSystemView) -> None:
    for path in ("/sha1/" + "0" * 40, "/elsewhere", "/sha1/" + "0" * 40 + "/x"):
        with pytest.raises(NotFound):
            view.stat(path)


def test_snapshot_paths_resolve_through_the_manifest(view: FileSystemView, snapshot: str) -> None:
    top = view.stat(f"/sha1dir/{snapshot}.ds")
    assert top.is_dir and str(top.url) == f"sha1dir://{snapshot}.ds" and top.sha1 == snapshot
    assert top.size == 6 + len(BIG) + 6
    big = view.stat(f"/sha1dir/{snapshot}.ds/sub/big.bin")
    assert big.size == len(BIG) and str(big.url) == f"sha1://{sha1(BIG)}/big.bin"
    sub = view.stat(f"/sha1dir/{snapshot}/sub")
    assert str(sub.url) == f"sha1dir://{snapshot}/sub" and sub.sha1 is None
    entries = {name: info.size for name, info in view.readdir(f"/sha1dir/{snapshot}.ds/sub")}
    assert entries == {"big.bin": len(BIG), "remote.dat": 6}


def test_unknown_sub_paths_are_not_found_and_files_have_no_entries(view: FileSystemView, snapshot: str) -> None:
    with pytest.raises(NotFound):
        view.stat(f"/sha1dir/{snapshot}/nope")
    with pytest.raises(NotADirectory):
        view.stat(f"/sha1dir/{snapshot}/a.txt/x")


def test_open_gives_a_descriptor_on_the_blob(view: FileSystemView, snapshot: str) -> None:
    fd = view.open(f"/sha1dir/{snapshot}/sub/big.bin")
    try:
        assert os.pread(fd, 10, 5) == BIG[5:15]
    finally:
        view.release(fd)
    with pytest.raises(IsADirectory):
        view.open(f"/sha1dir/{snapshot}/sub")


def test_reads_share_one_kept_descriptor_per_blob(view: FileSystemView, snapshot: str, store: LocalStore) -> None:
    fd = view.blob_fd(f"/sha1dir/{snapshot}/sub/big.bin")
    assert view.blob_fd(f"/sha1/{sha1(BIG)}.bin") == fd  # the same blob under another name
    assert os.pread(fd, 10, 5) == BIG[5:15]
    assert view.status()["blobs_held"] == 1
    view.close_blob_fds()
    assert view.status()["blobs_held"] == 0
    assert not _is_open_on(fd, sha1(BIG))


def test_a_read_of_a_blob_already_open_looks_nothing_up(
    view: FileSystemView, snapshot: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = f"/sha1dir/{snapshot}/sub/big.bin"
    fd = view.blob_fd(path)

    def no_stat(path: str) -> None:
        raise AssertionError(f"stat({path}) on a read of an open blob")

    monkeypatch.setattr(view, "stat", no_stat)
    assert view.blob_fd(path) == fd  # every read after the first: no stat of the store's blob
    view.close_blob_fds()
    with pytest.raises(AssertionError, match="on a read of an open blob"):
        view.blob_fd(path)  # let go of: looked up again


def test_kept_descriptors_are_bounded_and_closed_only_after_a_grace(view: FileSystemView, store: LocalStore) -> None:
    digests = [store.put_bytes(b"%d" % i).sha1 for i in range(vfs._BLOB_FDS + 1)]
    first = view.blob_fd(f"/sha1/{digests[0]}")
    for digest in digests[1:]:
        view.blob_fd(f"/sha1/{digest}")
    assert view.status()["blobs_held"] == vfs._BLOB_FDS
    assert _is_open_on(first, digests[0])  # let go of, but a reply may still be read from it: not closed yet
    view.close_blob_fds()
    assert not _is_open_on(first, digests[0])


def _snapshot_of_small_files(store: LocalStore, cached: bool) -> tuple[str, list[Path]]:
    """A snapshot of three files of 8 KiB stored in `store` (its sha1, their blobs), in the page cache or not."""
    blobs = [store.put_bytes(os.urandom(8192)) for _ in range(3)]
    root = DirNode(files={f"f{i}": FileEntry(b.size, b.sha1) for i, b in enumerate(blobs)})
    paths = [store.blob_path("sha1", b.sha1) for b in blobs]
    for path in paths:
        if cached:
            path.read_bytes()
        else:
            _drop_from_page_cache(path)
    return store.put_bytes(manifest.serialize(root)).sha1, paths


def test_the_first_read_in_a_snapshot_directory_reads_its_small_siblings_ahead(
    view: FileSystemView, store: LocalStore
) -> None:
    snap, blobs = _snapshot_of_small_files(store, cached=False)
    view.blob_fd(f"/sha1dir/{snap}/f0")
    view._warm_pool.shutdown(wait=True)  # type: ignore[union-attr]
    assert all(_resident_bytes(blob) == 8192 for blob in blobs[1:])
    view.close_blob_fds()


def test_a_snapshot_directory_already_in_the_page_cache_is_not_read_ahead(
    view: FileSystemView, store: LocalStore
) -> None:
    snap, _ = _snapshot_of_small_files(store, cached=True)
    view.blob_fd(f"/sha1dir/{snap}/f0")
    assert view._warm_pool is None  # no thread was started to read anything ahead
    view.close_blob_fds()


def test_reading_a_directory_reads_the_next_one_ahead_and_reaching_it_the_one_after(
    view: FileSystemView, store: LocalStore
) -> None:
    # d0, d1, d2, d3 of three cold files each: the program reads d0, then d1, ...
    blobs = {d: [store.put_bytes(os.urandom(8192)) for _ in range(3)] for d in ("d0", "d1", "d2", "d3")}
    root = DirNode(dirs={d: DirNode(files={f"f{i}": FileEntry(b.size, b.sha1) for i, b in enumerate(bs)})
                         for d, bs in blobs.items()})  # fmt: skip
    paths = {d: [store.blob_path("sha1", b.sha1) for b in bs] for d, bs in blobs.items()}
    for path in (p for ps in paths.values() for p in ps):
        _drop_from_page_cache(path)
    snap = store.put_bytes(manifest.serialize(root)).sha1

    def read_ahead() -> set[str]:
        view._warm_pool.shutdown(wait=True)  # type: ignore[union-attr]
        view._warm_pool = None
        return {d for d, ps in paths.items() if all(_resident_bytes(p) == 8192 for p in ps)}

    os.close(view.open(f"/sha1dir/{snap}/d0/f0"))
    assert read_ahead() == {"d0", "d1"}
    os.close(view.open(f"/sha1dir/{snap}/d1/f0"))  # in the page cache by now, and d2 is read ahead
    assert read_ahead() == {"d0", "d1", "d2"}
    os.close(view.open(f"/sha1dir/{snap}/d1/f1"))  # not the first open in d1: nothing more
    assert view._warm_pool is None and _resident_bytes(paths["d3"][0]) == 0
    os.close(view.open(f"/sha1dir/{snap}/d2/f0"))
    assert read_ahead() == {"d0", "d1", "d2", "d3"}
    os.close(view.open(f"/sha1dir/{snap}/d3/f0"))  # the last directory: none after it
    assert view._warm_pool is None and view._warm_tasks == 0


def test_a_read_ahead_stops_while_a_few_directories_are_queued(view: FileSystemView, store: LocalStore) -> None:
    snap, paths = _snapshot_of_small_files(store, cached=False)
    view._warm_tasks = vfs._WARM_TASKS_MAX  # as if the disk were four directories behind
    os.close(view.open(f"/sha1dir/{snap}/f0"))
    assert view._warm_pool is None and view._warm_tasks == vfs._WARM_TASKS_MAX
    assert all(_resident_bytes(p) == 0 for p in paths[1:])


def test_a_read_ahead_never_fails_an_open_nor_asks_a_channel(
    view: FileSystemView, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap, _ = _snapshot_of_small_files(store, cached=False)

    def fail(directory: str) -> None:
        raise RuntimeError("the read-ahead pool is shut down")

    monkeypatch.setattr(view, "_read_dir_ahead", fail)
    fds_before = len(os.listdir("/proc/self/fd"))
    fd = view.open(f"/sha1dir/{snap}/f0")
    assert os.fstat(fd).st_size > 0
    os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    # a snapshot whose manifest only a channel has is no directory to read ahead: nothing is asked
    remote = manifest.serialize(DirNode(dirs={"d": DirNode()}))
    channel = FakeChannel({sha1(remote): remote})
    remote_view = FileSystemView(Resolver(store, [channel]))
    assert remote_view._snapshot_dir(f"/sha1dir/{sha1(remote)}/d") is None
    assert remote_view._next_dir(f"/sha1dir/{sha1(remote)}/d") is None
    assert channel.checks == channel.fetches == 0


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert _resident_bytes(path) == 0


def _resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out.split()[0])


def _is_open_on(fd: int, digest: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(digest)
    except FileNotFoundError:
        return False


def test_xattrs_of_files_directories_and_the_root(view: FileSystemView, snapshot: str) -> None:
    path = f"/sha1dir/{snapshot}.ds/a.txt"
    assert sorted(view.listxattr(path)) == ["user.kachery.sha1", "user.kachery.size", "user.kachery.url"]
    assert view.getxattr(path, "user.kachery.size") == b"6"
    assert view.getxattr(f"/sha1dir/{snapshot}.ds/sub", "user.kachery.url") == f"sha1dir://{snapshot}.ds/sub".encode()
    assert view.listxattr("/") == [STATUS_XATTR, PID_XATTR]
    assert json.loads(view.getxattr("/", STATUS_XATTR))["pid"] == os.getpid()
    with pytest.raises(NotFound):
        view.getxattr("/", PID_XATTR)  # readiness checks poll it: no answer before the whole mount is up
    view.ready.set()
    assert view.getxattr("/", PID_XATTR) == str(os.getpid()).encode()
    with pytest.raises(NotFound):
        view.getxattr(path, "user.other")


def test_a_missing_blob_is_fetched_on_open_not_on_lookup(store: LocalStore) -> None:
    channel = FakeChannel({sha1(b"remote"): b"remote"})
    view = FileSystemView(Resolver(store, [channel]))
    path = f"/sha1/{sha1(b'remote')}"
    assert view.stat(path).size == 6 and channel.fetches == 0
    fd = view.open(path)
    view.release(fd)
    assert channel.fetches == 1 and store.has("sha1", sha1(b"remote"))


def test_concurrent_opens_share_one_download(store: LocalStore) -> None:
    channel = FakeChannel({sha1(b"remote"): b"remote"}, delay=0.3)
    view = FileSystemView(Resolver(store, [channel]))
    fds: list[int] = []
    threads = [threading.Thread(target=lambda: fds.append(view.open(f"/sha1/{sha1(b'remote')}"))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(fds) == 16 and channel.fetches == 1
    for fd in fds:
        view.release(fd)


def test_a_slow_channel_costs_eio_after_fetch_timeout(store: LocalStore) -> None:
    channel = FakeChannel({sha1(b"remote"): b"remote"}, delay=30)
    view = FileSystemView(Resolver(store, [channel]), fetch_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ChannelUnavailable, match="fetch_timeout"):
        view.open(f"/sha1/{sha1(b'remote')}")
    assert time.monotonic() - started < 10  # bounded by fetch_timeout, not by the 30 s channel (loose: no timing claim)


@pytest.mark.parametrize(
    ("serve", "fail"),
    [(None, None), (b"evil!!", None), (None, StoreFull("no space left"))],
    ids=["answers-late", "fails-late", "fails-late-uncounted"],
)
def test_a_fetch_that_timed_out_counts_once_as_an_error_however_it_ends(store: LocalStore, serve, fail) -> None:
    channel = FakeChannel({sha1(b"remote"): b"remote"}, delay=0.6, serve=serve, fail=fail)
    resolver = Resolver(store, [channel])
    view = FileSystemView(resolver, fetch_timeout=0.1)
    with pytest.raises(ChannelUnavailable, match="fetch_timeout"):
        view.open(f"/sha1/{sha1(b'remote')}")
    deadline = time.monotonic() + 10
    while (resolver.stats.fetches_in_progress or not resolver.stats.errors) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # room for a second count, were there one
    assert resolver.stats.fetches_in_progress == 0
    assert resolver.stats.errors == 1  # the caller's EIO; a late failure is not counted again
    assert store.has("sha1", sha1(b"remote")) == (serve is None and fail is None)


def test_wrong_bytes_from_a_channel_are_refused_and_not_stored(store: LocalStore) -> None:
    channel = FakeChannel({sha1(b"remote"): b"remote"}, serve=b"evil!!")
    view = FileSystemView(Resolver(store, [channel]))
    with pytest.raises(HashMismatch, match="wrong bytes"):
        view.open(f"/sha1/{sha1(b'remote')}")
    assert not store.has("sha1", sha1(b"remote"))


# -- the FUSE operations, called as libfuse would ------------------------------------------
def fuse_errno(call, *args) -> int:
    with pytest.raises(mfusepy.FuseOSError) as err:
        call(*args)
    return err.value.errno


def test_getattr_reports_read_only_modes_fixed_times_and_blocks(ops: HashViewOperations, snapshot: str) -> None:
    st = ops.getattr(f"/sha1dir/{snapshot}/sub/big.bin")
    assert st["st_mode"] == stat.S_IFREG | 0o444 and st["st_size"] == len(BIG)
    assert st["st_blocks"] == (len(BIG) + 511) // 512 and st["st_blksize"] == BLOCK_SIZE
    assert st["st_mtime"] == FIXED_TIME_NS
    assert ops.getattr("/")["st_mode"] == stat.S_IFDIR | 0o555


def test_fill_stat_writes_what_getattr_says_over_every_byte(
    ops: HashViewOperations, snapshot: str, store: LocalStore
) -> None:
    blob = store.put_bytes(b"x" * 1000).sha1
    paths = ["/", "/sha1", f"/sha1dir/{snapshot}", f"/sha1dir/{snapshot}/sub", f"/sha1dir/{snapshot}/sub/big.bin",
             f"/sha1dir/{snapshot}/a.txt", f"/sha1/{blob}.csv"]  # fmt: skip
    for path in paths:
        expected = mfusepy.c_stat()
        mfusepy.set_st_attrs(expected, ops.getattr(path), use_ns=True)
        st = mfusepy.c_stat.from_buffer_copy(b"\xab" * ctypes.sizeof(mfusepy.c_stat))  # no byte left as it was
        ops.fill_stat(path, st)
        assert bytes(st) == bytes(expected), path
    assert fuse_errno(ops.fill_stat, f"/sha1dir/{snapshot}/nope", mfusepy.c_stat()) == errno.ENOENT


def test_readdir_sends_attributes_with_each_entry(ops: HashViewOperations, snapshot: str) -> None:
    entries = ops.readdir(f"/sha1dir/{snapshot}", 0)
    assert entries[:2] == [".", ".."]
    sizes = {name: attrs["st_size"] for name, attrs, _ in entries[2:]}
    assert sizes == {"a.txt": 6, "sub": 4096}


def test_errors_become_their_errno(ops: HashViewOperations, snapshot: str) -> None:
    assert fuse_errno(ops.getattr, "/sha1/zzz") == errno.ENOENT
    assert fuse_errno(ops.getattr, f"/sha1dir/{snapshot}/nope") == errno.ENOENT
    assert fuse_errno(ops.getxattr, f"/sha1dir/{snapshot}/a.txt", "user.nope") == errno.ENODATA
    assert fuse_errno(ops.open, f"/sha1dir/{snapshot}/a.txt", SimpleNamespace(flags=os.O_RDWR)) == errno.EROFS


def test_an_invalid_manifest_is_eio(ops: HashViewOperations, store: LocalStore) -> None:
    bad = store.put_bytes(b'{"files": {"": {"size": -1}}}')
    assert fuse_errno(ops.readdir, f"/sha1dir/{bad.sha1}", 0) == errno.EIO
    assert ops.view.recent_errors


def test_an_unexpected_exception_is_logged_and_becomes_eio(
    ops: HashViewOperations, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(path: str) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(ops.view, "stat", broken)
    with caplog.at_level(logging.ERROR):
        assert fuse_errno(ops.getattr, "/sha1") == errno.EIO
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)


def test_the_first_open_fetches_then_tells_the_kernel_no_open_is_needed(ops: HashViewOperations, snapshot: str) -> None:
    fi = SimpleNamespace(flags=os.O_RDONLY, fh=0)
    assert fuse_errno(ops.open, f"/sha1dir/{snapshot}/sub/big.bin", fi) == errno.ENOSYS
    assert ops.view.status()["blobs_held"] == 1  # the blob's descriptor, kept for the reads to come
    assert fuse_errno(ops.open, f"/sha1dir/{snapshot}/sub/big.bin", SimpleNamespace(flags=os.O_RDWR)) == errno.EROFS
    assert fuse_errno(ops.flush, f"/sha1dir/{snapshot}/sub/big.bin", fi) == errno.ENOSYS


def test_a_kernel_that_refuses_passthrough_gets_the_no_open_mode_and_status_says_why(
    ops: HashViewOperations, snapshot: str
) -> None:
    class Refusing:
        def open(self, blob: object, open_blob: object) -> int:
            raise Unavailable("the kernel refused a backing file (EPERM)")

        def __len__(self) -> int:
            return 0

    ops.use_passthrough(Refusing())  # type: ignore[arg-type]
    assert ops.view.status()["reads"] == "kernel (passthrough)"
    fi = SimpleNamespace(flags=os.O_RDONLY, fh=0)
    assert fuse_errno(ops.open, f"/sha1dir/{snapshot}/sub/big.bin", fi) == errno.ENOSYS
    status = ops.view.status()
    assert status["reads"] == "daemon" and "EPERM" in status["reads_why"] and ops.passthrough is None


def test_reads_are_served_from_the_blob_descriptor(ops: HashViewOperations, snapshot: str) -> None:
    path = f"/sha1dir/{snapshot}/sub/big.bin"
    fi = SimpleNamespace(flags=os.O_RDONLY, fh=0)  # no-open mode: reads come without a handle
    bufp = ctypes.c_void_p()
    try:
        assert ops.read_buf(path, ctypes.pointer(bufp), 4096, 100, fi) == 0
        vec = _FuseBufvec.from_address(bufp.value)  # type: ignore[arg-type]
        assert vec.count == 1 and vec.buf[0].fd == ops.view.blob_fd(path)
        assert os.pread(vec.buf[0].fd, vec.buf[0].size, vec.buf[0].pos) == BIG[100:4196]
    finally:
        ctypes.CDLL(None).free(bufp)
        ops.view.close_blob_fds()


def test_init_sets_kernel_cache_timeouts_read_size_and_splicing(view: FileSystemView) -> None:
    called: list[bool] = []
    ops = HashViewOperations(
        view, entry_timeout=7, attr_timeout=8, negative_timeout=2, on_init=lambda: called.append(1)
    )
    conn, config = SimpleNamespace(max_read=0, capable=0xFFFF, want=1), SimpleNamespace()
    ops.init_with_config(conn, config)
    assert (config.entry_timeout, config.attr_timeout, config.negative_timeout) == (7, 8, 2)
    assert conn.max_read == MAX_READ == 1008 << 10 and called
    assert conn.want == 1 | 1 << 7 | 1 << 8  # replies from descriptors are spliced (FUSE_CAP_SPLICE_WRITE, _MOVE)


def test_a_path_giving_its_blob_the_wrong_size_is_refused_even_once_the_blob_is_open(
    view: FileSystemView, store: LocalStore
) -> None:
    blob = store.put_bytes(b"hello\n")
    root = DirNode(files={"right": FileEntry(6, blob.sha1), "short": FileEntry(2, blob.sha1)})
    snap = store.put_bytes(manifest.serialize(root)).sha1
    fd = view.blob_fd(f"/sha1dir/{snap}/right")  # the blob is now open under another name
    view._blob_sizes.clear()  # as when the bounded map is cleared: the store is asked again
    with pytest.raises(InvalidManifest, match="says 2 bytes"):
        view.blob_of(f"/sha1dir/{snap}/short")
    assert view.blob_fd(f"/sha1dir/{snap}/right") == fd
    view.close_blob_fds()


def test_a_shared_connection_passes_every_staging_operation_on() -> None:
    """SharedOperations forwards by hand: every op staging has must be one of its own (or the
    very same), or the kernel would get ENOSYS for it on a user's mount."""
    import mfusepy

    from kacheryfs.mount.fuse_ops import SharedOperations, StagingOperations

    ops = {name for name in dir(mfusepy.Operations) if not name.startswith("_")}
    staged = {name for name in ops if not getattr(getattr(StagingOperations, name), "libfuse_ignore", False)}
    assert {"create", "write", "rename", "link", "flush", "release", "opendir"} <= staged
    own = SharedOperations.__dict__
    missing = {n for n in staged if n not in own and getattr(SharedOperations, n) is not getattr(StagingOperations, n)}
    assert not missing
