"""The local store: layout, atomic writes, crash leftovers, disk full."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from kacheryfs.errors import HashMismatch, NotFound, StoreError, StoreFull
from kacheryfs.store import LocalStore


def test_layout_is_the_original_kachery_layout(tmp_path):
    store = LocalStore(tmp_path / "s")
    d = store.put_bytes(b"hello")
    h = hashlib.sha1(b"hello").hexdigest()
    assert d.sha1 == h and d.size == 5
    assert (tmp_path / "s" / "sha1" / h[0:2] / h[2:4] / h[4:6] / h).read_bytes() == b"hello"


def test_blob_is_indexed_under_md5_too(tmp_path):
    store = LocalStore(tmp_path)
    d = store.put_bytes(b"hello")
    assert d.md5 == hashlib.md5(b"hello").hexdigest()
    assert store.blob_path("md5", d.md5).read_bytes() == b"hello"


def test_blobs_are_read_only_on_disk(tmp_path):
    store = LocalStore(tmp_path)
    d = store.put_bytes(b"x" * 100)
    assert stat.S_IMODE(store.blob_path("sha1", d.sha1).stat().st_mode) & 0o222 == 0


def test_existing_blob_is_success_and_keeps_its_inode(tmp_path):
    store = LocalStore(tmp_path)
    d = store.put_bytes(b"same")
    inode = store.blob_path("sha1", d.sha1).stat().st_ino
    assert store.put_bytes(b"same") == d
    assert store.blob_path("sha1", d.sha1).stat().st_ino == inode


def test_large_file_is_hashed_while_copied(tmp_path):
    data = os.urandom(9 << 20)
    src = tmp_path / "big"
    src.write_bytes(data)
    d = LocalStore(tmp_path / "s").put_file(src)
    assert (d.sha1, d.md5, d.size) == (hashlib.sha1(data).hexdigest(), hashlib.md5(data).hexdigest(), len(data))


def test_hard_link_mode_shares_the_inode(tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"linked")
    store = LocalStore(tmp_path / "s")
    d = store.put_file(src, hard_link=True)
    assert store.blob_path("sha1", d.sha1).stat().st_ino == src.stat().st_ino


def test_an_existing_kachery_storage_dir_is_read_as_it_is(tmp_path):
    h = hashlib.sha1(b"old data").hexdigest()
    blob = tmp_path / "sha1" / h[0:2] / h[2:4] / h[4:6] / h
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"old data")
    store = LocalStore(tmp_path)
    assert store.size("sha1", h) == 8
    with store.open("sha1", h) as f:
        assert f.read() == b"old data"


def test_wrong_bytes_are_not_committed(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(HashMismatch):
        with store.writer() as w:
            w.write(b"bad")
            w.commit(expect_alg="sha1", expect_hash=hashlib.sha1(b"good").hexdigest())
    assert not store.has("sha1", hashlib.sha1(b"good").hexdigest())
    assert not store.has("sha1", hashlib.sha1(b"bad").hexdigest())
    assert list((tmp_path / "tmp").iterdir()) == []


def test_missing_blob_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        LocalStore(tmp_path).open("sha1", "0" * 40)


def test_missing_source_file_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        LocalStore(tmp_path / "s").put_file(tmp_path / "nope")


def test_unusable_store_root_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="KACHERY_STORAGE_DIR"):
        LocalStore(tmp_path / "file" / "store")


def test_sigkill_mid_copy_leaves_no_blob_and_the_next_start_cleans_up(tmp_path):
    src = tmp_path / "src"
    # a slow source: a fifo the writer reads from, fed slowly so the kill lands mid-copy
    os.mkfifo(src)
    root = tmp_path / "s"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            from kacheryfs.store import LocalStore
            LocalStore({str(root)!r}).put_file({str(src)!r})
        """)],
    )  # fmt: skip
    with open(src, "wb") as feed:
        feed.write(os.urandom(5 << 20))
        feed.flush()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any((root / "tmp").glob("*.part")):
            time.sleep(0.05)
        time.sleep(0.3)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    leftovers = list((root / "tmp").glob("*.part"))
    assert leftovers, "the killed writer should have left its temp file"
    assert not (root / "sha1").exists() or not any(p.is_file() for p in (root / "sha1").rglob("*"))
    LocalStore(root)  # the next start
    assert list((root / "tmp").glob("*.part")) == []


def test_cleanup_spares_a_live_writers_temp_file(tmp_path):
    store = LocalStore(tmp_path)
    with store.writer() as w:
        w.write(b"in progress")
        assert LocalStore(tmp_path).cleanup_temp() == 0
        assert w.path.exists()
        w.commit()


@pytest.fixture
def tiny_fs(tmpfs):
    return tmpfs("2m")


