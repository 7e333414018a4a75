"""A mount made by a user who is not root, as most users make theirs.

fusermount3 (setuid root) makes such a mount, and a FUSE mount lets no other user in, root
included: so `<mnt>/staging` cannot be a second mount on top, and the daemon serves it on
the same connection (`SharedOperations`). These tests run every command as `nobody`: mount,
read, list, stage, ask for URLs, unmount. The user keeps one capability, reading any file
(CAP_DAC_READ_SEARCH), so that it can run this Python wherever it is installed; it has no
other (no CAP_SYS_ADMIN: no passthrough, no mount(2) of its own).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures_mount import (
    CLI_TIMEOUT,
    force_unmount,
    fuse_requests,
    is_mounted,
    require_fuse,
    store_tree,
    wait_until,
    write_sample_tree,
)

from kacheryfs.mount.paths import mount_path
from kacheryfs.store import LocalStore

NOBODY = 65534
Run = Callable[..., subprocess.CompletedProcess[str]]


def _need(what: str, ok: bool) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root with util-linux: {what}")
        pytest.skip(what)


@pytest.fixture
def as_nobody() -> Iterator[tuple[Run, Path]]:
    """(run, base): `run(*cmd)` runs a command as nobody in `base`, a folder nobody owns."""
    require_fuse()
    _need("running commands as another user needs root", os.geteuid() == 0)
    setpriv = shutil.which("setpriv")
    _need("setpriv (util-linux) is needed to run commands as nobody", setpriv is not None)
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if fuse_mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", fuse_mode | 0o666)  # as distributions ship it; put back below
    base = Path(tempfile.mkdtemp(prefix="kacheryfs-nobody-"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    os.chown(base, NOBODY, NOBODY)
    os.chown(home, NOBODY, NOBODY)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    caps = ["--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search"]

    def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [setpriv, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *caps, *cmd]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env, cwd=base)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr}")
        return done

    try:
        yield run, base
    finally:
        mnt = base / "mnt"
        if is_mounted(mnt):
            run(sys.executable, "-m", "kacheryfs", "umount", "--lazy", str(mnt), check=False)
        if is_mounted(mnt):
            force_unmount(mnt)
        os.chmod("/dev/fuse", fuse_mode)
        shutil.rmtree(base, ignore_errors=True)


def _chown_tree(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, NOBODY, NOBODY)


def test_a_user_mounts_reads_stages_and_unmounts(as_nobody: tuple[Run, Path]) -> None:
    run, base = as_nobody
    tree = write_sample_tree(base / "ds001")
    storage = base / "storage"
    url = store_tree(LocalStore(storage), tree)
    _chown_tree(base)
    mnt = base / "mnt"
    run("mkdir", str(mnt))

    def kacheryfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(sys.executable, "-m", "kacheryfs", *args, check=check)

    kacheryfs("mount", str(mnt), "--storage-dir", str(storage))
    try:
        assert is_mounted(mnt)
        snapshot = mount_path(url, mnt)
        for _ in range(3):  # later opens of a blob are answered by libfuse's low level, staged files' never
            assert run("cat", str(snapshot / "a.txt")).stdout == "hello kachery\n"
        big = run("sha1sum", str(snapshot / "sub" / "big.bin")).stdout.split()[0]
        assert big == hashlib.sha1((tree / "sub" / "big.bin").read_bytes()).hexdigest()
        listing = run("ls", "-lR", str(snapshot)).stdout
        assert "ünï cödé.txt" in listing and "big.bin" in listing
        assert run("find", str(mnt / "sha1")).stdout.split() == [str(mnt / "sha1")]  # lookup-only, as with root

        # The staging folder: a copy of the tree gets the snapshot's own URL.
        run("cp", "-r", str(tree), str(mnt / "staging" / "copy"))
        staged_url = kacheryfs("url", str(mnt / "staging" / "copy")).stdout.strip()
        assert staged_url.split(".")[0] == url.split(".")[0]
        getfattr = run("getfattr", "-n", "user.kachery.url", "--only-values", str(mnt / "staging" / "copy" / "a.txt"))
        assert getfattr.stdout.startswith("sha1://")
        run("mv", str(mnt / "staging" / "copy"), str(mnt / "staging" / "moved"))
        assert run("ls", str(mnt / "staging")).stdout.split() == ["moved"]  # before open.txt below
        for _ in range(3):
            assert run("cat", str(mnt / "staging" / "moved" / "a.txt")).stdout == "hello kachery\n"
        run("sh", "-c", f"echo more >> {mnt}/staging/moved/a.txt")  # a staged file opened again, written
        assert run("cat", str(mnt / "staging" / "moved" / "a.txt")).stdout == "hello kachery\nmore\n"

        # The hash views stay read-only, and nothing crosses between the two parts.
        assert run("touch", str(mnt / "sha1" / "x"), check=False).returncode != 0
        link = run("ln", str(snapshot / "a.txt"), str(mnt / "staging" / "a.txt"), check=False)
        assert link.returncode != 0 and "cross-device" in link.stderr
        assert run("rmdir", str(mnt / "staging"), check=False).returncode != 0

        # A file still open for writing has no URL yet, and is said so (not "a top-level folder").
        holder = (
            "import subprocess, sys\n"
            f"f = open({str(mnt / 'staging' / 'open.txt')!r}, 'w'); f.write('x'); f.flush()\n"
            f"url = [sys.executable, '-m', 'kacheryfs', 'url', f.name]\n"
            "print(subprocess.run(url, capture_output=True, text=True).stderr)\n"
        )
        assert "not yet: a staged file has one once closed" in run(sys.executable, "-c", holder).stdout

        status = kacheryfs("status", str(mnt)).stdout
        assert "on the mount's own connection" in status
        assert "passthrough off" in status
        assert "idle polling    off: the CPU latency request (/dev/cpu_dma_latency) needs root" in status
        kacheryfs("umount", str(mnt / "staging"))  # as with root's two mounts: the whole mount goes
    finally:
        if is_mounted(mnt):
            kacheryfs("umount", str(mnt), check=False)
    assert not is_mounted(mnt)
    # What was staged is in the store, under the user's own store.
    staged = storage / "staging" / "moved" / "a.txt"
    assert staged.read_text() == "hello kachery\nmore\n"


def test_a_blob_on_a_users_mount_costs_a_request_at_each_open_and_none_at_its_close(
    as_nobody: tuple[Run, Path],
) -> None:
    """On the shared connection every open is a request, but a blob's close sends no FLUSH (a
    round trip the reader would wait for); a staged file's still does, its bytes depend on it."""
    run, base = as_nobody
    storage, mnt = base / "storage", base / "mnt"
    url = store_tree(LocalStore(storage), write_sample_tree(base / "ds001"))
    _chown_tree(base)
    run("mkdir", str(mnt))
    run(sys.executable, "-m", "kacheryfs", "mount", str(mnt), "--storage-dir", str(storage))
    blob = mount_path(url, mnt) / "a.txt"
    run("cat", str(blob))
    with fuse_requests(mnt) as blob_requests:
        for _ in range(3):
            assert run("cat", str(blob)).stdout == "hello kachery\n"
    assert blob_requests["FUSE_OPEN"] == 3 and blob_requests["FUSE_FLUSH"] == 0, blob_requests
    with fuse_requests(mnt) as staged_requests:
        run("sh", "-c", f"echo x > {mnt}/staging/new.txt")
    assert staged_requests["FUSE_FLUSH"] >= 1, staged_requests
    run(sys.executable, "-m", "kacheryfs", "umount", str(mnt))


