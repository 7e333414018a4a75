"""The resolver's channel order: a channel that cannot serve sends the read on to the next."""

from __future__ import annotations

import pytest
from fixtures_server import PASSWORD, ServerProcess, quota, readable_tempdir, write_config

from kacheryfs.errors import StoreFull
from kacheryfs.remote import HttpChannel
from kacheryfs.resolver import Resolver
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
