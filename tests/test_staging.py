"""The staging core, called directly (no mount): ingest on close, copy-on-write, recovery."""

from __future__ import annotations

import errno
import hashlib
import os
import time

import pytest

import kacheryfs as ka
from kacheryfs import upload_queue
from kacheryfs.errors import ChannelUnavailable, NotFound
from kacheryfs.staging import StagingArea
from kacheryfs.store import LocalStore
from kacheryfs.upload_queue import UploadQueue


@pytest.fixture
def area(tmp_path, storage_dir):
    return StagingArea(tmp_path / "staging", LocalStore(storage_dir))


def _write(area: StagingArea, rel: str, chunks: list[bytes], flags: int = os.O_WRONLY | os.O_TRUNC) -> None:
    fh = area.create(rel, flags, 0o644)
    offset = 0
    for chunk in chunks:
        offset += area.write(fh, chunk, offset)
    area.flush(fh)
    area.release(fh)


def _url(area: StagingArea, rel: str) -> str:
    return area.getxattr(rel, "user.kachery.url").decode()


def test_a_closed_file_gets_the_url_kachery_store_gives(area, tmp_path):
    data = os.urandom(6 << 20)
    _write(area, "f.bin", [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)])
    (tmp_path / "f.bin").write_bytes(data)
    assert _url(area, "f.bin") == ka.store_file(tmp_path / "f.bin")
    assert area.getxattr("f.bin", "user.kachery.sha1").decode() == hashlib.sha1(data).hexdigest()


def test_the_blob_shares_the_staged_bytes(area):
    _write(area, "f", [b"shared"])
    sha1 = hashlib.sha1(b"shared").hexdigest()
    assert area.store.blob_path("sha1", sha1).stat().st_ino == os.stat(area.real("f")).st_ino


def test_a_file_open_for_writing_has_no_url(area):
    fh = area.create("f", os.O_WRONLY, 0o644)
    area.write(fh, b"x", 0)
    with pytest.raises(NotFound, match="open for writing"):
        area.getxattr("f", "user.kachery.url")
    area.release(fh)
    assert _url(area, "f").endswith("/f")


def test_append_gives_a_new_url_and_leaves_the_old_blob_intact(area):
    _write(area, "f", [b"one\n"])
    first = _url(area, "f")
    fh = area.open("f", os.O_WRONLY | os.O_APPEND)
    area.write(fh, b"two\n", 4)
    area.flush(fh)
    area.release(fh)
    second = _url(area, "f")
    assert first != second
    assert ka.load_text(first) == "one\n"
    assert ka.load_text(second) == "one\ntwo\n"


def test_out_of_order_writes_are_hashed_at_close(area):
    fh = area.create("f", os.O_WRONLY, 0o644)
    area.write(fh, b"world", 5)
    area.write(fh, b"hello", 0)
    area.flush(fh)
    area.release(fh)
    assert area.getxattr("f", "user.kachery.sha1").decode() == hashlib.sha1(b"helloworld").hexdigest()


def test_truncate_of_a_closed_file_is_ingested_without_touching_the_old_blob(area):
    _write(area, "f", [b"0123456789"])
    old = _url(area, "f")
    area.truncate("f", 4)
    assert ka.load_text(_url(area, "f")) == "0123"
    assert ka.load_text(old) == "0123456789"


def test_directory_url_equals_kachery_store_of_the_same_tree(area, tmp_path):
    area.mkdir("ds", 0o755)
    area.mkdir("ds/sub", 0o755)
    _write(area, "ds/a.txt", [b"alpha"])
    _write(area, "ds/sub/b.txt", [b"beta"])
    (tmp_path / "ref" / "ds" / "sub").mkdir(parents=True)
    (tmp_path / "ref" / "ds" / "a.txt").write_bytes(b"alpha")
    (tmp_path / "ref" / "ds" / "sub" / "b.txt").write_bytes(b"beta")
    url = _url(area, "ds")
    assert url == ka.store_dir(tmp_path / "ref" / "ds")
    assert ka.load_text(url + "/sub/b.txt") == "beta"


