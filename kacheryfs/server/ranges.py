"""Where a `Range` header is parsed: the one byte range a /get sends, as RFC 9110 §14 reads it.

Only a single `bytes` range is honoured; anything else (another unit, several ranges, bad
syntax) is ignored and the whole blob sent, which RFC 9110 allows. Unsatisfiable is kept apart
from invalid: only a well-formed range that selects no byte is a 416.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kacheryfs.errors import KacheryError

# One range-spec: `first-[last]` or `-suffix`; [0-9] because str.isdigit also takes '²'. At most
# 19 digits (more than any file's size): int() refuses 4,300 and more, and a longer one is invalid.
_SPEC = re.compile(r"(?:([0-9]{1,19})-([0-9]{0,19})|-([0-9]{1,19}))")


class RangeNotSatisfiable(KacheryError):
    """A well-formed Range that selects no byte of the blob (it starts past the end, or is `-0`)."""

    http_status = 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


@dataclass(frozen=True)
class ByteRange:
    """Bytes `start` to `stop` (exclusive) of a blob; never empty."""

    start: int
    stop: int

    @property
    def header(self) -> str:
        """The same range as a `Range` header value: `bytes=first-last`, both inclusive."""
        return f"bytes={self.start}-{self.stop - 1}"


def requested_range(header: str | None, size: int) -> ByteRange | None:
    """The range `header` asks of a `size`-byte blob; None to send it whole.

    RangeNotSatisfiable for a single byte range that selects nothing.
    """
    if header is None:
        return None
    unit, equals, specs = header.strip().partition("=")
    # The list rule allows spaces around elements and empty ones (RFC 9110 §5.6.1.2).
    parts = [part.strip(" \t") for part in specs.split(",") if part.strip(" \t")]
    if not equals or unit.lower() != "bytes" or len(parts) != 1:
        return None  # another unit, bad syntax or several ranges: answered whole
    match = _SPEC.fullmatch(parts[0])
    if match is None:
        return None
    first, last, suffix = match.groups()
    if suffix is not None:
        if int(suffix) == 0:
            raise RangeNotSatisfiable("Range bytes=-0 asks for no bytes: ask for at least one", size)
        if size == 0:
            return None  # a suffix of an empty blob is the empty blob, which 206 cannot express
        return ByteRange(max(0, size - int(suffix)), size)
    if last and int(last) < int(first):
        return None  # invalid, not unsatisfiable: RFC 9110 §14.1.1
    if int(first) >= size:
        raise RangeNotSatisfiable(f"Range starts at byte {first} of a {size}-byte blob: ask for less", size)
    return ByteRange(int(first), min(int(last) + 1, size) if last else size)
