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
import fcntl
import json
import logging
import logging.handlers
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from kacheryfs.config import Config
from kacheryfs.errors import MountError
from kacheryfs.mount.idle_poll import POLLING
from kacheryfs.resolver import Resolver
from kacheryfs.staging import StagingArea
from kacheryfs.store import LocalStore
from kacheryfs.upload_queue import UploadQueue
from kacheryfs.vfs import PID_XATTR, STAGING_VIEW, STATUS_XATTR, FileSystemView

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install FUSE with `apt-get install fuse3` (in a container also pass --device /dev/fuse --cap-add SYS_ADMIN)"
)
START_TIMEOUT = 30.0  # seconds `kacheryfs mount` waits for the daemon's first answer
STOP_TIMEOUT = 10.0  # seconds `kacheryfs umount` waits for the daemon to exit
_SUBTYPE = "kacheryfs"
_MOUNT_TYPE = f"fuse.{_SUBTYPE}"  # how /proc/self/mounts names our mounts
LOG_BYTES, LOG_BACKUPS = 10 << 20, 3  # the log file rotates at 10 MiB, keeping three older ones (.1–.3)

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
    """The daemon logs to `log_file` when given (rotated: `_LogFile`), else to stderr."""
    handler: logging.Handler = logging.StreamHandler(sys.stderr) if log_file is None else _LogFile(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _LogFile(logging.handlers.RotatingFileHandler):
    """A log file rotated at LOG_BYTES, keeping LOG_BACKUPS older ones: a mount runs for months.

    A daemon started in the background has that file as its stderr too (`start`), where
    libfuse's messages and a dying interpreter's last traceback land: stderr moves to the
    new file at each rotation, or those would go to an old one, and at last to a deleted one.
    """

    def __init__(self, path: Path) -> None:
        # A name that is not UTF-8 (kept by Python as surrogates) is logged escaped, not lost to an encoding error.
        super().__init__(path, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS, errors="backslashreplace")
        self._stderr_follows = _same_file(_STDERR, self.stream.fileno())

    def doRollover(self) -> None:  # noqa: N802 (logging's name)
        super().doRollover()
        if self._stderr_follows and self.stream is not None:
            os.dup2(self.stream.fileno(), _STDERR)


_STDERR = 2


def _same_file(fd: int, other: int) -> bool:
    try:
        a, b = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# -- checks ------------------------------------------------------------------------
def check_fuse() -> None:
    """MountError with the install hint when this machine cannot make FUSE mounts."""
    if not os.path.exists("/dev/fuse"):
        raise MountError(f"FUSE is not available here (no /dev/fuse): {INSTALL_HINT}")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError(f"fusermount3 is not installed: {INSTALL_HINT}")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        raise MountError(
            f"/dev/fuse (mode {mode:04o}) is not open to this user: mount as root, or ask an administrator "
            "for `chmod 0666 /dev/fuse`, the mode distributions give it (FUSE keeps each user to their own mounts)"
        )
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
    inside = _kacheryfs_mount_above(mountpoint)
    if inside is not None:
        raise MountError(f"{mountpoint} is inside the kacheryfs mount {inside}: mount somewhere else")
    with os.scandir(mountpoint) as entries:
        if any(True for _ in entries):
            raise MountError(f"mountpoint {mountpoint} is not empty: mount on an empty directory")


def _kacheryfs_mount_above(path: Path) -> Path | None:
    """The kacheryfs mount `path` lies inside, if any (a mount there would hide part of it)."""
    return next((where for where in kacheryfs_mounts() if path != where and path.is_relative_to(where)), None)


def kacheryfs_mounts() -> list[Path]:
    """Where kacheryfs is mounted on this machine (staging mounts included)."""
    return [where for where, kind in _mount_table() if kind == _MOUNT_TYPE]


def is_staging_mount(where: Path, mounts: Collection[Path]) -> bool:
    """Whether `where`, one of `mounts`, is the staging folder of another: the same daemon's."""
    return where.name == STAGING_VIEW and where.parent in mounts


def mount_type(path: Path) -> str | None:
    """The type of what is mounted at `path` ("fuse.kacheryfs", "tmpfs"…, the topmost); None if nothing is."""
    where = Path(os.path.realpath(path))
    return next((kind for mounted, kind in reversed(_mount_table()) if mounted == where), None)


def _mount_table() -> list[tuple[Path, str]]:
    """(mountpoint, type) of every mount this process sees, in mount order."""
    with open("/proc/self/mounts", "rb") as mounts:
        fields = [line.split() for line in mounts]
    return [(Path(_unescaped(f[1])), os.fsdecode(f[2])) for f in fields if len(f) >= 3]


def _unescaped(field: bytes) -> str:
    """A path as /proc/self/mounts writes it, with space, tab, newline and backslash as octal escapes."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def mounts_of_store(root: Path, timeout: float = 5.0) -> tuple[dict[Path, dict[str, object]], list[Path]]:
    """The live kacheryfs mounts whose daemon serves the store at `root`, with the daemon's
    status; and those whose daemon did not answer within `timeout` (stopped, hung), which may.

    Every daemon is asked at once, from threads of their own: asking one that hangs must not
    hang the caller.
    """
    asked: dict[Path, Future[dict[str, object] | None]] = {}
    mounts = kacheryfs_mounts()
    for where in mounts:
        if is_staging_mount(where, mounts):
            continue  # the mount it is on is asked
        answer = asked[where] = Future()
        threading.Thread(target=lambda w=where, a=answer: a.set_result(_status_or_none(w)), daemon=True).start()
    deadline = time.monotonic() + timeout
    found, silent = {}, []
    for where, answer in asked.items():
        try:
            status = answer.result(max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            silent.append(where)
            continue
        if status is not None and os.path.realpath(str(status.get("storage_dir"))) == os.path.realpath(root):
            found[where] = status
    return found, silent


def _status_or_none(mountpoint: Path) -> dict[str, object] | None:
    """The daemon's status; None for a stale mount, a staging mount (no status there) or one not ours to read."""
    try:
        return daemon_status(mountpoint)
    except (MountError, ValueError):
        return None


@contextlib.contextmanager
def mounting(mountpoint: Path) -> Iterator[None]:
    """Held from the checks until the mount answers: two `kacheryfs mount` of one directory at
    the same moment (a job array's "mount unless mounted") give one mount and one clear error."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the other one's checks and start, then ours see its mount
        yield
    finally:
        os.close(fd)


def _root_xattr(mountpoint: Path, name: str) -> bytes:
    """An attribute the daemon answers on the mount root; MountError if no daemon answers."""
    try:
        return os.getxattr(mountpoint, name)
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise MountError(f"{mountpoint} holds a stale mount: run `kacheryfs umount {mountpoint}`") from err
        if err.errno == errno.EACCES and mount_type(mountpoint) == _MOUNT_TYPE:
            raise MountError(
                f"{mountpoint} is another user's kacheryfs mount: FUSE lets only its owner in (root too is kept "
                "out, unless it was mounted with --allow-other)"
            ) from err
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
    """Mount and run the filesystem in this process until unmounted or signalled.

    As root, two FUSE connections: the read-only hash views at `mountpoint` (in a thread)
    and the staging area on `mountpoint/staging` (in this thread); otherwise one
    (`_serve_shared`). When the staging mount ends, for whatever reason, the hash views are
    unmounted after it; when the hash views end first (a lazy unmount), the staging mount
    is let go too. SIGINT, SIGTERM and SIGHUP unmount
    the staging mount, and so both; RECHECK_SIGNAL lets go of held blobs whose file in the
    store was replaced (`_on_signals`).
    """
    check_fuse()
    check_mountpoint(mountpoint)
    POLLING.start(config.idle_poll)  # first: its measure forks, and needs idle CPUs
    tune_malloc()
    raise_fd_limit()
    from kacheryfs.mount.fuse_ops import MAX_READ, HashViewFUSE, HashViewOperations, StagingFUSE, StagingOperations

    resolver = Resolver.from_config(config)
    staging, uploads = open_staging(config, resolver.store)
    resolver.md5_index = staging.md5_index  # fetched blobs get their md5 name in the background too
    view = FileSystemView(resolver, fetch_timeout=config.fetch_timeout, staging=staging)
    view.idle_poll_status = POLLING.status
    staging_mnt = mountpoint / STAGING_VIEW
    before_dev = os.stat(mountpoint).st_dev
    hash_views_up, hash_views_done, stopping = threading.Event(), threading.Event(), threading.Event()
    signalled = threading.Event()
    failure: list[BaseException] = []

    def raise_readahead_of(path: Path, dev: int) -> Callable[[], None]:
        # From a thread: a stat of the mountpoint from inside FUSE's init would deadlock.
        args = (path, dev, config.readahead_kb)
        return lambda: threading.Thread(target=raise_readahead, args=args, daemon=True).start()

    def on_hash_views_init() -> None:
        hash_views_up.set()
        raise_readahead_of(mountpoint, before_dev)()

    def on_staging_init() -> None:
        raise_readahead_of(staging_mnt, before_dev)()
        _up(view, signalled, staging_mnt)

    view.recheck_signal = RECHECK_SIGNAL.name
    on_signal = _on_signal(view, signalled, mountpoint, staging_mnt)

    timeouts = {"entry_timeout": config.entry_timeout, "attr_timeout": config.attr_timeout,
                "negative_timeout": config.negative_timeout}  # fmt: skip
    fuse_options: dict[str, object] = {
        "fsname": _SUBTYPE,
        "subtype": _SUBTYPE,
        "default_permissions": True,  # the kernel checks modes: 0444/0555 on the hash views
        "max_read": MAX_READ,
        "max_threads": 64,  # opens that wait for a download must not starve lookups of cached files
        # Threads are kept, not ended when idle: each holds its Python thread state (fuse_ops._FUSE).
        # Explicit also because libfuse 3.14 otherwise logs "Ignoring invalid max threads value".
        "max_idle_threads": 64,
        "allow_other": config.allow_other,
    }
    for option in options:
        for item in filter(None, option.split(",")):
            key, eq, value = item.partition("=")
            fuse_options[key] = value if eq else True
    run = {"raw_fi": True, "foreground": True, "nothreads": False}
    if not staging_apart():
        _serve_shared(config, mountpoint, view, uploads, fuse_options | run, timeouts)
        return

    def hash_views() -> None:
        try:
            ops = HashViewOperations(view, on_init=on_hash_views_init, use_passthrough=config.passthrough, **timeouts)
            HashViewFUSE(ops, str(mountpoint), ro=True, **run, **fuse_options)  # type: ignore[arg-type]
        except BaseException as err:  # handed to the main thread
            failure.append(err)
        finally:
            hash_views_done.set()
            if not stopping.is_set():
                # Ended first (a signal before the staging mount took them over, a lazy unmount):
                # nothing may stay mounted without its daemon.
                _detach(staging_mnt, lazy=True)
                _detach(mountpoint, lazy=True)

    log.info("mounting %s (storage %s, channels %s)", mountpoint, config.storage_dir, list(config.fr) or "none")
    with _on_signals(on_signal):
        threading.Thread(target=hash_views, name="kacheryfs-hash-views", daemon=True).start()
        try:
            while not hash_views_up.wait(0.05) and not signalled.is_set():
                if hash_views_done.is_set():
                    raise _mount_failed(mountpoint, config, failure)
            try:
                if not signalled.is_set():
                    ops = StagingOperations(view, on_init=on_staging_init, **timeouts)
                    StagingFUSE(ops, str(staging_mnt), **run, **fuse_options)  # type: ignore[arg-type]
            except RuntimeError as err:
                if not (view.ready.is_set() or signalled.is_set() or hash_views_done.wait(1.0)):
                    raise _mount_failed(staging_mnt, config, [err]) from err
        finally:
            stopping.set()
            if not hash_views_done.is_set():
                _detach(mountpoint, lazy=True)  # the staging mount is gone: nothing is left to wait for
                hash_views_done.wait(STOP_TIMEOUT)
        _wind_down(view, uploads)
    log.info("unmounted %s", mountpoint)


def staging_apart() -> bool:
    """Whether `<mnt>/staging` can be a FUSE mount of its own on top of the hash views.

    Only for root: without it, fusermount3 makes the mount, as root, and a FUSE mount lets
    no other user in, root included (allow_other would, but fusermount3 then finds the
    hash views' `staging` folder read-only to the user). SHARED_ENV=1 asks for one
    connection as root too (the tests run staging both ways).
    """
    return os.geteuid() == 0 and os.environ.get(SHARED_ENV) != "1"


SHARED_ENV = "KACHERYFS_STAGING_SHARED"


def _serve_shared(
    config: Config,
    mountpoint: Path,
    view: FileSystemView,
    uploads: UploadQueue | None,
    fuse_options: dict[str, object],
    timeouts: dict[str, float],
) -> None:
    """`serve` with the hash views and the staging area on one FUSE connection (`SharedOperations`)."""
    from kacheryfs.mount.fuse_ops import SharedFUSE, SharedOperations

    before_dev = os.stat(mountpoint).st_dev
    signalled = threading.Event()

    def on_init() -> None:
        args = (mountpoint, before_dev, config.readahead_kb)  # from a thread: see serve
        threading.Thread(target=raise_readahead, args=args, daemon=True).start()
        _up(view, signalled, mountpoint)

    on_signal = _on_signal(view, signalled, mountpoint, mountpoint)
    view.recheck_signal = RECHECK_SIGNAL.name
    view.staging_shared = True
    log.info("mounting %s (storage %s, channels %s; staging on the same connection: not root)",
             mountpoint, config.storage_dir, list(config.fr) or "none")  # fmt: skip
    with _on_signals(on_signal):
        try:
            ops = SharedOperations(view, on_init=on_init, use_passthrough=config.passthrough, **timeouts)
            SharedFUSE(ops, str(mountpoint), **fuse_options)  # type: ignore[arg-type]
        except RuntimeError as err:
            if not (view.ready.is_set() or signalled.is_set()):
                raise _mount_failed(mountpoint, config, [err]) from err
        finally:
            _wind_down(view, uploads)
    log.info("unmounted %s", mountpoint)


def _up(view: FileSystemView, signalled: threading.Event, last: Path) -> None:
    """The whole mount answers (its last connection, at `last`, is up): `kacheryfs mount` may
    return; a stop signal that came while it was mounting takes it down now."""
    view.ready.set()  # from now on the root answers its pid
    (log.warning if POLLING.refused else log.info)("%s", POLLING.describe())
    if signalled.is_set():
        threading.Thread(target=_detach, args=(last,), kwargs={"lazy": True}, daemon=True).start()


def _on_signal(view: FileSystemView, signalled: threading.Event, mountpoint: Path, last: Path) -> Callable[[int], None]:
    """What the daemon does on a signal: RECHECK_SIGNAL rechecks held blobs; a stop signal
    detaches the connection at `last`, and so the whole mount, once it is up (`_up`)."""

    def on_signal(signum: int) -> None:
        if signum == RECHECK_SIGNAL:
            _recheck_in_background(view)
            return
        log.info("stopped by a signal (%s): unmounting %s", signal.Signals(signum).name, mountpoint)
        signalled.set()
        if view.ready.is_set():
            _detach(last, lazy=True)  # as libfuse does on a signal: unmounted even if busy

    return on_signal


def _recheck_in_background(view: FileSystemView) -> None:
    """Let go of held blobs whose file in the store was replaced (RECHECK_SIGNAL), from a thread
    of its own: the signal thread must hear a stop signal at once."""

    def recheck() -> None:
        try:
            log.info("held blobs rechecked: let go of %d replaced in the store", view.let_go_of_replaced_blobs())
        except Exception:
            log.exception("rechecking held blobs")

    threading.Thread(target=recheck, name="kacheryfs-recheck", daemon=True).start()


def _wind_down(view: FileSystemView, uploads: UploadQueue | None) -> None:
    """After the unmount: idle polling stopped, descriptors closed, the upload thread stopped,
    access times written."""
    POLLING.stop()
    view.close_blob_fds()
    if uploads is not None:
        uploads.stop()
    view.resolver.store.cache.flush_access()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RECHECK_SIGNAL = signal.SIGUSR1  # sent by `kacheryfs fsck --repair`: let go of blobs it moved away


@contextlib.contextmanager
def _on_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Call `on_signal(signum)` from a thread of its own on SIGINT, SIGTERM, SIGHUP or RECHECK_SIGNAL.

    Not libfuse's handlers: they end only the session set up last, and not before it is up
    (a signal in between would leave a mount without its daemon). Python's handler writes
    the signal to a pipe even while this thread is inside libfuse's loop; mfusepy is kept
    from resetting SIGINT (libfuse installs its own only over the default).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only: its caller's business
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # set_wakeup_fd requires it

    def watch() -> None:
        with open(read_end, "rb", buffering=0) as signals:
            while data := signals.read(16):
                for signum in data:
                    on_signal(signum)

    previous = {signum: signal.signal(signum, lambda *_: None) for signum in (*_STOP_SIGNALS, RECHECK_SIGNAL)}
    previous_fd = signal.set_wakeup_fd(write_end)
    import mfusepy

    mfusepy_signal, mfusepy.signal = mfusepy.signal, _refuse_signal  # type: ignore[attr-defined]
    threading.Thread(target=watch, name="kacheryfs-signals", daemon=True).start()
    try:
        yield
    finally:
        mfusepy.signal = mfusepy_signal  # type: ignore[attr-defined]
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(write_end)  # the watcher reads the end of the pipe and stops


def _refuse_signal(*_: object) -> None:
    raise ValueError("kacheryfs handles the signals")  # what mfusepy expects outside the main thread


def _mount_failed(path: Path, config: Config, failure: list[BaseException]) -> MountError:
    hint = " (allow_other needs user_allow_other in /etc/fuse.conf)" if config.allow_other else ""
    code = f" (code {failure[0]})" if failure else ""
    return MountError(f"libfuse could not mount {path}{code}{hint}; see the messages above")


def _detach(path: Path, *, lazy: bool) -> None:
    """Unmount one of our own connections (its loop then ends); quiet when it is gone already."""
    flag = "-uz" if lazy else "-u"
    for cmd in (["fusermount3", flag, str(path)], ["umount", *(["-l"] if lazy else []), str(path)]):
        if shutil.which(cmd[0]) is None:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run(cmd, capture_output=True, timeout=STOP_TIMEOUT).returncode == 0:
                return


def raise_fd_limit() -> None:
    """Open files up to the hard limit: the daemon keeps a descriptor per blob being read."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
    """Unmount, waiting for the daemon to exit; a stale mount (or `lazy`) is detached lazily.

    The staging mount on `mountpoint/staging` goes first (the daemon then unmounts the hash
    views itself); a lazy detach takes both at once.
    """
    mountpoint = Path(os.path.realpath(mountpoint))  # a symlink to it names the mount, as the table does
    kind = mount_type(mountpoint)
    if kind is None and mountpoint.name == STAGING_VIEW and mount_type(mountpoint.parent) == _MOUNT_TYPE:
        mountpoint, kind = mountpoint.parent, _MOUNT_TYPE  # staging on the mount's own connection: goes with it
    if kind is None:
        raise MountError(f"{mountpoint} is not mounted")
    if kind != _MOUNT_TYPE:  # never someone else's filesystem, stale or busy or not
        raise MountError(f"{mountpoint} is not a kacheryfs mount (it is {kind}): unmount it with umount")
    stale = is_stale(mountpoint)
    pid = None
    if not stale:
        with contextlib.suppress(MountError):
            pid = daemon_pid(mountpoint)
    if not (stale or lazy):
        # Checked first: once the staging mount is gone the daemon detaches the hash views
        # itself, and a plain umount would quietly have been a lazy one.
        holders = users_of(mountpoint, besides={os.getpid(), pid or 0})
        if holders:
            raise MountError(
                f"{mountpoint} is busy, in use by {', '.join(holders)}: close those, or `kacheryfs umount --lazy` "
                "to detach it now (the daemon then serves them until they close)"
            )
    # Whether something is mounted is read from the mount table: a path in another user's
    # FUSE mount cannot even be looked at, by root neither (os.path.ismount says no).
    staging = mountpoint / STAGING_VIEW
    if not (stale or lazy) and mount_type(staging) == _MOUNT_TYPE:
        _unmount_one(staging, lazy=False, timeout=timeout)
        deadline = time.monotonic() + timeout
        while pid is not None and mount_type(mountpoint) is not None and time.monotonic() < deadline:
            time.sleep(0.02)  # the daemon unmounts the hash views after the staging mount
    if mount_type(mountpoint) == _MOUNT_TYPE:
        try:
            _unmount_one(mountpoint, lazy=stale or lazy, timeout=timeout)
        except MountError:
            if mount_type(mountpoint) == _MOUNT_TYPE:
                raise  # else the daemon unmounted it meanwhile
    if isinstance(pid, int):
        _wait_exit(pid, timeout)


def users_of(mountpoint: Path, besides: set[int]) -> list[str]:
    """Processes ("name (pid)") with a working directory, an open file or a mapping under
    `mountpoint`, as `fuser -m` finds them (only those this user may inspect)."""
    inside = os.fsencode(os.path.realpath(mountpoint))  # as /proc shows paths: resolved
    prefix = inside + b"/"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in besides:
            continue
        if any(p == inside or p.startswith(prefix) for p in _paths_of(entry.path)):
            try:
                name = Path(entry.path, "comm").read_text().strip()
            except OSError:
                name = "?"
            found.append(f"{name} ({entry.name})")
    return found


def _paths_of(proc: str) -> Iterator[bytes]:
    """The paths a process is using: cwd, root, open files, mapped files."""
    for link in ("cwd", "root"):
        with contextlib.suppress(OSError):
            yield os.readlink(os.fsencode(f"{proc}/{link}"))
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"{proc}/fd"):
            with contextlib.suppress(OSError):
                yield os.readlink(os.fsencode(fd.path))
    with contextlib.suppress(OSError), open(f"{proc}/maps", "rb") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                yield fields[5].rstrip(b"\n")


def _unmount_one(path: Path, *, lazy: bool, timeout: float) -> None:
    if lazy:
        attempts = [["fusermount3", "-uz", str(path)], ["umount", "-l", str(path)]]
    else:
        attempts = [["fusermount3", "-u", str(path)], ["umount", str(path)]]
    reasons = []
    for cmd in attempts:
        if shutil.which(cmd[0]) is None:
            reasons.append(f"{cmd[0]}: not installed")
            continue
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0:
            return
        reasons.append(f"{' '.join(cmd)}: {done.stderr.strip()}")
    busy = " (busy: close the programs using it, or use --lazy)" if any("busy" in r for r in reasons) else ""
    raise MountError(f"could not unmount {path}{busy}: {'; '.join(reasons)}")


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
