#!/usr/bin/env python3
"""Benchmark kacheryfs against its reference tools, side by side, in one run.

    python scripts/bench.py [--quick] [--only SECTION,...] [--size-gib N] [--files N] [--json OUT]

Sections follow the issues' "Performance" lists: core (issue 2), server (3), mount (4),
staging (5), ops (6). Each comparison times kacheryfs and a reference (openssl, cat, curl,
nginx, the same bytes read natively) on the same data in the same run and prints
ratio = kacheryfs / reference of the quantity shown (a time: lower is better; a rate: higher
is better) beside the issue's target. A section whose feature has not landed says
"not available yet" and the run goes on. Timing claims live here, never in tests.

Big files are read with `cat`, small ones with open/read/close in this process: the same
reader on both sides. "cold": both sides' files were dropped from the page cache just before
(posix_fadvise DONTNEED on the exact files; drop_caches where metadata matters; a fresh
mount for the FUSE side). "warm": both were read once before. Values are medians of
--repeats runs (3; 1 with --quick), the two sides interleaved. MB/s = 10^6 B/s. Everything
lives in a temp dir that is removed at the end, only 127.0.0.1 is used, and every server
and mount is stopped, also on errors. Run as root (drop_caches, FUSE mounts).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime
import functools
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MB = 1_000_000
GIB = 1 << 30
CHUNK = 1 << 20
SMALL_FILE = 4096
SERVER_CHANNEL, SERVER_PASSWORD = "pub", "pw"
CLIENT_CHANNEL = "bench"  # the client config's name for the kacheryfs server
REPO = Path(__file__).resolve().parent.parent
SYMBOLS = {"<=": "≤", ">=": "≥", "<": "<"}


# -- results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A goal from an issue, on the ratio (`≤ 1.15`) or on kacheryfs's own value (`< 150 MB`)."""

    op: str  # "<=", ">=" or "<"
    bound: float
    on: str = "ratio"

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return {"<=": value <= self.bound, ">=": value >= self.bound, "<": value < self.bound}[self.op]

    def describe(self, unit: str) -> str:
        text = f"{SYMBOLS[self.op]} {self.bound:g}"
        return text if self.on == "ratio" else f"{text} {unit}"


@dataclass(frozen=True)
class Measurement:
    """One row: kacheryfs's value, the reference's value (same unit), and the target."""

    name: str
    unit: str  # "s", "ms", "µs", "MB/s", "files/s", "req/s" or "MB"
    ours: float | None
    reference: float | None = None
    target: Target | None = None
    nbytes: int | None = None  # bytes each side moved, to show a rate beside a time

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference

    @property
    def ok(self) -> bool | None:
        if self.target is None:
            return None
        return self.target.met(self.ratio if self.target.on == "ratio" else self.ours)

    def cells(self) -> list[str]:
        return [
            self.name,
            _format(self.ours, self.unit, self.nbytes),
            _format(self.reference, self.unit, self.nbytes),
            "" if self.ratio is None else f"{self.ratio:.2f}",
            self.target.describe(self.unit) if self.target else "report",
            {None: "", True: "yes", False: "NO"}[self.ok],
        ]

    def to_json(self) -> dict[str, Any]:
        rate = {}
        if self.unit == "s" and self.nbytes:
            rate = {
                k: (self.nbytes / v / MB if v else None)
                for k, v in (("ours_mbps", self.ours), ("reference_mbps", self.reference))
            }
        return {
            "name": self.name, "unit": self.unit, "kacheryfs": self.ours, "reference": self.reference,
            "ratio": self.ratio, "target": self.target.describe(self.unit) if self.target else None,
            "ok": self.ok, "bytes": self.nbytes, **rate,
        }  # fmt: skip


def _format(value: float | None, unit: str, nbytes: int | None) -> str:
    if value is None:
        return "–"
    if unit == "s":
        rate = f" ({nbytes / value / MB:,.0f} MB/s)" if nbytes and value else ""
        return f"{value:.3f} s{rate}"
    if unit in ("ms", "µs", "MB"):
        return f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}"


class Table:
    """Prints rows as they are measured, in fixed columns."""

    HEAD = ("name", "kacheryfs", "reference", "ratio", "target", "ok")
    WIDTHS = (66, 24, 24, 6, 10, 3)

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out

    def line(self, cells: Iterable[str]) -> None:
        self.out(" | ".join(c.ljust(w) for c, w in zip(cells, self.WIDTHS, strict=True)).rstrip())

    def header(self) -> None:
        self.line(self.HEAD)
        self.line("-" * w for w in self.WIDTHS)


# -- running and timing --------------------------------------------------------------------
class Unavailable(Exception):
    """The feature a comparison measures is not in the code base yet."""


class CommandFailed(RuntimeError):
    pass


def tool(name: str) -> str:
    """A command's path: beside this Python (the installation measured, not a version
    manager's shim in front of it, which costs ~50 ms a start), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise Unavailable(f"`{name}` is not installed")
    return found


def run(
    cmd: list[str | Path], *, env: dict[str, str] | None = None, stdout: Any = subprocess.DEVNULL,
    stdin: Any = subprocess.DEVNULL, timeout: float = 3600, cwd: Path | None = None,
) -> str:  # fmt: skip
    """Run a command; CommandFailed with the end of its stderr when it fails. Returns stdout if piped."""
    argv = [str(c) for c in cmd]
    # stderr to a file, not a pipe: a daemon that inherits a pipe would keep us waiting for EOF
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run(argv, env=env, stdout=stdout, stdin=stdin, stderr=err, timeout=timeout, cwd=cwd)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
            raise CommandFailed(f"`{shlex.join(argv)}` exited {proc.returncode}: {' / '.join(tail)}")
    return proc.stdout.decode() if isinstance(proc.stdout, bytes) else ""


def timed(cmd: list[str | Path], **kwargs: Any) -> float:
    started = time.perf_counter()
    run(cmd, **kwargs)
    return time.perf_counter() - started


def stopwatch(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def read_file(path: Path) -> int:
    """Read a file sequentially in 1 MiB reads (to warm the page cache); bytes read."""
    buf = bytearray(CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def read_files(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            f.read()


def drop_file_cache(*paths: Path) -> None:
    """Evict these files' pages from the page cache (written back first, so they can go)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def touch_free_memory(nbytes: int) -> None:
    """Touch `nbytes` of fresh memory and free it again, just before a cold read.

    These VMs hand free memory back to the host (page reporting), and a page's first touch
    after that is slow: whichever side of a cold comparison filled its page cache first paid
    for it (the mount, which reads first, measured 0.37 of native in a full run, 1.14 in a
    run of its section alone). Freed just before, these pages are the ones the read gets, on
    both sides alike.
    """
    buffer = bytearray(nbytes)  # zero-filled: every page written
    del buffer


