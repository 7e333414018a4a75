"""The staging view through a real mount, with real tools: what is dropped in gets the URL
`kachery-store` gives the same content, and nothing dropped in is ever lost or corrupted —
not by a rewrite, a rename, a full disk, two writers, a kill -9 or a remount.

Each URL is checked three ways (getfattr, `kacheryfs url`, `kacheryfs.url_of`) against
`kachery-store` run outside the mount, on its own storage dir.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_mount import Mount, mounted_at, wait_until, write_sample_tree
from fixtures_server import PASSWORD, ServerProcess, free_port

from kacheryfs.mount.daemon import SHARED_ENV, is_stale
from kacheryfs.remote import HttpChannel
from kacheryfs.staging import RECORD_XATTR
from kacheryfs.store import LocalStore

pytest_plugins = ["fixtures_server"]  # server_dir

MiB = 1 << 20
URL_XATTR = "user.kachery.url"


# -- helpers -----------------------------------------------------------------------
def run(*args: str | Path, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, cwd=cwd)
    if check:
        assert done.returncode == 0, f"{' '.join(map(str, args))} failed: {done.stderr}"
    return done


def reference_url(path: Path, tmp_path: Path) -> str:
    """What `kachery-store` prints for `path`, stored in a storage dir of its own."""
    env = dict(os.environ, KACHERY_STORAGE_DIR=str(tmp_path / "reference-storage"))
    done = subprocess.run(["kachery-store", str(path)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def url_of(path: Path, mount: Mount) -> str:
    """The URL of a staged path, asked three ways; they must agree."""
    by_getfattr = run("getfattr", "-n", URL_XATTR, "--only-values", path).stdout
    by_cli = mount.cli("url", str(path)).stdout.strip()
    code = "import sys, kacheryfs; print(kacheryfs.url_of(sys.argv[1]))"
    by_api = run(sys.executable, "-c", code, path).stdout.strip()
    assert by_getfattr == by_cli == by_api, (by_getfattr, by_cli, by_api)
    return by_getfattr


def sha1_of(url: str) -> str:
    return url.split("://", 1)[1][:40]


def blob(mount: Mount, url: str) -> bytes:
    """The bytes the mount's blob view serves for a file URL."""
    return (mount.mountpoint / "sha1" / sha1_of(url)).read_bytes()


def no_url(path: Path) -> bool:
    try:
        os.getxattr(path, URL_XATTR)
    except OSError as err:
        return err.errno == errno.ENODATA
    return False


def verify_store(storage: Path) -> int:
    """Re-hash every sha1 blob in a store: none may hold other bytes than its name says."""
    count = 0
    for path in (storage / "sha1").rglob("*"):
        if path.is_file():
            assert hashlib.sha1(path.read_bytes()).hexdigest() == path.name, f"corrupt blob {path}"
            count += 1
    return count


def backing(mount: Mount, staged: Path) -> Path:
    """The file behind a staged path, in the default staging dir."""
    return mount.storage / "staging" / staged.relative_to(mount.mountpoint / "staging")


