"""Sharing through a channel with the Python API and the CLI: upload, fetch on another machine."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_server import PASSWORD, ServerProcess, free_port, quota, write_config

import kacheryfs as ka
from kacheryfs import api
from kacheryfs.remote import HttpChannel
from kacheryfs.store import LocalStore
from kacheryfs.store.cache import DIGESTS_XATTR

pytestmark = pytest.mark.timeout(180)


def channels_config(*channels: tuple[str, str], fr: list[str], to: str | None = None) -> str:
    text = f"fr = {json.dumps(fr)}\n" + (f'to = "{to}"\n' if to else "")
    for name, url in channels:
        text += f'[channels.{name}]\nurl = "{url}"\nchannel = "lab"\npassword = "{PASSWORD}"\n'
    return text


@pytest.fixture
def lab(server: ServerProcess, config_file: Path) -> ServerProcess:
    config_file.write_text(channels_config(("lab", server.url), fr=["lab"]))
    return server


def on_other_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str = "machine-b") -> Path:
    """Point the store at a fresh directory, as if on another computer."""
    storage = tmp_path / name
    monkeypatch.setenv("KACHERY_STORAGE_DIR", str(storage))
    api._resolvers.clear()
    return storage


def on_server(server: ServerProcess, sha1: str) -> int | None:
    return HttpChannel("lab", server.url, "lab", PASSWORD).check("sha1", sha1)


def remote_noted(sha1: str) -> object:
    """The channel the local store's note on a blob names as holding a copy (None: none)."""
    path = ka.api.resolver().store.blob_path("sha1", sha1)
    return json.loads(os.getxattr(path, DIGESTS_XATTR)).get("remote")


def test_store_with_to_uploads_and_another_machine_loads(lab, tmp_path, monkeypatch):
    sha1 = hashlib.sha1(b"shared text").hexdigest()
    url = ka.store_text("shared text", to="lab")
    assert on_server(lab, sha1) == 11
    assert remote_noted(sha1) == "lab"  # uploaded: the cache may evict it now
    on_other_machine(tmp_path, monkeypatch)
    assert ka.load_text(url) == "shared text"
    assert remote_noted(sha1) == "lab"  # fetched from there
    ka.store_text("only here")
    assert remote_noted(hashlib.sha1(b"only here").hexdigest()) is None  # never evicted


def test_store_dir_with_to_uploads_every_file_and_the_manifest(lab, tmp_path, monkeypatch):
    src = tmp_path / "ds"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    url = ka.store_dir(src, to="lab")
    on_other_machine(tmp_path, monkeypatch)
    ka.load_dir(url, tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "b.txt").read_text() == "b"


def test_local_only_with_empty_fr(lab, tmp_path, monkeypatch):
    url = ka.store_text("not local", to="lab")
    on_other_machine(tmp_path, monkeypatch)
    with pytest.raises(ka.NotFound):
        ka.load_text(url, fr="")


def test_a_dead_channel_is_skipped_for_the_next_one(server, config_file, tmp_path, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    config_file.write_text(channels_config(("dead", dead), ("lab", server.url), fr=["dead", "lab"], to="lab"))
    url = ka.store_text("second channel")
    on_other_machine(tmp_path, monkeypatch)
    assert ka.load_text(url) == "second channel"


def test_a_range_of_a_remote_file_is_verified_through_the_whole_blob_unless_declined(lab, tmp_path, monkeypatch):
    data = os.urandom(2 << 20)
    sha1 = hashlib.sha1(data).hexdigest()
    url = ka.store_bytes(data, to="lab")
    storage = on_other_machine(tmp_path, monkeypatch)
    assert ka.load_bytes(url, 10, 20, verify=False) == data[10:20]
    assert not LocalStore(storage).has("sha1", sha1)  # the range alone was fetched
    assert ka.load_bytes(url, 10, 20) == data[10:20]
    assert LocalStore(storage).has("sha1", sha1)  # fetched whole, verified, kept


def test_a_range_from_a_channel_serving_wrong_bytes_is_refused(lab, tmp_path, monkeypatch):
    data = os.urandom(5000)
    url = ka.store_bytes(data, to="lab")
    on_server_disk = LocalStore(lab.directory, clean=False).blob_path("sha1", hashlib.sha1(data).hexdigest())
    os.chmod(on_server_disk, 0o644)
    with open(on_server_disk, "r+b") as f:
        f.seek(100)
        f.write(bytes([data[100] ^ 0xFF]))
    on_other_machine(tmp_path, monkeypatch)
    with pytest.raises((ka.HashMismatch, ka.ChannelUnavailable)):
        ka.load_bytes(url, 95, 110)
    done = subprocess.run(["kachery-cat", url, "--start", "95", "--end", "110"], capture_output=True, timeout=60)
    assert done.returncode != 0 and done.stdout == b"" and b"wrong bytes" in done.stderr, done.stderr


def test_prefetch_a_snapshot_then_read_it_with_the_server_gone(lab, tmp_path, monkeypatch):
    src = tmp_path / "ds"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.bin").write_bytes(os.urandom(10_000 + i))
    url = ka.store_dir(src, to="lab")
    on_other_machine(tmp_path, monkeypatch)
    result = ka.prefetch(url, jobs=4)
    assert result.fetched == 20 and not result.failed
    again = ka.prefetch(url)
    assert (again.fetched, again.present) == (0, 21)  # resumable: nothing is fetched twice
    lab.stop()
    for i in range(20):
        assert ka.load_bytes(f"{url}/f{i}.bin") == (src / f"f{i}.bin").read_bytes()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, env=os.environ.copy())


