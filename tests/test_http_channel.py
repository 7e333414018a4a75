"""HttpChannel against real servers: kacheryfs serve, nginx (static and as a proxy), dead and silent ones."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import tracemalloc
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from fixtures_server import (
    PASSWORD,
    PUBLIC_PASSWORD,
    REPO,
    NginxProcess,
    Respond,
    ScriptedServer,
    ServerProcess,
    free_port,
    quota,
    start_nginx,
)
from fixtures_server import write_config as write_server_config

from kacheryfs.errors import (
    AuthError,
    ChannelBusy,
    ChannelUnavailable,
    Forbidden,
    HashMismatch,
    KacheryError,
    NotFound,
    QuotaExceeded,
    StoreFull,
    TooLarge,
)
from kacheryfs.remote import Channel, HttpChannel
from kacheryfs.store import BlobWriter, LocalStore

pytestmark = pytest.mark.timeout(90)
DATA = os.urandom(3 << 20)
SHA1 = hashlib.sha1(DATA).hexdigest()


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "local")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    return path


def lab(url: str, channel: str = "lab", password: str | None = PASSWORD, timeout: float = 10.0) -> HttpChannel:
    return HttpChannel("lab-server", url, channel, password, timeout=timeout)


def put_on_server(server_dir: Path, data: bytes) -> str:
    return LocalStore(server_dir, clean=False).put_bytes(data).sha1


@pytest.fixture(autouse=True, params=["through the page cache", "received in place"])
def receive(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: blobs written the ordinary way, and read from the socket straight into
    the O_DIRECT ring (direct.Sink) in 1 MiB buffers, as blobs of 64 MiB and more are."""
    from kacheryfs.store import direct

    if request.param == "received in place":
        monkeypatch.setattr(direct, "MIN_SIZE", 1)
        monkeypatch.setattr(direct, "CHUNK", 1 << 20)
    else:
        monkeypatch.setattr(direct, "MIN_SIZE", 1 << 62)
    return request.param


def fetch_into(channel: HttpChannel, local: LocalStore, digest: str, size: int | None = None, **kw: object) -> None:
    with local.writer(size_hint=size) as writer:
        channel.fetch("sha1", digest, writer, expected_size=size, **kw)  # type: ignore[arg-type]
        writer.commit(expect_alg="sha1", expect_hash=digest, expect_size=size)


def test_http_channel_is_a_channel() -> None:
    channel: Channel = lab("http://127.0.0.1:1")
    assert channel.name == "lab-server"


def test_upload_then_check_and_fetch(server: ServerProcess, local: LocalStore, data_file: Path) -> None:
    channel = lab(server.url)
    assert channel.check("sha1", SHA1) is None
    assert channel.upload("sha1", SHA1, data_file, len(DATA)) is True
    assert channel.check("sha1", SHA1) == len(DATA)
    fetch_into(channel, local, SHA1, len(DATA))
    assert local.open("sha1", SHA1).read() == DATA


def test_upload_skips_a_blob_the_channel_has(server: ServerProcess, data_file: Path) -> None:
    channel = lab(server.url)
    channel.upload("sha1", SHA1, data_file, len(DATA))
    assert channel.upload("sha1", SHA1, data_file, len(DATA)) is False


def test_upload_and_fetch_report_progress(server: ServerProcess, local: LocalStore, data_file: Path) -> None:
    sent: list[int] = []
    received: list[int] = []
    channel = lab(server.url)
    channel.upload("sha1", SHA1, data_file, len(DATA), progress=sent.append)
    fetch_into(channel, local, SHA1, progress=received.append)
    assert sum(sent) == sum(received) == len(DATA)


def test_a_download_of_unknown_size_goes_in_place_once_its_length_is_known(
    server: ServerProcess, server_dir: Path, local: LocalStore, receive: str
) -> None:
    digest = put_on_server(server_dir, DATA)
    with local.writer() as writer:  # no size hint: a sha1:// URL names no size
        lab(server.url).fetch("sha1", digest, writer)
        assert (writer.space() is not None) == (receive == "received in place")  # from the Content-Length
        writer.commit(expect_alg="sha1", expect_hash=digest, expect_size=len(DATA))
    assert local.open("sha1", digest).read() == DATA


def test_fetch_of_a_missing_blob_is_not_found(server: ServerProcess, local: LocalStore) -> None:
    with pytest.raises(NotFound), local.writer() as writer:
        lab(server.url).fetch("sha1", SHA1, writer)


def test_fetch_of_the_wrong_size_is_a_mismatch(server: ServerProcess, server_dir: Path, local: LocalStore) -> None:
    put_on_server(server_dir, DATA)
    with pytest.raises(HashMismatch), local.writer() as writer:
        lab(server.url).fetch("sha1", SHA1, writer, expected_size=len(DATA) + 1)


