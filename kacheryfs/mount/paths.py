"""Map hash URLs to paths under a kacheryfs mount (`mount_path`) and paths back to URLs (`url_of`).

The default mountpoint is the config's `[mount] mountpoint`; without one, `/mnt/kachery`
for root and `~/kachery` for everyone else (a home directory survives logout, unlike the
runtime dir).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from kacheryfs.config import Config, load_config
from kacheryfs.errors import InvalidURL, KacheryError, MountError, NotFound
from kacheryfs.uri import KacheryURL, as_url
from kacheryfs.vfs import SNAPSHOT_VIEW, STAGING_VIEW, XATTR_PREFIX

URL_XATTR = XATTR_PREFIX + "url"


def default_mountpoint(config: Config | None = None) -> Path:
    """Where `kacheryfs mount` mounts when given no mountpoint."""
    config = load_config() if config is None else config
    if config.mountpoint is not None:
        return config.mountpoint.expanduser()
    return Path("/mnt/kachery") if os.geteuid() == 0 else Path.home() / "kachery"


def mount_path(url: str | KacheryURL, mountpoint: str | os.PathLike[str] | None = None) -> Path:
    """The path of `url` under the mount, keeping the file's extension.

    `sha1://H/data.csv` → `<mnt>/sha1/H.csv`; `sha1dir://H.ds001/a/b.txt` →
    `<mnt>/sha1dir/H.ds001/a/b.txt`. Everything after the first dot of the name is kept, so
    `x.tar.gz` stays `.tar.gz`. A snapshot URL with a query is looked at on the mount only to
    tell a name holding a `?` from a query.
    """
    url = as_url(url)
    mnt = Path(mountpoint) if mountpoint is not None else default_mountpoint()
    if url.is_dir:
        if url.alg != "sha1":
            raise InvalidURL(f"{url}: the mount has directory views for sha1dir:// URLs only")
        snapshot = mnt / SNAPSHOT_VIEW / (url.hash if url.label is None else f"{url.hash}.{url.label}")
        literal = url.literal_path
        if literal is not None and os.path.lexists(snapshot / literal):
            return snapshot / literal  # a name holding a '?' (see KacheryURL.literal_path)
        return snapshot / url.path if url.path else snapshot
    base = url.name.rsplit("/", 1)[-1]
    dot = base.find(".")
    return mnt / url.alg / (url.hash + (base[dot:] if dot >= 0 else ""))


def url_of(path: str | os.PathLike[str]) -> str:
    """The hash URL of a file or directory under a kacheryfs mount (its `user.kachery.url`)."""
    try:
        return os.getxattr(path, URL_XATTR).decode()
    except FileNotFoundError as err:
        raise NotFound(f"no such file or directory: {path}") from err
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP):
            raise NotFound(f"{path} has no kachery URL: {_why_no_url(path)}") from err
        if err.errno == errno.ENOTCONN:
            raise MountError(f"{path} is under a stale mount (its daemon died): run `kacheryfs umount` on it") from err
        raise KacheryError(f"cannot read the URL of {path}: {err.strerror or err}") from err


def _why_no_url(path: str | os.PathLike[str]) -> str:
    from kacheryfs.mount.daemon import is_staging_mount, kacheryfs_mounts  # only here: a large module

    mounts = set(kacheryfs_mounts())
    where = Path(os.path.realpath(path))
    under = [m for m in mounts if where.is_relative_to(m)]
    if not under:
        return "it is not a file or directory under a kacheryfs mount"
    inner = max(under, key=lambda m: len(m.parts))
    if is_staging_mount(inner, mounts) or where.is_relative_to(inner / STAGING_VIEW):  # staging apart, or shared
        return "not yet: a staged file has one once closed, a staged directory once no file in it is open for writing"
    return "the mount's top-level folders (sha1/, md5/, sha1dir/) have none"