def test_cli_store_to_then_load_info_cat_ls_with_fr(lab, tmp_path, monkeypatch):
    src = tmp_path / "ds"
    src.mkdir()
    (src / "x.txt").write_text("0123456789")
    stored = run("kachery-store", str(src / "x.txt"), str(src), "--to", "lab")
    assert stored.returncode == 0, stored.stderr
    file_url, dir_url = stored.stdout.split()
    on_other_machine(tmp_path, monkeypatch)
    info = json.loads(run("kachery-info", file_url, "--fr", "lab").stdout)
    assert info["found_in"] == "lab" and info["size"] == 10 and info["path"] is None
    assert run("kachery-cat", file_url, "--fr", "lab", "--start", "2", "--end", "5").stdout == "234"
    assert run("kachery-ls", dir_url, "--fr", "lab").stdout.split() == ["x.txt"]
    path = run("kachery-load", f"{dir_url}/x.txt", "--fr", "lab").stdout.strip()
    assert Path(path).read_text() == "0123456789"
    assert json.loads(run("kachery-info", file_url).stdout)["found_in"] == "local"


def test_cli_store_to_prints_every_url_when_a_quota_refuses_one_file(server, config_file, tmp_path):
    config_file.write_text(f'[channels.tiny]\nurl = "{server.url}"\nchannel = "tiny"\npassword = "{PASSWORD}"\n')
    big, small = tmp_path / "big.bin", tmp_path / "small.txt"
    big.write_bytes(os.urandom(2000))  # over the channel's 1000-byte upload limit
    small.write_bytes(b"fits")
    stored = run("kachery-store", "--to", "tiny", str(big), str(small))
    assert stored.returncode == 8, stored.stderr  # QuotaExceeded's exit code
    urls = stored.stdout.splitlines()
    assert urls == [f"sha1://{hashlib.sha1(f.read_bytes()).hexdigest()}/{f.name}" for f in (big, small)]
    assert [ka.load_bytes(url, fr="") for url in urls] == [big.read_bytes(), b"fits"]  # both stored locally
    assert str(big) in stored.stderr and str(small) not in stored.stderr
    tiny = HttpChannel("tiny", server.url, "tiny", PASSWORD)
    assert tiny.check("sha1", urls[1].split("/")[2]) == 4  # the file after the refused one is still uploaded


def test_cli_store_to_a_channel_that_is_down_stores_every_path_and_waits_for_it_once(
    silent_server, config_file, tmp_path
):
    timeout = 3
    config_file.write_text(f'channel_timeout = {timeout}\n[channels.down]\nurl = "{silent_server}"\nchannel = "lab"\n')
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "in.txt").write_text("in a directory")
    paths = [tmp_path / "hello.txt", tmp_path / "ds", tmp_path / "hd"]
    paths[0].write_text("hello")
    paths[2].write_text("hd")
    started = time.monotonic()
    stored = run("kachery-store", "--to", "down", *map(str, paths))
    assert time.monotonic() - started < 2 * timeout  # one wait for the dead channel, not one per path
    assert stored.returncode == 6, stored.stderr  # ChannelUnavailable's exit code
    hello, ds, hd = stored.stdout.splitlines()
    assert (ka.load_text(hello, fr=""), ka.load_text(hd, fr="")) == ("hello", "hd")
    assert ka.load_text(f"{ds}/in.txt", fr="") == "in a directory"
    assert stored.stderr.count("unavailable") == 1 and str(paths[0]) in stored.stderr, stored.stderr