def test_read_range_returns_the_bytes_asked_for(server: ServerProcess, server_dir: Path) -> None:
    put_on_server(server_dir, DATA)
    channel = lab(server.url)
    assert channel.read_range("sha1", SHA1, 1000, 5000) == DATA[1000:5000]
    assert channel.read_range("sha1", SHA1, len(DATA) - 10, len(DATA) + 100) == DATA[-10:]
    assert channel.read_range("sha1", SHA1, len(DATA) + 5, len(DATA) + 10) == b""


def test_upload_of_an_empty_file(server: ServerProcess, tmp_path: Path, local: LocalStore) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    digest = hashlib.sha1(b"").hexdigest()
    assert lab(server.url).upload("sha1", digest, empty, 0) is True
    assert lab(server.url).check("sha1", digest) == 0


def test_upload_whose_bytes_do_not_match_the_hash_is_a_mismatch(server: ServerProcess, data_file: Path) -> None:
    other = hashlib.sha1(b"other").hexdigest()
    with pytest.raises(HashMismatch):
        lab(server.url).upload("sha1", other, data_file, len(DATA))


def test_wrong_password_is_an_auth_error(server: ServerProcess) -> None:
    with pytest.raises(AuthError):
        lab(server.url, password="guess").check("sha1", SHA1)


def test_upload_to_a_read_only_channel_is_forbidden(server: ServerProcess, data_file: Path) -> None:
    with pytest.raises(Forbidden):
        lab(server.url, channel="readonly").upload("sha1", SHA1, data_file, len(DATA))


def test_oversized_upload_is_too_large(server: ServerProcess, data_file: Path) -> None:
    with pytest.raises(TooLarge, match="limit"):
        lab(server.url, channel="tiny").upload("sha1", SHA1, data_file, len(DATA))


def test_upload_over_the_daily_quota_is_quota_exceeded(server_dir: Path, tmp_path: Path) -> None:
    write_server_config(server_dir, [{"name": "lab", "password": PASSWORD, "uploadQuotas": [quota(files=1)]}])
    server = ServerProcess(server_dir)
    try:
        channel = lab(server.url)
        for i, name in enumerate(["a", "b"]):
            (tmp_path / name).write_bytes(name.encode())
            digest = hashlib.sha1(name.encode()).hexdigest()
            if i == 0:
                channel.upload("sha1", digest, tmp_path / name, 1)
            else:
                with pytest.raises(QuotaExceeded, match="files per day"):
                    channel.upload("sha1", digest, tmp_path / name, 1)
    finally:
        server.stop()


def test_upload_to_a_full_server_disk_is_store_full(full_disk_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(full_disk_dir)
    try:
        path = tmp_path / "big"
        path.write_bytes(DATA)
        with pytest.raises(StoreFull):
            lab(server.url).upload("sha1", SHA1, path, len(DATA))
    finally:
        server.stop()


def test_concurrent_uploads_of_one_blob_both_succeed(server: ServerProcess, server_dir: Path, data_file: Path) -> None:
    start = threading.Barrier(2)
    outcomes: list[object] = []

    def send() -> None:
        channel = lab(server.url)
        start.wait()
        try:
            outcomes.append(channel.upload("sha1", SHA1, data_file, len(DATA)))
        except Exception as err:  # recorded for the assertion below
            outcomes.append(err)

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(outcome, bool) for outcome in outcomes), outcomes
    assert LocalStore(server_dir, clean=False).open("sha1", SHA1).read() == DATA


# -- static and proxied servers ------------------------------------------------------


def test_fetch_and_read_range_from_static_nginx(
    static_server: NginxProcess, server_dir: Path, local: LocalStore
) -> None:
    put_on_server(server_dir, DATA)
    channel = HttpChannel("mirror", static_server.url, "public", None)
    fetch_into(channel, local, SHA1, len(DATA))
    assert local.open("sha1", SHA1).read() == DATA
    assert channel.read_range("sha1", SHA1, 10, 20) == DATA[10:20]


def test_static_nginx_answers_missing_blobs_with_not_found(static_server: NginxProcess, local: LocalStore) -> None:
    with pytest.raises(NotFound), local.writer() as writer:
        HttpChannel("mirror", static_server.url, "public", None).fetch("sha1", SHA1, writer)


def test_static_nginx_never_serves_the_config(static_server: NginxProcess) -> None:
    import requests

    assert requests.get(f"{static_server.url}/probe").json() == {"success": True}
    for path in ("/kachery.json", "/get/../kachery.json", "/.kacheryfs/quota-counters.json"):
        answer = requests.get(static_server.url + path)
        assert answer.status_code == 404
        assert PUBLIC_PASSWORD not in answer.text


