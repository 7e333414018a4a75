"""Where blobs live: the local content-addressed store."""

from kacheryfs.store.local import BlobWriter, LocalStore

__all__ = ["BlobWriter", "LocalStore"]