def test_rename_keeps_the_url(area):
    _write(area, "a", [b"moved"])
    sha1 = area.getxattr("a", "user.kachery.sha1")
    area.mkdir("d", 0o755)
    area.rename("a", "d/b")
    assert area.getxattr("d/b", "user.kachery.sha1") == sha1


def test_recover_ingests_files_a_crash_left_behind(area):
    with open(area.real("orphan"), "wb") as f:
        f.write(b"left behind")
    assert area.recover() == 1
    assert area.getxattr("orphan", "user.kachery.sha1").decode() == hashlib.sha1(b"left behind").hexdigest()
    assert area.recover() == 0


def test_staged_blobs_are_pinned_until_uploaded(area):
    _write(area, "f", [b"keep"])
    pins = list(area.store.cache.pins())
    assert ("sha1", hashlib.sha1(b"keep").hexdigest(), False, "staging") in pins


def test_uploaded_says_why_without_a_channel(area):
    _write(area, "f", [b"x"])
    assert area.getxattr("f", "user.kachery.uploaded").startswith(b"no:")


def test_unknown_attribute_is_not_found(area):
    _write(area, "f", [b"x"])
    with pytest.raises(NotFound):
        area.getxattr("f", "user.other")


def test_the_md5_index_follows_in_the_background(area):
    data = os.urandom(5 << 20)
    _write(area, "f", [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)])
    area.md5_index.wait()
    md5 = hashlib.md5(data).hexdigest()
    assert area.store.blob_path("md5", md5).stat().st_ino == os.stat(area.real("f")).st_ino
    assert area.store.noted_digests("sha1", hashlib.sha1(data).hexdigest()).md5 == md5


# -- hard links: a second name for the same file, until one of them is changed ---------------
def test_a_hard_link_shares_the_file_its_record_and_its_url(area, tmp_path):
    area.mkdir("ds", 0o755)
    _write(area, "ds/a", [b"linked"])
    area.link("ds/a", "ds/b")
    assert os.stat(area.real("ds/a")).st_ino == os.stat(area.real("ds/b")).st_ino
    assert area.getxattr("ds/b", "user.kachery.sha1") == area.getxattr("ds/a", "user.kachery.sha1")
    (tmp_path / "ref" / "ds").mkdir(parents=True)
    (tmp_path / "ref" / "ds" / "a").write_bytes(b"linked")
    (tmp_path / "ref" / "ds" / "b").write_bytes(b"linked")
    assert _url(area, "ds") == ka.store_dir(tmp_path / "ref" / "ds")


def test_a_write_through_one_linked_name_leaves_the_other_its_bytes_and_url(area):
    _write(area, "a", [b"before"])
    area.link("a", "b")
    url = _url(area, "b")
    reader = area.open("b", os.O_RDONLY)
    writer = area.open("a", os.O_WRONLY)
    area.write(writer, b"AFTER!", 0)
    area.release(writer)
    assert area.read(reader, 100, 0) == b"before"
    area.release(reader)
    assert _url(area, "b") == url and ka.load_text(url) == "before"
    assert ka.load_text(_url(area, "a")) == "AFTER!"


def test_a_link_to_a_file_with_unsaved_writes_is_a_copy_of_the_bytes_so_far(area):
    fh = area.create("w", os.O_WRONLY, 0o640)
    area.write(fh, b"so far", 0)
    area.link("w", "copy")
    assert area.listxattr("copy") != [], "the copy has its URL at once"
    area.write(fh, b", and more", 6)
    area.release(fh)
    assert ka.load_text(_url(area, "w")) == "so far, and more"
    assert ka.load_text(_url(area, "copy")) == "so far"
    assert os.stat(area.real("copy")).st_mode & 0o777 == 0o640
    assert sorted(name for name, _st in area.readdir("")) == ["copy", "w"]


def test_a_handle_open_across_a_rename_writes_the_renamed_file(area):
    _write(area, "a", [b"old bytes"])
    fh = area.open("a", os.O_WRONLY)
    area.rename("a", "b")
    area.write(fh, b"NEW", 0)
    area.release(fh)
    assert ka.load_text(_url(area, "b")) == "NEW bytes"