def drop_tree_cache(root: Path) -> None:
    drop_file_cache(*(Path(d) / f for d, _, files in os.walk(root) for f in files))


def drop_all_caches() -> None:
    """Drop page cache, dentries and inodes (for first-listing measurements); needs root."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise Unavailable(f"cannot drop caches ({err.strerror}): run as root") from err


def files_under(root: Path) -> list[Path]:
    return sorted(Path(d) / f for d, _, files in os.walk(root) for f in files)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)


def need_subcommand(*words: str) -> None:
    """Unavailable unless `kacheryfs WORDS --help` works."""
    try:
        run([tool("kacheryfs"), *words, "--help"], timeout=60)
    except CommandFailed as err:
        raise Unavailable(f"`kacheryfs {' '.join(words)}` does not exist yet") from err


def need_module(module: str, attr: str | None = None) -> None:
    try:
        mod = __import__(module, fromlist=["_"])
    except ImportError as err:
        raise Unavailable(f"cannot import {module} ({err})") from err
    if attr and not hasattr(mod, attr):
        raise Unavailable(f"{module} has no {attr} yet")


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for pos in range(0, size, CHUNK):
            f.write(os.urandom(min(CHUNK, size - pos)))
        os.fsync(f.fileno())
    return path


@functools.cache
def digests(path: Path) -> tuple[str, str]:
    """(sha1, md5) of a file."""
    sha1, md5 = hashlib.sha1(), hashlib.md5()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            sha1.update(chunk)
            md5.update(chunk)
    return sha1.hexdigest(), md5.hexdigest()


def blob_path(root: Path, alg: str, digest: str) -> Path:
    return root / alg / digest[0:2] / digest[2:4] / digest[4:6] / digest


def size_label(nbytes: int) -> str:
    return f"{nbytes / GIB:g} GiB" if nbytes >= GIB // 8 else f"{nbytes / (1 << 20):g} MiB"


# -- processes under test ------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    """A running storage server (kacheryfs or nginx) over `root`."""

    url: str
    pid: int
    root: Path

    def get_url(self, digest: str, alg: str = "sha1") -> str:
        return f"{self.url}/get/{alg}/{digest}?channel={SERVER_CHANNEL}"

    def set_url(self, digest: str) -> str:
        from urllib.parse import urlencode

        from kacheryfs.auth import signed_query

        query = signed_query(SERVER_CHANNEL, SERVER_PASSWORD, "upload", "sha1", digest)
        return f"{self.url}/set/sha1/{digest}?{urlencode(query)}"

    def reset_peak_rss(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5\n")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
        raise RuntimeError("no VmHWM in /proc status")


KACHERY_JSON = {
    "channels": [{
        "name": SERVER_CHANNEL, "password": SERVER_PASSWORD, "public": True,
        "downloadQuotas": [{"name": "all", "maxFileSize": 1e12, "maxSimultaneous": 1000,
                            "maxNumFilesPerDay": 1e9, "maxNumBytesPerDay": 1e15}],
        "uploadQuotas": [{"name": "all", "maxFileSize": 1e12, "maxSimultaneous": 100,
                          "maxNumFilesPerDay": 1e9, "maxNumBytesPerDay": 1e15}],
    }]
}  # fmt: skip


@contextlib.contextmanager
def kachery_server(b: Bench, root: Path) -> Iterator[Server]:
    """`python -m kacheryfs.server ROOT --port 0`, until the block ends."""
    need_module("kacheryfs.server.app")
    (root / "kachery.json").write_text(json.dumps(KACHERY_JSON))
    log = b.workdir / f"server-{root.name}.log"
    with open(log, "wb") as err:
        cmd = [sys.executable, "-m", "kacheryfs.server", str(root), "--host", "127.0.0.1", "--port", "0"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=b.env(b.workdir / "server-client"))
    try:
        url = ""

        def listening() -> bool:
            nonlocal url
            if proc.poll() is not None:
                raise CommandFailed(f"the kacheryfs server exited {proc.returncode}: {log.read_text()[-500:]}")
            for line in log.read_text(errors="replace").splitlines():
                if "listening on " in line:
                    url = line.split("listening on ", 1)[1].strip()
                    return True
            return False

        wait_for(listening, 30, "the kacheryfs server listening", interval=0.05)
        yield Server(url, proc.pid, root)
    finally:
        stop(proc)


NGINX_CONF = REPO / "docs" / "nginx.conf"  # the shipped config, templated: @ROOT@, @PORT@, @PREFIX@
NGINX_FALLBACK = """\
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/client_body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;
    sendfile on;
    tcp_nopush on;
    server {
        listen @PORT@;
        root @ROOT@;
        location ~ "^/get/(sha1|md5)/(([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})[0-9a-f]*)$" {
            try_files /$1/$3/$4/$5/$2 =404;
        }
    }
}
"""


@contextlib.contextmanager
def nginx_server(b: Bench, root: Path) -> Iterator[Server]:
    """nginx serving ROOT's blobs read-only under the /get/<alg>/<hash> rewrite."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        raise Unavailable("nginx is not installed")
    port = free_port()
    prefix = b.workdir / f"nginx-{port}"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    template = NGINX_CONF.read_text() if NGINX_CONF.exists() else NGINX_FALLBACK
    values = {"@ROOT@": str(root), "@PORT@": f"127.0.0.1:{port}", "@PREFIX@": str(prefix)}
    for key, value in values.items():
        template = template.replace(key, value)
    conf.write_text(template)
    with open(prefix / "stderr.log", "wb") as err:
        # `user root`: workers must read blobs under our 0700 temp dir
        cmd = [nginx, "-c", str(conf), "-p", str(prefix), "-g", "daemon off; user root;"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:

        def accepting() -> bool:
            if proc.poll() is not None:
                raise CommandFailed(f"nginx exited {proc.returncode}: {(prefix / 'stderr.log').read_text()[-500:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(accepting, 30, "nginx accepting connections", interval=0.05)
        yield Server(f"http://127.0.0.1:{port}", proc.pid, root)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Mount:
    path: Path
    start_ms: float  # from `kacheryfs mount` starting to the first successful stat


@contextlib.contextmanager
def mounted(b: Bench, storage: Path, config: Path, probe: str) -> Iterator[Mount]:
    """`kacheryfs mount` on a fresh mountpoint; unmounted when the block ends, whatever happens."""
    need_subcommand("mount")
    mnt = b.fresh_dir(f"mnt-{next(b.counter)}")
    env = b.env(storage, config)
    started = time.perf_counter()
    try:
        with open(b.workdir / "mount.log", "ab") as log:
            proc = subprocess.run(
                [tool("kacheryfs"), "mount", str(mnt), "--storage-dir", str(storage), "--config", str(config)],
                env=env, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, timeout=120,
            )  # fmt: skip
        if proc.returncode != 0:
            raise CommandFailed(f"`kacheryfs mount` exited {proc.returncode}: see {b.workdir / 'mount.log'}")

        def answers() -> bool:
            try:
                os.stat(mnt / probe)
            except OSError:
                return False
            return True

        wait_for(answers, 60, f"stat {probe} through the mount")
        yield Mount(mnt, (time.perf_counter() - started) * 1000)
    finally:
        unmount(mnt, env)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def unmount(mnt: Path, env: dict[str, str]) -> None:
    if not os.path.ismount(mnt):
        return
    with contextlib.suppress(CommandFailed, Unavailable, subprocess.TimeoutExpired):
        run([tool("kacheryfs"), "umount", str(mnt)], env=env, timeout=60)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], stderr=subprocess.DEVNULL, check=False)
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], stderr=subprocess.DEVNULL, check=False)


