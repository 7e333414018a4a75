"""The resolver's channel order: a channel that cannot serve sends the read on to the next;
one that is down is skipped until it is due to be tried again; a failed read says why."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler

import pytest
from fixtures_server import PASSWORD, ScriptedServer, ServerProcess, quota, readable_tempdir, write_config

from kacheryfs.errors import AuthError, ChannelUnavailable, HashMismatch, InvalidManifest, NotFound, StoreFull
from kacheryfs.parallel_fetch import fetch_all
from kacheryfs.remote import HttpChannel, TrackedChannel
from kacheryfs.resolver import BlobRef, Resolver
from kacheryfs.store import LocalStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def two_servers():
    """An exhausted channel (no downloads left today) and a good one, both holding the blob."""
    spent, good = readable_tempdir(), readable_tempdir()
    write_config(spent, [{"name": "lab", "password": PASSWORD, "downloadQuotas": [quota(files=0)], "uploadQuotas": []}])
    write_config(good, [{"name": "lab", "password": PASSWORD, "downloadQuotas": [quota()], "uploadQuotas": []}])
    digest = None
    for directory in (spent, good):
        digest = LocalStore(directory, clean=False).put_bytes(b"on both servers").sha1
    servers = [ServerProcess(spent), ServerProcess(good)]
    yield servers, digest
    for server in servers:
        server.stop()


def test_a_channel_over_its_quota_is_skipped_for_the_next(two_servers, tmp_path):
    (spent, good), digest = two_servers
    channels = [HttpChannel(name, s.url, "lab", PASSWORD, timeout=5) for name, s in (("spent", spent), ("good", good))]
    resolver = Resolver(LocalStore(tmp_path / "local"), channels)
    assert resolver.ensure("sha1", digest).read_bytes() == b"on both servers"
    assert resolver.stats.bytes_by_channel == {"good": 15}


@pytest.fixture
def full_disk_fetch(tmpfs):
    """A server holding a 3 MiB blob, and a 5 MiB disk for the local store: (server, its blob's sha1, the disk)."""
    remote = readable_tempdir()
    write_config(remote, [{"name": "lab", "password": PASSWORD, "downloadQuotas": [quota()], "uploadQuotas": []}])
    wanted = LocalStore(remote, clean=False).put_bytes(b"w" * (3 << 20)).sha1
    server = ServerProcess(remote)
    yield server, wanted, tmpfs("5m")
    server.stop()


def test_a_full_disk_during_a_fetch_evicts_fetched_blobs_and_retries_once(full_disk_fetch):
    server, wanted, disk = full_disk_fetch
    local = LocalStore(disk / "store")  # unbounded: only the disk can say no
    old = [local.put_bytes(bytes([i]) * (1 << 20)).sha1 for i in range(3)]
    for digest in old:
        local.note_remote("sha1", digest, "lab")  # fetched earlier: can be fetched again
    resolver = Resolver(local, [HttpChannel("lab", server.url, "lab", PASSWORD, timeout=5)])
    assert resolver.ensure("sha1", wanted).stat().st_size == 3 << 20
    assert not all(local.has("sha1", digest) for digest in old)  # room was made by eviction


def test_a_full_disk_never_evicts_the_only_copy_of_what_was_stored_here(full_disk_fetch):
    server, wanted, disk = full_disk_fetch
    local = LocalStore(disk / "store")
    only_copies = [local.put_bytes(bytes([i]) * (1 << 20)).sha1 for i in range(3)]
    resolver = Resolver(local, [HttpChannel("lab", server.url, "lab", PASSWORD, timeout=5)])
    with pytest.raises(StoreFull):
        resolver.ensure("sha1", wanted)
    assert all(local.has("sha1", digest) for digest in only_copies)


def test_a_blob_that_cannot_fit_even_after_eviction_evicts_nothing(tmpfs):
    local = LocalStore(tmpfs("5m") / "store")
    fetched = local.put_bytes(b"f" * (1 << 20)).sha1
    local.note_remote("sha1", fetched, "lab")
    with pytest.raises(StoreFull, match="cannot make room"):
        local.cache.evict(free_at_least=64 << 20, need=64 << 20)  # 64 MiB on a 5 MiB disk
    assert local.has("sha1", fetched)


def test_every_fetch_is_logged_with_url_channel_bytes_ms_and_result(two_servers, tmp_path, caplog):
    (spent, good), digest = two_servers
    channels = [HttpChannel(name, s.url, "lab", PASSWORD, timeout=5) for name, s in (("spent", spent), ("good", good))]
    with caplog.at_level("INFO", logger="kacheryfs.resolver"):
        Resolver(LocalStore(tmp_path / "local"), channels).ensure("sha1", digest)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fetch ")]
    assert len(lines) == 2
    assert f"sha1://{digest}" in lines[1] and "channel=good" in lines[1] and "bytes=15" in lines[1]
    assert "ms=" in lines[1] and "result=ok" in lines[1] and "channel=spent" in lines[0]


# -- channels that are down ----------------------------------------------------------------


class Failing:
    """A channel's server that answers every request with `status` (changeable) and counts them."""

    def __init__(self, start: Callable[..., ScriptedServer], status: int = 503) -> None:
        self.status, self.requests = status, 0
        self.url = start(self._respond).url

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests += 1
        body = json.dumps({"error": "scripted"}).encode()
        handler.send_response(self.status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)


class Clock:
    """Monotonic seconds that move only when the test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def channel(name: str, url: str, password: str = PASSWORD) -> HttpChannel:
    return HttpChannel(name, url, "lab", password, timeout=5, retries=0)  # one request per call: countable


@pytest.fixture
def lab_with_30_blobs():
    """A good server holding 30 small blobs: (server, their sha1s)."""
    directory = readable_tempdir()
    write_config(directory, [{"name": "lab", "password": PASSWORD, "downloadQuotas": [quota()], "uploadQuotas": []}])
    store = LocalStore(directory, clean=False)
    digests = [store.put_bytes(b"blob %d" % i).sha1 for i in range(30)]
    server = ServerProcess(directory)
    yield server, digests
    server.stop()


def test_a_channel_that_fails_is_skipped_while_down_not_asked_again_for_each_blob(
    scripted_server, lab_with_30_blobs, tmp_path
):
    lab, digests = lab_with_30_blobs
    broken = Failing(scripted_server)
    resolver = Resolver(LocalStore(tmp_path / "local"), [channel("broken", broken.url), channel("lab", lab.url)])
    result = fetch_all(resolver, [BlobRef("sha1", d) for d in digests], jobs=8)
    assert result.fetched == 30 and not result.failed
    assert broken.requests <= 8  # at most the first request of each parallel job, not one per blob


def test_with_every_channel_down_a_read_fails_at_once_naming_each_and_since_when(scripted_server, tmp_path):
    first, second = Failing(scripted_server), Failing(scripted_server)
    resolver = Resolver(LocalStore(tmp_path / "local"), [channel("first", first.url), channel("second", second.url)])
    with pytest.raises(ChannelUnavailable):
        resolver.ensure("sha1", "1" * 40)
    asked = first.requests, second.requests
    with pytest.raises(ChannelUnavailable, match="first: channel 'first' is down since .*second: .* down since"):
        resolver.ensure("sha1", "2" * 40)
    with pytest.raises(ChannelUnavailable, match="down since"):
        resolver.find("sha1", "3" * 40)
    assert (first.requests, second.requests) == asked  # no request at all


def test_a_down_channel_is_probed_once_its_wait_is_over_and_the_wait_doubles_up_to_a_bound(scripted_server):
    broken, clock = Failing(scripted_server), Clock()
    tracked = TrackedChannel(channel("broken", broken.url), down_for=30, max_down_for=60, clock=clock)
    for advance, asked, next_try in ((0, 1, 30), (29, 1, 1), (1, 2, 60), (59, 2, 1), (1, 3, 60)):
        clock.now += advance
        with pytest.raises(ChannelUnavailable):
            tracked.check("sha1", "1" * 40)
        assert broken.requests == asked
        assert tracked.status()["next_try_in_s"] == next_try
    broken.status = 404  # it answers again ("not found" is an answer)
    clock.now += 60
    assert tracked.check("sha1", "1" * 40) is None
    assert tracked.status()["state"] == "up"
    tracked.check("sha1", "2" * 40)
    assert broken.requests == 3 + 2 + 2  # the probe, then the next check at once (each a GET /check and a HEAD)


def test_going_down_and_coming_back_are_logged_once_each(scripted_server, lab_with_30_blobs, tmp_path, caplog):
    lab, digests = lab_with_30_blobs
    broken, clock = Failing(scripted_server), Clock()
    tracked = TrackedChannel(channel("broken", broken.url), clock=clock)
    resolver = Resolver(LocalStore(tmp_path / "local"), [tracked, channel("lab", lab.url)])
    with caplog.at_level(logging.INFO, logger="kacheryfs"):
        for digest in digests[:15]:
            assert resolver.find("sha1", digest)[0] == "lab"
        broken.status, clock.now = 404, clock.now + 30
        for digest in digests[15:]:
            assert resolver.find("sha1", digest)[0] == "lab"
    messages = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(messages) == 2, messages
    assert "broken is down" in messages[0] and "broken is back up" in messages[1]


def test_status_shows_each_channel_up_or_down_and_its_failures_apart_from_failed_reads(
    scripted_server, lab_with_30_blobs, tmp_path
):
    lab, digests = lab_with_30_blobs
    broken = Failing(scripted_server)
    resolver = Resolver(LocalStore(tmp_path / "local"), [channel("broken", broken.url), channel("lab", lab.url)])
    resolver.ensure("sha1", digests[0])
    status = resolver.status()
    down, up = status["channel_states"]
    assert (down["name"], down["state"], up["name"], up["state"]) == ("broken", "down", "lab", "up")
    assert down["down_since"] and "HTTP 503" in down["last_error"]
    assert (status["errors"], status["channel_failures"]) == (0, 1)  # the read itself succeeded


def test_a_read_that_failed_counts_once_as_an_error_whatever_its_channels_did(scripted_server, tmp_path):
    broken = Failing(scripted_server)
    resolver = Resolver(LocalStore(tmp_path / "local"), [channel("broken", broken.url)])
    for _ in range(2):  # the second finds the channel down and skips it
        with pytest.raises(ChannelUnavailable):
            resolver.ensure("sha1", "1" * 40)
    with pytest.raises(ChannelUnavailable):
        resolver.find("sha1", "2" * 40)
    status = resolver.status()
    assert (status["errors"], status["channel_failures"], status["lookups_in_progress"]) == (3, 1, 0)


# -- what a failed read raises --------------------------------------------------------------


@pytest.fixture
def wrong_bytes(scripted_server):
    """A channel's server that answers every /get with 15 zero bytes, a size `two_servers`' blob has."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "15")
        handler.end_headers()
        handler.wfile.write(bytes(15))

    return scripted_server(respond).url


def test_wrong_bytes_from_every_channel_that_has_the_blob_is_a_hash_mismatch(two_servers, wrong_bytes, tmp_path):
    (_, empty), _ = two_servers
    missing = hashlib.sha1(b"on no server").hexdigest()
    channels = [channel("liar", wrong_bytes), channel("other liar", wrong_bytes), channel("lab", empty.url)]
    with pytest.raises(HashMismatch, match="liar: served wrong bytes.*other liar: served wrong bytes.*lab: not found"):
        Resolver(LocalStore(tmp_path / "local"), channels).ensure("sha1", missing, 15)


def test_credentials_refused_by_every_channel_is_an_auth_error(two_servers, tmp_path):
    (spent, good), digest = two_servers
    channels = [channel("a", spent.url, "wrong"), channel("b", good.url, "wrong")]
    resolver = Resolver(LocalStore(tmp_path / "local"), channels)
    with pytest.raises(AuthError):
        resolver.ensure("sha1", digest)
    with pytest.raises(AuthError):
        resolver.find("sha1", digest)


def test_failures_of_different_kinds_are_channel_unavailable(two_servers, scripted_server, tmp_path):
    (_, good), digest = two_servers
    channels = [channel("refuses", good.url, "wrong"), channel("broken", Failing(scripted_server).url)]
    with pytest.raises(ChannelUnavailable) as caught:
        Resolver(LocalStore(tmp_path / "local"), channels).ensure("sha1", digest)
    assert type(caught.value) is ChannelUnavailable


def test_a_manifest_that_fails_validation_is_judged_once(tmp_path):
    """A path in an invalid snapshot asked again (a stat loop) neither reads nor parses it again."""
    store = LocalStore(tmp_path)
    digest = store.put_bytes(b'{"files": {"a": {"size": "big"}}}').sha1
    resolver = Resolver(store)
    with pytest.raises(InvalidManifest) as first:
        resolver.manifest("sha1", digest)
    store.blob_path("sha1", digest).unlink()  # read again, it would now be NotFound
    with pytest.raises(InvalidManifest) as again:
        resolver.manifest("sha1", digest)
    assert str(again.value) == str(first.value)


def test_a_manifest_damaged_on_disk_is_judged_again_once_mended(tmp_path):
    """A verdict on bytes that are not the manifest's own is not kept: a repair or a fetch may mend them."""
    store = LocalStore(tmp_path)
    good = b'{"files": {"a": {"size": 1, "sha1": "%s"}}}' % (b"1" * 40)
    digest = store.put_bytes(good).sha1
    blob = store.blob_path("sha1", digest)
    blob.chmod(0o644)
    blob.write_bytes(b"{damaged")
    resolver = Resolver(store)
    with pytest.raises(InvalidManifest):
        resolver.manifest("sha1", digest)
    blob.write_bytes(good)
    assert list(resolver.manifest("sha1", digest).files) == ["a"]


def test_a_data_file_named_as_a_snapshot_is_refused_without_being_read_whole(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    binary = store.put_bytes(b"\x93NUMPY" + bytes(1000)).sha1
    with pytest.raises(InvalidManifest, match="is not a directory manifest"):
        Resolver(store).manifest("sha1", binary)
    monkeypatch.setattr("kacheryfs.resolver.MANIFEST_MAX", 100)
    big = store.put_bytes(b'{"files": {}, "pad": "' + b"x" * 200 + b'"}').sha1
    with pytest.raises(InvalidManifest, match=r"has 2\d\d bytes, more than any directory manifest"):
        Resolver(store).manifest("sha1", big)


def test_concurrent_lookups_of_a_missing_blob_ask_its_channels_once(tmp_path):
    class SlowChannel:
        name, checks = "slow", 0

        def check(self, alg: str, digest: str) -> int | None:
            SlowChannel.checks += 1
            time.sleep(0.3)
            return 1234

    resolver = Resolver(LocalStore(tmp_path), [SlowChannel()])
    with ThreadPoolExecutor(16) as pool:
        found = set(pool.map(lambda _: resolver.find("sha1", "1" * 40), range(16)))
    assert found == {("slow", 1234)} and SlowChannel.checks == 1
    assert resolver.find("sha1", "1" * 40) == ("slow", 1234) and SlowChannel.checks == 2  # nothing kept after


def test_a_channels_word_that_a_blob_is_too_big_for_a_manifest_is_not_kept(tmp_path, monkeypatch):
    class Channel:
        name, size = "lab", 10**12

        def check(self, alg: str, digest: str) -> int | None:
            return Channel.size

        def fetch(self, alg: str, digest: str, writer, expected_size=None, progress=None) -> None:
            raise NotFound("lab has no such blob")

    monkeypatch.setattr("kacheryfs.resolver.MANIFEST_MAX", 100)
    resolver = Resolver(LocalStore(tmp_path), [Channel()])
    with pytest.raises(InvalidManifest, match="more than any directory manifest"):
        resolver.manifest("sha1", "2" * 40)
    Channel.size = None  # the channel thinks again: it has no such blob
    with pytest.raises(NotFound):
        resolver.manifest("sha1", "2" * 40)