def test_a_rename_onto_another_name_of_the_same_file_leaves_the_name_the_kernel_sees(area):
    _write(area, "a", [b"one file"])
    area.link("a", "b")
    fh = area.open("a", os.O_WRONLY)
    area.rename("a", "b")  # rename(2) would leave both names, but the kernel now knows a's node as b, and no a
    assert [name for name, _st in area.readdir("")] == ["b"]
    area.write(fh, b"ONE", 0)
    area.release(fh)
    assert ka.load_text(_url(area, "b")) == "ONE file"
    assert ka.load_text("sha1://" + hashlib.sha1(b"one file").hexdigest()) == "one file"  # the blob kept its bytes


def _blob_intact(area: StagingArea, sha1: str) -> bool:
    return hashlib.sha1(area.store.blob_path("sha1", sha1).read_bytes()).hexdigest() == sha1


def test_no_link_rename_unlink_and_truncate_lets_a_write_into_a_stored_blob(area):
    data = os.urandom(3 << 20)  # no md5 name yet: the staged names and the store's are the file's only ones
    _write(area, "a", [data])
    area.link("a", "b")
    fh = area.open("a", os.O_WRONLY)
    area.rename("a", "b")
    with pytest.raises(FileNotFoundError):
        area.unlink("a")
    area.truncate("b", 0)
    area.write(fh, b"EVIL", 0)
    area.release(fh)
    assert _blob_intact(area, hashlib.sha1(data).hexdigest())


def test_a_write_through_a_handle_whose_name_is_gone_never_reaches_the_blob(area):
    data = os.urandom(3 << 20)
    _write(area, "a", [data])
    fh = area.open("a", os.O_WRONLY)
    area.unlink("a")  # only the store's name is left on the file: one link, but a blob's
    area.write(fh, b"EVIL", 0)
    area.release(fh)
    assert _blob_intact(area, hashlib.sha1(data).hexdigest())


def test_a_link_of_a_directory_is_refused_with_eperm(area):
    area.mkdir("d", 0o755)
    with pytest.raises(PermissionError):
        area.link("d", "d2")


def test_a_link_through_a_symlinked_directory_is_refused_with_exdev(area, outside):
    os.symlink(outside, area.real("out"))
    _write(area, "mine", [b"staged"])
    for existing, new in (("out/data.txt", "theirs"), ("mine", "out/mine")):
        with pytest.raises(OSError) as refused:
            area.link(existing, new)
        assert refused.value.errno == errno.EXDEV
    assert (outside / "data.txt").stat().st_nlink == 1 and not (outside / "mine").exists()