# -- the run's data and settings -----------------------------------------------------------
class Bench:
    """Settings, the temp dir, shared test data, and processes kept for one section."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.size = max(CHUNK, int(args.size_gib * GIB))
        self.files = args.files
        self.repeats = args.repeats or (1 if args.quick else 3)
        self.counter = iter(range(1_000_000))
        self.section_stack = contextlib.ExitStack()
        self._shared: dict[str, Any] = {}
        self.empty_config = self.config("empty", None)
        self.mount_config = self.make_mount_config("mount")

    # paths and environments
    def fresh_dir(self, name: str) -> Path:
        path = self.workdir / name
        if path.exists():
            for d, _, _ in os.walk(path):  # blobs and their folders may be read-only
                os.chmod(d, 0o755)
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def env(self, storage: Path, config: Path | None = None) -> dict[str, str]:
        """The environment of every kacheryfs process: an isolated store and config file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KACHERY_")}
        env.update(KACHERY_STORAGE_DIR=str(storage), KACHERY_CONFIG=str(config or self.empty_config))
        return env

    def config(self, name: str, server: Server | None) -> Path:
        """A client config.toml naming `server` as channel `bench`, read first."""
        path = self.workdir / f"config-{name}.toml"
        text = ""
        if server is not None:
            text = (
                f'fr = ["{CLIENT_CHANNEL}"]\n\n[channels.{CLIENT_CHANNEL}]\nurl = "{server.url}"\n'
                f'channel = "{SERVER_CHANNEL}"\npassword = "{SERVER_PASSWORD}"\n'
            )
        path.write_text(text)
        return path

    def make_mount_config(self, name: str, extra: str = "") -> Path:
        """A config.toml for the mount daemon (its log kept in the temp dir), plus `extra` TOML."""
        path = self.workdir / f"config-{name}.toml"
        path.write_text(f'[mount]\nlog_file = "{self.workdir / "mount-daemon.log"}"\n\n{extra}')
        return path

    def store(self, path: Path, storage: Path) -> str:
        """`kachery-store PATH` into `storage`; the URL it prints."""
        return run([tool("kachery-store"), path], env=self.env(storage), stdout=subprocess.PIPE).strip()

    # timing
    def pair(self, ours: Callable[[], float], reference: Callable[[], float]) -> tuple[float, float]:
        """Medians of both sides over the repeats, interleaved so drift hits both alike."""
        a, r = [], []
        for _ in range(self.repeats):
            a.append(ours())
            r.append(reference())
        return statistics.median(a), statistics.median(r)

    # data shared across sections (files only: processes live in section_stack)
    @functools.cached_property
    def big_file(self) -> Path:
        return random_file(self.workdir / "big.bin", self.size)

    @functools.cached_property
    def small_tree(self) -> Path:
        """`--files` files of 4 KiB in (up to) 100 directories."""
        root = self.workdir / "tree"
        ndirs = min(100, self.files)
        for i in range(self.files):
            d = root / f"dir{i % ndirs:03d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"file{i:05d}.dat").write_bytes(os.urandom(SMALL_FILE))
        os.sync()
        return root

    @functools.cached_property
    def client_store(self) -> tuple[Path, str, str]:
        """A store holding the big file and the small tree: (storage dir, file URL, dir URL)."""
        storage = self.fresh_dir("client-store")
        return storage, self.store(self.big_file, storage), self.store(self.small_tree, storage)

    def once(self, key: str, build: Callable[[], Any]) -> Any:
        """`build()`, called once per section (data or processes several comparisons share)."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def shared(self, key: str, factory: Callable[[], contextlib.AbstractContextManager[Any]]) -> Any:
        """A server (or other process) started once per section and stopped at its end."""
        return self.once(key, lambda: self.section_stack.enter_context(factory()))

    def end_section(self) -> None:
        self._shared.clear()
        self.section_stack.close()


Comparison = Callable[[Bench], Iterable[Measurement]]


# -- core (issue 2) ------------------------------------------------------------------------
def core_store_big(b: Bench) -> Iterable[Measurement]:
    src = b.big_file

    def ours() -> float:
        storage = b.fresh_dir("store-fresh")
        drop_file_cache(src)
        return timed([tool("kachery-store"), src], env=b.env(storage))

    def reference() -> float:
        drop_file_cache(src)
        return timed(["openssl", "dgst", "-md5", src])

    ours_s, ref_s = b.pair(ours, reference)
    name = f"kachery-store {size_label(b.size)} (cold) vs openssl dgst -md5"
    yield Measurement(name, "s", ours_s, ref_s, Target("<=", 1.15), nbytes=b.size)


def core_cat_big(b: Bench) -> Iterable[Measurement]:
    storage, url, _ = b.client_store
    blob = blob_path(storage, "sha1", digests(b.big_file)[0])
    for cold in (True, False):
        if not cold:
            read_file(blob)

        def ours(cold: bool = cold) -> float:
            if cold:
                drop_file_cache(blob)
            return timed([tool("kachery-cat"), url], env=b.env(storage))

        def reference(cold: bool = cold) -> float:
            if cold:
                drop_file_cache(blob)
            return timed(["cat", blob])

        ours_s, ref_s = b.pair(ours, reference)
        state = "cold" if cold else "warm"
        name = f"kachery-cat {size_label(b.size)} >/dev/null ({state}) vs cat blob"
        yield Measurement(name, "s", ours_s, ref_s, Target("<=", 1.3), nbytes=b.size)


def core_store_tree(b: Bench) -> Iterable[Measurement]:
    tree = b.small_tree
    read_files(files_under(tree))

    def ours() -> float:
        return timed([tool("kachery-store"), tree], env=b.env(b.fresh_dir("store-fresh")))

    def reference() -> float:
        return timed(["find", tree, "-type", "f", "-exec", "sha1sum", "{}", "+"])

    ours_s, ref_s = b.pair(ours, reference)
    name = f"kachery-store dir of {b.files:,} × 4 KiB (warm) vs find|sha1sum"
    yield Measurement(name, "files/s", b.files / ours_s, b.files / ref_s)


# -- server (issue 3) ----------------------------------------------------------------------
@dataclass(frozen=True)
class ServerData:
    root: Path
    big_sha1: str
    small_sha1s: list[str]


def server_data(b: Bench) -> ServerData:
    """A server directory holding the big file and 1,000 blobs of 64 KiB."""

    def build() -> ServerData:
        root = b.fresh_dir("server-root")
        small_dir = b.fresh_dir("server-small")
        small = []
        for i in range(1000):
            data = os.urandom(64 << 10)
            (small_dir / f"s{i:04d}.bin").write_bytes(data)
            small.append(hashlib.sha1(data).hexdigest())
        b.store(b.big_file, root)
        run([tool("kachery-store"), *sorted(small_dir.iterdir())], env=b.env(root))
        return ServerData(root, digests(b.big_file)[0], small)

    need_module("kacheryfs.server.app")
    return b.once("server-data", build)


def our_server(b: Bench) -> Server:
    return b.shared("kachery-server", lambda: kachery_server(b, server_data(b).root))


def nginx(b: Bench) -> Server:
    return b.shared("nginx", lambda: nginx_server(b, server_data(b).root))


def curl_get(url: str, out: Path | str = "/dev/null") -> float:
    return timed(["curl", "-sSf", "-o", out, url])


def server_load_big(b: Bench) -> Iterable[Measurement]:
    need_module("kacheryfs.remote", "HttpChannel")
    data, server = server_data(b), our_server(b)
    config = b.config("server", server)
    url = f"sha1://{data.big_sha1}/big.bin"
    read_file(blob_path(data.root, "sha1", data.big_sha1))
    out = b.workdir / "curl.out"

    def ours() -> float:
        storage = b.fresh_dir("store-fresh")
        return timed([tool("kachery-load"), url, "--fr", CLIENT_CHANNEL], env=b.env(storage, config))

    def reference() -> float:
        out.unlink(missing_ok=True)
        return curl_get(server.get_url(data.big_sha1), out)

    ours_s, ref_s = b.pair(ours, reference)
    out.unlink(missing_ok=True)
    name = f"kachery-load --fr {size_label(b.size)} vs curl -o (same server, warm)"
    yield Measurement(name, "s", ours_s, ref_s, Target("<=", 1.2), nbytes=b.size)


def server_vs_nginx_big(b: Bench) -> Iterable[Measurement]:
    data, ours_srv, ref_srv = server_data(b), our_server(b), nginx(b)
    read_file(blob_path(data.root, "sha1", data.big_sha1))
    ours_s, ref_s = b.pair(lambda: curl_get(ours_srv.get_url(data.big_sha1)),
                           lambda: curl_get(ref_srv.get_url(data.big_sha1)))  # fmt: skip
    name = f"server → curl {size_label(b.size)} vs nginx → curl (warm)"
    yield Measurement(name, "s", ours_s, ref_s, Target("<=", 1.3), nbytes=b.size)


def fetch_many(server: Server, digests_: list[str], workdir: Path, parallel: int = 64) -> float:
    """One curl fetching every blob over up to `parallel` connections at once; seconds."""
    conf = workdir / f"curl-many-{server.url.rsplit(':', 1)[1]}.conf"
    conf.write_text("".join(f'url = "{server.get_url(d)}"\noutput = "/dev/null"\n' for d in digests_))
    cmd = ["curl", "-s", "--parallel", "--parallel-immediate", "--parallel-max", str(parallel), "-K", conf,
           "-w", "%{http_code}\n"]  # fmt: skip
    started = time.perf_counter()
    codes = run(cmd, stdout=subprocess.PIPE).split()
    seconds = time.perf_counter() - started
    if codes.count("200") != len(digests_):
        raise CommandFailed(f"{len(digests_) - codes.count('200')} of {len(digests_)} fetches from {server.url} failed")
    return seconds


def server_concurrent_small(b: Bench) -> Iterable[Measurement]:
    data, ours_srv, ref_srv = server_data(b), our_server(b), nginx(b)
    n = len(data.small_sha1s)
    fetch_many(ours_srv, data.small_sha1s, b.workdir)  # warm both the files and the servers
    fetch_many(ref_srv, data.small_sha1s, b.workdir)
    ours_s, ref_s = b.pair(lambda: fetch_many(ours_srv, data.small_sha1s, b.workdir),
                           lambda: fetch_many(ref_srv, data.small_sha1s, b.workdir))  # fmt: skip
    yield Measurement(f"64 clients × {n:,} blobs of 64 KiB: server vs nginx", "req/s", n / ours_s, n / ref_s)


def server_upload_big(b: Bench) -> Iterable[Measurement]:
    need_module("kacheryfs.remote", "HttpChannel")
    data, server = server_data(b), our_server(b)
    config = b.config("server", server)
    src = b.big_file
    sha1, md5 = digests(src)
    ours_rss: list[float] = []
    ref_rss: list[float] = []

    def prepare() -> None:
        for alg, digest in (("sha1", sha1), ("md5", md5)):
            blob_path(data.root, alg, digest).unlink(missing_ok=True)
        drop_file_cache(src)
        server.reset_peak_rss()

    def ours() -> float:
        storage = b.fresh_dir("store-fresh")
        prepare()
        seconds = timed([tool("kachery-store"), src, "--to", CLIENT_CHANNEL], env=b.env(storage, config))
        ours_rss.append(server.peak_rss_mb())
        return seconds

    def reference() -> float:
        prepare()
        # -T streams the file (--data-binary @file reads it into memory, at most 1 GiB);
        # `Expect:` off, or curl waits for a 100-continue before sending
        seconds = timed(["curl", "-sSf", "-X", "POST", "-H", "Expect:", "-T", src, server.set_url(sha1)])
        ref_rss.append(server.peak_rss_mb())
        return seconds

    ours_s, ref_s = b.pair(ours, reference)
    if not blob_path(data.root, "sha1", sha1).exists():
        raise CommandFailed("the upload did not leave the blob on the server")
    yield Measurement(f"kachery-store --to {size_label(b.size)} vs curl -T POST (cold)", "s",
                      ours_s, ref_s, Target("<=", 1.3), nbytes=b.size)  # fmt: skip
    rss_target = Target("<", 150, "value")
    yield Measurement("server peak RSS during that upload", "MB", max(ours_rss), max(ref_rss), rss_target)


# -- mount (issue 4) -----------------------------------------------------------------------
def _big_reads(b: Bench, config: Path) -> dict[str, float]:
    """Medians of reading the big blob through a mount made with `config`, beside the store's own file."""
    storage, _, _ = b.client_store
    sha1 = digests(b.big_file)[0]
    blob = blob_path(storage, "sha1", sha1)
    probe = f"sha1/{sha1}"
    rows: dict[str, list[float]] = {k: [] for k in ("cold", "cold_n", "backing", "reread", "warm_n", "start")}

    def cat_mbps(path: Path) -> float:
        # cat, as any program reads (128 KiB reads): the reader the issue's native figures came from
        return b.size / timed(["cat", path]) / MB

    for _ in range(b.repeats):
        drop_file_cache(blob)
        with mounted(b, storage, config, probe) as m:
            rows["start"].append(m.start_ms)
            touch_free_memory(b.size)
            rows["cold"].append(cat_mbps(m.path / probe))
        drop_file_cache(blob)
        touch_free_memory(b.size)
        rows["cold_n"].append(cat_mbps(blob))
        with mounted(b, storage, config, probe) as m:  # a new mount: empty FUSE page cache
            rows["backing"].append(cat_mbps(m.path / probe))
            rows["reread"].append(cat_mbps(m.path / probe))
        rows["warm_n"].append(cat_mbps(blob))
    return {k: statistics.median(v) for k, v in rows.items()}


