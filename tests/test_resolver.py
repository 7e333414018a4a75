"""The resolver's channel order: a channel that cannot serve sends the read on to the next."""

from __future__ import annotations

import pytest
from fixtures_server import PASSWORD, ServerProcess, quota, readable_tempdir, write_config

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
