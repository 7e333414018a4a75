"""Where an HTTP request becomes a store call: the aiohttp storage server.

Thin by design: channels and quotas live in their own modules, blobs in a LocalStore
rooted at the served directory (so nginx can serve the same files read-only). Errors are
kacheryfs errors translated here, and only here, into an HTTP status and `{"error": ...}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from kacheryfs import auth
from kacheryfs.errors import AuthError, ChannelBusy, ConfigError, KacheryError, NotFound, ServeError
from kacheryfs.hashing import CHUNK
from kacheryfs.server.channels import ServerChannel, load_channels
from kacheryfs.server.quotas import QuotaLedger
from kacheryfs.server.ranges import RangeNotSatisfiable, requested_range
from kacheryfs.store import LocalStore
from kacheryfs.uri import check_hash

log = logging.getLogger(__name__)
COUNTERS_PATH = Path(".kacheryfs") / "quota-counters.json"
SHUTDOWN_TIMEOUT = 3.0  # seconds
STALL_TIMEOUT = 60.0  # seconds a transfer may move no byte (either way) before it is dropped and its slot freed
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_MAX_USER_TIMEOUT_MS = 2**31 - 1  # TCP_USER_TIMEOUT is an int of milliseconds (24 days)


class StorageServer:
    """The request handlers, over one store, its channels and their quota ledger."""

    def __init__(self, directory: Path, environ: Mapping[str, str], stall_timeout: float = STALL_TIMEOUT) -> None:
        if not directory.is_dir():
            raise ConfigError(f"{directory} is not a directory: give the server's storage directory")
        self.channels = load_channels(directory, environ)
        self.store = LocalStore(directory)
        self.ledger = QuotaLedger(directory / COUNTERS_PATH)
        self.stall_timeout = stall_timeout

    async def probe(self, request: web.Request) -> web.Response:
        return web.json_response({"success": True})

    async def check(self, request: web.Request) -> web.Response:
        alg, digest = _blob_id(request)
        self._authorize(request, "check", alg, digest)
        size = self.store.size(alg, digest)
        if size is None:
            return web.json_response({"success": True, "found": False})
        return web.json_response({"success": True, "found": True, "size": size})

    async def download(self, request: web.Request) -> web.StreamResponse:
        alg, digest = _blob_id(request)
        channel = self._authorize(request, "download", alg, digest)
        size = self.store.size(alg, digest)
        if size is None:
            raise NotFound(f"{alg}://{digest} is not on this server")
        quota = channel.quota("download", size)
        path = self.store.blob_path(alg, digest)
        # Range is only defined for GET (RFC 9110 §14.2), and an If-Range that fails turns it off
        # before it is read: no 416 for a range of another version of the file.
        ranged = request.method == "GET" and _if_range_holds(request, path)
        wanted = requested_range(request.headers.get(hdrs.RANGE), size) if ranged else None
        # aiohttp's FileResponse reads Range itself: it gets the range decided here, or none
        # (a request without either header, most of them, goes as it is).
        forwarded = request
        if hdrs.RANGE in request.headers or hdrs.IF_RANGE in request.headers:
            headers = CIMultiDict(request.headers)
            headers.popall(hdrs.RANGE, None)
            headers.popall(hdrs.IF_RANGE, None)
            if wanted is not None:
                headers[hdrs.RANGE] = wanted.header
            forwarded = request.clone(headers=headers)
        response = _BlobResponse(path, chunk_size=CHUNK)
        if request.method == "HEAD":
            await response.prepare(forwarded)
            return response  # sends no bytes, so it counts against no quota
        nbytes = size if wanted is None else wanted.stop - wanted.start
        with self.ledger.transfer(channel.name, "download", quota, nbytes) as refund:
            # Sent inside the handler so a dropped connection refunds the quota.
            _limit_unacknowledged_time(request, self.stall_timeout)
            try:
                await response.prepare(forwarded)
                await response.write_eof()
            except TimeoutError as err:  # ETIMEDOUT from TCP_USER_TIMEOUT: the client stopped reading
                raise ConnectionAbortedError(f"the client read nothing for {self.stall_timeout:g} s") from err
            if response.status not in (200, 206):
                refund()  # 304 or 412: no body was sent
        return response

    async def upload(self, request: web.Request) -> web.Response:
        alg, digest = _blob_id(request)
        channel = self._authorize(request, "upload", alg, digest)
        size = request.content_length
        if size is None:
            raise web.HTTPLengthRequired(reason="Content-Length is required: send the whole file as the body")
        quota = channel.quota("upload", size)
        with self.ledger.transfer(channel.name, "upload", quota, size):
            await self._receive(request, alg, digest, size)
        return web.json_response({"success": True})

    async def _receive(self, request: web.Request, alg: str, digest: str, size: int) -> None:
        # Disk writes and digests run off the event loop; at most one chunk is held in memory.
        writer = await asyncio.to_thread(self.store.writer, size_hint=size)
        try:
            async for chunk in self._body(request, size):
                await asyncio.to_thread(writer.write, chunk)
            await asyncio.to_thread(writer.commit, expect_alg=alg, expect_hash=digest, expect_size=size)
        finally:
            # Off the loop too: aborting a large upload waits for its digest and writer threads.
            await asyncio.shield(asyncio.to_thread(writer.abort))

    async def _body(self, request: web.Request, size: int) -> AsyncIterator[bytes]:
        """The upload body in chunks of about CHUNK bytes; 408 when it stalls for `stall_timeout`."""
        parts: list[bytes] = []
        held = remaining = size
        while remaining:
            try:
                async with asyncio.timeout(self.stall_timeout):
                    part = await request.content.readany()
            except TimeoutError:
                raise web.HTTPRequestTimeout(
                    reason=f"the upload sent nothing for {self.stall_timeout:g} s: send it again"
                ) from None
            if not part:
                raise asyncio.IncompleteReadError(b"", remaining)  # the client went away
            part = part[:remaining]
            parts.append(part)
            remaining -= len(part)
            if held - remaining >= CHUNK or not remaining:
                yield parts[0] if len(parts) == 1 else b"".join(parts)
                parts, held = [], remaining

    def _authorize(self, request: web.Request, op: str, alg: str, digest: str) -> ServerChannel:
        query = request.query
        name = query.get("channel", "")
        channel = self.channels.get(name)
        if channel is not None and channel.public and op != "upload":
            return channel
        expires, signature = query.get("expires", ""), query.get("signature", "")
        if channel is None or not auth.verify(channel.key, op, alg, digest, name, expires, signature):
            # One answer for every failure, so it tells a prober nothing about channel names.
            raise AuthError(f"not authorized to {op} on channel {name!r}: check the channel name, password and clock")
        return channel


class _BlobResponse(web.FileResponse):
    """A FileResponse that may be sent inside the handler: aiohttp calls `prepare` again after it returns."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        return None if self.prepared else await super().prepare(request)


