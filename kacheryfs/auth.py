"""Request signatures for channels: what the client signs and the server checks.

signature = HMAC-SHA256(key, "kacheryfs-v1\\n{op}\\n{alg}\\n{hash}\\n{channel}\\n{expires}")
with key = PBKDF2-HMAC-SHA256(password, salt="kacheryfs:" + channel, 100,000 rounds).

A signature names one operation on one hash of one channel and expires; the stretched key
makes guessing the password from a logged signature 100,000 times dearer than one HMAC.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from dataclasses import dataclass

from kacheryfs.errors import ChannelMisconfigured

OPERATIONS = ("check", "download", "upload")
KDF_ROUNDS = 100_000
DEFAULT_LIFETIME = 3600  # seconds a freshly made signature stays valid
MAX_LIFETIME = 7 * 24 * 3600  # the server refuses signatures that claim to live longer


@dataclass(frozen=True)
class MissingPassword:
    """A channel password the config takes from an environment variable that is not set:
    no request can be signed, and each says so (`error`)."""

    why: str

    def error(self) -> ChannelMisconfigured:
        return ChannelMisconfigured(self.why)


@functools.lru_cache(maxsize=64)
def channel_key(channel: str, password: str) -> bytes:
    """The signing key of a channel, derived once per (channel, password)."""
    return hashlib.pbkdf2_hmac("sha256", password.encode(), b"kacheryfs:" + channel.encode(), KDF_ROUNDS)


def _message(op: str, alg: str, digest: str, channel: str, expires: int) -> bytes:
    return f"kacheryfs-v1\n{op}\n{alg}\n{digest.lower()}\n{channel}\n{expires}".encode()


def sign(key: bytes, op: str, alg: str, digest: str, channel: str, expires: int) -> str:
    """Hex signature of one operation; `key` comes from `channel_key`."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}")
    return hmac.new(key, _message(op, alg, digest, channel, expires), hashlib.sha256).hexdigest()


def signed_query(
    channel: str, password: str | None, op: str, alg: str, digest: str, lifetime: int = DEFAULT_LIFETIME
) -> dict[str, str]:
    """Query parameters for a request: just the channel when there is no password."""
    if password is None:
        return {"channel": channel}
    expires = int(time.time()) + lifetime
    return {
        "channel": channel,
        "expires": str(expires),
        "signature": sign(channel_key(channel, password), op, alg, digest, channel, expires),
    }


def verify(key: bytes, op: str, alg: str, digest: str, channel: str, expires: str, signature: str) -> bool:
    """True when `signature` is valid for this exact request and has not expired."""
    try:
        when = int(expires)
    except (TypeError, ValueError):
        return False
    now = time.time()
    if when < now or when > now + MAX_LIFETIME:
        return False
    expected = sign(key, op, alg, digest, channel, when)
    # As bytes: compare_digest refuses str holding non-ASCII (TypeError), which a query may carry.
    return hmac.compare_digest(expected.encode(), (signature or "").encode("utf-8", "surrogatepass"))