def mount_big_reads(b: Bench) -> Iterable[Measurement]:
    med = _big_reads(b, b.mount_config)
    size = size_label(b.size)
    yield Measurement(f"first read {size} via mount vs native (both cold)", "MB/s", med["cold"], med["cold_n"],
                      Target(">=", 0.7))  # fmt: skip
    yield Measurement(f"first read {size} via mount, blob in page cache vs native warm", "MB/s", med["backing"],
                      med["warm_n"], Target(">=", 0.2))  # fmt: skip
    yield Measurement(f"re-read {size} via mount vs native warm", "MB/s", med["reread"],
                      med["warm_n"], Target(">=", 0.45))  # fmt: skip
    yield Measurement("mount start → first successful stat", "ms", med["start"])


def mount_big_reads_by_daemon(b: Bench) -> Iterable[Measurement]:
    """The same reads with passthrough off: what a mount gets without root or on a kernel before 6.9."""
    med = _big_reads(b, b.make_mount_config("daemon-reads", "passthrough = false\n"))
    size = size_label(b.size)
    yield Measurement(f"  the same, daemon reads: first read {size} (both cold)", "MB/s", med["cold"], med["cold_n"])
    yield Measurement("  the same, daemon reads: blob in page cache vs warm", "MB/s", med["backing"], med["warm_n"])
    yield Measurement("  the same, daemon reads: re-read (FUSE page cache)", "MB/s", med["reread"], med["warm_n"])


