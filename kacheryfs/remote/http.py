"""Where a channel call becomes an HTTP request: the client of `kacheryfs serve` and of static mirrors.

Every request is signed with `kacheryfs.auth`. Failures to connect or answer are retried
with exponential backoff and jitter inside a time bound, so a silent channel costs at most
about `timeout` seconds; a refused connection is not retried, so a dead one costs
milliseconds. An interrupted download resumes with a Range request.
Messages name the channel URL but never the query, which holds the signature.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import requests

from kacheryfs import auth
from kacheryfs.auth import MissingPassword
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
from kacheryfs.hashing import CHUNK
from kacheryfs.remote.channel import Progress
from kacheryfs.store import BlobWriter
from kacheryfs.uri import check_hash

_OPERATIONS = {"check": "check", "get": "download", "set": "upload"}
# The errors the server sends (kacheryfs.errors gives each its status) that mean the same
# whatever the request. A 400 is not among them: see `_error_for`.
_STATUS_ERRORS: dict[int, type[KacheryError]] = {
    error.http_status: error for error in (AuthError, Forbidden, NotFound, TooLarge, QuotaExceeded, StoreFull)
}
BUSY_WAITS = 10  # a channel with all its transfers in use is waited for up to this many timeouts
_BACKOFF = 0.2  # seconds before the first retry; doubled for each next one
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+)")
_QUERY = re.compile(r"\?[^\s'\"()]*")
_IDENTITY = {"Accept-Encoding": "identity"}  # byte ranges must be of the stored bytes


class HttpChannel:
    """A channel on a kacheryfs server (or, for reads, any static server with its layout).

    `timeout` bounds the time spent without progress: connecting, waiting for an answer
    and retrying. A transfer that keeps delivering bytes is not cut off. Safe to share
    between threads: each thread gets its own connection pool. `password` None is a public
    channel; a MissingPassword (the config names a password variable that is not set) makes
    every call raise ChannelMisconfigured instead of sending a request.
    """

    def __init__(
        self,
        name: str,
        url: str,
        channel: str,
        password: str | MissingPassword | None,
        timeout: float = 10.0,
        retries: int = 3,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.channel = channel
        self.timeout = timeout
        self.retries = retries
        self._password = password
        self._local = threading.local()  # one keep-alive Session per thread: Session is not thread-safe

    @property
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def __repr__(self) -> str:
        return f"HttpChannel({self.name!r}, {self.url!r}, channel={self.channel!r})"

    def check(self, alg: str, digest: str) -> int | None:
        digest = check_hash(alg, digest)
        with self._request("GET", "check", alg, digest) as response:
            if response.status_code == 404:
                return self._head_size(alg, digest)  # no /check: a static mirror
            self._raise_for(response, "check")
            try:
                answer = response.json()
                return int(answer["size"]) if answer["found"] else None
            except (ValueError, KeyError, TypeError) as err:
                raise ChannelUnavailable(f"{self._where('check')} gave an answer that is not kacheryfs JSON") from err

    def _head_size(self, alg: str, digest: str) -> int | None:
        """The size of a blob from `HEAD /get`, as any static web server answers it."""
        with self._request("HEAD", "get", alg, digest, headers=_IDENTITY) as response:
            if response.status_code == 404:
                return None
            self._raise_for(response, "get")
            try:
                return int(response.headers["Content-Length"])
            except (KeyError, ValueError) as err:
                raise ChannelUnavailable(f"{self._where('get')} gave no size for {alg}://{digest}") from err

    def fetch(
        self,
        alg: str,
        digest: str,
        writer: BlobWriter,
        expected_size: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        digest = check_hash(alg, digest)
        failures = 0
        deadline = time.monotonic() + self.timeout  # moved on by every chunk received
        while True:
            start = writer.size
            headers = dict(_IDENTITY, Range=f"bytes={start}-") if start else _IDENTITY
            with self._request("GET", "get", alg, digest, headers=headers, stream=True, deadline=deadline) as response:
                self._raise_for(response, "get")
                skip = self._check_body(response, alg, digest, start, expected_size)
                if start == 0 and response.status_code == 200 and expected_size is None:
                    with contextlib.suppress(KeyError, ValueError):
                        writer.expect_size(int(response.headers["Content-Length"]))
                try:
                    raw = _raw_body(response) if skip == 0 else None
                    space = writer.space() if raw is not None else None
                    while space is not None:
                        # Received in place: straight into the buffer the digests and the disk write use.
                        n = raw.readinto(space[:CHUNK])  # a cut-off read loses at most this much
                        del space  # the view goes before the writer may hand its buffer on
                        if not n:
                            if raw.length:  # http.client ends a cut-off body quietly: resume it
                                raise http.client.IncompleteRead(b"", raw.length)
                            return
                        deadline = time.monotonic() + self.timeout
                        if expected_size is not None and writer.size + n > expected_size:
                            raise HashMismatch(
                                f"{self._where('get')} sent more than the {expected_size} bytes of {alg}://{digest}"
                            )
                        writer.advance(n)
                        if progress is not None:
                            progress(n)
                        space = writer.space()
                    for chunk in _body(response, skip):
                        deadline = time.monotonic() + self.timeout
                        if expected_size is not None and writer.size + len(chunk) > expected_size:
                            # A body without a length, or longer than it said: stop before it fills the disk.
                            raise HashMismatch(
                                f"{self._where('get')} sent more than the {expected_size} bytes of {alg}://{digest}"
                            )
                        writer.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
                    return
                except (requests.RequestException, OSError, http.client.HTTPException) as err:
                    # Resume from writer.size; give up after `retries` attempts that brought nothing.
                    failures = failures + 1 if writer.size == start else 0
                    if failures > self.retries:
                        raise ChannelUnavailable(f"{self._where('get')} kept failing: {_reason(err)}") from err

    def read_range(self, alg: str, digest: str, start: int, end: int) -> bytes:
        digest = check_hash(alg, digest)
        if end <= start:
            return b""
        headers = dict(_IDENTITY, Range=f"bytes={start}-{end - 1}")
        with self._request("GET", "get", alg, digest, headers=headers, stream=True) as response:
            if response.status_code == 416:  # start is past the end of the blob
                return b""
            self._raise_for(response, "get")
            # A 200 (the server ignored the Range) is streamed to `start`, never held whole.
            skip = self._check_body(response, alg, digest, start, None)
            wanted, parts = end - start, []
            try:
                for chunk in _body(response, skip):
                    parts.append(chunk[:wanted])
                    wanted -= len(parts[-1])
                    if not wanted:
                        break
            except requests.RequestException as err:
                raise ChannelUnavailable(f"{self._where('get')} broke off: {_reason(err)}") from err
            return b"".join(parts)

    def upload(self, alg: str, digest: str, path: Path, size: int, progress: Progress | None = None) -> bool:
        digest = check_hash(alg, digest)
        present = self.check(alg, digest)
        if present == size:
            return False
        if present is not None:
            raise HashMismatch(f"{self._where('check')} has {alg}://{digest} with {present} bytes, not {size}")
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                raise HashMismatch(f"{path} has changed: it is no longer {size} bytes long")
            # An empty iterable body would be sent chunked; an empty bytes body gets Content-Length: 0.
            body = (lambda: _FileBody(f, size, progress)) if size else (lambda: b"")
            with self._request("POST", "set", alg, digest, body=body) as response:
                self._raise_for(response, "set")
        return True

    def _request(
        self,
        method: str,
        endpoint: str,
        alg: str,
        digest: str,
        *,
        headers: dict[str, str] | None = None,
        body: Callable[[], _FileBody | bytes] | None = None,
        stream: bool = False,
        deadline: float | None = None,
    ) -> requests.Response:
        """Send one signed request, retrying failures to connect or answer until the deadline."""
        if isinstance(self._password, MissingPassword):
            raise self._password.error()
        url = f"{self.url}/{endpoint}/{alg}/{digest}"
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        reason = f"no progress for {self.timeout:g} s"
        # A busy channel (429 with Retry-After: all its transfers in use) is an answer, not a failure:
        # each such answer moves the deadline on, up to BUSY_WAITS timeouts in all, and is not counted.
        failures = 0
        busy_until = time.monotonic() + BUSY_WAITS * self.timeout
        while failures <= self.retries:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            query = auth.signed_query(self.channel, self._password, _OPERATIONS[endpoint], alg, digest)
            busy = False
            try:
                response = self._session.request(
                    method,
                    url,
                    params=query,
                    headers=headers,
                    data=None if body is None else body(),
                    stream=stream,
                    timeout=(remaining, remaining),
                )
            except requests.RequestException as err:
                if _refused(err):  # nothing listens there: asking again within the second will not change that
                    reason = "connection refused"
                    break
                reason = _reason(err)
            else:
                busy = response.status_code == 429 and "Retry-After" in response.headers
                if not busy and (response.status_code < 500 or response.status_code == 507):
                    return response
                reason = f"HTTP {response.status_code} {_error_text(response)}"
                response.close()
            if busy:  # every simultaneous transfer of the channel is in use: soon there is room
                delay = _retry_after(response) * random.uniform(0.1, 0.5)
                if time.monotonic() + delay >= busy_until:
                    waited = BUSY_WAITS * self.timeout
                    raise ChannelBusy(f"channel {self.name!r} ({url}) stayed busy for {waited:g} s: {reason}")
                deadline = max(deadline, min(busy_until, time.monotonic() + self.timeout))
            else:
                delay = _BACKOFF * 2**failures * random.uniform(0.5, 1.5)
                failures += 1
            if time.monotonic() + delay >= deadline:
                break
            time.sleep(delay)
        raise ChannelUnavailable(f"channel {self.name!r} ({url}) is unavailable: {reason}")

    def _check_body(
        self, response: requests.Response, alg: str, digest: str, start: int, expected_size: int | None
    ) -> int:
        """Bytes to skip at the start of this body; HashMismatch when its total size is not the expected one."""
        if response.status_code == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != start:
                raise ChannelUnavailable(f"{self._where('get')} answered a Range request with the wrong bytes")
            skip, total = 0, int(match.group(2))
        else:
            skip, total = start, int(response.headers.get("Content-Length", -1))
        if expected_size is not None and total >= 0 and total != expected_size:
            raise HashMismatch(f"{self._where('get')} has {total} bytes for {alg}://{digest}, expected {expected_size}")
        return skip

    def _raise_for(self, response: requests.Response, endpoint: str) -> None:
        if response.status_code < 300:
            return
        url = response.url.split("?", 1)[0]
        why = f"{_error_text(response)} (HTTP {response.status_code})"
        if endpoint == "set" and _takes_no_uploads(response):
            raise Forbidden(f"channel {self.name!r} ({url}) takes no uploads: {why}; a static web server, or not a "
                            "kacheryfs server's URL?")  # fmt: skip
        raise _error_for(response, endpoint)(f"channel {self.name!r} ({url}): {why}")

    def _where(self, endpoint: str) -> str:
        return f"channel {self.name!r} ({self.url}/{endpoint})"


class _FileBody:
    """An upload body: `file` from its start in CHUNK pieces, with progress.

    Iterable, so the HTTP client sends each piece with one sendall (given a file object it
    would read and send 16 KiB at a time); sized, so it is sent with Content-Length, not chunked.
    """

    def __init__(self, file: BinaryIO, size: int, progress: Progress | None) -> None:
        self._file, self._size, self._progress = file, size, progress

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        self._file.seek(0)  # a retry sends the file again from its start
        while chunk := self._file.read(CHUNK):
            yield chunk
            if self._progress is not None:
                self._progress(len(chunk))


def _raw_body(response: requests.Response) -> Any:
    """The http.client response under a streamed body, to read into our own buffers (readinto);
    None when the body is encoded (then its decoded chunks come from iter_content)."""
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    raw = getattr(response.raw, "_fp", None)
    return raw if callable(getattr(raw, "readinto", None)) else None


def _body(response: requests.Response, skip: int) -> Iterator[bytes]:
    """The body's non-empty chunks, without its first `skip` bytes (a server that ignored our Range)."""
    for chunk in response.iter_content(CHUNK):
        if skip:
            chunk, skip = chunk[skip:], max(0, skip - len(chunk))
        if chunk:
            yield chunk