def test_one_gib_round_trip_is_checked_by_hash(server_dir, config_file, tmp_path, monkeypatch):
    write_config(server_dir, [{"name": "lab", "password": PASSWORD, "downloadQuotas": [quota(max_file_size=2 << 30)],
                               "uploadQuotas": [quota(max_file_size=2 << 30)]}])  # fmt: skip
    lab = ServerProcess(server_dir)
    try:
        config_file.write_text(channels_config(("lab", lab.url), fr=["lab"]))
        big = tmp_path / "big.bin"
        sha1 = hashlib.sha1()
        with open(big, "wb") as f:
            for _ in range(1024):
                chunk = os.urandom(1 << 20)
                sha1.update(chunk)
                f.write(chunk)
        url = ka.store_file(big, to="lab")
        assert url.split("/")[2] == sha1.hexdigest()
        big.unlink()
        on_other_machine(tmp_path, monkeypatch)
        path = ka.load_file(url)
        assert ka.get_file_info(url)["sha1"] == sha1.hexdigest()
        assert os.path.getsize(path) == 1 << 30
    finally:
        lab.stop()


def test_load_dir_works_with_a_cache_smaller_than_the_tree(server, config_file, tmp_path, monkeypatch):
    src = tmp_path / "ds"
    src.mkdir()
    for i in range(10):
        (src / f"f{i}").write_bytes(bytes([i]) * 300_000)
    config_file.write_text(channels_config(("lab", server.url), fr=["lab"], to="lab"))
    url = ka.store_dir(src)
    storage = on_other_machine(tmp_path, monkeypatch)
    config_file.write_text(channels_config(("lab", server.url), fr=["lab"]) + '[cache]\nmax_size = "1 MB"\n')
    ka.load_dir(url, tmp_path / "copy")
    for i in range(10):
        assert (tmp_path / "copy" / f"f{i}").read_bytes() == bytes([i]) * 300_000
    assert LocalStore(storage).cache.usage().total_bytes <= 1_000_000


def test_a_file_that_changes_while_uploaded_is_sent_as_stored(lab, tmp_path, monkeypatch):
    from kacheryfs.hashing import Digests

    f = tmp_path / "moving.bin"
    f.write_bytes(b"the bytes that get stored")
    stale = Digests(5, hashlib.sha1(b"older").hexdigest())  # what the quick first pass saw, before a change
    monkeypatch.setattr(ka.api, "hash_file", lambda path, md5=True: stale)
    url = ka.store_file(f, to="lab")
    digest = hashlib.sha1(b"the bytes that get stored").hexdigest()
    assert url.split("/")[2] == digest
    assert on_server(lab, digest) == len(b"the bytes that get stored")
    assert on_server(lab, stale.sha1) is None


@pytest.mark.parametrize("command", ["kachery-info", "kachery-cat"])
def test_a_password_every_channel_refuses_exits_7_not_6(server, config_file, command):
    password = '\npassword = "not the password"\n'
    config_file.write_text("".join(f'[channels.{n}]\nurl = "{server.url}"\nchannel = "lab"{password}' for n in "ab"))
    done = run(command, f"sha1://{'1' * 40}", "--fr", "a,b")
    assert done.returncode == 7, done.stderr


def test_ctrl_c_stops_a_prefetch_at_once_not_after_every_download_queued(scripted_server, config_file, tmp_path):
    def slow(handler) -> None:  # a channel that takes 20 s to say it has nothing
        time.sleep(20)
        handler.send_response(404)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    slow_lab = scripted_server(slow)
    config_file.write_text("channel_timeout = 60\n" + channels_config(("lab", slow_lab.url), fr=["lab"]))
    urls = [f"sha1://{i:040x}" for i in range(1, 6)]
    prefetch = subprocess.Popen(["kacheryfs", "prefetch", *urls, "--jobs", "2"], stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # two downloads under way, three queued
    interrupted = time.monotonic()
    prefetch.send_signal(signal.SIGINT)
    assert prefetch.wait(timeout=15) == 130
    assert time.monotonic() - interrupted < 10  # not the 20 s and more the downloads would take (loose)