def _snapshot_dir(mnt: Path, dir_url: str) -> Path:
    # sha1dir://<hash>.<label> → <mnt>/sha1dir/<hash>.<label>
    return mnt / "sha1dir" / dir_url.removeprefix("sha1dir://").rstrip("/")


def _tree_times(b: Bench, config: Path, kinds: tuple[str, ...]) -> dict[str, float]:
    """Medians of `ls -lR` ("ls") and of reading every file ("rd") of the small tree, twice each,
    through a fresh mount made with `config` and on local disk (the `_n` keys)."""
    storage, _, dir_url = b.client_store
    tree = b.small_tree
    probe = str(_snapshot_dir(Path(), dir_url))
    rel = [p.relative_to(tree) for p in files_under(tree)]
    ls = ["ls", "-lR"]
    t: dict[str, list[float]] = {f"{k}{i}{n}": [] for k in kinds for i in (1, 2) for n in ("", "_n")}
    for _ in range(b.repeats):
        for kind in kinds:
            with mounted(b, storage, config, probe) as m:
                snap = _snapshot_dir(m.path, dir_url)
                drop_all_caches()
                if kind == "ls":
                    t["ls1"].append(timed([*ls, snap]))
                    t["ls2"].append(timed([*ls, snap]))
                else:
                    paths = [snap / p for p in rel]
                    t["rd1"].append(stopwatch(lambda paths=paths: read_files(paths)))
                    t["rd2"].append(stopwatch(lambda paths=paths: read_files(paths)))
            drop_all_caches()
            if kind == "ls":
                t["ls1_n"].append(timed([*ls, tree]))
                t["ls2_n"].append(timed([*ls, tree]))
            else:
                paths = [tree / p for p in rel]
                t["rd1_n"].append(stopwatch(lambda paths=paths: read_files(paths)))
                t["rd2_n"].append(stopwatch(lambda paths=paths: read_files(paths)))
    return {k: statistics.median(v) for k, v in t.items()}


