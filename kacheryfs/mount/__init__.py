"""The FUSE mount: operations over the filesystem view, the daemon, and URL ↔ path mapping."""

from kacheryfs.mount.paths import default_mountpoint, mount_path, url_of

__all__ = ["default_mountpoint", "mount_path", "url_of"]
