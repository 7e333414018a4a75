"""The storage server's wire behaviour: endpoints, authorization, quotas, faults (real processes)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from fixtures_server import PASSWORD, REPO, ServerProcess, quota, write_config

from kacheryfs import auth
from kacheryfs.errors import ConfigError, Forbidden, QuotaExceeded, TooLarge
from kacheryfs.server.app import make_app
from kacheryfs.server.channels import Quota, load_channels
from kacheryfs.server.quotas import QuotaLedger
from kacheryfs.store import LocalStore

pytestmark = pytest.mark.timeout(60)
DATA = b"0123456789" * 1000
SHA1 = hashlib.sha1(DATA).hexdigest()


def signed(channel: str, op: str, digest: str, password: str = PASSWORD, alg: str = "sha1") -> dict[str, str]:
    return auth.signed_query(channel, password, op, alg, digest)


def upload(server: ServerProcess, data: bytes, channel: str = "lab", digest: str | None = None) -> requests.Response:
    digest = digest or hashlib.sha1(data).hexdigest()
    return requests.post(f"{server.url}/set/sha1/{digest}", params=signed(channel, "upload", digest), data=data)


def download(server: ServerProcess, digest: str = SHA1, channel: str = "lab", **kw: object) -> requests.Response:
    return requests.get(f"{server.url}/get/sha1/{digest}", params=signed(channel, "download", digest), **kw)


def stored(directory: Path) -> list[str]:
    return [digest for digest, _ in LocalStore(directory, clean=False).iter_blobs()]


# -- endpoints -----------------------------------------------------------------------


def test_probe_answers_success(server: ServerProcess) -> None:
    assert requests.get(f"{server.url}/probe").json() == {"success": True}


def test_uploaded_blob_is_checked_and_downloaded(server: ServerProcess) -> None:
    assert upload(server, DATA).json() == {"success": True}
    check = requests.get(f"{server.url}/check/sha1/{SHA1}", params=signed("lab", "check", SHA1))
    assert check.json() == {"success": True, "found": True, "size": len(DATA)}
    assert download(server).content == DATA


def test_uploaded_blob_lands_in_the_local_store_layout(server: ServerProcess, server_dir: Path) -> None:
    upload(server, DATA)
    assert (server_dir / "sha1" / SHA1[:2] / SHA1[2:4] / SHA1[4:6] / SHA1).read_bytes() == DATA
    md5 = hashlib.md5(DATA).hexdigest()
    assert requests.get(f"{server.url}/get/md5/{md5}", params=signed("lab", "download", md5, alg="md5")).content == DATA


def test_check_reports_a_missing_blob_as_not_found(server: ServerProcess) -> None:
    answer = requests.get(f"{server.url}/check/sha1/{SHA1}", params=signed("lab", "check", SHA1))
    assert answer.json() == {"success": True, "found": False}


def test_get_honours_range(server: ServerProcess) -> None:
    upload(server, DATA)
    answer = download(server, headers={"Range": "bytes=5-14"})
    assert answer.status_code == 206
    assert answer.content == DATA[5:15]
    assert answer.headers["Content-Range"] == f"bytes 5-14/{len(DATA)}"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=10-5", "bytes=abc", "items=0-5", "bytes=5"])
def test_get_ignores_a_range_it_cannot_honour_and_sends_the_whole_blob(server: ServerProcess, header: str) -> None:
    # RFC 9110 §14.2: an invalid Range, another unit or (here) several ranges are ignored.
    upload(server, DATA)
    answer = download(server, headers={"Range": header})
    assert answer.status_code == 200
    assert answer.content == DATA


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [("bytes= 0-5", 0, 6), ("BYTES=9990-", 9990, 10000), ("bytes=-5", 9995, 10000), ("bytes=9999-20000", 9999, 10000),
     ("bytes=-20000", 0, 10000)],
)  # fmt: skip
def test_get_answers_a_single_range_clipped_to_the_blob(
    server: ServerProcess, header: str, start: int, stop: int
) -> None:
    upload(server, DATA)
    answer = download(server, headers={"Range": header})
    assert answer.status_code == 206
    assert answer.content == DATA[start:stop]
    assert answer.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(DATA)}"


@pytest.mark.parametrize("header", [f"bytes={len(DATA)}-", f"bytes={len(DATA) + 5}-{len(DATA) + 9}", "bytes=-0"])
def test_range_selecting_no_byte_is_416_with_the_size_and_a_json_error(server: ServerProcess, header: str) -> None:
    upload(server, DATA)
    answer = download(server, headers={"Range": header})
    assert answer.status_code == 416
    assert answer.headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert "error" in answer.json()


def test_if_range_naming_the_blob_gives_the_range_and_any_other_the_whole_blob(server: ServerProcess) -> None:
    upload(server, DATA)
    validators = requests.head(f"{server.url}/get/sha1/{SHA1}", params=signed("lab", "download", SHA1)).headers
    for current in (validators["ETag"], validators["Last-Modified"]):
        answer = download(server, headers={"Range": "bytes=0-9", "If-Range": current})
        assert (answer.status_code, answer.content) == (206, DATA[:10])
    for other in ('"another"', "W/" + validators["ETag"], "Thu, 01 Jan 2015 00:00:00 GMT"):
        answer = download(server, headers={"Range": "bytes=0-9", "If-Range": other})
        assert (answer.status_code, answer.content) == (200, DATA)
        past_the_end = download(server, headers={"Range": f"bytes={len(DATA)}-", "If-Range": other})
        assert past_the_end.status_code == 200  # a range of another version is not read at all: no 416


def test_a_range_of_thousands_of_digits_is_ignored_not_a_server_error(server: ServerProcess) -> None:
    upload(server, DATA)
    answer = download(server, headers={"Range": "bytes=" + "9" * 5000 + "-"})
    assert (answer.status_code, answer.content) == (200, DATA)


def test_head_gives_the_size_without_the_bytes(server: ServerProcess) -> None:
    upload(server, DATA)
    answer = requests.head(f"{server.url}/get/sha1/{SHA1}", params=signed("lab", "download", SHA1))
    assert answer.status_code == 200
    assert int(answer.headers["Content-Length"]) == len(DATA)


def test_upper_case_hash_names_the_same_blob(server: ServerProcess) -> None:
    upload(server, DATA)
    assert download(server, SHA1.upper()).content == DATA


def test_log_has_one_line_per_request_without_the_signature(server: ServerProcess) -> None:
    upload(server, DATA)
    download(server)
    time.sleep(0.2)  # the log is read by a thread
    lines = [line for line in server.log if f"/sha1/{SHA1}" in line]
    assert len(lines) == 2
    assert re.search(rf"POST /set/sha1/{SHA1} 200 {len(DATA)} \d+ms", lines[0])
    assert re.search(rf"GET /get/sha1/{SHA1} 200 {len(DATA)} \d+ms", lines[1])
    assert not any("signature" in line for line in server.log)


def test_kacheryfs_serve_logs_one_line_per_request_by_default(server_dir: Path) -> None:
    # The CLI starts every command at WARNING; serve must still log its requests (journalctl shows them).
    with ServerProcess(server_dir, command=("-m", "kacheryfs", "serve")) as server:
        upload(server, DATA)
        download(server, headers={"Range": "bytes=0-9"})
        time.sleep(0.2)  # the log is read by a thread
    lines = [line for line in server.log if f"/sha1/{SHA1}" in line]
    assert len(lines) == 2
    assert re.search(rf"GET /get/sha1/{SHA1} 206 10 \d+ms", lines[1])


def test_client_leaving_mid_upload_logs_one_line_and_no_traceback(server: ServerProcess) -> None:
    query = "&".join(f"{k}={v}" for k, v in signed("lab", "upload", SHA1).items())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        conn.sendall(f"POST /set/sha1/{SHA1}?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n".encode())
        conn.sendall(DATA[:17])
        time.sleep(0.2)
    time.sleep(0.5)  # the server notices, then the log is read by a thread
    assert [line for line in server.log if "/set/" in line][0].split()[-3:-1] == ["aborted", "0"]
    assert not any("Traceback" in line or "Error handling request" in line for line in server.log)


# -- authorization -------------------------------------------------------------------


def test_request_without_signature_is_401(server: ServerProcess) -> None:
    upload(server, DATA)
    answer = requests.get(f"{server.url}/get/sha1/{SHA1}", params={"channel": "lab"})
    assert answer.status_code == 401
    assert "error" in answer.json()


def test_wrong_password_is_401(server: ServerProcess) -> None:
    upload(server, DATA)
    answer = requests.get(f"{server.url}/get/sha1/{SHA1}", params=signed("lab", "download", SHA1, "guess"))
    assert answer.status_code == 401


def test_tampered_signature_is_401(server: ServerProcess) -> None:
    upload(server, DATA)
    query = signed("lab", "download", SHA1)
    query["signature"] = ("0" if query["signature"][0] != "0" else "1") + query["signature"][1:]
    assert requests.get(f"{server.url}/get/sha1/{SHA1}", params=query).status_code == 401


def test_expired_signature_is_401(server: ServerProcess) -> None:
    upload(server, DATA)
    expires = int(time.time()) - 1
    key = auth.channel_key("lab", PASSWORD)
    query = {
        "channel": "lab",
        "expires": str(expires),
        "signature": auth.sign(key, "download", "sha1", SHA1, "lab", expires),
    }
    assert requests.get(f"{server.url}/get/sha1/{SHA1}", params=query).status_code == 401


def test_non_ascii_signature_is_401(server: ServerProcess) -> None:
    upload(server, DATA)
    query = dict(signed("lab", "download", SHA1), signature="é" * 64)
    answer = requests.get(f"{server.url}/get/sha1/{SHA1}", params=query)
    assert answer.status_code == 401
    assert "error" in answer.json()


def test_signature_for_another_hash_is_401(server: ServerProcess) -> None:
    upload(server, DATA)
    other = hashlib.sha1(b"other").hexdigest()
    assert requests.get(f"{server.url}/get/sha1/{SHA1}", params=signed("lab", "download", other)).status_code == 401


def test_signature_for_another_operation_is_401(server: ServerProcess) -> None:
    upload(server, DATA)
    assert requests.get(f"{server.url}/get/sha1/{SHA1}", params=signed("lab", "check", SHA1)).status_code == 401
    other = b"another file"
    digest = hashlib.sha1(other).hexdigest()
    answer = requests.post(f"{server.url}/set/sha1/{digest}", params=signed("lab", "download", digest), data=other)
    assert answer.status_code == 401


def test_signature_of_another_channel_is_401(server: ServerProcess) -> None:
    upload(server, DATA)
    query = dict(signed("readonly", "download", SHA1), channel="lab")
    assert requests.get(f"{server.url}/get/sha1/{SHA1}", params=query).status_code == 401


def test_unknown_channel_is_401(server: ServerProcess) -> None:
    answer = requests.get(f"{server.url}/check/sha1/{SHA1}", params=signed("nobody", "check", SHA1))
    assert answer.status_code == 401


def test_missing_blob_is_401_before_auth_and_404_after(server: ServerProcess) -> None:
    assert requests.get(f"{server.url}/get/sha1/{SHA1}", params={"channel": "lab"}).status_code == 401
    assert download(server).status_code == 404


def test_public_channel_reads_without_signature(server: ServerProcess) -> None:
    upload(server, DATA)
    assert requests.get(f"{server.url}/get/sha1/{SHA1}", params={"channel": "public"}).content == DATA
    check = requests.get(f"{server.url}/check/sha1/{SHA1}", params={"channel": "public"})
    assert check.json()["found"] is True


def test_public_channel_upload_still_needs_signature(server: ServerProcess) -> None:
    answer = requests.post(f"{server.url}/set/sha1/{SHA1}", params={"channel": "public"}, data=DATA)
    assert answer.status_code == 401


def test_upload_to_read_only_channel_is_403(server: ServerProcess, server_dir: Path) -> None:
    assert upload(server, DATA, channel="readonly").status_code == 403
    assert stored(server_dir) == []


def test_body_not_matching_hash_is_400_and_nothing_is_stored(server: ServerProcess, server_dir: Path) -> None:
    answer = upload(server, b"not the claimed bytes", digest=SHA1)
    assert answer.status_code == 400
    assert "expected" in answer.json()["error"]
    assert stored(server_dir) == []
    assert os.listdir(server_dir / "tmp") == []


def test_oversized_upload_is_413(server: ServerProcess, server_dir: Path) -> None:
    assert upload(server, DATA, channel="tiny").status_code == 413
    assert stored(server_dir) == []


def test_malformed_hash_is_400(server: ServerProcess) -> None:
    assert requests.get(f"{server.url}/get/sha1/abc", params={"channel": "public"}).status_code == 400
    assert requests.get(f"{server.url}/get/sha256/{SHA1}", params={"channel": "public"}).status_code == 400


@pytest.mark.parametrize(
    "path",
    [
        "/get/sha1/../../kachery.json",
        "/get/sha1/..%2F..%2Fkachery.json",
        "/get/sha1/%2e%2e/%2e%2e/kachery.json",
        "/get/..%2Fkachery.json/" + SHA1,
    ],
)
def test_path_traversal_never_reads_outside_the_store(server: ServerProcess, path: str) -> None:
    # A raw socket: HTTP clients would normalize the dots away before sending.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        conn.sendall(f"GET {path}?channel=public HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status = int(answer.split()[1])
    assert status in (400, 404)
    assert PASSWORD.encode() not in answer


# -- quotas --------------------------------------------------------------------------


def quota_server(directory: Path, **limits: int) -> ServerProcess:
    write_config(
        directory,
        [{"name": "lab", "password": PASSWORD, "downloadQuotas": [quota(**limits)], "uploadQuotas": [quota()]}],
    )
    return ServerProcess(directory)


def test_files_per_day_quota_is_429(server_dir: Path) -> None:
    with quota_server(server_dir, files=2) as server:
        upload(server, DATA)
        assert download(server).status_code == 200
        assert download(server).status_code == 200
        answer = download(server)
        assert answer.status_code == 429
        assert "files per day" in answer.json()["error"]


def test_bytes_per_day_quota_counts_range_bytes_and_not_head(server_dir: Path) -> None:
    with quota_server(server_dir, nbytes=len(DATA) + 100) as server:
        upload(server, DATA)
        head = requests.head(f"{server.url}/get/sha1/{SHA1}", params=signed("lab", "download", SHA1))
        assert head.status_code == 200
        assert download(server, headers={"Range": "bytes=0-99"}).status_code == 206
        assert download(server).status_code == 200  # exactly fills the day's bytes
        assert download(server, headers={"Range": "bytes=0-0"}).status_code == 429


@pytest.mark.parametrize(
    ("headers", "status"),
    [({"Range": f"bytes={len(DATA)}-"}, 416), ({"If-None-Match": "*"}, 304), ({"If-Match": '"another"'}, 412)],
)
def test_download_answered_without_a_body_is_not_charged(server_dir: Path, headers: dict, status: int) -> None:
    with quota_server(server_dir, files=1) as server:
        upload(server, DATA)
        assert download(server, headers=headers).status_code == status
        assert download(server).status_code == 200  # the day's only file is still there


def test_file_larger_than_the_daily_bytes_is_refused_as_such(server_dir: Path) -> None:
    with quota_server(server_dir, nbytes=1000) as server:
        upload(server, DATA)
        answer = download(server)
        assert answer.status_code == 429
        assert f"{len(DATA)} bytes is more than the 1000 bytes it allows per day" in answer.json()["error"]


def test_simultaneous_limit_is_429_at_once(server_dir: Path) -> None:
    write_config(server_dir, [{"name": "lab", "password": PASSWORD, "uploadQuotas": [quota(simultaneous=1)]}])
    with ServerProcess(server_dir) as server:
        query = "&".join(f"{k}={v}" for k, v in signed("lab", "upload", SHA1).items())
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
            # An upload that sends half its body and waits holds the only slot.
            head = f"POST /set/sha1/{SHA1}?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(DATA)}\r\n\r\n"
            slow.sendall(head.encode() + DATA[:100])
            time.sleep(0.3)
            started = time.monotonic()
            answer = upload(server, DATA)
            assert answer.status_code == 429
            assert time.monotonic() - started < 2
        time.sleep(0.3)  # the slot is freed when the first upload's connection is gone
        assert upload(server, DATA).status_code == 200


def test_stalled_upload_is_dropped_and_frees_its_slot(server_dir: Path) -> None:
    write_config(server_dir, [{"name": "lab", "password": PASSWORD, "uploadQuotas": [quota(simultaneous=1)]}])
    with ServerProcess(server_dir, options=("--stall-timeout", "1")) as server:
        query = "&".join(f"{k}={v}" for k, v in signed("lab", "upload", SHA1).items())
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stalled:
            head = f"POST /set/sha1/{SHA1}?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(DATA)}\r\n\r\n"
            stalled.sendall(head.encode() + DATA[:100])
            assert stalled.makefile("rb").readline().split()[1] == b"408"
            assert upload(server, DATA).status_code == 200  # the connection is still open, its slot is not


BIG = os.urandom(32 << 20)  # more than loopback's socket buffers hold, so a client that never reads stalls it
BIG_SHA1 = hashlib.sha1(BIG).hexdigest()


def test_download_whose_client_stops_reading_is_dropped_and_refunded(server_dir: Path) -> None:
    write_config(server_dir, [{"name": "lab", "password": PASSWORD, "uploadQuotas": [quota()],
                               "downloadQuotas": [quota(simultaneous=1, files=1)]}])  # fmt: skip
    with ServerProcess(server_dir, options=("--stall-timeout", "1")) as server:
        upload(server, BIG)
        query = "&".join(f"{k}={v}" for k, v in signed("lab", "download", BIG_SHA1).items())
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stuck:
            stuck.sendall(f"GET /get/sha1/{BIG_SHA1}?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            time.sleep(0.3)
            assert download(server, BIG_SHA1).status_code == 429  # it holds the only slot
            started = time.monotonic()
            while (answer := download(server, BIG_SHA1)).status_code == 429 and time.monotonic() - started < 10:
                time.sleep(0.2)
            # Slot freed and the day's only file refunded, while the stuck socket is still open.
            assert answer.status_code == 200, answer.text
            assert hashlib.sha1(answer.content).hexdigest() == BIG_SHA1
    assert not any("Traceback" in line for line in server.log)


def test_a_stall_timeout_longer_than_the_socket_option_holds_still_serves(server_dir: Path) -> None:
    with ServerProcess(server_dir, options=("--stall-timeout", "3e6")) as server:  # 35 days: past 2^31 ms
        upload(server, DATA)
        assert download(server).content == DATA


def test_download_read_slowly_is_not_dropped(server_dir: Path) -> None:
    with ServerProcess(server_dir, options=("--stall-timeout", "2")) as server:
        upload(server, BIG)
        answer = download(server, BIG_SHA1, stream=True)
        received = hashlib.sha1()
        chunks = answer.iter_content(1 << 20)
        for _ in range(12):  # 6 s in all, three stall timeouts, but never 2 s without reading
            received.update(next(chunks))
            time.sleep(0.5)
        for chunk in chunks:
            received.update(chunk)
        assert received.hexdigest() == BIG_SHA1


def test_quota_counters_survive_a_restart(server_dir: Path) -> None:
    server = quota_server(server_dir, files=2)
    try:
        upload(server, DATA)
        assert download(server).status_code == 200
        server.stop()
        server = ServerProcess(server_dir)
        assert download(server).status_code == 200
        assert download(server).status_code == 429
    finally:
        server.stop()


def test_quota_counters_survive_a_crash_a_second_later(server_dir: Path) -> None:
    server = quota_server(server_dir, files=2)
    try:
        upload(server, DATA)
        assert download(server).status_code == 200
        time.sleep(1.5)  # counters reach the disk at most a second after they change
        server.kill()
        server = ServerProcess(server_dir)
        assert download(server).status_code == 200
        assert download(server).status_code == 429
    finally:
        server.stop()


ONE_FILE_A_DAY = Quota("all", max_file_size=10**9, max_simultaneous=4, max_files_per_day=1, max_bytes_per_day=10**9)


def test_daily_counts_start_again_at_utc_midnight(tmp_path: Path) -> None:
    now = [1767225600.0 - 10]  # ten seconds before 2026-01-01T00:00:00Z
    ledger = QuotaLedger(tmp_path / "counters.json", now=lambda: now[0])
    with ledger.transfer("lab", "download", ONE_FILE_A_DAY, 10):
        pass
    with pytest.raises(QuotaExceeded):
        ledger.transfer("lab", "download", ONE_FILE_A_DAY, 10)
    now[0] += 20
    with ledger.transfer("lab", "download", ONE_FILE_A_DAY, 10):
        pass


def test_failed_transfer_is_refunded(tmp_path: Path) -> None:
    ledger = QuotaLedger(tmp_path / "counters.json")
    with pytest.raises(ConnectionResetError), ledger.transfer("lab", "download", ONE_FILE_A_DAY, 10):
        raise ConnectionResetError
    with ledger.transfer("lab", "download", ONE_FILE_A_DAY, 10):
        pass


def test_counting_a_transfer_does_no_disk_io_and_saves_are_batched(tmp_path: Path) -> None:
    path = tmp_path / "counters.json"
    ledger = QuotaLedger(path)
    writes: list[str] = []
    write = ledger._write
    ledger._write = lambda doc: (writes.append(doc), write(doc))  # type: ignore[method-assign]
    quota = Quota("all", max_file_size=10**9, max_simultaneous=4, max_files_per_day=1000, max_bytes_per_day=10**9)

    async def serve_a_while() -> None:
        saver = asyncio.create_task(ledger.persist(interval=0.2))
        for _ in range(100):
            with ledger.transfer("lab", "download", quota, 10):
                pass
        assert not path.exists()  # counting happens on the event loop: no file I/O there
        await asyncio.sleep(0.3)
        saver.cancel()

    asyncio.run(serve_a_while())
    assert len(writes) == 1
    assert QuotaLedger(path)._daily["lab/download/all"] == {"files": 100, "bytes": 1000}


def test_quota_is_the_first_whose_max_file_size_fits(server_dir: Path) -> None:
    small, large = quota("small", max_file_size=100), quota("large", max_file_size=10**6)
    write_config(server_dir, [{"name": "c", "password": "p", "downloadQuotas": [small, large]}])
    channel = load_channels(server_dir, {})["c"]
    assert channel.quota("download", 100).name == "small"
    assert channel.quota("download", 101).name == "large"
    with pytest.raises(TooLarge):
        channel.quota("download", 10**6 + 1)
    with pytest.raises(Forbidden):
        channel.quota("upload", 1)


# -- configuration -------------------------------------------------------------------


def test_missing_kachery_json_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kachery.json is missing"):
        load_channels(tmp_path, {})


def test_invalid_quota_names_the_bad_key(tmp_path: Path) -> None:
    bad = dict(quota(), maxFileSize="big")
    write_config(tmp_path, [{"name": "lab", "password": "p", "uploadQuotas": [quota(), bad]}])
    with pytest.raises(ConfigError, match=re.escape("channels[0].uploadQuotas[1].maxFileSize")):
        load_channels(tmp_path, {})


def test_password_can_come_from_the_environment(tmp_path: Path) -> None:
    write_config(tmp_path, [{"name": "lab", "password": {"env": "LAB_PW"}}])
    assert load_channels(tmp_path, {"LAB_PW": "s3"})["lab"].key == auth.channel_key("lab", "s3")
    with pytest.raises(ConfigError, match="LAB_PW"):
        load_channels(tmp_path, {})


def test_server_reads_passwords_from_the_environment_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, [{"name": "lab", "password": {"env": "LAB_PW"}}])
    monkeypatch.setenv("LAB_PW", "from the process")
    with pytest.raises(ConfigError, match="LAB_PW"):
        make_app(tmp_path, {})  # configuration enters at the edge, never from os.environ below it
    make_app(tmp_path, {"LAB_PW": "s3"})


def test_server_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    (tmp_path / "kachery.json").write_text('{"channels": [{"name": "lab"}]}')
    done = subprocess.run(
        [sys.executable, "-m", "kacheryfs.server", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=30,
    )
    assert done.returncode == ConfigError.exit_code
    assert "channels[0].password" in done.stderr


def test_protocol_doc_worked_example_is_right() -> None:
    text = (REPO / "docs" / "protocol.md").read_text()
    row = dict(re.findall(r"^\| (\w[\w ()]*?) \| `([^`]+)`", text, re.MULTILINE))
    key = auth.channel_key(row["channel"], row["password"])
    assert key.hex() == row["key (hex)"]
    assert hashlib.sha1(b"hello\n").hexdigest() == row["hash"]
    expected = auth.sign(key, row["op"], row["alg"], row["hash"], row["channel"], int(row["expires"]))
    assert expected == row["signature"]
    assert f"signature={expected}" in text


# -- faults --------------------------------------------------------------------------


def test_disk_full_is_507_and_leaves_no_partial_blob(full_disk_dir: Path) -> None:
    with ServerProcess(full_disk_dir) as server:
        big = os.urandom(2 << 20)
        answer = upload(server, big)
        assert answer.status_code == 507
        assert "space" in answer.json()["error"]
        assert stored(full_disk_dir) == []
        assert os.listdir(full_disk_dir / "tmp") == []
        assert upload(server, DATA).status_code == 200  # the space was given back


def test_concurrent_uploads_of_one_blob_both_succeed(server: ServerProcess, server_dir: Path) -> None:
    big = os.urandom(8 << 20)
    digest = hashlib.sha1(big).hexdigest()
    query = "&".join(f"{k}={v}" for k, v in signed("lab", "upload", digest).items())
    head = f"POST /set/sha1/{digest}?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}\r\n\r\n".encode()
    # Both bodies are sent half, then both finished: the two uploads overlap for sure.
    conns = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    try:
        for conn in conns:
            conn.sendall(head + big[: len(big) // 2])
        for conn in conns:
            conn.sendall(big[len(big) // 2 :])
        answers = [conn.makefile("rb").readline() for conn in conns]
    finally:
        for conn in conns:
            conn.close()
    assert all(b" 200 " in answer for answer in answers), answers
    assert stored(server_dir) == [digest]
    assert json.loads(requests.get(f"{server.url}/check/sha1/{digest}", params=signed("lab", "check", digest)).text)[
        "size"
    ] == len(big)


def test_serve_on_a_port_in_use_says_so_and_exits_3(server, server_dir):
    result = subprocess.run(
        ["kacheryfs", "serve", str(server_dir), "--port", str(server.port)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 3 and f"port {server.port} is in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--port", "99999"), ("--port", "-1"), ("--port", "1_000"), ("--stall-timeout", "-5"), ("--stall-timeout", "nan"),
     ("--stall-timeout", "inf"), ("--stall-timeout", "0")],
)  # fmt: skip
def test_serve_refuses_a_number_that_cannot_work_as_bad_usage(server_dir: Path, flag: str, value: str) -> None:
    result = subprocess.run(
        ["kacheryfs", "serve", str(server_dir), flag, value], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 2 and f"argument {flag}: '{value}' is not" in result.stderr
    assert "Traceback" not in result.stderr
