"""Real mounts read by real tools: ls, find, du, stat, cat, cp, tar, rsync, getfattr, dd, numpy, mmap.

Each mount runs `kacheryfs mount` in a subprocess; tests that need the daemon to themselves
(signals, kill -9, errors at mount time) make their own.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fixtures_mount import (
    DAEMON_READS,
    Mount,
    fuse_requests,
    is_mounted,
    kacheryfs,
    mounted_at,
    require_fuse,
    require_passthrough,
    wait_until,
)

from kacheryfs.mount.daemon import kacheryfs_mounts
from kacheryfs.mount.paths import url_of
from kacheryfs.store import LocalStore


def sh(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert done.returncode == 0, f"{args[0]} failed: {done.stderr}"
    return done.stdout


def tree_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def snap(sample: tuple[Mount, Path, str]) -> Path:
    mount, _tree, url = sample
    return mount.path(url)


@pytest.fixture
def tree(sample: tuple[Mount, Path, str]) -> Path:
    return sample[1]


# -- real tools --------------------------------------------------------------------
def test_ls_lR_shows_every_entry_with_its_size(snap: Path, tree: Path) -> None:
    listing = sh("ls", "-lR", snap)
    for path in tree.rglob("*"):
        if path.is_file():
            assert f" {path.stat().st_size} " in listing and path.name in listing


def test_find_lists_the_snapshot_but_never_crawls_the_store(snap: Path, tree: Path, sample) -> None:
    found = {line[len(str(snap)) + 1 :] for line in sh("find", snap).splitlines() if line != str(snap)}
    assert found == {str(p.relative_to(tree)) for p in tree.rglob("*")}
    top = sh("find", sample[0].mountpoint).split()
    assert sorted(top) == sorted(str(sample[0].mountpoint / n) for n in ("", "sha1", "md5", "sha1dir", "staging"))


def test_du_apparent_size_matches_the_original(snap: Path, tree: Path) -> None:
    files = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    dirs = 1 + sum(1 for p in tree.rglob("*") if p.is_dir())
    assert int(sh("du", "-sb", snap).split()[0]) == files + 4096 * dirs


def test_stat_shows_read_only_modes_fixed_times_and_blocks(snap: Path) -> None:
    out = sh("stat", "-c", "%a %s %b %B %o %Y %F", snap / "sub" / "big.bin").split(" ", 6)
    size = (1 << 20) + 1
    assert out[:6] == ["444", str(size), str((size + 511) // 512), "512", str(1 << 20), "1546300800"]
    assert sh("stat", "-c", "%a %F", snap / "sub").strip() == "555 directory"


def test_cat_reads_every_file(snap: Path, tree: Path) -> None:
    for path in tree.rglob("*"):
        if path.is_file():
            rel = path.relative_to(tree)
            done = subprocess.run(["cat", str(snap / rel)], capture_output=True, timeout=60)
            assert done.returncode == 0 and done.stdout == path.read_bytes(), rel


def test_cp_r_of_a_whole_snapshot_is_identical(snap: Path, tree: Path, tmp_path: Path) -> None:
    sh("cp", "-r", snap, tmp_path / "copy")
    assert tree_digests(tmp_path / "copy") == tree_digests(tree)


def test_tar_archives_the_snapshot(snap: Path, tree: Path, tmp_path: Path) -> None:
    sh("tar", "cf", tmp_path / "s.tar", "-C", snap, ".")
    (tmp_path / "x").mkdir()
    sh("tar", "xf", tmp_path / "s.tar", "-C", tmp_path / "x")
    assert tree_digests(tmp_path / "x") == tree_digests(tree)


def test_rsync_a_copies_the_snapshot(snap: Path, tree: Path, tmp_path: Path) -> None:
    sh("rsync", "-a", f"{snap}/", tmp_path / "r")
    assert tree_digests(tmp_path / "r") == tree_digests(tree)
    assert "big.bin" not in sh("rsync", "-ai", f"{snap}/", tmp_path / "r")  # fixed times: nothing to redo


def test_getfattr_dumps_url_sha1_and_size(snap: Path, tree: Path, sample) -> None:
    out = sh("getfattr", "-d", snap / "a.txt")
    digest = hashlib.sha1((tree / "a.txt").read_bytes()).hexdigest()
    assert f'user.kachery.url="sha1://{digest}/a.txt"' in out
    assert f'user.kachery.sha1="{digest}"' in out and 'user.kachery.size="14"' in out
    assert f'user.kachery.url="{sample[2]}/sub/deep"' in sh("getfattr", "-d", snap / "sub" / "deep")


def test_dd_reads_a_range(snap: Path, tree: Path) -> None:
    done = subprocess.run(
        ["dd", f"if={snap / 'sub' / 'big.bin'}", "bs=4096", "skip=3", "count=5", "status=none"],
        capture_output=True,
        timeout=60,
    )
    assert done.stdout == (tree / "sub" / "big.bin").read_bytes()[3 * 4096 : 8 * 4096]


def test_numpy_loads_a_mounted_npy(snap: Path) -> None:
    path = snap / "sub" / "deep" / "arr.npy"
    code = f"import numpy; a = numpy.load({str(path)!r}); print(a.shape, a.sum())"
    assert sh(sys.executable, "-c", code).strip() == "(10, 100) 499500.0"


def test_mmap_of_a_mounted_file(snap: Path, tree: Path) -> None:
    with open(snap / "sub" / "big.bin", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[-100:] == (tree / "sub" / "big.bin").read_bytes()[-100:]


# -- layout, URLs, errors ------------------------------------------------------------
def test_blob_view_serves_a_file_under_its_extension(sample) -> None:
    mount = sample[0]
    digests = LocalStore(mount.storage).put_bytes(b"x,y\n1,2\n")
    url = f"sha1://{digests.sha1}/data.csv"
    path = mount.path(url)
    assert path == mount.mountpoint / "sha1" / f"{digests.sha1}.csv"
    assert path.read_bytes() == b"x,y\n1,2\n"
    assert url_of(path) == f"sha1://{digests.sha1}/{digests.sha1}.csv"
    assert (mount.mountpoint / "md5" / f"{digests.md5}.txt").read_bytes() == b"x,y\n1,2\n"
    out = subprocess.run(["getfattr", "-d", mount.mountpoint / "md5" / digests.md5], capture_output=True, text=True)
    assert f'user.kachery.sha1="{digests.sha1}"' in out.stdout, out


def test_url_of_a_snapshot_file_and_directory(snap: Path, sample) -> None:
    assert url_of(snap) == sample[2]
    assert url_of(snap / "sub" / "deep" / "ünï cödé.txt").endswith("/ünï cödé.txt")


def test_kacheryfs_url_gives_every_path_it_can_and_says_why_not_for_the_others(snap: Path, sample, tmp_path) -> None:
    done = sample[0].cli("url", str(tmp_path), str(snap), check=False)
    assert done.returncode == 1 and done.stdout.strip() == sample[2]
    assert "it is not a file or directory under a kacheryfs mount" in done.stderr


def test_a_listing_read_once_is_kept_by_the_kernel(snap: Path, sample) -> None:
    mount = sample[0]
    if "the kernel will ask for listings again" in mount.log_text():
        reason = "this libfuse's private session layout is not one the mount knows: listings are not kept"
        if os.environ.get("CI"):
            pytest.fail(f"CI's libfuse is one the mount knows: {reason}")
        pytest.skip(reason)
    pid = mount.status()["pid"]

    def requests() -> int:  # the daemon reads each request from /dev/fuse with one read(2)
        return int(re.search(r"^syscr: (\d+)$", Path(f"/proc/{pid}/io").read_text(), re.M).group(1))

    expected = sorted(os.listdir(snap / "sub"))
    before = requests()
    for _ in range(50):
        assert sorted(os.listdir(snap / "sub")) == expected
    # An OPENDIR and a RELEASEDIR per listing; a listing read from the daemon again costs two READDIRs more.
    assert requests() - before <= 50 * 2 + 10


def _io_counter(pid: object, name: str) -> int:
    """One of the daemon's I/O counters: rchar counts bytes read(2) and pread(2) (not spliced), syscr the calls."""
    return int(re.search(rf"^{name}: (\d+)$", Path(f"/proc/{pid}/io").read_text(), re.M).group(1))