def test_an_upload_to_a_static_server_is_refused_and_says_why(static_server: NginxProcess, tmp_path: Path) -> None:
    small = tmp_path / "small.bin"
    small.write_bytes(b"a few bytes")
    digest = hashlib.sha1(b"a few bytes").hexdigest()
    channel = HttpChannel("mirror", static_server.url, "public", None)
    with pytest.raises(Forbidden, match=r"takes no uploads: .*\(HTTP 40[45]\); a static web server"):
        channel.upload("sha1", digest, small, 11)


def test_check_on_a_static_server_answers_from_head(static_server: NginxProcess, server_dir: Path) -> None:
    channel = HttpChannel("mirror", static_server.url, "public", None)
    assert channel.check("sha1", SHA1) is None
    put_on_server(server_dir, DATA)
    assert channel.check("sha1", SHA1) == len(DATA)


def test_server_behind_a_path_prefix(server: ServerProcess, tmp_path: Path, local: LocalStore, data_file: Path) -> None:
    conf = (REPO / "docs" / "nginx.conf").read_text()
    proxy = (
        f"location /neuro1/ {{ proxy_pass {server.url}/; client_max_body_size 0; "
        "proxy_request_buffering off; proxy_buffering off; }\n"
    )
    conf = conf.replace("        location = /probe {", "        " + proxy + "        location = /probe {")
    nginx = start_nginx(conf, tmp_path, tmp_path)
    try:
        channel = lab(nginx.url + "/neuro1/")
        assert channel.upload("sha1", SHA1, data_file, len(DATA)) is True
        fetch_into(channel, local, SHA1, len(DATA))
    finally:
        nginx.stop()


