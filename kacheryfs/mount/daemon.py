"""Run, start and stop a kacheryfs mount: assembly from Config, checks, background start, umount.

`serve()` runs the FUSE loop in this process (`kacheryfs mount --foreground`); libfuse's
own SIGINT/SIGTERM/SIGHUP handlers end the loop and unmount. `start()` runs the same
command as a detached child and returns once the mount answers, or raises with the reason.
`unmount()` also clears a stale mount whose daemon was killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from kacheryfs.config import Config
from kacheryfs.errors import MountError
from kacheryfs.resolver import Resolver
from kacheryfs.staging import StagingArea
from kacheryfs.store import LocalStore
from kacheryfs.upload_queue import UploadQueue
from kacheryfs.vfs import PID_XATTR, STATUS_XATTR, FileSystemView

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install FUSE with `apt-get install fuse3` (in a container also pass --device /dev/fuse --cap-add SYS_ADMIN)"
)
START_TIMEOUT = 30.0  # seconds `kacheryfs mount` waits for the daemon's first answer
STOP_TIMEOUT = 10.0  # seconds `kacheryfs umount` waits for the daemon to exit

# glibc mallopt parameters. libfuse allocates a fresh 1 MiB buffer per read and Python a
# 1 MiB bytes; with glibc's dynamic thresholds each one can page-fault (measured: ~900 MB/s
# instead of 2.3+ GB/s). Fixed thresholds keep those buffers on the heap and reused.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOPT = {_M_MMAP_THRESHOLD: 8 << 20, _M_TRIM_THRESHOLD: 64 << 20, _M_TOP_PAD: 16 << 20}


def default_log_file(mountpoint: Path) -> Path:
    """Where a background daemon logs when the config names no log_file."""
    import platformdirs

    name = str(mountpoint.absolute()).strip("/").replace("/", "_") or "root"
    return Path(platformdirs.user_log_dir("kachery")) / f"mount-{name}.log"


def configure_logging(log_file: Path | None, level: str) -> None:
    """The daemon logs to `log_file` when given, else to stderr."""
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- checks ------------------------------------------------------------------------
def check_fuse() -> None:
    """MountError with the install hint when this machine cannot make FUSE mounts."""
    if not os.path.exists("/dev/fuse"):
        raise MountError(f"FUSE is not available here (no /dev/fuse): {INSTALL_HINT}")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError(f"fusermount3 is not installed: {INSTALL_HINT}")
    try:
        import mfusepy  # noqa: F401  (loads libfuse3 at import)
    except (OSError, ImportError) as err:
        raise MountError(f"libfuse3 cannot be loaded ({err}): {INSTALL_HINT}") from err


def is_stale(mountpoint: Path) -> bool:
    """True when a FUSE mount is left at `mountpoint` whose daemon is gone."""
    try:
        os.statvfs(mountpoint)  # not stat: the kernel answers that from its attribute cache
    except OSError as err:
        return err.errno == errno.ENOTCONN
    return False


def check_mountpoint(mountpoint: Path) -> None:
    """MountError unless `mountpoint` is an existing, empty directory with nothing mounted on it."""
    if is_stale(mountpoint):
        raise MountError(f"{mountpoint} holds a stale mount (its daemon died): run `kacheryfs umount {mountpoint}`")
    if not mountpoint.exists():
        raise MountError(f"mountpoint {mountpoint} does not exist: create it with `mkdir -p {mountpoint}`")
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already mounted: `kacheryfs status {mountpoint}` shows what it is")
    with os.scandir(mountpoint) as entries:
        if any(True for _ in entries):
            raise MountError(f"mountpoint {mountpoint} is not empty: mount on an empty directory")


def _root_xattr(mountpoint: Path, name: str) -> bytes:
    """An attribute the daemon answers on the mount root; MountError if no daemon answers."""
    try:
        return os.getxattr(mountpoint, name)
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise MountError(f"{mountpoint} holds a stale mount: run `kacheryfs umount {mountpoint}`") from err
        raise MountError(f"no kacheryfs mount answers at {mountpoint} ({err.strerror})") from err


def daemon_pid(mountpoint: Path) -> int:
    """The pid of the kacheryfs daemon serving `mountpoint` (cheap: readiness checks poll it)."""
    return int(_root_xattr(mountpoint, PID_XATTR))


def daemon_status(mountpoint: Path) -> dict[str, object]:
    """The status JSON a live kacheryfs daemon serves on its root."""
    return json.loads(_root_xattr(mountpoint, STATUS_XATTR))


# -- the daemon itself ---------------------------------------------------------------
def tune_malloc() -> None:
    """Apply the mallopt settings above (glibc only; elsewhere nothing to do)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        for param, value in _MALLOPT.items():
            libc.mallopt(param, value)


