"""Remote channels: the Channel interface and its HTTP implementation."""

from kacheryfs.remote.channel import Channel, Progress
from kacheryfs.remote.http import HttpChannel

__all__ = ["Channel", "HttpChannel", "Progress"]