def test_a_blobs_bytes_are_spliced_to_the_kernel_not_read_by_the_daemon(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    data = os.urandom(16 << 20)
    digest = LocalStore(storage).put_bytes(data).sha1
    with mounted_at(tmp_path, storage, DAEMON_READS) as mounted:
        pid = mounted.status()["pid"]
        before = _io_counter(pid, "rchar")
        with open(mounted.mountpoint / "sha1" / digest, "rb", buffering=0) as f:
            assert f.read() == data
        # The requests themselves are read (~100 bytes each); a read that fell back to pread would add the 16 MiB.
        assert _io_counter(pid, "rchar") - before < 1 << 20
        status = mounted.status()
        assert status["reads"] == "daemon" and status["reads_why"] == "[mount] passthrough = false"
        assert (
            "by the daemon (passthrough off: [mount] passthrough = false)"
            in mounted.cli("status", str(mounted.mountpoint)).stdout
        )


def test_with_passthrough_the_kernel_reads_a_blob_without_the_daemon(mounted: Mount) -> None:
    data = os.urandom(16 << 20)
    digest = LocalStore(mounted.storage).put_bytes(data).sha1
    (mounted.mountpoint / "sha1" / f"{digest}.warm").read_bytes()[:1]  # the first open decides the mode
    require_passthrough(mounted)
    pid = mounted.status()["pid"]
    before = _io_counter(pid, "syscr")
    with open(mounted.mountpoint / "sha1" / f"{digest}.bin", "rb", buffering=0) as f:
        assert f.read() == data
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert mapped[-4096:] == data[-4096:]
    # LOOKUP, OPEN, RELEASE and a few more; the daemon serving the reads would add 17 READs at least.
    assert _io_counter(pid, "syscr") - before < 12


def test_one_blob_under_three_names_reads_through_all_at_once(mounted: Mount) -> None:
    data = os.urandom(3 << 20)
    digests = LocalStore(mounted.storage).put_bytes(data)
    names = [f"sha1/{digests.sha1}.a", f"sha1/{digests.sha1}.b", f"md5/{digests.md5}"]
    files = [open(mounted.mountpoint / name, "rb", buffering=0) for name in names]
    try:
        chunks: list[list[bytes]] = [[] for _ in files]
        for _ in range(3):
            for f, got in zip(files, chunks, strict=True):
                got.append(f.read(1 << 20))
        assert all(b"".join(got) == data for got in chunks)
    finally:
        for f in files:
            f.close()


def test_blobs_opened_before_keep_their_backing_file(mounted: Mount) -> None:
    store = LocalStore(mounted.storage)
    digests = [store.put_bytes(b"blob %d" % i).sha1 for i in range(300)]
    with open(mounted.mountpoint / "sha1" / digests[0], "rb") as held:
        for _ in range(2):  # the second time, each open is answered from its inode alone
            for i, digest in enumerate(digests):
                assert (mounted.mountpoint / "sha1" / digest).read_bytes() == b"blob %d" % i
        require_passthrough(mounted)
        assert mounted.status()["blobs_held"] == 300
        assert held.read() == b"blob 0"


def test_many_threads_opening_the_same_blobs_all_read_them_right(mounted: Mount) -> None:
    store = LocalStore(mounted.storage)
    contents = [os.urandom(1000 + i) for i in range(100)]
    paths = [mounted.mountpoint / "sha1" / store.put_bytes(data).sha1 for data in contents]
    wrong: list[object] = []

    def reader(seed: int) -> None:  # first opens racing each other, then opens of blobs held
        for i in random.Random(seed).choices(range(len(paths)), k=300):
            try:
                if paths[i].read_bytes() != contents[i]:
                    wrong.append(i)
            except OSError as err:
                wrong.append(err)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads) and wrong == []
    assert mounted.status()["errors"] == 0