@pytest.fixture(scope="module", params=["own mount", "one connection"])
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount for the tool tests; each test works in a staging sub-directory of its own.

    Twice: staging as a FUSE mount of its own (root's daemon), and on the hash views'
    connection (a user's daemon: asked for here as root, so the tests can look in).
    """
    base = tmp_path_factory.mktemp("staging-mount")
    env = {SHARED_ENV: "1"} if request.param == "one connection" else {}
    with mounted_at(base, base / "storage", daemon_env=env) as mount:
        assert mount.status()["staging_shared"] == bool(env)
        yield mount


@pytest.fixture
def mnt(shared: Mount) -> Mount:
    return shared


@pytest.fixture
def work(shared: Mount, request: pytest.FixtureRequest) -> Path:
    """staging/<test name>/, fresh."""
    path = shared.mountpoint / "staging" / request.node.name.replace("[", "_").replace("]", "")
    path.mkdir()
    return path


# -- real tools, each file's URL what kachery-store gives ------------------------------
@pytest.mark.parametrize("size", [6 * MiB + 3, MiB + 1], ids=["threaded-hash", "1MiB+1"])
def test_cp_of_a_file_gives_the_url_kachery_store_gives(mnt: Mount, work: Path, tmp_path: Path, size: int) -> None:
    source = tmp_path / "rec.bin"
    source.write_bytes(os.urandom(size))
    run("cp", source, work)
    url = url_of(work / "rec.bin", mnt)
    assert url == reference_url(source, tmp_path)
    assert blob(mnt, url) == source.read_bytes()
    # One copy on disk: the blob is the staged file itself.
    stored = LocalStore(mnt.storage).blob_path("sha1", sha1_of(url))
    assert stored.stat().st_ino == backing(mnt, work / "rec.bin").stat().st_ino


def test_cp_r_of_a_tree_gives_the_directory_url_kachery_store_gives(mnt: Mount, work: Path, tmp_path: Path) -> None:
    tree = write_sample_tree(tmp_path / "ds001")
    run("cp", "-r", tree, work)
    assert url_of(work / "ds001", mnt) == reference_url(tree, tmp_path)
    for path in tree.rglob("*"):
        if path.is_file():
            assert url_of(work / "ds001" / path.relative_to(tree), mnt) == reference_url(path, tmp_path)
    assert "no staged file" not in mnt.log_text()  # each name cp looked up before creating it: not logged


def test_rsync_a_temp_file_then_rename(mnt: Mount, work: Path, tmp_path: Path) -> None:
    tree = write_sample_tree(tmp_path / "ds")
    run("rsync", "-a", f"{tree}/", work / "ds")
    assert url_of(work / "ds", mnt) == reference_url(tree, tmp_path)
    assert url_of(work / "ds" / "sub" / "big.bin", mnt) == reference_url(tree / "sub" / "big.bin", tmp_path)
    assert os.stat(work / "ds" / "a.txt").st_mtime == os.stat(tree / "a.txt").st_mtime  # -a kept the time
    (tree / "a.txt").write_text("changed\n")
    run("rsync", "-a", f"{tree}/", work / "ds")  # a second sync rewrites only what changed
    assert url_of(work / "ds", mnt) == reference_url(tree, tmp_path)
    assert not [p for p in (work / "ds").rglob(".*") if p.name.startswith(".a.txt")]  # no temp file left


def test_tar_x_into_staging(mnt: Mount, work: Path, tmp_path: Path) -> None:
    tree = write_sample_tree(tmp_path / "ds")
    run("tar", "cf", tmp_path / "ds.tar", "-C", tmp_path, "ds")
    run("tar", "xf", tmp_path / "ds.tar", "-C", work)
    assert url_of(work / "ds", mnt) == reference_url(tree, tmp_path)


def test_append_gives_a_new_url_and_the_first_blob_keeps_its_bytes(mnt: Mount, work: Path) -> None:
    run("sh", "-c", "echo a > f", cwd=work)
    first = url_of(work / "f", mnt)
    run("sh", "-c", "echo b >> f", cwd=work)
    second = url_of(work / "f", mnt)
    assert first != second
    assert blob(mnt, first) == b"a\n" and blob(mnt, second) == b"a\nb\n"
    run("sh", "-c", "echo c > f", cwd=work)  # overwrite: truncated at open
    assert blob(mnt, url_of(work / "f", mnt)) == b"c\n"
    assert blob(mnt, first) == b"a\n" and blob(mnt, second) == b"a\nb\n"


def test_names_of_255_bytes_take_writes_appends_and_links(mnt: Mount, work: Path) -> None:
    """A change to a stored file makes its copy under a short name (a 255-byte name has no room
    for a suffix): a shell's `>` stores the empty file at its first close, then writes."""
    long, other = "n" * 255, "m" * 255
    run("sh", "-c", f"echo a > {long}", cwd=work)
    first = url_of(work / long, mnt)
    run("sh", "-c", f"echo b >> {long}", cwd=work)
    assert (work / long).read_bytes() == b"a\nb\n"
    assert blob(mnt, url_of(work / long, mnt)) == b"a\nb\n" and blob(mnt, first) == b"a\n"
    os.link(work / long, work / other)
    run("sh", "-c", f"echo c >> {other}", cwd=work)
    assert (work / long).read_bytes() == b"a\nb\n" and (work / other).read_bytes() == b"a\nb\nc\n"
    assert sorted(os.listdir(work)) == [other, long]  # no copy left behind under another name
    with pytest.raises(OSError) as too_long:
        os.stat(work / ("n" * 256))
    assert too_long.value.errno == errno.ENAMETOOLONG
    assert not [e for e in mnt.status()["recent_errors"] if "n" * 256 in e]  # the caller's mistake, not the mount's


def test_a_directory_read_again_from_its_start_lists_what_is_there_now(mnt: Mount, work: Path) -> None:
    (work / "old.txt").write_text("x")
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(fd) == ["old.txt"]
        (work / "old.txt").unlink()
        (work / "new.txt").write_text("y")
        assert os.listdir(fd) == ["new.txt"]  # os.listdir(fd) rewinds the handle it was given
    finally:
        os.close(fd)


_RENAMES = """
import errno, os, sys, threading
work = sys.argv[1]
stop = threading.Event()
failures = []

def reopen():
    while not stop.is_set():
        for name in ("final", "final.tmp"):
            try:
                with open(os.path.join(work, name), "rb") as f:
                    f.read()
            except FileNotFoundError:
                pass
            except OSError as err:
                # An open racing the rename over its name may find the name's old file gone:
                # libfuse's high level knows a file only by its path (ESTALE, after the
                # kernel's one retry). A known limit, not what this test is about.
                if err.errno != errno.ESTALE:
                    failures.append(err)

readers = [threading.Thread(target=reopen, daemon=True) for _ in range(3)]
for reader in readers:
    reader.start()
for i in range(300):
    with open(os.path.join(work, "final.tmp"), "w") as f:
        f.write(f"version {i}\\n")
    os.rename(os.path.join(work, "final.tmp"), os.path.join(work, "final"))
stop.set()
for reader in readers:
    reader.join()
sys.exit(f"readers failed: {failures}" if failures else 0)
"""


def test_many_temp_files_renamed_into_place_never_stall_the_mount(mnt: Mount, work: Path) -> None:
    """rsync's and editors' way: write a temp file, close it, rename it over its name, again
    and again, while other threads open both names (each close's release races a rename).
    In a process of its own, bounded: a stalled mount fails the test instead of hanging it."""
    daemon = int(mnt.status()["pid"])
    renames = subprocess.Popen([sys.executable, "-c", _RENAMES, str(work)], stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = renames.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # Killed first: its FUSE requests then fail, and the renamer (which a lock may hold
        # past any signal) can end; a stalled daemon would stall every later test too.
        os.kill(daemon, signal.SIGKILL)
        renames.kill()
        renames.communicate(timeout=60)
        pytest.fail("the mount stalled under renames racing closes and opens (its daemon is killed)")
    assert renames.returncode == 0, stderr
    assert (work / "final").read_text() == "version 299\n"
    assert url_of(work / "final", mnt).startswith("sha1://")


def test_editor_style_save_renames_a_temp_file_over_the_original(mnt: Mount, work: Path, tmp_path: Path) -> None:
    (work / "notes.txt").write_text("draft one\n")
    first = url_of(work / "notes.txt", mnt)
    run("sed", "-i", "s/one/two/", work / "notes.txt")  # writes a temp file, renames it over
    (tmp_path / "notes.txt").write_text("draft two\n")
    assert url_of(work / "notes.txt", mnt) == reference_url(tmp_path / "notes.txt", tmp_path)
    assert blob(mnt, first) == b"draft one\n"
    assert sorted(os.listdir(work)) == ["notes.txt"]


def test_truncate_s_shrinks_and_extends(mnt: Mount, work: Path, tmp_path: Path) -> None:
    (work / "t.bin").write_bytes(b"0123456789")
    original = url_of(work / "t.bin", mnt)
    run("truncate", "-s", "4", work / "t.bin")
    assert blob(mnt, url_of(work / "t.bin", mnt)) == b"0123"
    run("truncate", "-s", "8", work / "t.bin")
    (tmp_path / "t.bin").write_bytes(b"0123\0\0\0\0")
    assert url_of(work / "t.bin", mnt) == reference_url(tmp_path / "t.bin", tmp_path)
    assert blob(mnt, original) == b"0123456789"


def test_mv_within_across_and_over_keeps_urls(mnt: Mount, work: Path) -> None:
    for name in ("a", "b", "c"):
        (work / name).write_text(f"content {name}\n")
    url_a, url_b = url_of(work / "a", mnt), url_of(work / "b", mnt)
    (work / "d1" / "d2").mkdir(parents=True)
    run("mv", work / "a", work / "a2")
    assert url_of(work / "a2", mnt) == url_a.replace("/a", "/a2")
    run("mv", work / "a2", work / "d1" / "d2" / "a3")
    assert (work / "d1" / "d2" / "a3").read_text() == "content a\n"
    run("mv", work / "b", work / "c")  # over an existing file
    assert (work / "c").read_text() == "content b\n" and not (work / "b").exists()
    assert sha1_of(url_of(work / "c", mnt)) == sha1_of(url_b)
    run("mv", work / "d1", work / "e1")  # a directory, with a file two levels down
    assert url_of(work / "e1" / "d2" / "a3", mnt) == url_a.replace("/a", "/a3")


def renameat2(old: Path, new: Path, flags: int) -> int:
    """renameat2(2) as a program calls it; 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.renameat2(-100, bytes(old), -100, bytes(new), flags) == 0 else ctypes.get_errno()


def test_renameat2_noreplace_refuses_and_exchange_swaps(mnt: Mount, work: Path) -> None:
    (work / "mine").write_text("mine\n")
    (work / "theirs").write_text("theirs\n")
    assert renameat2(work / "mine", work / "theirs", 1) == errno.EEXIST  # RENAME_NOREPLACE: never clobber
    assert (work / "theirs").read_text() == "theirs\n"
    assert renameat2(work / "mine", work / "theirs", 2) == 0  # RENAME_EXCHANGE
    assert (work / "mine").read_text() == "theirs\n" and (work / "theirs").read_text() == "mine\n"
    assert url_of(work / "mine", mnt).endswith("/mine")


def test_rm_r_mkdir_rmdir(mnt: Mount, work: Path) -> None:
    run("mkdir", "-p", work / "x" / "y" / "z")
    (work / "x" / "y" / "f").write_text("f\n")
    refused = run("rmdir", work / "x" / "y", check=False)
    assert refused.returncode != 0 and "not empty" in refused.stderr
    run("rmdir", work / "x" / "y" / "z")
    run("rm", "-r", work / "x")
    assert os.listdir(work) == []
    assert not backing(mnt, work / "x").exists()
    assert "rmdir" not in " ".join(mnt.status()["recent_errors"])  # an ordinary refusal, not an error


def test_chmod_and_touch_change_metadata_not_urls(mnt: Mount, work: Path, tmp_path: Path) -> None:
    (work / "m").write_text("meta\n")
    url = url_of(work / "m", mnt)
    run("chmod", "600", work / "m")
    assert os.stat(work / "m").st_mode & 0o777 == 0o600
    run("touch", "-d", "@1000000000", work / "m")
    assert os.stat(work / "m").st_mtime == 1000000000
    assert url_of(work / "m", mnt) == url
    run("touch", work / "empty")
    (tmp_path / "empty").write_bytes(b"")
    assert url_of(work / "empty", mnt) == reference_url(tmp_path / "empty", tmp_path)


def test_a_file_open_for_writing_has_no_url_until_closed(mnt: Mount, work: Path) -> None:
    with open(work / "w", "wb") as f:
        f.write(b"partial")
        f.flush()
        assert no_url(work / "w")
        done = mnt.cli("url", str(work / "w"), str(mnt.mountpoint / "sha1"), check=False)
        assert done.returncode != 0 and done.stdout == ""
        assert "has no kachery URL: not yet: a staged file has one once closed" in done.stderr
        assert f"{mnt.mountpoint / 'sha1'} has no kachery URL: the mount's top-level folders" in done.stderr
        assert no_url(work), "a directory holding it has no URL either"
        f.write(b" and done")
    assert blob(mnt, url_of(work / "w", mnt)) == b"partial and done"
    verify_store(mnt.storage)  # no blob took the later writes


def cached_pages(fd: int) -> int:
    """Pages of the file open as `fd` in the page cache: cachestat(2), Linux 6.5+."""

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]

    libc = ctypes.CDLL(None, use_errno=True)
    stat = Stat()
    if libc.syscall(451, fd, ctypes.byref(Range(0, 0)), ctypes.byref(stat), 0) != 0:  # x86-64's cachestat
        if ctypes.get_errno() == errno.ENOSYS:
            reason = "cachestat(2) needs Linux 6.5 or later: the page cache cannot be counted here"
            if os.environ.get("CI"):
                pytest.fail(f"CI's kernel has cachestat: {reason}")
            pytest.skip(reason)
        raise OSError(ctypes.get_errno(), "cachestat")
    return stat.cache


def test_a_write_only_copy_passes_the_mounts_page_cache_by_and_readers_see_every_byte(
    mnt: Mount, work: Path, tmp_path: Path
) -> None:
    data = os.urandom(4 << 20)
    (work / "f").touch()
    reader = os.open(work / "f", os.O_RDONLY)  # opened first: an open drops the file's cached pages
    try:
        with open(work / "f", "wb") as w:
            w.write(data)
        # No copy of the bytes stayed in the mount's own page cache on their way to the staged file.
        assert cached_pages(reader) == 0
        assert os.pread(reader, len(data) + 1, 0) == data
    finally:
        os.close(reader)
    with open(work / "g", "wb") as w:  # a reader beside a write-only handle sees what it wrote so far
        w.write(b"a" * 5000)
        w.flush()
        assert (work / "g").read_bytes() == b"a" * 5000
        w.write(b"b" * 10)
        w.flush()
        assert (work / "g").read_bytes() == b"a" * 5000 + b"b" * 10


def test_device_files_fifos_and_links_of_directories_or_from_outside_are_refused(
    mnt: Mount, work: Path, tmp_path: Path
) -> None:
    (work / "f").write_text("x")
    (tmp_path / "mine").write_text("mine")
    (work / "d").mkdir()
    assert "Operation not permitted" in run("mkfifo", work / "p", check=False).stderr
    with pytest.raises(PermissionError):
        os.mknod(work / "n", 0o600 | 0o020000, os.makedev(1, 3))
    with pytest.raises(PermissionError):
        os.link(work / "d", work / "d2")
    url = url_of(work / "f", mnt)
    for outside in (mnt.mountpoint / "sha1" / sha1_of(url), tmp_path / "mine"):
        with pytest.raises(OSError) as refused:  # another mount, another filesystem
            os.link(outside, work / "g")
        assert refused.value.errno == errno.EXDEV
    assert sorted(os.listdir(work)) == ["d", "f"]


# -- hard links: a second name for the same staged file ----------------------------------
def tree_with_hard_links(root: Path) -> Path:
    """The tester's tree (d/a.txt and its link d/b.txt), and a link across directories."""
    (root / "d").mkdir(parents=True)
    (root / "e").mkdir()
    (root / "d" / "a.txt").write_text("x\n")
    os.link(root / "d" / "a.txt", root / "d" / "b.txt")
    (root / "d" / "big.bin").write_bytes(os.urandom(MiB + 1))
    os.link(root / "d" / "big.bin", root / "e" / "big-too.bin")
    return root


@pytest.mark.parametrize("tool", ["tar x", "cp -a", "rsync -aH"], ids=["tar", "cp", "rsync"])
def test_tools_that_keep_hard_links_give_the_url_kachery_store_gives(
    mnt: Mount, work: Path, tmp_path: Path, tool: str
) -> None:
    tree = tree_with_hard_links(tmp_path / "hl")
    if tool == "tar x":
        run("tar", "cf", tmp_path / "hl.tar", "-C", tmp_path, "hl")
        run("tar", "xf", tmp_path / "hl.tar", "-C", work)
    elif tool == "cp -a":
        run("cp", "-a", tree, work)
    else:
        run("rsync", "-aH", f"{tree}/", f"{work / 'hl'}/")
    assert url_of(work / "hl", mnt) == reference_url(tree, tmp_path)
    for name, link in (("d/a.txt", "d/b.txt"), ("d/big.bin", "e/big-too.bin")):
        assert (work / "hl" / link).read_bytes() == (tree / name).read_bytes()
        assert backing(mnt, work / "hl" / name).stat().st_ino == backing(mnt, work / "hl" / link).stat().st_ino
        for staged in (name, link):  # mode and time set before the link: each name shows them
            shown, source = os.stat(work / "hl" / staged), os.stat(tree / staged)
            assert (shown.st_mode, int(shown.st_mtime)) == (source.st_mode, int(source.st_mtime))  # tar: seconds
    assert verify_store(mnt.storage) > 0


def test_mv_of_a_linked_name_onto_its_other_name_leaves_one_name_and_the_blob_intact(mnt: Mount, work: Path) -> None:
    data = os.urandom(3 << 20)  # no md5 name yet: the staged names and the store's are the file's only ones
    (work / "a").write_bytes(data)
    os.link(work / "a", work / "b")
    fd = os.open(work / "a", os.O_WRONLY)
    try:
        os.rename(work / "a", work / "b")
        assert sorted(os.listdir(work)) == ["b"]  # what the kernel shows is what the staging dir holds
        os.truncate(work / "b", 0)
        os.pwrite(fd, b"EVIL", 0)
    finally:
        os.close(fd)
    assert verify_store(mnt.storage) > 0  # every blob still hashes to its name


def test_a_write_through_one_linked_name_gives_it_a_copy_and_the_other_keeps_its_bytes_and_url(
    mnt: Mount, work: Path
) -> None:
    (work / "f").write_bytes(b"shared\n")
    os.link(work / "f", work / "g")
    first = url_of(work / "g", mnt)
    assert sha1_of(url_of(work / "f", mnt)) == sha1_of(first)
    with open(work / "g", "rb") as reader:  # open on the other name while the first is written
        run("sh", "-c", "echo more >> f", cwd=work)
        assert reader.read() == b"shared\n"
    assert (work / "f").read_bytes() == b"shared\nmore\n" and (work / "g").read_bytes() == b"shared\n"
    assert blob(mnt, url_of(work / "f", mnt)) == b"shared\nmore\n"
    assert url_of(work / "g", mnt) == first and blob(mnt, first) == b"shared\n"
    os.link(work / "g", work / "h")
    run("sh", "-c", "echo new > g", cwd=work)  # truncated at open
    run("truncate", "-s", "3", work / "h")
    assert [(work / n).read_bytes() for n in ("f", "g", "h")] == [b"shared\nmore\n", b"new\n", b"sha"]
    assert [blob(mnt, url_of(work / n, mnt)) for n in ("f", "g", "h")] == [b"shared\nmore\n", b"new\n", b"sha"]
    assert blob(mnt, first) == b"shared\n"
    assert verify_store(mnt.storage) > 0


def test_a_link_to_a_file_open_for_writing_holds_the_bytes_written_so_far(mnt: Mount, work: Path) -> None:
    with open(work / "w", "wb") as f:
        f.write(b"partial")
        f.flush()
        os.link(work / "w", work / "snapshot")
        assert (work / "snapshot").read_bytes() == b"partial"
        f.write(b" and done")
    assert blob(mnt, url_of(work / "w", mnt)) == b"partial and done"
    assert (work / "snapshot").read_bytes() == b"partial"
    assert blob(mnt, url_of(work / "snapshot", mnt)) == b"partial"
    with open(work / "w", "ab") as f:  # open, nothing written yet: linked as it is, changed apart later
        os.link(work / "w", work / "before-append")
        f.write(b"!")
    assert (work / "w").read_bytes() == b"partial and done!"
    assert blob(mnt, url_of(work / "before-append", mnt)) == b"partial and done"
    assert verify_store(mnt.storage) > 0


def test_a_symlink_counts_as_its_target_like_kachery_store(mnt: Mount, work: Path, tmp_path: Path) -> None:
    (work / "ds").mkdir()
    (work / "ds" / "real.txt").write_text("target\n")
    os.symlink("real.txt", work / "ds" / "alias.txt")
    assert os.readlink(work / "ds" / "alias.txt") == "real.txt"
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "real.txt").write_text("target\n")
    os.symlink("real.txt", tmp_path / "ds" / "alias.txt")
    assert url_of(work / "ds", mnt) == reference_url(tmp_path / "ds", tmp_path)


def test_a_symlinked_directory_to_outside_is_copied_not_linked(mnt: Mount, work: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.txt").write_text("my own file\n")
    (work / "ds").mkdir()
    os.symlink(mine, work / "ds" / "link")
    url = url_of(work / "ds", mnt)
    assert url == reference_url(work / "ds", tmp_path)
    assert (mine / "data.txt").stat().st_nlink == 1 and os.listxattr(mine / "data.txt") == []
    (mine / "data.txt").write_text("edited later\n")
    assert verify_store(mnt.storage) > 0  # no blob changed with it


# -- two writers -----------------------------------------------------------------------
def test_two_writers_at_once_and_identical_files_make_one_blob(mnt: Mount, work: Path, tmp_path: Path) -> None:
    one, two = os.urandom(8 * MiB), os.urandom(8 * MiB)
    sources = {"one": one, "two": two, "same1": one, "same2": one}
    for name, data in sources.items():
        (tmp_path / name).write_bytes(data)
    copies = [subprocess.Popen(["cp", str(tmp_path / name), str(work / name)]) for name in sources]
    assert [c.wait(timeout=60) for c in copies] == [0] * len(copies)
    urls = {name: url_of(work / name, mnt) for name in sources}
    for name, data in sources.items():
        assert sha1_of(urls[name]) == hashlib.sha1(data).hexdigest()
    assert sha1_of(urls["same1"]) == sha1_of(urls["same2"]) == sha1_of(urls["one"])
    stored = LocalStore(mnt.storage).blob_path("sha1", sha1_of(urls["one"]))
    staged = {backing(mnt, work / n).stat().st_ino for n in ("one", "same1", "same2")}
    assert stored.stat().st_ino in staged  # the one blob is one of the staged files, not another copy

    def write(name: str, data: bytes) -> None:  # two threads of one process, interleaved writes
        with open(work / name, "wb") as f:
            for i in range(0, len(data), 64 * 1024):
                f.write(data[i : i + 64 * 1024])

    threads = [threading.Thread(target=write, args=(n, d)) for n, d in (("t1", one[: 2 * MiB]), ("t2", two[: 2 * MiB]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sha1_of(url_of(work / "t1", mnt)) == hashlib.sha1(one[: 2 * MiB]).hexdigest()
    assert sha1_of(url_of(work / "t2", mnt)) == hashlib.sha1(two[: 2 * MiB]).hexdigest()
    assert verify_store(mnt.storage) > 0


# -- nothing lost: kill -9, full disk, remount -------------------------------------------
def test_kill_9_mid_copy_and_mid_ingest_then_remount_loses_and_corrupts_nothing(tmp_path: Path) -> None:
    storage, sources = tmp_path / "storage", tmp_path / "src"
    sources.mkdir()
    finished = {f"done{i}.bin": os.urandom(MiB + i) for i in range(3)}
    fed = os.urandom(4 * MiB)
    big = os.urandom(96 * MiB)
    with mounted_at(tmp_path, storage) as mount:
        staging = mount.mountpoint / "staging"
        for name, data in finished.items():
            (sources / name).write_bytes(data)
            run("cp", sources / name, staging)
        # mid-copy: cp reads from a pipe that stops after 3 MiB
        fifo = tmp_path / "feed"
        os.mkfifo(fifo)
        copy = subprocess.Popen(["cp", str(fifo), str(staging / "partial.bin")], stderr=subprocess.PIPE, text=True)
        feed = open(fifo, "wb")  # noqa: SIM115 (closed after the kill, whatever happens)
        feed.write(fed[: 3 * MiB])
        feed.flush()
        wait_until(lambda: backing(mount, staging / "partial.bin").stat().st_size >= 3 * MiB, what="3 MiB copied")
        # mid-ingest: written out of order, so its close hashes all 96 MiB
        out_of_order = open(staging / "ooo.bin", "wb")  # noqa: SIM115
        out_of_order.seek(MiB)
        out_of_order.write(big[MiB:])
        out_of_order.seek(0)
        out_of_order.write(big[:MiB])
        closing = threading.Thread(target=lambda: _close_quietly(out_of_order))
        closing.start()
        time.sleep(0.03)
        os.kill(int(mount.status()["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        closing.join(30)
        _close_quietly(feed)
        assert copy.wait(timeout=30) != 0
        wait_until(lambda: is_stale(mount.mountpoint), what="the mount to go stale")
        mount.unmount()
    area = storage / "staging"
    # What else a crash can leave: a file written but never ingested (its record missing),
    # a copy-on-write cut short, a file removed while open.
    os.removexattr(area / "done1.bin", RECORD_XATTR)
    (area / "done2.bin.kacheryfs-cow").write_bytes(b"half a copy")
    (area / ".fuse_hidden0000000100000001").write_bytes(b"removed while open")
    on_disk = (area / "partial.bin").read_bytes()
    assert on_disk == fed[: len(on_disk)] and len(on_disk) >= 3 * MiB
    with mounted_at(tmp_path, storage) as again:
        staging = again.mountpoint / "staging"
        assert sorted(os.listdir(staging)) == sorted([*finished, "partial.bin", "ooo.bin"])
        for name, data in finished.items():
            url = url_of(staging / name, again)
            assert sha1_of(url) == hashlib.sha1(data).hexdigest() and blob(again, url) == data
        assert sha1_of(url_of(staging / "partial.bin", again)) == hashlib.sha1(on_disk).hexdigest()
        assert sha1_of(url_of(staging / "ooo.bin", again)) == hashlib.sha1(big).hexdigest()
        wait_until(lambda: "ingested" in again.log_text(), what="recovery to say what it did")
        assert verify_store(storage) >= len(finished) + 2


def _close_quietly(f: object) -> None:
    try:
        f.close()  # type: ignore[attr-defined]
    except OSError:
        pass  # the daemon is gone: ENOTCONN, or EPIPE on the feeding pipe


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the staging dir (needs root)."""
    directory = tmp_path / "small"
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(directory)], capture_output=True)
    if done.returncode != 0:
        reason = f"a tmpfs mount needs root: {done.stderr.decode().strip()}"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=True, timeout=30)


def test_a_full_staging_disk_is_enospc_for_the_writer_and_nothing_else(tmp_path: Path, small_disk: Path) -> None:
    small, large = os.urandom(MiB), os.urandom(8 * MiB)
    (tmp_path / "small.bin").write_bytes(small)
    (tmp_path / "large.bin").write_bytes(large)
    with mounted_at(tmp_path, tmp_path / "storage", f'[staging]\ndir = "{small_disk}"\n') as mount:
        staging = mount.mountpoint / "staging"
        run("cp", tmp_path / "small.bin", staging)
        first = url_of(staging / "small.bin", mount)
        refused = run("cp", tmp_path / "large.bin", staging, check=False)
        assert refused.returncode != 0 and "No space left on device" in refused.stderr
        assert url_of(staging / "small.bin", mount) == first
        assert (staging / "small.bin").read_bytes() == small and blob(mount, first) == small
        os.unlink(staging / "large.bin")
        (staging / "after.txt").write_text("still working\n")
        assert blob(mount, url_of(staging / "after.txt", mount)) == b"still working\n"
        assert any("No space left" in e for e in mount.status()["recent_errors"])  # type: ignore[union-attr]
        assert verify_store(mount.storage) >= 2


def test_recovery_runs_after_the_mount_answers(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    (storage / "staging").mkdir(parents=True)
    with open(storage / "staging" / "left.bin", "wb") as f:  # left unrecorded: seconds of hashing
        f.truncate(4 << 30)
    (storage / "staging" / "small.txt").write_text("asked for first\n")
    with mounted_at(tmp_path, storage) as mount:
        assert "ingested" not in mount.log_text(), "the mount waited for recovery"
        staging = mount.mountpoint / "staging"
        assert blob(mount, url_of(staging / "small.txt", mount)) == b"asked for first\n"
        wait_until(lambda: "ingested" in mount.log_text(), timeout=120, what="recovery in the background")
        assert sha1_of(url_of(staging / "left.bin", mount)) == "1bf99ee9f374e58e201e4dda4f474e570eb77229"


def test_nothing_staged_is_lost_across_unmount_and_remount(tmp_path: Path) -> None:
    tree = write_sample_tree(tmp_path / "ds")
    storage = tmp_path / "storage"
    with mounted_at(tmp_path, storage) as mount:
        run("cp", "-r", tree, mount.mountpoint / "staging")
        staged = mount.mountpoint / "staging" / "ds"
        urls = {p: url_of(p, mount) for p in [staged, *staged.rglob("*")] if not p.name.endswith(".npy")}
        mount.unmount()
    with mounted_at(tmp_path, storage) as again:
        for path, url in urls.items():
            assert url_of(path, again) == url
        for path in tree.rglob("*"):
            if path.is_file():
                assert (staged / path.relative_to(tree)).read_bytes() == path.read_bytes()
        assert "ingested" not in again.log_text()  # everything was ingested already: no re-hashing


# -- uploads ---------------------------------------------------------------------------
def upload_config(port: int) -> str:
    return f"""
[staging]
to = "lab"

[channels.lab]
url = "http://127.0.0.1:{port}"
channel = "lab"
password = "{PASSWORD}"
"""


def test_uploads_wait_for_a_server_that_is_down_and_complete_when_it_is_up(tmp_path: Path, server_dir: Path) -> None:
    port = free_port()  # nothing listens there yet
    data = os.urandom(MiB + 7)
    with mounted_at(tmp_path, tmp_path / "storage", upload_config(port)) as mount:
        staging = mount.mountpoint / "staging"
        (staging / "ds").mkdir()
        (staging / "ds" / "up.bin").write_bytes(data)
        sha1 = sha1_of(url_of(staging / "ds" / "up.bin", mount))
        dir_sha1 = sha1_of(url_of(staging / "ds", mount))

        def uploaded(path: Path) -> str:
            return os.getxattr(path, "user.kachery.uploaded").decode()

        wait_until(lambda: uploaded(staging / "ds" / "up.bin").startswith("failed: "), what="a failed attempt")
        assert uploaded(staging / "ds") in ("pending",) or uploaded(staging / "ds").startswith("failed: ")
        status = mount.cli("status", str(mount.mountpoint)).stdout
        assert "uploads" in status and "2 pending" in status and sha1 in status
        # Not uploaded yet: kept through a gc that evicts everything else.
        mount.cli("gc", "--max-size", "1")
        assert LocalStore(mount.storage).blob_path("sha1", sha1).read_bytes() == data
        server = ServerProcess(server_dir, port=port)
        try:
            wait_until(lambda: uploaded(staging / "ds" / "up.bin") == "yes", timeout=40, what="the upload")
            wait_until(lambda: uploaded(staging / "ds") == "yes", timeout=40, what="the manifest's upload")
            channel = HttpChannel("lab", server.url, "lab", PASSWORD)
            assert channel.check("sha1", sha1) == len(data)
            assert channel.check("sha1", dir_sha1) is not None
            assert mount.status()["staging"]["uploads_pending"] == 0  # type: ignore[index]
        finally:
            server.stop()
