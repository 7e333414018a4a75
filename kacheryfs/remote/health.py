"""Remember which channels are down, and skip them while they are.

A channel that fails by being unreachable (refused, silent, 5xx: ChannelUnavailable) is
down for `down_for` seconds; then one request probes it, and each failed probe doubles the
wait up to `max_down_for`. Any answer, even "not found", brings it back. So a dead channel
costs one failure per period, not one per blob, and a read with every channel down fails at
once. Going down and coming back are each logged once. The state lives in this process only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kacheryfs.errors import AuthError, ChannelUnavailable, HashMismatch, NotFound, QuotaExceeded
from kacheryfs.remote.channel import Channel, Progress
from kacheryfs.store import BlobWriter

log = logging.getLogger(__name__)
T = TypeVar("T")

DOWN_FOR = 5.0  # seconds a channel is skipped after it first fails (a server restarting costs no more)
MAX_DOWN_FOR = 300.0  # the longest wait between probes of a channel that stays down
# What only a channel that was reached can answer.
_ANSWERS = (NotFound, HashMismatch, AuthError, QuotaExceeded)


@dataclass
class _Health:
    failures: int = 0  # requests that found the channel unreachable, ever
    last_error: str = ""
    down_since: float | None = None  # wall time it went down; None while it is up
    retry_at: float = 0.0  # clock time from which one request may probe it
    wait: float = 0.0  # seconds from the last failure to that probe
    probing: bool = False


class TrackedChannel:
    """A channel that raises ChannelUnavailable at once, without a request, while it is down.

    Safe to share between threads. `clock` (monotonic seconds) is for tests.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        down_for: float = DOWN_FOR,
        max_down_for: float = MAX_DOWN_FOR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channel = channel
        self.name = channel.name
        self.down_for = down_for
        self.max_down_for = max_down_for
        self._clock = clock
        self._lock = threading.Lock()
        self._health = _Health()

    def __repr__(self) -> str:
        return f"TrackedChannel({self.channel!r})"

    def check(self, alg: str, digest: str) -> int | None:
        return self._call(self.channel.check, alg, digest)

    def fetch(
        self,
        alg: str,
        digest: str,
        writer: BlobWriter,
        expected_size: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        self._call(self.channel.fetch, alg, digest, writer, expected_size, progress)

    def read_range(self, alg: str, digest: str, start: int, end: int) -> bytes:
        return self._call(self.channel.read_range, alg, digest, start, end)

    def upload(self, alg: str, digest: str, path: Path, size: int, progress: Progress | None = None) -> bool:
        return self._call(self.channel.upload, alg, digest, path, size, progress)

    @property
    def failures(self) -> int:
        """Requests that found this channel unreachable, since the process started."""
        return self._health.failures

    def down_error(self) -> ChannelUnavailable | None:
        """The error this channel would be skipped with now; None when it may be asked."""
        with self._lock:
            health = self._health
            if health.down_since is None or (not health.probing and self._clock() >= health.retry_at):
                return None
            return self._down_error()

    def status(self) -> dict[str, object]:
        """Up or down, since when, the last error and the failure count, for `kacheryfs status`."""
        with self._lock:
            health, since = self._health, self._health.down_since
            return {
                "name": self.name,
                "state": "up" if since is None else "down",
                "down_since": None if since is None else _when(since),
                "next_try_in_s": None if since is None else round(max(0.0, health.retry_at - self._clock()), 1),
                "failures": health.failures,
                "last_error": health.last_error,
            }

    def _call(self, request: Callable[..., T], *args: object) -> T:
        probe = self._admit()
        try:
            result = request(*args)
        except ChannelUnavailable as err:
            self._failed(err, probe)
            raise
        except _ANSWERS:
            self._answered()
            raise
        except BaseException:  # e.g. the local disk filled up: says nothing of the channel
            if probe:
                with self._lock:
                    self._health.probing = False
            raise
        self._answered()
        return result

    def _admit(self) -> bool:
        """Whether this request is the probe of a channel that is down; ChannelUnavailable if it must not be sent."""
        with self._lock:
            health = self._health
            if health.down_since is None:
                return False
            if health.probing or self._clock() < health.retry_at:
                raise self._down_error()
            health.probing = True
            return True

    def _failed(self, err: ChannelUnavailable, probe: bool) -> None:
        with self._lock:
            health = self._health
            health.failures += 1
            health.last_error = str(err)
            went_down = health.down_since is None
            if went_down:
                health.down_since, health.wait = time.time(), self.down_for
            elif probe:
                health.wait = min(2 * health.wait, self.max_down_for)
            else:
                return  # a request sent before it went down: the wait already runs
            health.retry_at = self._clock() + health.wait
            health.probing = False
            wait = health.wait
        if went_down:
            log.warning("channel %s is down, skipped for %g s: %s", self.name, wait, err)
        else:
            log.debug("channel %s is still down, next try in %g s: %s", self.name, wait, err)

    def _answered(self) -> None:
        with self._lock:
            health = self._health
            down_since = health.down_since
            if down_since is None:
                return
            health.down_since, health.probing, health.retry_at = None, False, 0.0
        log.info("channel %s is back up after %.0f s down", self.name, time.time() - down_since)

    def _down_error(self) -> ChannelUnavailable:
        """Why this channel is skipped (under `_lock`, while it is down)."""
        health = self._health
        retry = time.time() + max(0.0, health.retry_at - self._clock())
        return ChannelUnavailable(
            f"channel {self.name!r} is down since {_when(health.down_since or 0.0)}, not asked again before "
            f"{_when(retry)} (last error: {health.last_error})"
        )


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))