# -- symlinks: the store never shares bytes it does not own ------------------------------
@pytest.fixture
def outside(tmp_path):
    """A user's own directory, outside staging, with one file in it."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "data.txt").write_bytes(b"the user's own bytes\n")
    return directory


def test_a_symlinked_directory_to_outside_is_stored_as_a_copy(area, outside, tmp_path):
    area.mkdir("ds", 0o755)
    os.symlink(outside, area.real("ds/link"))
    url = _url(area, "ds")
    sha1 = area.digests("ds/link/data.txt").sha1
    own = outside / "data.txt"
    assert own.stat().st_nlink == 1, "hard-linked into the store"
    assert os.listxattr(own) == [], "kacheryfs wrote its attributes on the user's file"
    assert area.store.blob_path("sha1", sha1).stat().st_ino != own.stat().st_ino
    with open(own, "r+b") as f:  # the user edits their file in place
        f.write(b"THE")
    assert area.store.blob_path("sha1", sha1).read_bytes() == b"the user's own bytes\n"
    (tmp_path / "ref" / "ds" / "link").mkdir(parents=True)
    (tmp_path / "ref" / "ds" / "link" / "data.txt").write_bytes(b"the user's own bytes\n")
    assert url == ka.store_dir(tmp_path / "ref" / "ds")


def test_a_symlinked_file_to_outside_is_stored_as_a_copy(area, outside):
    os.symlink(outside / "data.txt", area.real("alias.txt"))
    sha1 = area.digests("alias.txt").sha1
    assert sha1 == hashlib.sha1(b"the user's own bytes\n").hexdigest()
    assert (outside / "data.txt").stat().st_nlink == 1
    assert os.listxattr(outside / "data.txt") == []


def test_a_symlinked_directory_inside_staging_counts_as_its_target(area):
    area.mkdir("real", 0o755)
    _write(area, "real/f", [b"inside"])
    os.symlink("real", area.real("alias"))
    assert area.digests("alias/f") == area.digests("real/f")


def test_the_backing_dir_is_created_private(area):
    assert area.root.stat().st_mode & 0o777 == 0o700


# -- recovery, also while the mount is in use -----------------------------------------------
def test_recover_leaves_a_file_being_written_to_its_close(area):
    fh = area.create("busy", os.O_WRONLY, 0o644)
    area.write(fh, b"half", 0)
    assert area.recover() == 0
    with pytest.raises(NotFound, match="open for writing"):
        area.digests("busy")
    area.release(fh)
    assert area.digests("busy").sha1 == hashlib.sha1(b"half").hexdigest()


def test_recover_keeps_a_removed_file_this_run_still_has_open(area):
    fh = area.create(".fuse_hidden0000000200000001", os.O_WRONLY, 0o644)
    area.recover()
    assert os.path.exists(area.real(".fuse_hidden0000000200000001"))
    area.release(fh)
    area.recover()
    assert not os.path.exists(area.real(".fuse_hidden0000000200000001"))


def test_recover_ingests_two_names_of_one_file_once(area):
    with open(area.real("left"), "wb") as f:
        f.write(b"left behind twice")
    os.link(area.real("left"), area.real("behind"))
    assert area.recover() == 1
    assert area.getxattr("behind", "user.kachery.sha1") == area.getxattr("left", "user.kachery.sha1")


def test_recover_links_again_a_staged_file_whose_blob_was_evicted(area):
    _write(area, "f", [b"evicted"])
    blob = area.store.blob_path("sha1", hashlib.sha1(b"evicted").hexdigest())
    blob.unlink()
    area.recover()
    assert blob.read_bytes() == b"evicted"


def test_small_files_get_their_md5_at_close_without_the_indexer(area, monkeypatch):
    queued = []
    monkeypatch.setattr(area.md5_index, "add", queued.append)
    _write(area, "small", [b"tiny"])
    assert queued == []
    assert area.store.blob_path("md5", hashlib.md5(b"tiny").hexdigest()).read_bytes() == b"tiny"


# -- the upload queue: one per channel, a worker that never dies ----------------------------
class FakeChannel:
    """A channel that keeps what it is sent."""

    def __init__(self, name: str) -> None:
        self.name, self.blobs = name, set()

    def upload(self, alg, digest, path, size):
        self.blobs.add(digest)
        return True


def _queue(store: LocalStore, name: str, channel) -> UploadQueue:
    queue = UploadQueue(store, name, channel)
    queue.start()
    return queue


def _uploaded(queue: UploadQueue, sha1: str) -> bool:
    deadline = time.monotonic() + 10
    while queue.state(sha1) != "yes":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_new_channel_gets_what_was_uploaded_to_the_old_one(tmp_path, storage_dir):
    store = LocalStore(storage_dir)
    first, second = FakeChannel("a"), FakeChannel("b")
    queue = _queue(store, "a", lambda: first)
    area = StagingArea(tmp_path / "staging", store, queue)
    _write(area, "f", [b"shared twice"])
    sha1 = hashlib.sha1(b"shared twice").hexdigest()
    assert _uploaded(queue, sha1) and sha1 in first.blobs
    queue.stop()
    queue = _queue(store, "b", lambda: second)  # [staging] to changed, then the mount restarted
    area = StagingArea(tmp_path / "staging", store, queue)
    assert area.getxattr("f", "user.kachery.uploaded").startswith(b"no")
    area.recover()
    assert _uploaded(queue, sha1) and sha1 in second.blobs
    assert ("sha1", sha1, False, "staging") not in store.cache.pins()
    queue.stop()


def test_the_upload_worker_survives_any_error(storage_dir, monkeypatch):
    monkeypatch.setattr(upload_queue, "BACKOFF_FIRST", 0.01)
    store = LocalStore(storage_dir)
    channel, calls = FakeChannel("a"), []

    def flaky_factory() -> FakeChannel:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("the channel cannot be made yet")
        return channel

    queue = _queue(store, "a", flaky_factory)
    sha1 = store.put_bytes(b"eventually").sha1
    queue.enqueue(sha1)
    assert _uploaded(queue, sha1)
    queue.stop()


class DeadChannel(FakeChannel):
    """A channel whose server cannot be reached until `up` is set; counts the requests sent."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.up, self.requests = False, 0

    def upload(self, alg, digest, path, size):
        self.requests += 1
        if not self.up:
            raise ChannelUnavailable(f"channel {self.name!r} is unavailable: connection refused")
        return super().upload(alg, digest, path, size)