def test_disk_full_is_store_full_and_leaves_no_partial_blob(tmp_path, tiny_fs):
    src = tmp_path / "big"
    src.write_bytes(os.urandom(4 << 20))
    store = LocalStore(tiny_fs / "s")
    with pytest.raises(StoreFull, match="no space"):
        store.put_file(src)
    assert list((tiny_fs / "s" / "tmp").iterdir()) == []
    assert not (tiny_fs / "s" / "sha1").exists()


@pytest.fixture
def small_direct(monkeypatch):
    """The O_DIRECT copy for files from 1 MiB, in 1 MiB chunks: a ring of 8 buffers reused within 12 MiB."""
    from kacheryfs.store import direct

    monkeypatch.setattr(direct, "MIN_SIZE", 1 << 20)
    monkeypatch.setattr(direct, "CHUNK", 1 << 20)
    copies = []
    real_copy = direct.copy

    def spy(*args, **kwargs):
        copies.append(result := real_copy(*args, **kwargs))
        return result

    monkeypatch.setattr(direct, "copy", spy)
    return copies


def test_a_large_file_is_copied_past_the_page_cache_with_its_digests(tmp_path, small_direct):
    data = os.urandom((12 << 20) + 12345)  # an unaligned tail after a dozen chunks
    src = tmp_path / "big"
    src.write_bytes(data)
    store = LocalStore(tmp_path / "s")
    d = store.put_file(src)
    assert small_direct and small_direct[0] == d  # the direct copy made this blob
    assert (d.size, d.sha1, d.md5) == (len(data), hashlib.sha1(data).hexdigest(), hashlib.md5(data).hexdigest())
    assert store.blob_path("sha1", d.sha1).read_bytes() == data


def test_a_filesystem_refusing_direct_writes_gets_ordinary_writes(tmp_path, small_direct, monkeypatch):
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):  # what such a filesystem answers
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = os.urandom((3 << 20) + 7)
    src = tmp_path / "big"
    src.write_bytes(data)
    store = LocalStore(tmp_path / "s")
    d = store.put_file(src)
    assert small_direct == [d]  # the same copy, its writes made the ordinary way
    assert d.sha1 == hashlib.sha1(data).hexdigest()
    assert store.blob_path("sha1", d.sha1).read_bytes() == data


def test_a_large_blob_written_in_pieces_goes_past_the_page_cache_too(tmp_path, small_direct):
    data = os.urandom((9 << 20) + 4097)
    store = LocalStore(tmp_path / "s")
    with store.writer(size_hint=len(data)) as w:
        assert w._sink is not None  # a download or an upload of this size: the O_DIRECT ring
        pos = 0
        for size in itertools.cycle((1, 65536, 3 << 20, 4095, 1 << 20)):  # pieces as a network gives them
            w.write(data[pos : pos + size])
            pos += size
            if pos >= len(data):
                break
        assert w.size == len(data)
        d = w.commit(expect_alg="sha1", expect_hash=hashlib.sha1(data).hexdigest(), expect_size=len(data))
    assert d.md5 == hashlib.md5(data).hexdigest()
    assert store.blob_path("sha1", d.sha1).read_bytes() == data


def test_a_file_copied_into_a_writer_sized_for_the_ring_is_hashed_as_written(tmp_path, small_direct):
    data = os.urandom((3 << 20) + 5)
    (tmp_path / "f").write_bytes(data)
    store = LocalStore(tmp_path / "s")
    with store.writer(size_hint=len(data)) as w, open(tmp_path / "f", "rb") as src:
        w.copy_file(src.fileno())
        d = w.commit()
    assert (d.size, d.sha1) == (len(data), hashlib.sha1(data).hexdigest())
    assert store.blob_path("sha1", d.sha1).read_bytes() == data


def test_nothing_more_can_be_written_once_a_copy_completed_the_blob(tmp_path, small_direct):
    (tmp_path / "f").write_bytes(os.urandom(2 << 20))
    store = LocalStore(tmp_path / "s")
    with store.writer() as w, open(tmp_path / "f", "rb") as src:
        w.copy_file(src.fileno())  # past the page cache: the digests are final
        with pytest.raises(StoreError, match="complete"):
            w.write(b"more")
        d = w.commit()
    assert store.blob_path("sha1", d.sha1).read_bytes() == (tmp_path / "f").read_bytes()


def test_disk_full_while_writing_pieces_is_store_full_and_leaves_nothing(tmp_path, tiny_fs, small_direct):
    store = LocalStore(tiny_fs / "s")
    with pytest.raises(StoreFull, match="no space"):
        with store.writer(size_hint=8 << 20) as w:
            for _ in range(8):
                w.write(os.urandom(1 << 20))
            w.commit()
    assert list((tiny_fs / "s" / "tmp").iterdir()) == []
    assert not (tiny_fs / "s" / "sha1").exists()


