"""Remote channels: the Channel interface, its HTTP implementation, and the tracking of channels that are down."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kacheryfs.remote.channel import Channel, Progress
from kacheryfs.remote.health import TrackedChannel

if TYPE_CHECKING:
    from kacheryfs.remote.http import HttpChannel

__all__ = ["Channel", "HttpChannel", "Progress", "TrackedChannel"]


def __getattr__(name: str) -> object:
    # HttpChannel only when asked for: requests is slow to import, and the resolver needs only the rest
    if name == "HttpChannel":
        from kacheryfs.remote.http import HttpChannel

        return HttpChannel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