def raise_readahead(mountpoint: Path, before_dev: int, readahead_kb: int, wait: float = START_TIMEOUT) -> None:
    """Set the mount's kernel readahead once it is up: FUSE starts at 128 KiB, which caps reads.

    Needs root (writes /sys/class/bdi/<major>:<minor>/read_ahead_kb); otherwise it logs and
    the mount works with the kernel's default.
    """
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            dev = os.stat(mountpoint).st_dev
        except OSError:
            dev = before_dev
        if dev != before_dev:
            bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
            try:
                bdi.write_text(str(readahead_kb))
                log.info("readahead of %s set to %d KiB", mountpoint, readahead_kb)
            except OSError as err:
                log.info("readahead left at the kernel default (%s: %s)", bdi, err.strerror)
            return
        time.sleep(0.01)


def serve(config: Config, mountpoint: Path, options: Sequence[str] = ()) -> None:
    """Mount and run the filesystem in this process until unmounted or signalled."""
    check_fuse()
    check_mountpoint(mountpoint)
    tune_malloc()
    from kacheryfs.mount.fuse_ops import FUSE, MAX_READ, KacheryOperations

    resolver = Resolver.from_config(config)
    staging, uploads = open_staging(config, resolver.store)
    resolver.md5_index = staging.md5_index  # fetched blobs get their md5 name in the background too
    view = FileSystemView(resolver, fetch_timeout=config.fetch_timeout, staging=staging)
    before_dev = os.stat(mountpoint).st_dev
    mounted = threading.Event()

    def on_init() -> None:
        mounted.set()
        # From a thread: a stat of the mountpoint from inside FUSE's init would deadlock.
        args = (mountpoint, before_dev, config.readahead_kb)
        threading.Thread(target=raise_readahead, args=args, daemon=True).start()

    ops = KacheryOperations(
        view,
        entry_timeout=config.entry_timeout,
        attr_timeout=config.attr_timeout,
        negative_timeout=config.negative_timeout,
        on_init=on_init,
    )
    fuse_options: dict[str, object] = {
        "fsname": "kacheryfs",
        "subtype": "kacheryfs",
        "default_permissions": True,  # the kernel checks modes: 0444/0555 on the hash views
        "max_read": MAX_READ,
        "max_threads": 64,  # opens that wait for a download must not starve lookups of cached files
        # Threads are kept, not ended when idle: each holds its Python thread state (fuse_ops.FUSE).
        # Explicit also because libfuse 3.14 otherwise logs "Ignoring invalid max threads value".
        "max_idle_threads": 64,
        "allow_other": config.allow_other,
    }
    for option in options:
        for item in filter(None, option.split(",")):
            key, eq, value = item.partition("=")
            fuse_options[key] = value if eq else True
    log.info("mounting %s (storage %s, channels %s)", mountpoint, config.storage_dir, list(config.fr) or "none")
    try:
        FUSE(ops, str(mountpoint), raw_fi=True, foreground=True, nothreads=False, **fuse_options)
    except RuntimeError as err:
        if mounted.is_set():
            # libfuse's SIGINT/SIGTERM/SIGHUP handler ended the loop and unmounted: a clean stop.
            log.info("stopped by a signal; unmounted %s", mountpoint)
            return
        hint = " (allow_other needs user_allow_other in /etc/fuse.conf)" if config.allow_other else ""
        raise MountError(f"libfuse could not mount {mountpoint} (code {err}){hint}; see the messages above") from err
    finally:
        if uploads is not None:
            uploads.stop()
        resolver.store.cache.flush_access()
    log.info("unmounted %s", mountpoint)