def _blob_id(request: web.Request) -> tuple[str, str]:
    alg = request.match_info["alg"]
    return alg, check_hash(alg, request.match_info["hash"])


def _if_range_holds(request: web.Request, path: Path) -> bool:
    """Whether If-Range, if sent, names the blob as it is (RFC 9110 §13.1.5): its ETag or Last-Modified."""
    validator = request.headers.get(hdrs.IF_RANGE)
    if validator is None:
        return True
    st = os.stat(path)
    if validator.startswith(('"', "W/")):
        # The ETag FileResponse sends; a weak one never matches (RFC 9110 §13.1.5).
        return validator == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    when = request.if_range
    # Last-Modified has whole seconds (aiohttp rounds up, others down): the blob's second either way.
    return when is not None and abs(when.timestamp() - st.st_mtime) < 1


def _limit_unacknowledged_time(request: web.Request, seconds: float) -> None:
    """Have the kernel drop the connection when sent bytes wait `seconds` unread (TCP_USER_TIMEOUT).

    Linux counts a client whose receive window stays closed too, so a download that stops being
    read frees its slot, while one read slowly keeps opening its window and goes on.
    """
    sock = request.transport.get_extra_info("socket") if request.transport else None
    option = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only: elsewhere a stuck reader holds its slot
    if sock is not None and option is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, option, min(_MAX_USER_TIMEOUT_MS, max(1, round(seconds * 1000))))


