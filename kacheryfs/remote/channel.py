"""The Channel interface: what the resolver and the CLI may ask of any remote."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from kacheryfs.store import BlobWriter

Progress = Callable[[int], None]  # called with the number of bytes just moved


class Channel(Protocol):
    """A named remote holding blobs by hash.

    `fetch` only fills the writer; the caller commits it with the expected hash, so a
    channel that serves wrong bytes is caught by the store, never trusted.
    """

    name: str

    def check(self, alg: str, digest: str) -> int | None:
        """Size of the blob on the channel, or None when it is not there."""
        ...

    def fetch(
        self,
        alg: str,
        digest: str,
        writer: BlobWriter,
        expected_size: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Write the whole blob into `writer` (NotFound when the channel lacks it)."""
        ...

    def read_range(self, alg: str, digest: str, start: int, end: int) -> bytes:
        """Bytes `start` to `end` (exclusive) of the blob; fewer at its end."""
        ...

    def upload(self, alg: str, digest: str, path: Path, size: int, progress: Progress | None = None) -> bool:
        """Send the file at `path` unless the channel has it already; True when bytes were sent."""
        ...
