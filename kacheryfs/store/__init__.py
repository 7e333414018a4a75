"""Where blobs live: the local content-addressed store."""

from kacheryfs.store.cache import Cache, CacheLimits, Usage
from kacheryfs.store.local import BlobWriter, LocalStore

__all__ = ["BlobWriter", "Cache", "CacheLimits", "LocalStore", "Usage"]
