"""The one list of kacheryfs errors, each with its errno, HTTP status and CLI exit code.

Only the edges translate: the FUSE adapter reads `errno`, the server and client read
`http_status`, the CLI reads `exit_code`. Everything below them raises these values.
"""

from __future__ import annotations

import errno as _errno


class KacheryError(Exception):
    """Base of every error kacheryfs raises on purpose."""

    errno: int = _errno.EIO
    http_status: int = 500
    exit_code: int = 3
    counted: bool = False  # set once `kacheryfs status` counted it as a failed read or lookup


class InvalidURL(KacheryError, ValueError):
    """A string that is not a well-formed kachery URL."""

    errno = _errno.ENOENT
    http_status = 400
    exit_code = 2


class InvalidInput(KacheryError, ValueError):
    """What a call was given cannot be done as asked: a directory with a symlink loop, a fifo
    or device, a label that would not make a working URL, a byte range that does not fit, a
    file that is not what its load_* decodes. Bad input, not bad data."""

    errno = _errno.EINVAL
    http_status = 400
    exit_code = 2


class NotFound(KacheryError, LookupError):
    """No store or channel has the requested content, or a sub-path does not exist."""

    errno = _errno.ENOENT
    http_status = 404
    exit_code = 1


class IsADirectory(KacheryError):
    """A file was needed but the URL names a directory inside a snapshot."""

    errno = _errno.EISDIR
    http_status = 400
    exit_code = 2


class NotADirectory(KacheryError):
    """A directory was needed but the URL names a file."""

    errno = _errno.ENOTDIR
    http_status = 400
    exit_code = 2


class DestinationExists(KacheryError, FileExistsError):
    """A load's destination is in the way: load_dir writes a new directory, and load_file
    does not write a file over a directory."""

    errno = _errno.EEXIST
    http_status = 409
    exit_code = 2


class InvalidManifest(KacheryError):
    """A directory manifest that is not JSON or fails validation."""

    errno = _errno.EIO
    http_status = 422
    exit_code = 4


class HashMismatch(KacheryError):
    """Bytes whose hash (or size) is not the one they were asked for."""

    errno = _errno.EIO
    http_status = 400
    exit_code = 4


class StoreError(KacheryError):
    """The local store cannot be read or written (permissions, bad root)."""

    errno = _errno.EIO
    http_status = 500
    exit_code = 5


class StoreFull(StoreError):
    """The disk under the store is full (ENOSPC)."""

    errno = _errno.ENOSPC
    http_status = 507
    exit_code = 5


def store_error(err: OSError, what: str) -> StoreError:
    """The StoreError an OSError met while `what` (e.g. "pinning sha1://…") means: StoreFull for a full disk."""
    if err.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return StoreFull(f"no space left while {what}: free some disk space or run `kacheryfs gc`")
    where = f" ({err.filename})" if err.filename else ""
    return StoreError(f"{what} failed: {err.strerror or err}{where}")


class ChannelUnavailable(KacheryError):
    """A remote channel could not be reached or failed within its time bound."""

    errno = _errno.EIO
    http_status = 502
    exit_code = 6


class AuthError(KacheryError):
    """A channel refused our credentials (or a request carried none)."""

    errno = _errno.EACCES
    http_status = 401
    exit_code = 7


class Forbidden(AuthError):
    """The operation is not allowed on this channel (e.g. upload to a read-only one)."""

    http_status = 403


class QuotaExceeded(KacheryError):
    """A channel quota (size, count, bytes per day, simultaneous) was exceeded."""

    errno = _errno.EDQUOT
    http_status = 429
    exit_code = 8


class ChannelBusy(QuotaExceeded):
    """All of a channel's simultaneous transfers are in use: a retry shortly will do."""

    retry_after = 1  # seconds, sent as Retry-After


class TooLarge(QuotaExceeded):
    """The file is larger than any quota of the channel allows."""

    http_status = 413


class MountError(KacheryError):
    """A mount cannot be made or removed (mountpoint missing or busy, FUSE not installed)."""

    errno = _errno.EIO
    http_status = 500
    exit_code = 3


class ServeError(KacheryError):
    """The server cannot listen where it was asked to (port in use, address not ours)."""

    errno = _errno.EADDRINUSE
    http_status = 500
    exit_code = 3


class ConfigError(KacheryError):
    """A configuration file, flag or environment variable is invalid."""

    errno = _errno.EINVAL
    http_status = 500
    exit_code = 2


class ChannelMisconfigured(ConfigError):
    """A channel the configuration names but cannot use (its password variable is not set):
    refused when it is used, as a channel that fails (EIO), with the configuration's exit code."""

    errno = _errno.EIO