# -- misbehaving servers ------------------------------------------------------------


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Respond:
    """A responder sending `body` with a Content-Length, or until it closes when `headers` says so."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        sent = dict({"Content-Length": str(len(body))}, **(headers or {}))
        for name, value in sent.items():
            if value:
                handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            for at in range(0, len(body), 1 << 20):
                handler.wfile.write(body[at : at + (1 << 20)])

    return respond


def error(status: int, **headers: str) -> Respond:
    return answer(status, json.dumps({"error": "scripted"}).encode(), headers)


Scripted = Callable[[Respond], ScriptedServer]


def test_fetch_stops_as_soon_as_a_body_without_length_outgrows_the_expected_size(
    scripted_server: Scripted, local: LocalStore
) -> None:
    # No Content-Length: the body runs until the connection closes, far past the expected size.
    rogue = scripted_server(answer(200, bytes(32 << 20), {"Content-Length": "", "Connection": "close"}))
    with pytest.raises(HashMismatch, match="more than"), local.writer() as writer:
        try:
            lab(rogue.url).fetch("sha1", SHA1, writer, expected_size=1 << 20)
        finally:
            assert writer.size <= 1 << 20


def test_a_busy_channel_is_waited_for_past_its_timeout_as_long_as_it_says_so(
    scripted_server: Scripted, local: LocalStore
) -> None:
    busy = answer(429, b'{"error": "2 transfers already running"}', {"Retry-After": "0.2"})
    until = time.monotonic() + 2.5  # longer than the channel's timeout: its slots are all taken meanwhile
    server = scripted_server(lambda h: (busy if time.monotonic() < until else answer(200, DATA))(h))
    fetch_into(lab(server.url, timeout=1.0), local, SHA1, len(DATA))
    assert local.open("sha1", SHA1).read() == DATA


def test_a_channel_busy_for_good_is_given_up_after_busy_waits_timeouts(
    scripted_server: Scripted, local: LocalStore
) -> None:
    server = scripted_server(answer(429, b'{"error": "2 transfers already running"}', {"Retry-After": "0.2"}))
    started = time.monotonic()
    with pytest.raises(ChannelBusy, match=r"stayed busy for 3 s: HTTP 429 2 transfers already running"):
        fetch_into(lab(server.url, timeout=0.3), local, SHA1, len(DATA))
    assert time.monotonic() - started < 3 + 5  # BUSY_WAITS (10) × 0.3 s, then no more (loose: no timing claim)


def test_read_range_from_a_server_that_ignores_range_streams_only_what_it_needs(scripted_server: Scripted) -> None:
    blob = os.urandom(64 << 20)
    rogue = scripted_server(answer(200, blob))  # a 200 with the whole blob, whatever the Range
    channel = lab(rogue.url)
    tracemalloc.start()
    try:
        assert channel.read_range("sha1", SHA1, 5 << 20, (5 << 20) + 10) == blob[5 << 20 : (5 << 20) + 10]
        assert channel.read_range("sha1", SHA1, 0, 10) == blob[:10]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # a few chunks, never the whole blob


def test_read_range_refuses_a_206_for_other_bytes(scripted_server: Scripted) -> None:
    rogue = scripted_server(answer(206, bytes(10), {"Content-Range": "bytes 0-9/100"}))
    with pytest.raises(ChannelUnavailable, match="wrong bytes"):
        lab(rogue.url).read_range("sha1", SHA1, 50, 60)


def read(channel: HttpChannel, call: str, writer: BlobWriter) -> None:
    """One of the three reads of a channel, by name."""
    if call == "check":
        channel.check("sha1", SHA1)
    elif call == "fetch":
        channel.fetch("sha1", SHA1, writer)
    else:
        channel.read_range("sha1", SHA1, 0, 10)


@pytest.mark.parametrize("call", ["check", "fetch", "read_range"])
def test_400_on_a_read_is_an_unusable_channel_not_wrong_bytes(
    scripted_server: Scripted, local: LocalStore, call: str
) -> None:
    # We sent a well-formed hash, so a 400 says the server cannot serve it: try the next channel.
    channel = lab(scripted_server(error(400)).url)
    with pytest.raises(ChannelUnavailable), local.writer() as writer:
        read(channel, call, writer)


@pytest.mark.parametrize("kind", [AuthError, Forbidden, NotFound, TooLarge, QuotaExceeded, StoreFull])
def test_each_error_status_of_the_server_is_raised_as_its_error(
    scripted_server: Scripted, local: LocalStore, kind: type[KacheryError]
) -> None:
    channel = lab(scripted_server(error(kind.http_status)).url)
    with pytest.raises(kind) as caught, local.writer() as writer:
        channel.fetch("sha1", SHA1, writer)
    assert type(caught.value) is kind


# -- faults --------------------------------------------------------------------------

BIG = os.urandom(64 << 20)  # far more than the socket buffers hold, so a kill cuts the transfer
BIG_SHA1 = hashlib.sha1(BIG).hexdigest()


def test_download_resumes_after_the_server_restarts(server_dir: Path, local: LocalStore) -> None:
    put_on_server(server_dir, BIG)
    servers = [ServerProcess(server_dir)]

    def restart_once(nbytes: int) -> None:
        if len(servers) == 1:
            servers[0].kill()
            servers.append(ServerProcess(server_dir, port=servers[0].port))

    try:
        fetch_into(lab(servers[0].url), local, BIG_SHA1, len(BIG), progress=restart_once)
        time.sleep(0.2)  # the log is read by a thread
        assert any(" 206 " in line for line in servers[1].log)
    finally:
        servers[-1].stop()
    assert local.open("sha1", BIG_SHA1).read() == BIG


def test_download_from_a_killed_server_fails_and_stores_nothing(server_dir: Path, local: LocalStore) -> None:
    put_on_server(server_dir, BIG)
    server = ServerProcess(server_dir)
    started = time.monotonic()
    with pytest.raises(ChannelUnavailable), local.writer(size_hint=len(BIG)) as writer:
        lab(server.url, timeout=2).fetch("sha1", BIG_SHA1, writer, progress=lambda n: server.kill())
    assert time.monotonic() - started < 10
    assert list(local.iter_blobs()) == []


def test_wrong_bytes_fail_at_commit_and_nothing_is_stored(
    server: ServerProcess, server_dir: Path, local: LocalStore
) -> None:
    # The server's copy of SHA1 holds other bytes of the same size (a corrupt mirror).
    path = LocalStore(server_dir, clean=False).blob_path("sha1", SHA1)
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(len(DATA)))
    with pytest.raises(HashMismatch):
        fetch_into(lab(server.url), local, SHA1, len(DATA))
    assert list(local.iter_blobs()) == []
    assert list(local.iter_blobs("md5")) == []


@pytest.mark.parametrize("call", ["check", "fetch", "read_range"])
def test_silent_server_is_unavailable_within_the_timeout(silent_server: str, local: LocalStore, call: str) -> None:
    channel = lab(silent_server, timeout=2)
    started = time.monotonic()
    with pytest.raises(ChannelUnavailable), local.writer() as writer:
        read(channel, call, writer)
    assert time.monotonic() - started < 3 * 2  # bounded by the channel timeout: never a hang (no timing claim)


def test_a_refused_connection_is_not_retried() -> None:
    # Nothing listens there: a retry a moment later would be refused too, after a backoff of
    # 0.7 s or more; the resolver remembers the channel as down instead.
    channel = lab(f"http://127.0.0.1:{free_port()}", timeout=10)
    started = time.monotonic()
    with pytest.raises(ChannelUnavailable, match="connection refused"):
        channel.check("sha1", SHA1)
    assert time.monotonic() - started < 0.5


def test_refused_connection_is_unavailable_and_the_message_has_no_signature() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ChannelUnavailable) as caught:
        lab(url, timeout=1).check("sha1", SHA1)
    message = str(caught.value)
    assert url in message
    assert "signature" not in message
    assert "expires" not in message