def mount_tree(b: Bench) -> Iterable[Measurement]:
    med = _tree_times(b, b.mount_config, ("ls", "rd"))
    what = f"{b.files:,} files / {min(100, b.files)} dirs"
    yield Measurement(f"ls -lR {what}, first (cold) vs local disk", "s", med["ls1"], med["ls1_n"], Target("<=", 3))
    yield Measurement(f"ls -lR {what}, again vs local disk", "s", med["ls2"], med["ls2_n"], Target("<=", 1.5))
    yield Measurement(f"read all {b.files:,} × 4 KiB via mount (cold) vs local disk", "s", med["rd1"], med["rd1_n"],
                      Target("<=", 5))  # fmt: skip
    yield Measurement(f"read all {b.files:,} × 4 KiB via mount (warm) vs local disk", "s", med["rd2"], med["rd2_n"],
                      Target("<=", 5))  # fmt: skip


def mount_tree_by_daemon(b: Bench) -> Iterable[Measurement]:
    """The small files again with passthrough off: no open or close reaches the daemon."""
    med = _tree_times(b, b.make_mount_config("daemon-reads", "passthrough = false\n"), ("rd",))
    yield Measurement(f"  the same, daemon reads: {b.files:,} × 4 KiB (cold)", "s", med["rd1"], med["rd1_n"])
    yield Measurement(f"  the same, daemon reads: {b.files:,} × 4 KiB (warm)", "s", med["rd2"], med["rd2_n"])


def _round_trip_us(cpu_a: int, cpu_b: int) -> float:
    """Microseconds per wake-up round trip between two processes on these CPUs (the mount's own measure)."""
    need_module("kacheryfs.mount.wakeup", "round_trip_us")
    from kacheryfs.mount.wakeup import round_trip_us

    return round_trip_us(cpu_a, cpu_b, trips=2000)


def mount_wakeup_floor(b: Bench) -> Iterable[Measurement]:
    """What one request to the daemon costs at least: a reader wakes the daemon and waits to be woken.

    With passthrough each open of a small file is such a round trip (its close another,
    answered without the reader waiting); the kernel runs the daemon's thread on whichever
    CPU it finds, so the trip is mostly one between two CPUs.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise Unavailable("one CPU: no round trip between two")
    two, one = _round_trip_us(cpus[0], cpus[1]), _round_trip_us(cpus[0], cpus[0])
    yield Measurement("  a wake-up round trip between two processes: two CPUs vs one", "µs", two, one)


@contextlib.contextmanager
def _cpu_latency_request(microseconds: int) -> Iterator[None]:
    """The kernel's CPU latency request held at `microseconds` for the duration (0: idle CPUs poll)."""
    need_module("kacheryfs.mount.idle_poll", "CPU_LATENCY")
    from kacheryfs.mount.idle_poll import CPU_LATENCY

    try:
        fd = os.open(CPU_LATENCY, os.O_WRONLY)
    except OSError as err:
        raise Unavailable(f"no CPU latency request ({err.strerror}): run as root") from err
    try:
        os.write(fd, struct.pack("i", microseconds))
        yield
    finally:
        os.close(fd)


def mount_tree_without_idle_polling(b: Bench) -> Iterable[Measurement]:
    """The small files with idle polling off (`idle_poll = false`), and the wake-up round trip
    with idle CPUs polling: what the mount's idle polling buys on this machine (a report).

    Each open through a mount with passthrough is a round trip to the daemon; where idle
    CPUs halt at once, waking one is most of its cost.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise Unavailable("one CPU: no round trip between two")
    with _cpu_latency_request(0):
        polling = _round_trip_us(cpus[0], cpus[1])
    yield Measurement("  idle CPUs polling: a wake-up round trip, two CPUs", "µs", polling, None)
    med = _tree_times(b, b.make_mount_config("no-idle-poll", "idle_poll = false\n"), ("rd",))
    yield Measurement(f"  the same, idle polling off: {b.files:,} × 4 KiB (cold)", "s", med["rd1"], med["rd1_n"])
    yield Measurement(f"  the same, idle polling off: {b.files:,} × 4 KiB (warm)", "s", med["rd2"], med["rd2_n"])


_NOBODY = 65534
_READ_TWICE = """
import sys, time
paths = open(sys.argv[1]).read().split("\\n")
for _ in range(2):
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            f.read()
    print(time.perf_counter() - started, flush=True)
"""


@contextlib.contextmanager
def _dev_fuse_open_to_users() -> Iterator[None]:
    """/dev/fuse readable and writable by all for the duration (the mode distributions give it)."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", mode | 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


