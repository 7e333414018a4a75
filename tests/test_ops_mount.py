"""Running it for real: bounded cache under a live mount, recency from mount reads,
prefetch before a job, fsck repair followed by a fresh fetch."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_mount import mounted_at, require_passthrough, wait_until
from fixtures_server import PASSWORD, ServerProcess

import kacheryfs as ka
from kacheryfs.store import CacheLimits, LocalStore

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def _blobs(store: LocalStore, n: int) -> list[str]:
    """n blobs of 1 MiB as if fetched from a channel (evictable), made old (atime 1970 + i) so
    their LRU order is their list order."""
    digests = [store.put_bytes(bytes([i + 1]) * MiB).sha1 for i in range(n)]
    for i, digest in enumerate(digests):
        store.note_remote("sha1", digest, "lab")
        path = store.blob_path("sha1", digest)
        os.utime(path, (1_000_000 + i, path.stat().st_mtime))
    return digests


def test_eviction_keeps_bounds_and_spares_blobs_open_in_the_mount(tmp_path):
    storage = tmp_path / "storage"
    oldest, second, third = _blobs(LocalStore(storage), 3)
    with mounted_at(tmp_path, storage, '[cache]\nmax_size = "3 MiB"\n') as mount:
        with open(mount.mountpoint / "sha1" / oldest, "rb") as held:  # open in the mount: never evicted
            time.sleep(0.1)
            bounded = LocalStore(storage, limits=CacheLimits(max_size=3 * MiB))
            bounded.put_bytes(b"\xee" * MiB)
            assert bounded.has("sha1", oldest)
            assert not bounded.has("sha1", second)  # the least recently used that was not open
            assert bounded.has("sha1", third)
            assert held.read() == bytes([1]) * MiB
        assert bounded.cache.usage().total_bytes <= 3 * MiB


def test_reads_through_the_mount_update_recency(tmp_path):
    storage = tmp_path / "storage"
    oldest, second, third = _blobs(LocalStore(storage), 3)
    with mounted_at(tmp_path, storage) as mount:
        assert (mount.mountpoint / "sha1" / oldest).read_bytes()[:1] == b"\x01"
    # the unmount flushed the daemon's batched access times
    LocalStore(storage, limits=CacheLimits(max_size=3 * MiB)).put_bytes(b"\xdd" * MiB)
    store = LocalStore(storage)
    assert store.has("sha1", oldest) and not store.has("sha1", second) and store.has("sha1", third)


def test_reads_through_the_api_update_recency(storage_dir):
    oldest, second, _third = _blobs(LocalStore(storage_dir), 3)
    ka.load_bytes(f"sha1://{oldest}/x")
    ka.api.resolver().store.cache.flush_access()
    LocalStore(storage_dir, limits=CacheLimits(max_size=3 * MiB)).put_bytes(b"\xcc" * MiB)
    store = LocalStore(storage_dir)
    assert store.has("sha1", oldest) and not store.has("sha1", second)


def _lab_config(server: ServerProcess) -> str:
    return f'fr = ["lab"]\nto = "lab"\n[channels.lab]\nurl = "{server.url}"\nchannel = "lab"\npassword = "{PASSWORD}"\n'


def test_prefetch_then_every_file_reads_through_the_mount_with_the_server_gone(tmp_path, server, config_file):
    config_file.write_text(_lab_config(server))
    src = tmp_path / "ds"
    (src / "sub").mkdir(parents=True)
    for i in range(30):
        (src / ("sub" if i % 2 else ".") / f"f{i}.bin").write_bytes(os.urandom(5000 + i))
    with ka.config(storage_dir=str(tmp_path / "uploader")):
        url = ka.store_dir(src)
    storage = tmp_path / "job-machine"
    env = dict(os.environ, KACHERY_STORAGE_DIR=str(storage))
    done = subprocess.run(["kacheryfs", "prefetch", url, "--jobs", "8"], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "fetched 30 blobs" in done.stderr
    server.stop()
    with mounted_at(tmp_path / "m", storage, _lab_config(server)) as mount:
        snapshot = mount.path(url)
        for file in src.rglob("*.bin"):
            assert (snapshot / file.relative_to(src)).read_bytes() == file.read_bytes()


def test_fsck_repair_quarantines_a_flipped_blob_and_the_next_read_fetches_it_again(server, config_file, storage_dir):
    config_file.write_text(_lab_config(server))
    data = os.urandom(100_000)
    url = ka.store_bytes(data)  # stored here and uploaded to the lab
    path = Path(ka.get_file_info(url)["path"])
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(5000)
        f.write(bytes([data[5000] ^ 0xFF]))
    check = subprocess.run(["kacheryfs", "fsck"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 4 and str(path) in check.stdout
    repair = subprocess.run(["kacheryfs", "fsck", "--repair"], capture_output=True, text=True, timeout=60)
    assert repair.returncode == 0 and "quarantined" in repair.stdout
    assert any((storage_dir / "quarantine").iterdir())
    ka.api._resolvers.clear()
    assert ka.load_bytes(url) == data  # fetched again from the lab, verified
    assert hashlib.sha1(path.read_bytes()).hexdigest() == url.split("/")[2]
    assert json.loads(subprocess.run(["kacheryfs", "du", "--json"], capture_output=True, text=True).stdout)["blobs"]


def test_fsck_repair_has_a_live_mount_let_go_of_the_blob_it_quarantined(tmp_path):
    storage = tmp_path / "storage"
    store = LocalStore(storage)
    data = os.urandom(100_000)
    digest = store.put_bytes(data).sha1
    with mounted_at(tmp_path, storage) as mount, mounted_at(tmp_path / "o", tmp_path / "other") as other:
        require_passthrough(mount)
        path = mount.mountpoint / "sha1" / digest
        assert path.read_bytes() == data  # the mount holds the store's file now, for the kernel to read
        blob = store.blob_path("sha1", digest)
        os.chmod(blob, 0o644)
        with open(blob, "r+b") as f:  # the disk goes bad under it
            f.seek(5000)
            f.write(bytes([data[5000] ^ 0xFF]))
        assert path.read_bytes() != data  # the kernel reads the same, damaged file
        held = open(path, "rb")  # noqa: SIM115  (open across the repair: let go of at its close)
        check = subprocess.run(["kacheryfs", "fsck", "--storage-dir", str(storage)],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert check.returncode == 4 and "told" not in check.stderr  # nothing moved: nothing to tell
        repair = subprocess.run(["kacheryfs", "fsck", "--repair", "--storage-dir", str(storage)],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert repair.returncode == 0 and "quarantined" in repair.stdout
        assert f"told the mount at {mount.mountpoint} to let go of the quarantined blobs" in repair.stderr
        assert str(other.mountpoint) not in repair.stderr  # another store's mount is not told
        wait_until(lambda: "let go of 1 replaced in the store" in mount.log_text(), what="the mount's recheck")
        store.put_bytes(data)  # a good copy again, as the next fetch from a channel would bring
        with pytest.raises(OSError):  # the kernel still reads the old file for `held`: no new open shares it
            path.read_bytes()
        held.close()
        assert path.read_bytes() == data


def test_fsck_repair_does_not_hang_on_a_mount_whose_daemon_does_not_answer(tmp_path):
    storage = tmp_path / "storage"
    digest = LocalStore(storage).put_bytes(b"will rot").sha1
    blob = LocalStore(storage).blob_path("sha1", digest)
    blob.chmod(0o644)
    blob.write_bytes(b"has rot!")
    with mounted_at(tmp_path / "o", tmp_path / "other") as stopped:
        pid = int(stopped.status()["pid"])
        os.kill(pid, signal.SIGSTOP)
        try:
            repair = subprocess.run(["kacheryfs", "fsck", "--repair", "--storage-dir", str(storage)],
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
        finally:
            os.kill(pid, signal.SIGCONT)
        assert repair.returncode == 0 and "quarantined" in repair.stdout
        assert f"the mount at {stopped.mountpoint} did not answer" in repair.stderr
        assert "staging" not in repair.stderr  # its staging folder is the same daemon's
