"""A mount reading through channels: lazy fetch from a real server, one download for many readers,
wrong bytes refused, a channel that is down or silent costing EIO within the bound."""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import pytest
from fixtures_mount import Mount, mounted_at, store_tree, wait_until, write_sample_tree
from fixtures_server import PASSWORD, ServerProcess

from kacheryfs.store import LocalStore


def channel_config(url: str, *, fetch_timeout: float = 10.0, channel_timeout: float = 5.0) -> str:
    return f"""
fr = ["lab"]
channel_timeout = {channel_timeout}

[mount]
fetch_timeout = {fetch_timeout}

[channels.lab]
url = "{url}"
channel = "lab"
password = "{PASSWORD}"
"""


def downloads(server: ServerProcess, digest: str) -> int:
    """GET /get requests for `digest` in the server's request log."""
    return sum(1 for line in list(server.log) if f"GET /get/sha1/{digest} " in line)


@pytest.fixture
def remote_mount(tmp_path: Path, server: ServerProcess) -> Iterator[Mount]:
    """An empty local store mounted with the server's `lab` channel to read from."""
    with mounted_at(tmp_path, tmp_path / "storage", channel_config(server.url)) as mount:
        yield mount


def test_a_blob_is_fetched_on_first_open_not_on_lookup(remote_mount: Mount, server: ServerProcess) -> None:
    data = os.urandom(3_000_000)
    digest = LocalStore(server.directory).put_bytes(data).sha1
    path = remote_mount.path(f"sha1://{digest}/rec.bin")
    assert path.stat().st_size == len(data) and downloads(server, digest) == 0
    assert path.read_bytes() == data
    assert LocalStore(remote_mount.storage).has("sha1", digest)
    assert remote_mount.status()["bytes_by_channel"] == {"lab": len(data)}
    # verified by sha1 alone; its md5 name follows in the background
    md5 = hashlib.md5(data).hexdigest()
    wait_until(lambda: LocalStore(remote_mount.storage).has("md5", md5), what="the md5 index of the fetched blob")


def test_a_snapshot_is_read_lazily_from_the_channel(remote_mount: Mount, server: ServerProcess, tmp_path: Path) -> None:
    tree = write_sample_tree(tmp_path / "ds")
    url = store_tree(LocalStore(server.directory), tree)
    for path in tree.rglob("*"):
        if path.is_file():
            assert (remote_mount.path(url) / path.relative_to(tree)).read_bytes() == path.read_bytes()