def open_staging(config: Config, store: LocalStore) -> tuple[StagingArea, UploadQueue | None]:
    """The staging area (with the upload queue of the channel [staging] to names, if any).

    Whatever a crash left unfinished is ingested in the background, so the mount answers at
    once however much there is; a URL asked for meanwhile is ingested on demand.
    """
    uploads = None
    if config.staging_to:
        target = config.channel(config.staging_to)
        from kacheryfs.remote import HttpChannel

        uploads = UploadQueue(store, target.name, lambda: HttpChannel(
            target.name, target.url, target.channel, target.password, timeout=config.channel_timeout))  # fmt: skip
    staging = StagingArea(config.staging_dir or store.root / "staging", store, uploads)
    if uploads is not None:
        uploads.start()

    def recover() -> None:
        recovered = staging.recover()
        if recovered:
            log.info("ingested %d staged files left unfinished by the last run", recovered)

    threading.Thread(target=recover, name="kacheryfs-recover", daemon=True).start()
    return staging, uploads


def start(
    argv: Sequence[str], mountpoint: Path, log_file: Path, readahead_kb: int, timeout: float = START_TIMEOUT
) -> int:
    """Run `python -m kacheryfs <argv>` detached; return its pid once the mount answers.

    The child's stderr goes to `log_file` so that a failure is reported from there.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as err_out:
        offset = err_out.tell()
        child = subprocess.Popen(
            [sys.executable, "-m", "kacheryfs", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_out,
            start_new_session=True,  # not killed with the shell that started it
            cwd="/",  # never keep another mount busy
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            raise MountError(f"the mount daemon exited with code {code}: {_tail(log_file, offset)}")
        with contextlib.suppress(MountError):
            if daemon_pid(mountpoint) == child.pid:
                # The daemon raises it too, from a thread; done here as well so that the first
                # read after `kacheryfs mount` returns already gets 1 MiB requests.
                raise_readahead(mountpoint, -1, readahead_kb, wait=1.0)
                return child.pid
        time.sleep(0.02)
    child.terminate()
    raise MountError(f"the mount did not answer within {timeout:g} s: {_tail(log_file, offset)}")


def _tail(log_file: Path, offset: int, limit: int = 2000) -> str:
    with open(log_file, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace").strip()
    return (text[-limit:] if text else "no message") + f" (log: {log_file})"


def unmount(mountpoint: Path, *, lazy: bool = False, timeout: float = STOP_TIMEOUT) -> None:
    """Unmount, waiting for the daemon to exit; a stale mount (or `lazy`) is detached lazily."""
    stale = is_stale(mountpoint)
    if not stale and not os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    pid = None
    if not stale:
        with contextlib.suppress(MountError):
            pid = daemon_pid(mountpoint)
    if stale or lazy:
        attempts = [["fusermount3", "-uz", str(mountpoint)], ["umount", "-l", str(mountpoint)]]
    else:
        attempts = [["fusermount3", "-u", str(mountpoint)], ["umount", str(mountpoint)]]
    reasons = []
    for cmd in attempts:
        if shutil.which(cmd[0]) is None:
            reasons.append(f"{cmd[0]}: not installed")
            continue
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0:
            break
        reasons.append(f"{' '.join(cmd)}: {done.stderr.strip()}")
    else:
        busy = " (busy: close the programs using it, or use --lazy)" if any("busy" in r for r in reasons) else ""
        raise MountError(f"could not unmount {mountpoint}{busy}: {'; '.join(reasons)}")
    if isinstance(pid, int):
        _wait_exit(pid, timeout)


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":  # exited; its parent has not reaped it yet
            return
        time.sleep(0.02)
    log.warning("the daemon (pid %d) is still running %g s after the unmount", pid, timeout)