def test_a_user_who_asks_for_idle_polling_is_told_at_mount_time_that_it_needs_root(
    as_nobody: tuple[Run, Path],
) -> None:
    run, base = as_nobody
    storage, mnt, config = base / "storage", base / "mnt", base / "config.toml"
    run("mkdir", str(mnt), str(storage))
    config.write_text("[mount]\nidle_poll = true\n")
    mounting = run(sys.executable, "-m", "kacheryfs", "mount", str(mnt), "--storage-dir", str(storage),
                   "--config", str(config))  # fmt: skip
    needs_root = "idle_poll = true, but idle polling is off: the CPU latency request (/dev/cpu_dma_latency) needs root"
    assert needs_root in mounting.stderr  # asked for outright, and not to be had: said at once
    run(sys.executable, "-m", "kacheryfs", "umount", str(mnt))


def test_a_user_stops_a_mount_with_a_signal_and_clears_a_stale_one(as_nobody: tuple[Run, Path]) -> None:
    run, base = as_nobody
    storage, mnt = base / "storage", base / "mnt"
    run("mkdir", str(mnt), str(storage))

    def kacheryfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(sys.executable, "-m", "kacheryfs", *args, check=check)

    def pid() -> int:
        return int(run("getfattr", "-n", "user.kachery.pid", "--only-values", str(mnt)).stdout)

    kacheryfs("mount", str(mnt), "--storage-dir", str(storage))
    os.kill(pid(), signal.SIGTERM)
    wait_until(lambda: not is_mounted(mnt), what="the daemon to unmount on SIGTERM")

    kacheryfs("mount", str(mnt), "--storage-dir", str(storage))
    os.kill(pid(), signal.SIGKILL)
    wait_until(lambda: run("ls", str(mnt), check=False).returncode != 0, what="the mount to go stale")
    kacheryfs("umount", str(mnt))
    assert not is_mounted(mnt)
    kacheryfs("mount", str(mnt), "--storage-dir", str(storage))  # and a new mount works
    run("sh", "-c", f"echo hi > {mnt}/staging/z")
    assert kacheryfs("url", str(mnt / "staging" / "z")).stdout.startswith("sha1://")
    kacheryfs("umount", str(mnt))
    assert not is_mounted(mnt)