def test_view_directories_list_nothing(sample) -> None:
    mnt = sample[0].mountpoint
    assert sorted(os.listdir(mnt)) == ["md5", "sha1", "sha1dir", "staging"]
    assert os.listdir(mnt / "sha1") == [] and os.listdir(mnt / "sha1dir") == []


@pytest.mark.parametrize(
    "name",
    ["sha1/zzz", "sha1/" + "a" * 39, "sha1/" + "a" * 40 + "x", "md5/" + "g" * 32, "sha1dir/nothash", "nowhere"],
)
def test_malformed_names_do_not_exist(sample, name: str) -> None:
    with pytest.raises(FileNotFoundError):
        os.stat(sample[0].mountpoint / name)


def test_unknown_hash_and_sub_path_do_not_exist_and_are_logged(sample, snap: Path) -> None:
    with pytest.raises(FileNotFoundError):
        os.stat(sample[0].mountpoint / "sha1" / ("0" * 40))
    with pytest.raises(FileNotFoundError):
        os.stat(snap / "sub" / "no-such-file")
    assert "no-such-file" in sample[0].log_text()


def test_an_invalid_manifest_is_eio_logged_and_the_daemon_lives(sample) -> None:
    mount = sample[0]
    bad = LocalStore(mount.storage).put_bytes(b'{"files": {"../x": {"size": 1, "sha1": "nope"}}}')
    with pytest.raises(OSError) as err:
        os.listdir(mount.mountpoint / "sha1dir" / bad.sha1)
    assert err.value.errno == errno.EIO
    assert "invalid name" in mount.log_text()
    assert mount.status()["recent_errors"]
    assert sorted(os.listdir(mount.mountpoint)) == ["md5", "sha1", "sha1dir", "staging"]