def test_an_unreachable_channel_is_sent_one_upload_per_pass_not_one_per_blob(storage_dir):
    store = LocalStore(storage_dir)
    channel = DeadChannel("a")
    queue = UploadQueue(store, "a", lambda: channel)  # passes run here, not by its worker
    blobs = [store.put_bytes(b"blob %d" % i).sha1 for i in range(20)]
    for sha1 in blobs:
        queue.enqueue(sha1)
    assert queue._upload_due(channel) > 0
    assert channel.requests == 1
    assert queue.state(blobs[0]).startswith("failed: ") and {queue.state(b) for b in blobs[1:]} == {"pending"}
    queue.enqueue(store.put_bytes(b"one more").sha1)  # wakes the worker: the channel's wait still holds
    assert queue._upload_due(channel) > 0 and channel.requests == 1
    channel.up = True
    queue._channel_retry_at = 0  # its wait is over
    queue._upload_due(channel)  # the first blob (now last) waits for its own retry; the rest go now
    assert set(blobs[1:]) <= channel.blobs and blobs[0] not in channel.blobs


def test_a_blob_the_server_keeps_refusing_does_not_hold_up_the_others(storage_dir):
    store = LocalStore(storage_dir)
    refused = store.put_bytes(b"refused").sha1

    class RefusesOne(FakeChannel):
        def upload(self, alg, digest, path, size):
            if digest == refused:
                raise ChannelUnavailable("HTTP 500 from the server, for this blob alone")
            return super().upload(alg, digest, path, size)

    channel = RefusesOne("a")
    queue = UploadQueue(store, "a", lambda: channel)  # passes run here, not by its worker
    others = [store.put_bytes(b"other %d" % i).sha1 for i in range(5)]
    for sha1 in (refused, *others):
        queue.enqueue(sha1)
    for _ in range(3):
        queue._upload_due(channel)
        queue._channel_retry_at = 0  # time passes: every wait is over
        for entry in queue._pending.values():
            entry.next_try = 0
    assert set(others) == channel.blobs
    assert queue.state(refused).startswith("failed: HTTP 500")


def test_queued_uploads_survive_a_killed_daemon(storage_dir):
    store = LocalStore(storage_dir)
    sha1 = store.put_bytes(b"queued").sha1
    UploadQueue(store, "a", lambda: FakeChannel("a")).enqueue(sha1)  # never started: killed at once
    assert UploadQueue(store, "a", lambda: FakeChannel("a")).state(sha1) == "pending"


def test_the_queue_forgets_uploads_the_store_no_longer_holds(storage_dir):
    store = LocalStore(storage_dir)
    kept, gone = store.put_bytes(b"kept").sha1, store.put_bytes(b"gone").sha1
    queue = _queue(store, "a", lambda: FakeChannel("a"))
    queue.enqueue(kept)
    queue.enqueue(gone)
    assert _uploaded(queue, kept) and _uploaded(queue, gone)
    queue.stop()
    store.blob_path("sha1", gone).unlink()  # evicted
    reopened = UploadQueue(store, "a", lambda: FakeChannel("a"))
    assert reopened.state(kept) == "yes"
    assert gone not in (reopened.dir / upload_queue.JOURNAL).read_text()