def test_a_user_without_access_to_dev_fuse_is_told_what_to_do(as_nobody: tuple[Run, Path]) -> None:
    run, base = as_nobody
    run("mkdir", str(base / "mnt"))
    os.chmod("/dev/fuse", 0o600)  # as some machines have it; the fixture puts the mode back
    done = run(sys.executable, "-m", "kacheryfs", "mount", str(base / "mnt"), check=False)
    assert done.returncode != 0
    assert "/dev/fuse (mode 0600) is not open to this user" in done.stderr
    assert "chmod 0666 /dev/fuse" in done.stderr
    assert not is_mounted(base / "mnt")


def test_a_users_read_only_files_are_staged_like_roots(as_nobody: tuple[Run, Path]) -> None:
    """Read-only files and folders: root's daemon may change anything, a user's daemon lifts its
    own mode for a moment to set a file's record or make a copy-on-write."""
    run, base = as_nobody
    storage, mnt = base / "storage", base / "mnt"
    run("mkdir", str(mnt), str(storage))
    run("sh", "-c", f"echo read-only > {base}/ro.txt && chmod 444 {base}/ro.txt")

    def kacheryfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(sys.executable, "-m", "kacheryfs", *args, check=check)

    def url(path: Path) -> str:
        return kacheryfs("url", str(path)).stdout.strip()

    kacheryfs("mount", str(mnt), "--storage-dir", str(storage))
    try:
        staging = mnt / "staging"
        run("cp", "-a", f"{base}/ro.txt", str(staging / "ro.txt"))  # cp, tar x and git write such files
        first = url(staging / "ro.txt")
        assert first.startswith("sha1://")
        assert stat.S_IMODE(os.stat(storage / "staging" / "ro.txt").st_mode) == 0o444  # the mode is put back
        run("touch", "-d", "2001-01-01", str(staging / "ro.txt"))  # a new time: the record follows it
        assert url(staging / "ro.txt") == first

        # A change to a stored file in a read-only folder gets its own copy; the blob keeps its bytes.
        run("mkdir", str(staging / "rod"))
        run("sh", "-c", f"echo a > {staging}/rod/f")
        before = url(staging / "rod" / "f")
        run("chmod", "555", str(staging / "rod"))
        run("sh", "-c", f"echo more >> {staging}/rod/f")
        assert run("cat", str(staging / "rod" / "f")).stdout == "a\nmore\n"
        assert url(staging / "rod" / "f") != before
        assert run("cat", str(mount_path(before, mnt))).stdout == "a\n"
        assert stat.S_IMODE(os.stat(storage / "staging" / "rod").st_mode) == 0o555
        assert url(staging).startswith("sha1dir://")  # the whole folder has its URL
    finally:
        if is_mounted(mnt):
            kacheryfs("umount", str(mnt), check=False)


def test_root_is_told_whose_mount_it_is_and_unmounts_it(as_nobody: tuple[Run, Path]) -> None:
    run, base = as_nobody
    storage, mnt = base / "storage", base / "mnt"
    run("mkdir", str(mnt), str(storage))
    run(sys.executable, "-m", "kacheryfs", "mount", str(mnt), "--storage-dir", str(storage))
    daemon = int(run("getfattr", "-n", "user.kachery.pid", "--only-values", str(mnt)).stdout)

    def as_root(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kacheryfs", *args], capture_output=True, text=True,
                              timeout=CLI_TIMEOUT)  # fmt: skip

    status = as_root("status", str(mnt))  # root cannot look into a user's mount
    assert status.returncode != 0 and "another user's kacheryfs mount" in status.stderr
    done = as_root("umount", str(mnt))
    assert done.returncode == 0, done.stderr
    assert not is_mounted(mnt)

    def exited() -> bool:
        try:
            return Path(f"/proc/{daemon}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    wait_until(exited, what="the user's daemon to exit")