def test_the_same_failure_asked_again_and_again_is_logged_once(sample) -> None:
    mount = sample[0]
    bad = LocalStore(mount.storage).put_bytes(b'{"files": {"a": {"size": "big"}}}')
    for _ in range(20):  # an EIO is not kept by the kernel: each stat reaches the daemon
        with pytest.raises(OSError) as err:
            os.stat(mount.mountpoint / "sha1dir" / bad.sha1 / "a")
        assert err.value.errno == errno.EIO
    logged = [line for line in mount.log_text().splitlines() if bad.sha1 in line]
    assert len(logged) == 1 and "WARNING" in logged[0], logged


def test_unknown_attributes_are_enodata(snap: Path) -> None:
    with pytest.raises(OSError) as err:
        os.getxattr(snap / "a.txt", "user.other")
    assert err.value.errno == errno.ENODATA
    assert sorted(os.listxattr(snap / "a.txt")) == ["user.kachery.sha1", "user.kachery.size", "user.kachery.url"]


def test_security_labels_and_acls_are_unsupported(snap: Path) -> None:
    # EOPNOTSUPP, not ENODATA: `ls -l` then stops asking for them on every file.
    for name in ("security.selinux", "system.posix_acl_access"):
        with pytest.raises(OSError) as err:
            os.getxattr(snap / "a.txt", name)
        assert err.value.errno == errno.EOPNOTSUPP


def test_writes_are_refused(snap: Path) -> None:
    with pytest.raises(OSError) as err:
        open(snap / "a.txt", "r+b")
    assert err.value.errno in (errno.EROFS, errno.EACCES)