def _error_for(response: requests.Response, endpoint: str) -> type[KacheryError]:
    status = response.status_code
    if status == HashMismatch.http_status:
        # On /set the server refused the bytes we sent. On /get or /check we sent a valid hash
        # (check_hash), so the server is one we cannot use: another channel may do.
        return HashMismatch if endpoint == "set" else ChannelUnavailable
    return _STATUS_ERRORS.get(status, ChannelUnavailable)


def _retry_after(response: requests.Response) -> float:
    try:
        return max(0.1, float(response.headers["Retry-After"]))
    except ValueError:
        return 1.0


def _takes_no_uploads(response: requests.Response) -> bool:
    """Whether an upload's answer says there is no /set here at all (a kacheryfs server never
    answers one with 404, 405 or 501); a proxy's 413 in front of one is a size limit, and said so."""
    return response.status_code in (404, 405, 501)


def _error_text(response: requests.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.reason or "no reason given"


def _refused(err: BaseException) -> bool:
    """Whether the connection was refused (requests wraps the OSError in urllib3's errors)."""
    seen: BaseException | None = err
    for _ in range(8):  # a chain of causes is short; a cycle is not followed for long
        if seen is None or isinstance(seen, ConnectionRefusedError):
            return seen is not None
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(err: Exception) -> str:
    """What went wrong, without the request's query (it holds the signature)."""
    if isinstance(err, requests.ConnectTimeout):
        return "connection timed out"
    if isinstance(err, requests.ReadTimeout):
        return "no answer in time"
    return f"{type(err).__name__}: {_QUERY.sub('', str(err))}"
