"""Real mounts for the mount tests: `kacheryfs mount` in a subprocess, a stored sample tree, FUSE checks.

The daemon always runs in its own process (never in the test process). Each mount gets its
own storage dir, config file and log, and is unmounted by its fixture, also on failure.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from kacheryfs import manifest
from kacheryfs.manifest import FileEntry
from kacheryfs.mount.daemon import _unescaped, mount_type
from kacheryfs.mount.paths import mount_path
from kacheryfs.store import LocalStore
from kacheryfs.vfs import STATUS_XATTR

CLI_TIMEOUT = 60  # seconds any one `kacheryfs` command may take in a test


def require_fuse() -> None:
    """Skip without FUSE; in CI (env CI set) a missing FUSE fails the test instead."""
    missing = [what for what, ok in (("/dev/fuse", os.path.exists("/dev/fuse")),
                                     ("fusermount3", shutil.which("fusermount3") is not None)) if not ok]  # fmt: skip
    if missing:
        reason = f"real-mount tests need {' and '.join(missing)} (apt-get install fuse3)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def kacheryfs(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `python -m kacheryfs ARGS` and return the finished process."""
    done = subprocess.run(
        [sys.executable, "-m", "kacheryfs", *args], capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env
    )
    if check and done.returncode != 0:
        raise AssertionError(f"kacheryfs {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


def write_sample_tree(root: Path) -> Path:
    """A small tree with the shapes that trip file tools: empty, >1 MiB, nested, odd names, .npy."""
    import numpy as np

    root.mkdir(parents=True)
    (root / "a.txt").write_text("hello kachery\n")
    (root / "empty.dat").write_bytes(b"")
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "sub" / "big.bin").write_bytes(os.urandom((1 << 20) + 1))
    (root / "sub" / "deep" / "ünï cödé.txt").write_text("names with spaces and accents\n")
    np.save(root / "sub" / "deep" / "arr.npy", np.arange(1000, dtype=np.float64).reshape(10, 100))
    return root


def store_tree(store: LocalStore, root: Path, label: str | None = None) -> str:
    """Store a directory and its manifest directly in `store`; its sha1dir:// URL."""

    def store_one(path: Path) -> FileEntry:
        digests = store.put_file(path)
        return FileEntry(digests.size, digests.sha1)

    digests = store.put_bytes(manifest.serialize(manifest.build(root, store_one)))
    return f"sha1dir://{digests.sha1}.{label or root.name}"


@dataclass
class Mount:
    """A live mount made by `kacheryfs mount` and what it was made with."""

    mountpoint: Path
    storage: Path
    config: Path
    log: Path
    env: dict[str, str]

    def path(self, url: str) -> Path:
        return mount_path(url, self.mountpoint)

    def status(self) -> dict[str, object]:
        return json.loads(os.getxattr(self.mountpoint, STATUS_XATTR))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return kacheryfs(*args, env=self.env, check=check)

    def unmount(self) -> None:
        self.cli("umount", str(self.mountpoint))