def test_32_parallel_readers_of_a_missing_blob_make_one_download(remote_mount: Mount, server: ServerProcess) -> None:
    data = os.urandom(16 << 20)
    digest = LocalStore(server.directory).put_bytes(data).sha1
    path = remote_mount.path(f"sha1://{digest}")
    path.stat()  # the lookup (a /check) first, so all readers race for the download itself

    def read(_: int) -> str:
        with open(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()

    with ThreadPoolExecutor(32) as pool:
        assert set(pool.map(read, range(32))) == {digest}
    wait_until(lambda: downloads(server, digest) >= 1, what="the server's request log")
    time.sleep(0.2)  # let any further request line arrive
    assert downloads(server, digest) == 1


class _LyingHandler(http.server.BaseHTTPRequestHandler):
    """A channel that says it has every blob and serves the wrong bytes of the right size."""

    size = 1000

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/check/"):
            body = json.dumps({"success": True, "found": True, "size": self.size}).encode()
        else:
            body = b"x" * self.size
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def lying_server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LyingHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_wrong_bytes_from_a_channel_are_eio_and_nothing_is_cached(tmp_path: Path, lying_server: str) -> None:
    digest = hashlib.sha1(os.urandom(1000)).hexdigest()
    with mounted_at(tmp_path, tmp_path / "storage", channel_config(lying_server)) as mount:
        path = mount.path(f"sha1://{digest}")
        assert path.stat().st_size == 1000
        with pytest.raises(OSError) as err:
            path.read_bytes()
        assert err.value.errno == errno.EIO
        assert not LocalStore(mount.storage).has("sha1", digest)
        assert "wrong bytes" in mount.log_text() and digest in mount.log_text()
        assert not list((mount.storage / "tmp").glob("*.part"))


@pytest.fixture
def snapshot_without_blobs(tmp_path: Path) -> tuple[Path, str, Path]:
    """(storage, sha1dir URL, tree): the manifest and a.txt stored locally, the other files not."""
    tree = write_sample_tree(tmp_path / "ds")
    full = LocalStore(tmp_path / "full")
    url = store_tree(full, tree)
    storage = tmp_path / "storage"
    local = LocalStore(storage)
    local.put_bytes(full.blob_path("sha1", url[len("sha1dir://") :].split(".")[0]).read_bytes())
    local.put_bytes((tree / "a.txt").read_bytes())
    return storage, url, tree


def test_a_channel_that_is_down_costs_eio_only_for_what_is_not_cached(
    tmp_path: Path, server: ServerProcess, snapshot_without_blobs: tuple[Path, str, Path]
) -> None:
    storage, url, tree = snapshot_without_blobs
    server.kill()
    with mounted_at(tmp_path, storage, channel_config(server.url, fetch_timeout=5)) as mount:
        snap = mount.path(url)
        assert (snap / "a.txt").read_bytes() == (tree / "a.txt").read_bytes()
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            (snap / "sub" / "big.bin").read_bytes()
        # bounded by fetch_timeout (1 s), far below the channel's own 30 s (loose: no timing claim)
        assert err.value.errno == errno.EIO and time.monotonic() - started < 15 * 5  # bounded, never a hang
        assert "unavailable" in mount.log_text()


def test_a_silent_channel_costs_eio_after_fetch_timeout(
    tmp_path: Path, silent_server: str, snapshot_without_blobs: tuple[Path, str, Path]
) -> None:
    storage, url, tree = snapshot_without_blobs
    config = channel_config(silent_server, fetch_timeout=1.0, channel_timeout=30.0)
    with mounted_at(tmp_path, storage, config) as mount:
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            (mount.path(url) / "sub" / "big.bin").read_bytes()
        # bounded by fetch_timeout (1 s), far below the channel's own 30 s (loose: no timing claim)
        assert err.value.errno == errno.EIO and time.monotonic() - started < 15
        assert (mount.path(url) / "a.txt").read_bytes() == (tree / "a.txt").read_bytes()  # still serving
        assert "fetch_timeout" in mount.log_text()


@pytest.fixture
def silent_listener() -> Iterator[tuple[str, list[socket.socket]]]:
    """A channel that accepts connections and never answers: its URL, and the connections it holds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        with suppress(OSError):  # the listener was closed
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", held
    listener.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("passthrough", ["true", "false"])
def test_a_name_waiting_on_a_silent_channel_holds_up_no_other_name(
    tmp_path: Path, passthrough: str, silent_listener: tuple[str, list[socket.socket]]
) -> None:
    """The kernel looks up names of one directory side by side (FUSE_PARALLEL_DIROPS): a stored
    blob answers while lookups of missing ones wait on the channel."""
    url, held = silent_listener
    storage = tmp_path / "storage"
    digest = LocalStore(storage).put_bytes(b"stored here").sha1
    config = channel_config(url, channel_timeout=5.0)
    config = config.replace("[mount]\n", f"[mount]\npassthrough = {passthrough}\n")
    finished: list[float] = []

    def look_up(name: str) -> None:
        with suppress(OSError):
            os.stat(mount.mountpoint / "sha1" / name)
        finished.append(time.monotonic())

    with mounted_at(tmp_path, storage, config) as mount:
        waiting = [threading.Thread(target=look_up, args=(f"{i:040x}",), daemon=True) for i in range(1, 4)]
        for thread in waiting:
            thread.start()
        wait_until(lambda: held, what="a lookup waiting on the channel")
        assert (mount.mountpoint / "sha1" / digest).read_bytes() == b"stored here"
        answered = time.monotonic()
        for thread in waiting:
            thread.join(60)
        assert len(finished) == 3
        assert answered < min(finished)  # one at a time, it would have waited behind the first


def test_a_silent_channel_is_asked_once_then_skipped_and_status_shows_it_down(
    tmp_path: Path, server: ServerProcess, silent_listener: tuple[str, list[socket.socket]]
) -> None:
    silent, held = silent_listener
    config = channel_config(server.url, channel_timeout=1.0).replace('fr = ["lab"]', 'fr = ["silent", "lab"]')
    config += f'\n[channels.silent]\nurl = "{silent}"\nchannel = "lab"\n'
    data = os.urandom(10_000)
    digest = LocalStore(server.directory).put_bytes(data).sha1
    with mounted_at(tmp_path, tmp_path / "storage", config) as mount:
        assert (mount.mountpoint / "sha1" / digest).read_bytes() == data  # lookup, getattr, open, read
        assert len(held) == 1  # one /check timed out; nothing more was sent to it
        status = mount.status()
        assert [(c["name"], c["state"]) for c in status["channel_states"]] == [("silent", "down"), ("lab", "up")]
        assert (status["errors"], status["channel_failures"]) == (0, 1)  # the read itself succeeded
        shown = mount.cli("status", str(mount.mountpoint)).stdout
        assert "silent        down since" in shown and "no answer in time" in shown
