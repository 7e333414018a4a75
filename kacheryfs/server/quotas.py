"""Quota accounting: transfers in flight and files and bytes per UTC day, per channel quota.

Daily counts are saved to a JSON file (temp file, fsync, rename) by `persist`, off the
event loop and at most once per SAVE_INTERVAL, so a restart does not hand out a fresh day's
allowance (a crash loses at most the last interval's counts). A transfer is counted when it
starts, so concurrent ones cannot overshoot a limit, and refunded if it fails or sends no body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from kacheryfs.errors import ChannelBusy, QuotaExceeded
from kacheryfs.server.channels import Quota

log = logging.getLogger(__name__)
SAVE_INTERVAL = 1.0  # seconds: the most counts a crash can lose, and the least time between two saves


class QuotaLedger:
    """Counts transfers against quotas; `transfer()` admits one or raises QuotaExceeded."""

    def __init__(self, path: Path, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self._now = now
        self._active: dict[str, int] = {}
        self._day, self._daily = self._load()
        self._changed = False

    def transfer(
        self, channel: str, direction: str, quota: Quota, nbytes: int
    ) -> AbstractContextManager[Callable[[], None]]:
        """Admit a transfer of `nbytes` (QuotaExceeded if over a limit); use the result as a context.

        The context gives a `refund()` for a transfer that ends without moving its bytes.
        """
        key = f"{channel}/{direction}/{quota.name}"
        what = f"{direction} quota {quota.name!r} of channel {channel!r}"
        if self._active.get(key, 0) >= quota.max_simultaneous:
            raise ChannelBusy(f"{what}: {quota.max_simultaneous} transfers already running; try again shortly")
        if nbytes > quota.max_bytes_per_day:
            raise QuotaExceeded(
                f"{what}: {nbytes} bytes is more than the {quota.max_bytes_per_day} bytes it allows per day;"
                " ask the server's operator to raise its maxNumBytesPerDay"
            )
        self._roll_day()
        counts = self._daily.setdefault(key, {"files": 0, "bytes": 0})
        if counts["files"] + 1 > quota.max_files_per_day:
            raise QuotaExceeded(f"{what}: {quota.max_files_per_day} files per day used up; try again tomorrow (UTC)")
        if counts["bytes"] + nbytes > quota.max_bytes_per_day:
            raise QuotaExceeded(f"{what}: {quota.max_bytes_per_day} bytes per day used up; try again tomorrow (UTC)")
        return self._admit(key, nbytes)

    @contextmanager
    def _admit(self, key: str, nbytes: int) -> Iterator[Callable[[], None]]:
        day = self._day
        counted = True

        def refund() -> None:
            nonlocal counted
            if counted and self._day == day:  # a failed transfer costs nothing, as in the original
                self._count(key, -1, -nbytes)
            counted = False

        self._count(key, 1, nbytes)
        self._active[key] = self._active.get(key, 0) + 1
        try:
            yield refund
        except BaseException:
            refund()
            raise
        finally:
            self._active[key] -= 1

    def _count(self, key: str, files: int, nbytes: int) -> None:
        counts = self._daily.setdefault(key, {"files": 0, "bytes": 0})
        counts["files"] += files
        counts["bytes"] += nbytes
        self._changed = True

    def _today(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self._now()))

    def _roll_day(self) -> None:
        if self._day != self._today():
            self._day, self._daily = self._today(), {}

    def _load(self) -> tuple[str, dict[str, dict[str, int]]]:
        try:
            doc = json.loads(self.path.read_text())
            if doc["day"] == self._today():
                return doc["day"], {
                    k: {"files": int(v["files"]), "bytes": int(v["bytes"])} for k, v in doc["counts"].items()
                }
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("ignoring unreadable quota counters %s: %s", self.path, err)
        return self._today(), {}

    async def persist(self, interval: float = SAVE_INTERVAL) -> None:
        """Save changed counts every `interval` seconds, off the event loop; once more when cancelled."""
        try:
            while True:
                await asyncio.sleep(interval)
                await self._save_changes()
        finally:
            await asyncio.shield(self._save_changes())

    async def _save_changes(self) -> None:
        if self._changed:
            self._changed = False
            # Serialized here, on the loop, so the thread never sees the counts mid-change.
            await asyncio.to_thread(self._write, json.dumps({"day": self._day, "counts": self._daily}))

    def _write(self, doc: str) -> None:
        temp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "w") as f:
                f.write(doc)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except OSError as err:  # e.g. a full disk: keep serving, the counts stay in memory
            self._changed = True  # try again at the next interval
            log.warning("cannot save quota counters to %s: %s", self.path, err)
