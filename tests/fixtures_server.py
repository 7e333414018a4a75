"""Real servers for the server and channel tests: `kacheryfs serve` processes, nginx, a silent
socket, and a scripted server that misbehaves on purpose.

Everything listens on 127.0.0.1 only and is stopped by its fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "lab-secret"
PUBLIC_PASSWORD = "public-uploads"


def quota(
    name: str = "all", max_file_size: int = 10**9, simultaneous: int = 4, files: int = 1000, nbytes: int = 10**10
) -> dict:
    return {
        "name": name,
        "maxFileSize": max_file_size,
        "maxSimultaneous": simultaneous,
        "maxNumFilesPerDay": files,
        "maxNumBytesPerDay": nbytes,
    }


DEFAULT_CHANNELS = [
    {"name": "lab", "password": PASSWORD, "downloadQuotas": [quota()], "uploadQuotas": [quota()]},
    {"name": "public", "password": PUBLIC_PASSWORD, "public": True, "downloadQuotas": [quota()]},
    {"name": "readonly", "password": PASSWORD, "downloadQuotas": [quota()], "uploadQuotas": []},
    {"name": "tiny", "password": PASSWORD, "downloadQuotas": [quota()], "uploadQuotas": [quota(max_file_size=1000)]},
]


def write_config(directory: Path, channels: list[dict]) -> None:
    (directory / "kachery.json").write_text(json.dumps({"channels": channels}))


class ServerProcess:
    """`python -m kacheryfs.server DIR` in a subprocess; its stderr is collected in `log`.

    `command` runs it another way, e.g. `("-m", "kacheryfs", "serve")` as the CLI does.
    """

    def __init__(
        self,
        directory: Path,
        port: int = 0,
        options: tuple[str, ...] = (),
        command: tuple[str, ...] = ("-m", "kacheryfs.server"),
    ) -> None:
        self.directory = directory
        env = {k: v for k, v in os.environ.items() if k != "KACHERY_LOG_LEVEL"}
        env["PYTHONPATH"] = str(REPO)
        self.proc = subprocess.Popen(
            [sys.executable, *command, str(directory), "--port", str(port), *options],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.log: list[str] = []
        first = self._read_until_listening()
        self.url = first.rsplit(" ", 1)[1]
        self.port = int(self.url.rsplit(":", 1)[1])
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _read_until_listening(self) -> str:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # ends when the process exits
            self.log.append(line)
            if "listening on" in line:
                return line.strip()
        raise RuntimeError("server did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def readable_tempdir() -> Path:
    """A temp dir nginx's unprivileged workers can read (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="kacheryfs-test-"))
    path.chmod(0o755)
    return path


@pytest.fixture
def server_dir() -> Iterator[Path]:
    directory = readable_tempdir()
    write_config(directory, DEFAULT_CHANNELS)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def full_disk_dir() -> Iterator[Path]:
    """A server dir on a 1 MiB tmpfs (needs root), with the default channels."""
    directory = readable_tempdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)], check=True)
    write_config(directory, DEFAULT_CHANNELS)
    yield directory
    subprocess.run(["umount", str(directory)], check=True)
    directory.rmdir()


@pytest.fixture
def server(server_dir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(server_dir)
    yield process
    process.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is required in CI: apt-get install nginx-light")
        pytest.skip("nginx is not installed")
    return found


class NginxProcess:
    """nginx in the foreground with its conf, pid, logs and temp files under `prefix`."""

    def __init__(self, conf: str, prefix: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        conf_path = prefix / "nginx.conf"
        conf_path.write_text(conf)
        self.proc = subprocess.Popen(
            [nginx_binary(), "-c", str(conf_path), "-p", str(prefix), "-g", "daemon off;"],
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError as err:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    reason = self.proc.stderr.read() if self.proc.stderr else ""
                    raise RuntimeError(f"nginx did not start: {reason}") from err
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def start_nginx(conf_template: str, root: Path, prefix: Path) -> NginxProcess:
    """Fill in a conf with @ROOT@, @PORT@ and @PREFIX@ and start nginx on it."""
    port = free_port()
    conf = conf_template.replace("@ROOT@", str(root)).replace("@PREFIX@", str(prefix))
    return NginxProcess(conf.replace("@PORT@", f"127.0.0.1:{port}"), prefix, port)


@pytest.fixture
def static_server(server_dir: Path, tmp_path: Path) -> Iterator[NginxProcess]:
    """docs/nginx.conf serving `server_dir` read-only."""
    process = start_nginx((REPO / "docs" / "nginx.conf").read_text(), server_dir, tmp_path)
    yield process
    process.stop()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: the URL of it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return  # the listener was closed

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in held:
        conn.close()


Respond = Callable[[BaseHTTPRequestHandler], None]


class ScriptedServer:
    """An HTTP server whose every answer is written by `respond(handler)`: a channel that misbehaves."""

    def __init__(self, respond: Respond) -> None:
        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                try:
                    respond(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading, as it should

            do_GET = do_HEAD = do_POST = answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def scripted_server() -> Iterator[Callable[[Respond], ScriptedServer]]:
    """Start ScriptedServers; all are stopped at the end of the test."""
    started: list[ScriptedServer] = []

    def start(respond: Respond) -> ScriptedServer:
        started.append(ScriptedServer(respond))
        return started[-1]

    yield start
    for server in started:
        server.stop()