def test_disk_full_during_a_direct_copy_leaves_no_partial_blob(tmp_path, tiny_fs, small_direct):
    src = tmp_path / "big"
    src.write_bytes(os.urandom(8 << 20))
    store = LocalStore(tiny_fs / "s")
    with pytest.raises(StoreFull, match="no space"):
        store.put_file(src)
    assert list((tiny_fs / "s" / "tmp").iterdir()) == []
    assert not (tiny_fs / "s" / "sha1").exists()


def test_digests_come_from_the_note_or_from_hashing_an_old_blob(tmp_path):
    store = LocalStore(tmp_path)
    d = store.put_bytes(b"noted")
    assert store.digests("sha1", d.sha1) == d
    old = hashlib.sha1(b"old kachery").hexdigest()
    blob = tmp_path / "sha1" / old[0:2] / old[2:4] / old[4:6] / old
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"old kachery")
    assert store.digests("sha1", old).md5 == hashlib.md5(b"old kachery").hexdigest()


def test_a_file_changed_while_hashed_for_a_hard_link_is_copied_not_linked(tmp_path, monkeypatch):
    import kacheryfs.store.local as local

    src = tmp_path / "f"
    src.write_bytes(b"before")
    real_hash_file = local.hash_file

    def hash_then_change(path, **kw):
        digests = real_hash_file(path, **kw)
        with open(path, "ab") as f:  # another program appends while we hash
            f.write(b" and after")
        return digests

    monkeypatch.setattr(local, "hash_file", hash_then_change)
    store = LocalStore(tmp_path / "s")
    d = store.put_file(src, hard_link=True)
    blob = store.blob_path("sha1", d.sha1)
    assert hashlib.sha1(blob.read_bytes()).hexdigest() == d.sha1
    assert not store.has("sha1", hashlib.sha1(b"before").hexdigest())


def test_a_sink_whose_threads_cannot_all_start_stops_the_ones_that_did(tmp_path, monkeypatch) -> None:
    import threading

    from kacheryfs.store import direct

    real_start, started = threading.Thread.start, []

    def start(self: threading.Thread) -> None:
        if len(started) == 2:
            raise RuntimeError("can't start new thread")
        real_start(self)
        started.append(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    path = tmp_path / "t"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(RuntimeError, match="can't start"):
            direct.open_sink(path, fd)
    finally:
        os.close(fd)
    for t in started:
        t.join(timeout=5)
        assert not t.is_alive()


def _files(tmp_path, n):
    out = []
    for i in range(n):
        path = tmp_path / f"f{i}"
        path.write_bytes(f"file {i}".encode())
        out.append(path)
    return out


def test_a_group_links_its_blobs_only_once_their_bytes_are_durable(tmp_path, monkeypatch):
    from kacheryfs.store import local

    store = LocalStore(tmp_path / "s")
    syncs = []  # for each filesystem sync: which of the blobs were linked in when it ran
    real_syncfs = local._syncfs

    def spy(fd):
        syncs.append(sum(store.has("sha1", d.sha1) for d in added))
        return real_syncfs(fd)

    monkeypatch.setattr(local, "_syncfs", spy)
    added = []
    with store.group() as group:
        for path in _files(tmp_path, 5):
            added.append(store.put_file(path, group=group))
        assert not any(store.has("sha1", d.sha1) for d in added)
        assert len(list((tmp_path / "s" / "tmp").glob("*.part"))) == 5
    assert syncs == [0, 5]  # the bytes made durable before any link, then the links
    for i, d in enumerate(added):
        assert store.open("sha1", d.sha1).read() == f"file {i}".encode()
        assert store.has("md5", d.md5)
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_a_full_group_is_linked_before_the_next_blob_is_added(tmp_path):
    store = LocalStore(tmp_path / "s")
    with store.group() as group:
        group.MAX_FILES = 3
        added = [store.put_file(p, group=group) for p in _files(tmp_path, 4)]
        assert [store.has("sha1", d.sha1) for d in added] == [True, True, True, False]
    assert store.has("sha1", added[3].sha1)


def test_a_group_left_by_an_exception_links_nothing_and_leaves_no_temp_files(tmp_path):
    store = LocalStore(tmp_path / "s")
    added = []
    with pytest.raises(KeyboardInterrupt), store.group() as group:
        for path in _files(tmp_path, 3):
            added.append(store.put_file(path, group=group))
        raise KeyboardInterrupt
    assert not any(store.has("sha1", d.sha1) for d in added)
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_a_blob_in_a_group_that_does_not_match_is_refused_and_its_temp_file_removed(tmp_path):
    store = LocalStore(tmp_path / "s")
    with store.group() as group, store.writer() as w:
        w.write(b"actual bytes")
        with pytest.raises(HashMismatch):
            w.seal(expect_alg="sha1", expect_hash=hashlib.sha1(b"other bytes").hexdigest())
        assert not w.path.exists()
        group.flush()
    assert not store.has("sha1", hashlib.sha1(b"actual bytes").hexdigest())
