"""One conformance suite for every place bytes come from: the local store, a kacheryfs server
channel, and a plain nginx serving a server's directory (a static read channel).

Each test stores content on "one machine" and reads it through the public API on "another"
(a fresh storage dir), so every read below crosses the source under test.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fixtures_server import PASSWORD, REPO, ServerProcess, start_nginx

import kacheryfs as ka
from kacheryfs import api
from kacheryfs.store import LocalStore

pytestmark = pytest.mark.timeout(120)


@dataclass
class Source:
    """Where reads come from, and how to put content there."""

    name: str
    publish: Callable[[Path], None]  # copy a storage dir's blobs to the source
    config: str  # config.toml text that reads from the source


def _copy_store(src: Path, dest: Path) -> None:
    dest_store = LocalStore(dest, clean=False)
    for alg in ("sha1",):
        for digest, path in LocalStore(src).iter_blobs(alg):
            with open(path, "rb") as f:
                dest_store.put_stream(f, expect_alg=alg, expect_hash=digest)


@pytest.fixture(params=["local", "server", "static"])
def source(request: pytest.FixtureRequest, server_dir: Path, tmp_path: Path) -> Iterator[Source]:
    if request.param == "local":
        yield Source("local", lambda store: _copy_store(store, Path(os.environ["KACHERY_STORAGE_DIR"])), "")
        return
    if request.param == "server":
        server = ServerProcess(server_dir)
        config = f'fr = ["lab"]\n[channels.lab]\nurl = "{server.url}"\nchannel = "lab"\npassword = "{PASSWORD}"\n'
        try:
            yield Source("server", lambda store: _copy_store(store, server_dir), config)
        finally:
            server.stop()
        return
    nginx = start_nginx((REPO / "docs" / "nginx.conf").read_text(), server_dir, tmp_path)
    try:
        yield Source("static", lambda store: _copy_store(store, server_dir),
                     f'fr = ["cdn"]\n[channels.cdn]\nurl = "{nginx.url}"\nchannel = "public"\n')  # fmt: skip
    finally:
        nginx.stop()


@pytest.fixture
def machines(source: Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Store on machine A (a separate storage dir), publish to the source, read on machine B."""
    a = tmp_path / "machine-a"

    Path(os.environ["KACHERY_CONFIG"]).write_text(source.config)

    def store(fn: Callable[[], str]) -> str:
        with ka.config(storage_dir=str(a)):
            url = fn()
        source.publish(a)
        api._resolvers.clear()
        return url

    return store


def test_text_round_trip(machines):
    url = machines(lambda: ka.store_text("across machines"))
    assert ka.load_text(url) == "across machines"


def test_object_round_trip(machines):
    url = machines(lambda: ka.store_object({"a": [1, 2, {"b": None}]}))
    assert ka.load_object(url) == {"a": [1, 2, {"b": None}]}


def test_npy_round_trip(machines):
    array = np.random.default_rng(0).normal(size=(64, 32))
    url = machines(lambda: ka.store_npy(array))
    np.testing.assert_array_equal(ka.load_npy(url), array)


def test_directory_round_trip(machines, tmp_path):
    src = tmp_path / "ds"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "mid.bin").write_bytes(os.urandom(3 << 20))
    (src / "a" / "b" / "leaf.txt").write_text("leaf")
    url = machines(lambda: ka.store_dir(src))
    assert ka.read_dir(url)["dirs"]["a"]["dirs"]["b"]["files"]["leaf.txt"]["size"] == 4
    ka.load_dir(url, tmp_path / "copy")
    for rel in ("top.txt", "a/mid.bin", "a/b/leaf.txt"):
        assert (tmp_path / "copy" / rel).read_bytes() == (src / rel).read_bytes()


def test_range_of_a_remote_file(machines):
    data = os.urandom(1 << 20)
    url = machines(lambda: ka.store_bytes(data))
    assert ka.load_bytes(url, 1000, 1010) == data[1000:1010]
    assert ka.load_bytes(url) == data


def test_verified_blob_is_kept_locally(machines):
    url = machines(lambda: ka.store_text("kept"))
    ka.load_text(url)
    digest = hashlib.sha1(b"kept").hexdigest()
    assert LocalStore(os.environ["KACHERY_STORAGE_DIR"]).has("sha1", digest)
    assert ka.get_file_info(url)["found_in"] == "local"


def test_unknown_hash_is_not_found(machines):
    with pytest.raises(ka.NotFound):
        ka.load_text("sha1://" + "1" * 40 + "/x")
