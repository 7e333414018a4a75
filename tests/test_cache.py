"""The bounded cache: LRU eviction at insert time, pins, open blobs, fsck."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import kacheryfs as ka
from kacheryfs.errors import StoreFull
from kacheryfs.store import CacheLimits, LocalStore
from kacheryfs.store.fsck import fsck
from kacheryfs.uri import parse_url

MiB = 1 << 20


def _put(store: LocalStore, n: int, size: int = MiB):
    """`n` blobs as if fetched from a channel: the ones the cache may evict."""
    blobs = [store.put_bytes(bytes([i]) * size) for i in range(n)]
    for d in blobs:
        store.note_remote("sha1", d.sha1, "lab")
    return blobs


def _all_fetched(store: LocalStore) -> None:
    """Note every blob in the store as held by a channel (as if fetched from it)."""
    for digest, _path in list(store.iter_blobs("sha1")):
        store.note_remote("sha1", digest, "lab")


def _age(store: LocalStore, digests, start: float = 1_000_000.0):
    """Give blobs increasing atimes in list order (oldest first)."""
    for i, d in enumerate(digests):
        path = store.blob_path("sha1", d.sha1)
        os.utime(path, (start + i, path.stat().st_mtime))


def test_insert_evicts_least_recently_used_and_never_overshoots(tmp_path):
    store = LocalStore(tmp_path, limits=CacheLimits(max_size=3 * MiB))
    first = _put(store, 3)
    _age(store, first)
    store.cache._usage = None  # the atimes changed behind its back
    new = store.put_bytes(b"\xff" * MiB)
    assert not store.has("sha1", first[0].sha1)
    assert all(store.has("sha1", d.sha1) for d in first[1:] + [new])
    assert store.cache.usage().total_bytes <= 3 * MiB


def test_recency_from_reads_protects_a_recently_used_blob(tmp_path):
    store = LocalStore(tmp_path, limits=CacheLimits(max_size=3 * MiB))
    blobs = _put(store, 3)
    _age(store, blobs)
    with store.open("sha1", blobs[0].sha1):
        pass
    store.cache.flush_access()
    store.cache._usage = None
    store.put_bytes(b"\xfe" * MiB)
    assert store.has("sha1", blobs[0].sha1)
    assert not store.has("sha1", blobs[1].sha1)


def test_open_blobs_are_never_evicted(tmp_path):
    store = LocalStore(tmp_path, limits=CacheLimits(max_size=2 * MiB))
    blobs = _put(store, 2)
    _age(store, blobs)
    with store.open("sha1", blobs[0].sha1) as held:
        store.cache._usage = None
        store.put_bytes(b"\xfd" * MiB)
        assert store.has("sha1", blobs[0].sha1)
        assert held.read(1) == b"\x00"
    assert not store.has("sha1", blobs[1].sha1)


def test_pinned_blobs_survive_gc(tmp_path):
    blobs = _put(LocalStore(tmp_path), 1, size=10)
    store = LocalStore(tmp_path, limits=CacheLimits(max_size=1))
    store.cache.pin("sha1", blobs[0].sha1)
    store.cache.evict()
    assert store.has("sha1", blobs[0].sha1)
    assert store.cache.unpin("sha1", blobs[0].sha1)
    store.cache.evict()
    assert not store.has("sha1", blobs[0].sha1)


def test_a_pin_is_an_empty_file_and_pinning_again_leaves_it_as_it_is(tmp_path):
    store = LocalStore(tmp_path)
    sha1 = _put(store, 1, size=10)[0].sha1
    store.cache.pin("sha1", sha1)
    pin = store.cache.pins_dir / f"sha1-{sha1}.user"
    assert pin.stat().st_size == 0 and list(store.cache.pins()) == [("sha1", sha1, False, "user")]
    # Another user's pin in a shared store cannot be opened for writing (root is let through
    # any file mode; a pin of another kind stands in): pinning again is still success.
    pin.unlink()
    pin.mkdir()
    store.cache.pin("sha1", sha1)
    assert pin.is_dir()


def test_pinning_a_snapshot_pins_every_file_in_it(tmp_path, storage_dir):
    (tmp_path / "ds" / "sub").mkdir(parents=True)
    (tmp_path / "ds" / "a").write_text("a")
    (tmp_path / "ds" / "sub" / "b").write_text("b")
    url = ka.store_dir(tmp_path / "ds")
    loose = ka.store_text("loose")
    parsed = parse_url(url)
    store = LocalStore(storage_dir, limits=CacheLimits(max_size=1))
    _all_fetched(store)
    store.cache.pin("sha1", parsed.hash, is_dir=True)
    store.cache.evict()
    assert ka.load_text(url + "/sub/b") == "b"
    assert ka.load_text(url + "/a") == "a"
    with pytest.raises(ka.NotFound):
        ka.load_text(loose)


def test_an_insert_that_cannot_fit_is_store_full(tmp_path):
    store = LocalStore(tmp_path, limits=CacheLimits(max_size=MiB))
    d = store.put_bytes(b"p" * MiB)
    store.cache.pin("sha1", d.sha1)
    with pytest.raises(StoreFull, match="cannot make room for 10 bytes"):
        store.put_bytes(b"q" * 10)


def test_blobs_stored_here_and_never_uploaded_are_never_evicted_unless_asked(tmp_path):
    store = LocalStore(tmp_path, limits=CacheLimits(max_size=2 * MiB))
    only_copies = [store.put_bytes(bytes([i]) * MiB) for i in range(2)]
    with pytest.raises(StoreFull, match="2 blobs stored here and never uploaded"):
        store.put_bytes(b"\xfc" * MiB)
    assert all(store.has("sha1", d.sha1) for d in only_copies)  # nothing evicted for nothing
    store.note_remote("sha1", only_copies[0].sha1, "lab")  # uploaded since: fetchable again
    new = store.put_bytes(b"\xfc" * MiB)
    assert not store.has("sha1", only_copies[0].sha1)
    assert store.has("sha1", only_copies[1].sha1) and store.has("sha1", new.sha1)
    tighter = LocalStore(tmp_path, limits=CacheLimits(max_size=MiB))
    assert tighter.cache.evict() == (0, 0)
    assert tighter.cache.evict(include_local=True) == (MiB, 1)  # gc --include-local


def test_usage_counts_a_blob_once_despite_its_md5_name(tmp_path):
    store = LocalStore(tmp_path)
    _put(store, 2, size=1000)
    usage = store.cache.usage()
    assert (usage.total_bytes, usage.blobs) == (2000, 2)


def test_fsck_finds_a_flipped_byte_and_repair_quarantines_it(tmp_path):
    store = LocalStore(tmp_path)
    good, bad = _put(store, 2, size=4096)
    path = store.blob_path("sha1", bad.sha1)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x99")
    report = fsck(store)
    assert report.checked == 2 and not report.ok
    assert path in report.corrupt and store.blob_path("md5", bad.md5) in report.corrupt
    report = fsck(store, repair=True)
    assert not store.has("sha1", bad.sha1) and not store.has("md5", bad.md5)
    assert store.has("sha1", good.sha1)
    assert len(report.quarantined) == 2
    assert fsck(store).ok


def test_fsck_reports_a_misplaced_blob(tmp_path):
    store = LocalStore(tmp_path)
    (d,) = _put(store, 1, size=10)
    wrong = tmp_path / "sha1" / "00" / "00" / "00" / d.sha1
    wrong.parent.mkdir(parents=True)
    os.link(store.blob_path("sha1", d.sha1), wrong)
    assert wrong in fsck(store).misplaced


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kacheryfs", *args], capture_output=True, text=True, timeout=60)


def test_cli_pin_gc_du(tmp_path, storage_dir):
    keep = ka.store_text("keep me" * 1000)
    drop = ka.store_text("drop me" * 1000)
    assert run("pin", keep).returncode == 0
    du = json.loads(run("du", "--json").stdout)
    assert du["blobs"] == 2 and du["pinned_blobs"] == 1
    result = run("gc", "--max-size", "1")  # both were stored here, never uploaded: the only copies
    assert result.returncode == 0 and "evicted 0 blobs" in result.stdout
    result = run("gc", "--max-size", "1", "--include-local")
    assert result.returncode == 0 and "evicted 1 blobs" in result.stdout
    assert ka.load_text(keep).startswith("keep me")
    with pytest.raises(ka.NotFound):
        ka.load_text(drop)
    assert run("unpin", keep).returncode == 0
    assert json.loads(run("du", "--json").stdout)["pinned_blobs"] == 0


def test_cli_fsck_exit_codes(storage_dir):
    url = ka.store_text("x" * 5000)
    assert run("fsck").returncode == 0
    path = ka.get_file_info(url)["path"]
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"y")
    result = run("fsck")
    assert result.returncode == 4 and "corrupt" in result.stdout
    assert "checked 1 blobs" in result.stderr and "1 corrupt" in result.stderr  # its md5 name is the same blob
    assert run("fsck", "--repair").returncode == 0
    assert run("fsck").returncode == 0
    with pytest.raises(ka.NotFound):
        ka.load_text(url)


@pytest.fixture
def read_only_store(tmpfs, monkeypatch):
    """A store on a tmpfs with one text in it (its URL is returned); `remount_ro()` then makes it read-only."""
    root = tmpfs("4m")
    monkeypatch.setenv("KACHERY_STORAGE_DIR", str(root))
    url = ka.store_text("x" * 5000)

    def remount_ro() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)

    return root, url, remount_ro


def _one_clear_line(result: subprocess.CompletedProcess[str]) -> bool:
    return "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_fsck_repair_on_a_read_only_store_is_a_store_error(read_only_store):
    root, url, remount_ro = read_only_store
    path = ka.get_file_info(url)["path"]
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"y")
    remount_ro()
    result = run("fsck", "--repair")
    assert result.returncode == 5 and _one_clear_line(result) and "Read-only" in result.stderr


@pytest.mark.parametrize("command", ["pin {url}", "unpin {url}", "gc --max-size 0 --include-local"])
def test_pin_and_gc_on_a_read_only_store_are_store_errors(read_only_store, command):
    root, url, remount_ro = read_only_store
    if command.startswith("unpin"):
        assert run("pin", url).returncode == 0
    remount_ro()
    result = run(*command.format(url=url).split())
    assert result.returncode == 5 and _one_clear_line(result) and "Read-only" in result.stderr


def test_fsck_repair_of_a_sound_store_makes_no_quarantine_dir(storage_dir):
    ka.store_text("sound")
    assert run("fsck", "--repair").returncode == 0
    assert not (storage_dir / "quarantine").exists()


def test_pin_of_a_blob_not_in_the_store_pins_it_and_says_so(storage_dir):
    absent = "sha1://" + "0" * 40
    result = run("pin", absent)
    assert result.returncode == 0 and "not in the local store" in result.stderr
    assert run("unpin", absent).stdout == ""  # it was pinned


def test_pin_of_a_snapshot_url_whose_blob_is_no_manifest_is_refused_and_pins_nothing(storage_dir):
    plain = ka.store_text("not a manifest").split("/")[2]
    result = run("pin", "sha1://" + "1" * 40, f"sha1dir://{plain}.x")
    assert result.returncode == 4 and f"sha1dir://{plain}.x names no snapshot" in result.stderr
    assert not LocalStore(storage_dir).cache.pinned_paths()  # not even the URL before it


def test_gc_without_a_bound_explains_itself():
    result = run("gc")
    assert result.returncode == 2 and "max-size" in result.stdout


def test_min_free_space_at_insert_evicts_fetched_blobs_to_make_room(tmp_path, tmpfs):
    disk = tmpfs("8m")
    fetched = _put(LocalStore(disk / "s"), 5)  # 5 MiB of 8
    store = LocalStore(disk / "s", limits=CacheLimits(min_free_space=3 * MiB))
    store.put_bytes(b"\xfb" * MiB)  # leaves less than 3 MiB free unless something goes
    assert sum(store.has("sha1", d.sha1) for d in fetched) < 5
    assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize >= 3 * MiB


def test_blobs_without_a_note_are_evicted_only_under_a_bound_the_user_set(tmp_path):
    from kacheryfs.store.cache import DIGESTS_XATTR

    store = LocalStore(tmp_path)
    old = [store.put_bytes(bytes([i]) * MiB) for i in range(2)]
    for d in old:  # as an older kachery stored them: no note
        os.removexattr(store.blob_path("sha1", d.sha1), DIGESTS_XATTR)
    assert store.cache.evict(free_at_least=MiB) == (0, 0)  # unbounded: a full disk evicts none of them
    bounded = LocalStore(tmp_path, limits=CacheLimits(max_size=MiB))
    assert bounded.cache.evict() == (MiB, 1)


def test_fsck_repair_never_signals_a_daemon_that_does_not_say_it_takes_the_signal(tmp_path, monkeypatch, capsys):
    from kacheryfs.cli import fsck_cmd
    from kacheryfs.mount import daemon

    older = subprocess.Popen(["sleep", "30"])  # SIGUSR1 would end it, as it ends a daemon without the handler
    try:
        status = {"pid": older.pid, "storage_dir": str(tmp_path)}  # no "recheck_signal": an older kacheryfs
        monkeypatch.setattr(daemon, "mounts_of_store", lambda root: ({tmp_path / "mnt": status}, []))
        fsck_cmd._tell_live_mounts(LocalStore(tmp_path / "store"))
        assert older.poll() is None
        assert "may go on serving the quarantined bytes" in capsys.readouterr().err
    finally:
        older.kill()
        older.wait()