def force_unmount(mountpoint: Path) -> None:
    """Last resort in teardown: detach whatever is mounted there."""
    for cmd in (["fusermount3", "-uz", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        subprocess.run(cmd, capture_output=True, timeout=CLI_TIMEOUT, check=False)


def is_mounted(mountpoint: Path) -> bool:
    return mount_type(mountpoint) is not None  # stale mounts too: it reads the mount table


@contextmanager
def mounted_at(
    base: Path, storage: Path, config_text: str = "", *extra: str, daemon_env: dict[str, str] | None = None
) -> Iterator[Mount]:
    """`kacheryfs mount` on `base/mnt` with `storage` and a config file holding `config_text`;
    `daemon_env`: more environment for the mount command (and so its daemon)."""
    require_fuse()
    mountpoint, config, log = base / "mnt", base / "mount-config.toml", base / "mount.log"
    mountpoint.mkdir(parents=True, exist_ok=True)
    config.write_text(config_text)
    env = dict(os.environ, KACHERY_CONFIG=str(config), KACHERY_STORAGE_DIR=str(storage))
    mount = Mount(mountpoint, storage, config, log, env)
    args = ["mount", str(mountpoint), "--config", str(config), "--storage-dir", str(storage), "--log-file", str(log)]
    kacheryfs(*args, *extra, env={**env, **(daemon_env or {})})
    try:
        yield mount
    finally:
        if is_mounted(mountpoint):
            with suppress(AssertionError, subprocess.TimeoutExpired):
                mount.unmount()
        if is_mounted(mountpoint):
            force_unmount(mountpoint)


_TRACING = Path("/sys/kernel/tracing")
_REQUEST_LINE = re.compile(r"connection (\d+) req \d+ opcode \d+ \((\w+)\)")


@contextmanager
def fuse_requests(mountpoint: Path) -> Iterator[collections.Counter[str]]:
    """The requests the kernel sends to the FUSE connection at `mountpoint` meanwhile, counted by
    name ("FUSE_OPEN", ...) once the block ends: the fuse_request_send tracepoint (Linux >= 6.13,
    root), in a tracing instance of its own so that nothing else's tracing is touched."""
    event = _TRACING / "events" / "fuse" / "fuse_request_send"
    if not event.is_dir() or not os.access(_TRACING / "instances", os.W_OK):
        reason = f"no FUSE tracepoints to count requests with ({event}; root and Linux >= 6.13)"
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root on Linux 6.18: {reason}")
        pytest.skip(reason)
    # From the mount table (the last mount there): root may not stat a user's FUSE mount.
    where = os.path.realpath(mountpoint)
    devices = [fields[2] for fields in map(str.split, Path("/proc/self/mountinfo").read_text().splitlines())
               if _unescaped(fields[4].encode()) == where]  # fmt: skip
    if not devices:
        pytest.fail(f"{where} is not in the mount table")
    major, minor = map(int, devices[-1].split(":"))
    connection = str(major << 20 | minor)  # the kernel's own dev_t encoding
    instance = _TRACING / "instances" / f"kacheryfs-test-{os.getpid()}"
    instance.mkdir()
    counts: collections.Counter[str] = collections.Counter()
    try:
        enable = instance / "events" / "fuse" / "fuse_request_send" / "enable"
        enable.write_text("1")
        yield counts
        enable.write_text("0")
        for line in (instance / "trace").read_text().splitlines():
            match = _REQUEST_LINE.search(line)
            if match and match.group(1) == connection:
                counts[match.group(2)] += 1
    finally:
        instance.rmdir()


def wait_until(condition: object, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `condition()` until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mount]:
    """An empty store mounted on tmp_path/mnt."""
    with mounted_at(tmp_path, tmp_path / "mount-storage") as mount:
        yield mount


DAEMON_READS = "[mount]\npassthrough = false\n"  # config: the daemon serves reads itself, as without passthrough


def require_passthrough(mount: Mount) -> None:
    """Skip unless the kernel reads `mount`'s blobs itself; in CI (root, Linux 6.18) fail instead."""
    if mount.status()["reads"] != "kernel (passthrough)":
        reason = f"no kernel passthrough here (root and Linux >= 6.9 needed): {mount.log_text()[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root on a kernel with passthrough: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module", params=["kernel reads", "daemon reads"])
def sample(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Mount, Path, str]]:
    """(mount, original tree, its sha1dir URL): the sample tree stored and mounted, shared by a module.

    Twice: with kernel passthrough (where this machine has it) and with the daemon serving reads.
    """
    base = tmp_path_factory.mktemp("sample")
    tree = write_sample_tree(base / "ds001")
    storage = base / "storage"
    url = store_tree(LocalStore(storage), tree)
    with mounted_at(base, storage, DAEMON_READS if request.param == "daemon reads" else "") as mount:
        if request.param == "kernel reads":
            (mount.path(url) / "a.txt").read_bytes()  # the first open decides the mode
            require_passthrough(mount)  # else this half would only run the other one again
        yield mount, tree, url
