"""kacheryfs: content-addressed storage reached through Python, a CLI, HTTP and a FUSE mount.

import kacheryfs as ka
url = ka.store_npy(array)          # 'sha1://…/file.npy'
array = ka.load_npy(url)
"""

from kacheryfs.api import (
    config,
    get_config,
    get_file_info,
    load_bytes,
    load_dir,
    load_file,
    load_npy,
    load_object,
    load_text,
    prefetch,
    read_dir,
    set_config,
    store_bytes,
    store_dir,
    store_file,
    store_npy,
    store_object,
    store_text,
)
from kacheryfs.errors import (
    AuthError,
    ChannelBusy,
    ChannelMisconfigured,
    ChannelUnavailable,
    ConfigError,
    DestinationExists,
    Forbidden,
    HashMismatch,
    InvalidInput,
    InvalidManifest,
    InvalidURL,
    IsADirectory,
    KacheryError,
    MountError,
    NotADirectory,
    NotFound,
    QuotaExceeded,
    ServeError,
    StoreError,
    StoreFull,
    TooLarge,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The mount's path helpers pull in the whole filesystem view: imported only when used,
    # so `kachery-cat` and friends start faster.
    if name in ("mount_path", "url_of"):
        from kacheryfs.mount import paths

        return getattr(paths, name)
    raise AttributeError(f"module 'kacheryfs' has no attribute {name!r}")


__all__ = [
    "AuthError",
    "ChannelBusy",
    "ChannelMisconfigured",
    "ChannelUnavailable",
    "ConfigError",
    "DestinationExists",
    "Forbidden",
    "HashMismatch",
    "InvalidInput",
    "InvalidManifest",
    "InvalidURL",
    "IsADirectory",
    "KacheryError",
    "MountError",
    "NotADirectory",
    "NotFound",
    "QuotaExceeded",
    "ServeError",
    "StoreError",
    "StoreFull",
    "TooLarge",
    "config",
    "get_config",
    "get_file_info",
    "load_bytes",
    "load_dir",
    "load_file",
    "load_npy",
    "load_object",
    "load_text",
    "mount_path",
    "prefetch",
    "read_dir",
    "set_config",
    "store_bytes",
    "store_dir",
    "store_file",
    "store_npy",
    "store_object",
    "store_text",
    "url_of",
]