def test_a_cached_blob_costs_no_request_at_its_close_and_without_passthrough_none_at_all(sample) -> None:
    """With passthrough each open is a request (the kernel needs the backing file) and a close
    sends no FLUSH; without it, opens, closes and reads of a cached blob stay in the kernel."""
    mount, _, url = sample
    path = mount.path(url) / "a.txt"

    def read() -> bytes:  # os.open: Python's buffered open would ask for an ioctl (isatty) too
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.read(fd, 100)
        finally:
            os.close(fd)

    read()
    with fuse_requests(mount.mountpoint) as requests:
        for _ in range(3):
            assert read() == b"hello kachery\n"
    if mount.status()["reads"] == "kernel (passthrough)":
        assert requests["FUSE_OPEN"] == 3 and set(requests) <= {"FUSE_OPEN", "FUSE_RELEASE"}, requests
    else:
        assert requests == {}, requests


def test_status_reports_cache_and_counters(sample) -> None:
    mount = sample[0]
    assert (mount.path(sample[2]) / "a.txt").read_text() == "hello kachery\n"  # a hit at least
    text = mount.cli("status", str(mount.mountpoint)).stdout
    assert "local store" in text and "hits / misses" in text
    status = json.loads(mount.cli("status", str(mount.mountpoint), "--json").stdout)
    assert status["cache_blobs"] >= 6 and status["hits"] >= 1
    assert f"reads           by the {status['reads']}" in text
    via_staging = json.loads(mount.cli("status", str(mount.mountpoint / "staging"), "--json").stdout)
    assert via_staging["pid"] == status["pid"]  # the staging folder's mount is the same daemon's


# -- mounting and unmounting -------------------------------------------------------------
def test_mount_refuses_a_missing_mountpoint(tmp_path: Path) -> None:
    require_fuse()
    done = kacheryfs("mount", str(tmp_path / "nope"), check=False)
    assert done.returncode != 0 and "does not exist" in done.stderr


def test_mount_refuses_a_non_empty_mountpoint(tmp_path: Path) -> None:
    require_fuse()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "f").write_text("x")
    done = kacheryfs("mount", str(tmp_path / "m"), check=False)
    assert done.returncode != 0 and "not empty" in done.stderr


def test_mount_refuses_an_existing_mount(mounted: Mount) -> None:
    done = mounted.cli("mount", str(mounted.mountpoint), check=False)
    assert done.returncode != 0 and "already mounted" in done.stderr


def test_mount_refuses_a_directory_inside_a_kacheryfs_mount(mounted: Mount) -> None:
    done = mounted.cli("mount", str(mounted.mountpoint / "sha1dir"), check=False)  # it would hide every snapshot
    assert done.returncode != 0 and "inside the kacheryfs mount" in done.stderr


def test_a_mount_whose_path_has_a_space_tab_and_backslash_is_known_as_one(tmp_path: Path) -> None:
    with mounted_at(tmp_path / "odd \t\\name", tmp_path / "storage") as mount:  # /proc/self/mounts escapes these
        assert mount.mountpoint in kacheryfs_mounts()
        done = mount.cli("mount", str(mount.mountpoint / "sha1dir"), check=False)
        assert done.returncode != 0 and "inside the kacheryfs mount" in done.stderr


