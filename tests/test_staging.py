"""The staging core, called directly (no mount): ingest on close, copy-on-write, recovery."""

from __future__ import annotations

import hashlib
import os

import pytest

import kacheryfs as ka
from kacheryfs.errors import NotFound
from kacheryfs.staging import StagingArea
from kacheryfs.store import LocalStore


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