@web.middleware
async def _errors_and_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn errors into JSON answers and log one line per request (never the query: it holds signatures)."""
    started = time.monotonic()
    status: int | str = "aborted"
    nbytes = 0
    try:
        try:
            response = await handler(request)
        except KacheryError as err:
            response = web.json_response({"error": str(err)}, status=err.http_status)
            if isinstance(err, ChannelBusy):
                response.headers["Retry-After"] = str(err.retry_after)
            if isinstance(err, RangeNotSatisfiable):
                response.headers[hdrs.CONTENT_RANGE] = f"bytes */{err.size}"
        except web.HTTPException as err:
            response = web.json_response({"error": err.reason}, status=err.status)
        except (ConnectionError, asyncio.IncompleteReadError):
            # The client went away: nobody to answer. Raising would have aiohttp log a traceback;
            # an answer on an aborted transport is dropped quietly instead.
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=400)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = web.json_response({"error": "internal server error (see the server log)"}, status=500)
        if not request.content.at_eof():
            # A body refused unread (401, 403, 413, 429): close once it is answered rather than
            # keep the connection, whose unread bytes would otherwise hold up shutdown.
            response.force_close()
        status = response.status
        # Body bytes moved: received for a stored POST, sent for GET; HEAD moves none.
        moved = {"POST": request.content_length if status == 200 else 0, "GET": response.content_length}
        nbytes = moved.get(request.method) or 0
        return response
    finally:
        ms = (time.monotonic() - started) * 1000
        log.info("%s %s %s %d %.0fms", request.method, request.path, status, nbytes, ms)


def make_app(directory: Path, environ: Mapping[str, str], stall_timeout: float = STALL_TIMEOUT) -> web.Application:
    """The aiohttp application serving `directory` (ConfigError if its kachery.json is bad).

    `environ` holds the variables that kachery.json names for passwords.
    """
    server = StorageServer(Path(directory), environ, stall_timeout)
    app = web.Application(middlewares=[_errors_and_log])
    app.cleanup_ctx.append(functools.partial(_persisting, server.ledger))
    blob = "/{alg}/{hash}"
    app.router.add_get("/probe", server.probe)
    app.router.add_get("/check" + blob, server.check)
    app.router.add_get("/get" + blob, server.download)  # also answers HEAD
    app.router.add_post("/set" + blob, server.upload)
    return app


async def _persisting(ledger: QuotaLedger, app: web.Application) -> AsyncIterator[None]:
    """Keep the quota counters saved while the app runs, and save them once more at its end."""
    task = asyncio.create_task(ledger.persist())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run(
    directory: Path,
    environ: Mapping[str, str],
    host: str = "127.0.0.1",
    port: int = 0,
    stall_timeout: float = STALL_TIMEOUT,
    log_level: int | str = logging.INFO,
) -> None:
    """Serve `directory` until SIGINT or SIGTERM; print the bound address to stderr.

    At INFO (the default) the log has one line per request: method, path, status, bytes, ms.
    """
    # force: replace the quieter WARNING set-up every CLI command starts with; this process only serves.
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr, force=True)
    asyncio.run(_serve(make_app(Path(directory), environ, stall_timeout), host, port))


async def _listen(runner: web.AppRunner, host: str, port: int) -> None:
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} is in use on {host}: stop what listens there, or give another --port"
            ) from err
        raise ServeError(f"cannot listen on {host} port {port}: {err.strerror or err}") from err


async def _serve(app: web.Application, host: str, port: int) -> None:
    # Transfers are verified and clients resume, so shutdown may cut them: wait briefly, not 60 s.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        await _listen(runner, host, port)
        bound_port = runner.addresses[0][1]
        shown_host = f"[{host}]" if ":" in host else host
        print(f"kacheryfs serve: listening on http://{shown_host}:{bound_port}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