def test_two_mounts_of_one_directory_at_once_give_one_mount_and_one_clear_error(tmp_path: Path) -> None:
    require_fuse()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = dict(os.environ, KACHERY_STORAGE_DIR=str(tmp_path / "storage"))
    args = [sys.executable, "-m", "kacheryfs", "mount", str(mountpoint), "--log-file", str(tmp_path / "mount.log")]
    both = [subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = sorted((p.wait(60), p.stderr.read()) for p in both if p.stderr)
        assert [code for code, _ in results][0] == 0 and results[1][0] != 0
        assert "already mounted" in results[1][1]
        with open("/proc/self/mounts") as mounts:
            assert sum(line.split()[1] == str(mountpoint) for line in mounts) == 1
    finally:
        kacheryfs("umount", str(mountpoint), env=env, check=False)


def test_a_relative_storage_dir_in_the_config_is_the_same_store_for_the_cli_and_the_daemon(tmp_path: Path) -> None:
    require_fuse()
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "config.toml"
    config.write_text('storage_dir = "store"\n')
    env = {k: v for k, v in os.environ.items() if k != "KACHERY_STORAGE_DIR"} | {"KACHERY_CONFIG": str(config)}
    (tmp_path / "file.txt").write_text("stored by the CLI")
    stored = subprocess.run(  # run from another directory than the daemon's (/)
        ["kachery-store", "file.txt"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=True
    )
    digest = stored.stdout.split("/")[2]
    assert (tmp_path / "etc" / "store" / "sha1").is_dir()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    kacheryfs("mount", str(mountpoint), "--log-file", str(tmp_path / "mount.log"), env=env)
    try:
        assert (mountpoint / "sha1" / digest).read_text() == "stored by the CLI"
    finally:
        kacheryfs("umount", str(mountpoint), env=env, check=False)


def test_umount_of_a_busy_mount_refuses_and_names_who_uses_it(mounted: Mount) -> None:
    digest = LocalStore(mounted.storage).put_bytes(b"in use").sha1
    with open(mounted.mountpoint / "sha1" / digest, "rb") as held:
        done = mounted.cli("umount", str(mounted.mountpoint), check=False)
        assert done.returncode != 0 and "is busy, in use by" in done.stderr and f"({os.getpid()})" in done.stderr
        assert is_mounted(mounted.mountpoint) and is_mounted(mounted.mountpoint / "staging")
        assert held.read() == b"in use"  # still served
    mounted.cli("umount", str(mounted.mountpoint))
    assert not is_mounted(mounted.mountpoint)


def test_generic_mount_options_change_nothing_and_max_read_is_refused(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    digest = LocalStore(storage).put_bytes(b"read-only").sha1
    with mounted_at(tmp_path, storage, "", "-o", "rw,noatime") as mount:
        with pytest.raises(OSError) as err:
            (mount.mountpoint / "sha1" / digest).write_bytes(b"changed")
        assert err.value.errno == errno.EROFS
    done = kacheryfs("mount", str(tmp_path / "mnt"), "-o", "max_read=4096", check=False)
    assert done.returncode != 0 and "sets the read size itself" in done.stderr


def test_umount_of_something_not_mounted_fails_with_the_reason(tmp_path: Path) -> None:
    done = kacheryfs("umount", str(tmp_path), check=False)
    assert done.returncode != 0 and "not mounted" in done.stderr


@pytest.mark.parametrize("lazy", [False, True], ids=["plain", "lazy"])
def test_umount_refuses_a_mount_that_is_not_kacheryfs_and_leaves_it_be(tmpfs, lazy: bool) -> None:
    other = tmpfs("1m")
    (other / "data").write_text("important")
    done = kacheryfs("umount", *(["--lazy"] if lazy else []), str(other), check=False)
    assert done.returncode != 0 and "is not a kacheryfs mount (it is tmpfs)" in done.stderr
    assert os.path.ismount(other) and (other / "data").read_text() == "important"


@pytest.mark.parametrize("lazy", [False, True], ids=["plain", "lazy"])
def test_umount_and_status_through_a_symlink_to_the_mountpoint(tmp_path: Path, lazy: bool) -> None:
    with mounted_at(tmp_path, tmp_path / "storage") as mount:
        (tmp_path / "link").symlink_to(mount.mountpoint)
        status = json.loads(mount.cli("status", str(tmp_path / "link" / "staging"), "--json").stdout)
        assert status["pid"] == mount.status()["pid"]
        mount.cli("umount", *(["--lazy"] if lazy else []), str(tmp_path / "link"))
        assert not is_mounted(mount.mountpoint) and not is_mounted(mount.mountpoint / "staging")


def test_umount_unmounts_and_the_daemon_exits(mounted: Mount) -> None:
    pid = mounted.status()["pid"]
    mounted.unmount()
    assert not is_mounted(mounted.mountpoint)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unmounts_cleanly(mounted: Mount, sig: signal.Signals) -> None:
    os.kill(int(mounted.status()["pid"]), sig)  # type: ignore[call-overload]
    wait_until(lambda: not is_mounted(mounted.mountpoint), what="the unmount")
    # the daemon logs its clean stop just after the kernel has dropped the mount
    wait_until(lambda: "stopped by a signal" in mounted.log_text(), what="the daemon's clean stop")


def test_kill_9_leaves_a_stale_mount_that_umount_clears(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    with mounted_at(tmp_path, storage) as mount:
        os.kill(int(mount.status()["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        wait_until(lambda: _stale(mount.mountpoint), what="the mount to go stale")
        refused = mount.cli("mount", str(mount.mountpoint), check=False)
        assert refused.returncode != 0 and "stale" in refused.stderr
        (tmp_path / "c.txt").write_text("x")
        url = mount.cli("url", str(mount.mountpoint / "sha1dir"), str(tmp_path / "c.txt"), check=False)
        assert url.returncode == 3 and "is under a stale mount" in url.stderr and "Traceback" not in url.stderr
        assert "c.txt has no kachery URL" in url.stderr  # the next path is still answered
        mount.unmount()
        assert not is_mounted(mount.mountpoint)
    with mounted_at(tmp_path, storage) as again:
        assert sorted(os.listdir(again.mountpoint)) == ["md5", "sha1", "sha1dir", "staging"]


def _stale(mountpoint: Path) -> bool:
    try:
        os.statvfs(mountpoint)
    except OSError as err:
        return err.errno == errno.ENOTCONN
    return False


def test_foreground_mount_stops_on_ctrl_c(tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kacheryfs", "mount", str(mnt), "--foreground"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: is_mounted(mnt), what="the foreground mount")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, timeout=30)


def test_a_manifest_giving_a_wrong_size_is_eio_not_other_bytes(sample) -> None:
    mount = sample[0]
    store = LocalStore(mount.storage)
    blob = store.put_bytes(b"hello\n")
    entries = {name: {"size": size, "sha1": blob.sha1} for name, size in (("short", 2), ("long", 100), ("right", 6))}
    snapshot = store.put_bytes(json.dumps({"files": entries, "dirs": {}}).encode()).sha1
    root = mount.mountpoint / "sha1dir" / snapshot
    assert (root / "right").read_bytes() == b"hello\n"
    for name in ("short", "long"):
        with pytest.raises(OSError) as err:
            (root / name).read_bytes()
        assert err.value.errno == errno.EIO
    assert "the manifest says 2 bytes, its blob has 6" in mount.log_text()


def test_names_that_are_not_utf8_are_answered_and_logged_never_crashed_on(sample) -> None:
    mount, _tree, url = sample
    digest = url.removeprefix("sha1dir://").split(".")[0]
    odd = os.fsencode(mount.mountpoint / "sha1dir") + b"/" + digest.encode() + b".\xff"
    assert os.getxattr(odd, "user.kachery.url") == b"sha1dir://" + digest.encode() + b".\xff"
    with pytest.raises(FileNotFoundError):
        os.stat(odd + b"/missing\xfe")
    with pytest.raises(OSError) as err:  # a staged name must fit in a manifest (JSON, UTF-8)
        open(os.fsencode(mount.mountpoint / "staging") + b"/\xff.txt", "wb").close()
    assert err.value.errno == errno.EINVAL
    assert "missing\\udcfe" in mount.log_text() and "Logging error" not in mount.log_text()