def mount_tree_as_user(b: Bench) -> Iterable[Measurement]:
    """The small files through a mount made by a user, not root (nobody): staging shares the
    hash views' connection, so every open of a blob is a request (a report, not a target)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not os.path.exists("/dev/fuse"):
        raise Unavailable("needs root, setpriv and /dev/fuse to mount as nobody")
    tree = b.small_tree
    # A folder of its own the user can reach: fusermount3 checks the mountpoint as the user.
    base = Path(tempfile.mkdtemp(prefix="kacheryfs-bench-user-", dir=b.workdir.parent))
    b.section_stack.callback(shutil.rmtree, base, ignore_errors=True)
    base.chmod(0o755)
    storage, mnt, home = base / "store", base / "mnt", base / "home"
    for d in (mnt, home):
        d.mkdir()
    dir_url = b.store(tree, storage)
    for d, dirs, files in os.walk(base):
        for name in [d, *(os.path.join(d, n) for n in dirs + files)]:
            os.lchown(name, _NOBODY, _NOBODY)
    snap = _snapshot_dir(mnt, dir_url)
    listing = base / "paths.txt"
    listing.write_text("\n".join(str(snap / p.relative_to(tree)) for p in files_under(tree)))
    # It may read any file (to run this Python wherever it is installed); nothing else of root's.
    as_user = [setpriv, "--reuid", str(_NOBODY), "--regid", str(_NOBODY), "--clear-groups",
               "--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search"]  # fmt: skip
    env = {**b.env(storage), "HOME": str(home)}
    kacheryfs = [*as_user, sys.executable, "-m", "kacheryfs"]
    ours: dict[str, list[float]] = {"cold": [], "warm": []}
    native: dict[str, list[float]] = {"cold": [], "warm": []}
    local = files_under(tree)
    with _dev_fuse_open_to_users():
        for _ in range(b.repeats):
            run([*kacheryfs, "mount", str(mnt), "--storage-dir", str(storage)], env=env, cwd=base, timeout=120)
            try:
                drop_all_caches()
                out = run([*as_user, sys.executable, "-c", _READ_TWICE, str(listing)], env=env, cwd=base,
                          stdout=subprocess.PIPE, timeout=600)  # fmt: skip
            finally:
                subprocess.run([*kacheryfs, "umount", str(mnt)], env=env, cwd=base, capture_output=True, timeout=60)
            cold, warm = (float(x) for x in out.split())
            ours["cold"].append(cold)
            ours["warm"].append(warm)
            drop_all_caches()
            native["cold"].append(stopwatch(lambda: read_files(local)))
            native["warm"].append(stopwatch(lambda: read_files(local)))
    label = f"  a user's mount (not root; staging on its connection): {b.files:,} × 4 KiB"
    for kind in ("cold", "warm"):
        yield Measurement(f"{label} ({kind})", "s", statistics.median(ours[kind]), statistics.median(native[kind]))


# -- staging (issue 5) ---------------------------------------------------------------------
@contextlib.contextmanager
def staging_mount(b: Bench) -> Iterator[Path]:
    """A fresh store mounted; its staging/ directory (Unavailable when the mount has none)."""
    storage = b.fresh_dir("staging-store")
    with mounted(b, storage, b.mount_config, "sha1") as m:
        staging = m.path / "staging"
        if not staging.is_dir():
            raise Unavailable("the mount has no staging/ directory")
        yield staging


def wait_for_url(path: Path, timeout: float = 300) -> None:
    def has_url() -> bool:
        try:
            return bool(os.getxattr(path, "user.kachery.url"))
        except OSError:
            return False

    wait_for(has_url, timeout, f"user.kachery.url on {path}", interval=0.0005)


def staging_cp_big(b: Bench) -> Iterable[Measurement]:
    need_subcommand("mount")
    src = b.big_file
    url_ms: list[float] = []

    def ours() -> float:
        with staging_mount(b) as staging:
            drop_file_cache(src)
            seconds = timed(["cp", src, staging / "big.bin"])
            url_ms.append(stopwatch(lambda: wait_for_url(staging / "big.bin")) * 1000)
        return seconds

    def reference() -> float:
        dest = b.fresh_dir("cp-dest")
        drop_file_cache(src)
        return timed(["cp", src, dest / "big.bin"])

    ours_s, ref_s = b.pair(ours, reference)
    size = size_label(b.size)
    yield Measurement(f"cp {size} into staging vs cp to local dir (cold)", "s", ours_s, ref_s, Target("<=", 2),
                      nbytes=b.size)  # fmt: skip
    yield Measurement(f"cp returns → user.kachery.url answers ({size})", "ms", statistics.median(url_ms),
                      target=Target("<", 50, "value"))  # fmt: skip


def staging_cp_tree(b: Bench) -> Iterable[Measurement]:
    need_subcommand("mount")
    tree = b.small_tree
    read_files(files_under(tree))

    def ours() -> float:
        with staging_mount(b) as staging:
            return timed(["cp", "-r", tree, staging / "tree"])

    def reference() -> float:
        return timed(["cp", "-r", tree, b.fresh_dir("cp-dest") / "tree"])

    ours_s, ref_s = b.pair(ours, reference)
    yield Measurement(f"cp -r {b.files:,} × 4 KiB into staging vs local dir (warm)", "s", ours_s, ref_s)


# -- ops (issue 6) -------------------------------------------------------------------------
def ops_prefetch(b: Bench) -> Iterable[Measurement]:
    need_subcommand("prefetch")
    need_module("kacheryfs.remote", "HttpChannel")
    count = 1000 if b.size >= GIB else max(20, int(1000 * b.size / GIB))
    src = b.fresh_dir("prefetch-src")
    hashes = []
    for i in range(count):
        data = os.urandom(CHUNK)
        (src / f"f{i:04d}.bin").write_bytes(data)
        hashes.append(hashlib.sha1(data).hexdigest())
    root = b.fresh_dir("prefetch-server")
    dir_url = b.store(src, root)
    server = b.shared("prefetch-server", lambda: kachery_server(b, root))
    config = b.config("prefetch", server)
    drop_tree_cache(src)
    read_files(files_under(root))
    urls = b.workdir / "prefetch-urls.txt"

    def ours() -> float:
        storage = b.fresh_dir("store-fresh")
        cmd = [tool("kacheryfs"), "prefetch", dir_url, "--fr", CLIENT_CHANNEL, "--jobs", "8"]
        return timed(cmd, env=b.env(storage, config))

    def reference() -> float:
        out = b.fresh_dir("prefetch-curl")
        urls.write_text("".join(f"-o {out / h} {server.get_url(h)}\n" for h in hashes))
        with open(urls) as stdin:
            return timed(["xargs", "-P8", "-L1", "curl", "-sSf"], stdin=stdin)

    ours_s, ref_s = b.pair(ours, reference)
    name = f"kacheryfs prefetch sha1dir {count:,} × 1 MiB vs xargs -P8 curl"
    yield Measurement(name, "s", ours_s, ref_s, Target("<=", 1.3), nbytes=count * CHUNK)


def ops_fsck(b: Bench) -> Iterable[Measurement]:
    need_subcommand("fsck")
    storage = b.fresh_dir("fsck-store")
    for i in range(4):  # 4 × --size-gib
        src = random_file(b.workdir / f"fsck-{i}.bin", b.size)
        b.store(src, storage)
        src.unlink()
    blobs = storage / "sha1"  # md5/ holds hard links to the same blobs: hash each once

    def ours() -> float:
        drop_tree_cache(storage)
        return timed([tool("kacheryfs"), "fsck"], env=b.env(storage))

    def reference() -> float:
        drop_tree_cache(storage)
        return timed(["find", blobs, "-type", "f", "-exec", "sha1sum", "{}", "+"])

    ours_s, ref_s = b.pair(ours, reference)
    name = f"kacheryfs fsck of a {size_label(4 * b.size)} store vs find|sha1sum (cold)"
    yield Measurement(name, "s", ours_s, ref_s, Target("<=", 1.1), nbytes=4 * b.size)


def ops_recency_overhead(b: Bench) -> Iterable[Measurement]:
    need_subcommand("mount")
    from kacheryfs.config import Config

    if "track_access" not in Config.__dataclass_fields__:
        raise Unavailable("no track_access setting to turn recency tracking off")
    storage, _, dir_url = b.client_store
    rel = [p.relative_to(b.small_tree) for p in files_under(b.small_tree)]
    probe = str(_snapshot_dir(Path(), dir_url))

    def reread(track: bool) -> float:
        config = b.make_mount_config(f"track-{track}", f"[cache]\ntrack_access = {str(track).lower()}\n")
        with mounted(b, storage, config, probe) as m:
            paths = [_snapshot_dir(m.path, dir_url) / p for p in rel]
            read_files(paths)
            return stopwatch(lambda: read_files(paths))

    ours_s, ref_s = b.pair(lambda: reread(True), lambda: reread(False))
    name = f"re-read {b.files:,} × 4 KiB via mount: access tracking on vs off"
    yield Measurement(name, "s", ours_s, ref_s, Target("<=", 1.05))


# -- sections ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    name: str
    issue: int
    title: str
    comparisons: tuple[Comparison, ...]


SECTIONS = {
    s.name: s
    for s in (
        Section("core", 2, "local store and CLI", (core_store_big, core_cat_big, core_store_tree)),
        Section("server", 3, "storage server and client",
                (server_load_big, server_vs_nginx_big, server_concurrent_small, server_upload_big)),
        Section("mount", 4, "the FUSE mount",
                (mount_big_reads, mount_big_reads_by_daemon, mount_tree, mount_tree_by_daemon, mount_tree_as_user,
                 mount_wakeup_floor, mount_tree_without_idle_polling)),
        Section("staging", 5, "the staging directory", (staging_cp_big, staging_cp_tree)),
        Section("ops", 6, "prefetch, fsck, recency tracking", (ops_prefetch, ops_fsck, ops_recency_overhead)),
    )
}  # fmt: skip


def run_section(b: Bench, section: Section, out: Callable[[str], None]) -> dict[str, Any]:
    """Every comparison of a section; a missing feature or a failure is reported and the run goes on."""
    table = Table(out)
    out(f"\n== {section.name} (issue {section.issue}: {section.title})")
    rows: list[Measurement] = []
    unavailable: list[str] = []
    errors: list[str] = []
    header_done = False
    try:
        for comparison in section.comparisons:
            try:
                for m in comparison(b):
                    if not header_done:
                        table.header()
                        header_done = True
                    table.line(m.cells())
                    rows.append(m)
            except Unavailable as err:
                unavailable.append(f"{comparison.__name__}: {err}")
                out(f"{section.name}: not available yet ({comparison.__name__}: {err})")
            except Exception as err:  # a failing comparison must not stop the others
                errors.append(f"{comparison.__name__}: {type(err).__name__}: {err}")
                out(f"{section.name}: {comparison.__name__} FAILED: {type(err).__name__}: {err}")
                if not isinstance(err, (CommandFailed, TimeoutError, subprocess.TimeoutExpired)):
                    traceback.print_exc()
    finally:
        b.end_section()
    return {
        "issue": section.issue,
        "available": bool(rows),
        "measurements": [m.to_json() for m in rows],
        "unavailable": unavailable,
        "errors": errors,
    }


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "root": os.geteuid() == 0, "commit": commit, "load_avg": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repeat instead of three")
    p.add_argument("--only", metavar="SECTION,...", help=f"sections to run (default all: {', '.join(SECTIONS)})")
    p.add_argument("--size-gib", type=float, default=1.0, help="size of the big file (default 1)")
    p.add_argument("--files", type=int, default=10_000, help="files in the small-file tree (default 10000)")
    p.add_argument("--repeats", type=int, help="repeats per measurement (default 3, or 1 with --quick)")
    p.add_argument("--json", metavar="OUT", type=Path, help="also write the results as JSON")
    p.add_argument("--workdir", type=Path, help="parent of the temp dir (default: the system temp dir, /tmp)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.size_gib <= 0 or args.files < 1:
        p.error("--size-gib and --files must be positive")
    return args


def compile_package() -> None:
    """Byte-compile the kacheryfs measured, as pip does at a regular install: an editable one
    under PYTHONDONTWRITEBYTECODE would otherwise compile its changed modules at every start."""
    spec = importlib.util.find_spec("kacheryfs")
    if spec is not None and spec.submodule_search_locations:
        for where in spec.submodule_search_locations:
            compileall.compile_dir(where, quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` blocks stop servers and mounts

    def out(line: str) -> None:
        print(line, flush=True)

    compile_package()
    info = machine()
    started = datetime.datetime.now().astimezone()
    out(f"kacheryfs bench — {started:%Y-%m-%d %H:%M %Z} — commit {info['commit']}")
    out(
        f"machine: {info['nproc']} CPU ({info['cpu']}), {info['mem_gib']} GiB RAM, kernel {info['kernel']}, "
        f"Python {info['python']}, load average {info['load_avg']} at start"
        f"{'' if info['root'] else ', NOT root: cold-cache and mount rows will fail'}"
    )
    out(f"settings: big file {size_label(max(CHUNK, int(args.size_gib * GIB)))}, {args.files:,} small files, "
        f"median of {args.repeats or (1 if args.quick else 3)}; ratio = kacheryfs / reference "
        "(time: lower is better; rate: higher is better); MB/s = 10^6 B/s")  # fmt: skip
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kacheryfs-bench-", dir=args.workdir) as tmp:
        bench = Bench(args, Path(tmp))
        try:
            for name in args.sections:
                results[name] = run_section(bench, SECTIONS[name], out)
        finally:
            bench.end_section()
            for d, _, _ in os.walk(tmp):  # read-only blob folders would stop the cleanup
                with contextlib.suppress(OSError):
                    os.chmod(d, 0o755)
    if args.json:
        args.json.write_text(json.dumps({"date": started.isoformat(), "machine": info, "sections": results}, indent=2))
    missed = [m["name"] for r in results.values() for m in r["measurements"] if m["ok"] is False]
    out(f"\ntargets missed: {len(missed)}" + "".join(f"\n  - {n}" for n in missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
