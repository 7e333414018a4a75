"""The Python API (`import kacheryfs as ka`): store and load by hash URL.

This module assembles the parts (config → store, resolver, channels) for each call; the
parts themselves know nothing of one another beyond their own layer.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kacheryfs import manifest
from kacheryfs.auth import MissingPassword
from kacheryfs.config import Config, load_config
from kacheryfs.errors import (
    ChannelUnavailable,
    ConfigError,
    DestinationExists,
    HashMismatch,
    InvalidInput,
    InvalidManifest,
    IsADirectory,
    KacheryError,
    NotADirectory,
    NotFound,
    StoreFull,
)
from kacheryfs.hashing import Digests, hash_file
from kacheryfs.manifest import DirNode, FileEntry
from kacheryfs.resolver import BlobRef, Resolver
from kacheryfs.store import LocalStore
from kacheryfs.uri import KacheryURL, check_label, file_url, format_url

if TYPE_CHECKING:
    from kacheryfs.parallel_fetch import PrefetchResult
    from kacheryfs.remote import HttpChannel
    from kacheryfs.store.local import CommitGroup

log = logging.getLogger(__name__)
_SETTINGS = ("fr", "to", "storage_dir", "use_hard_links", "channel_timeout", "config_file")
_overrides: dict[str, Any] = {}
_resolvers: dict[str, Resolver] = {}
_lock = threading.Lock()
Names = str | Sequence[str] | None


# -- configuration -----------------------------------------------------------------
def set_config(**settings: Any) -> None:
    """Set defaults for later calls in this process: fr, to, storage_dir, use_hard_links, channel_timeout.

    `fr` is a channel name or list of names read in order (`''` = local only); `to` is the
    channel that `store_*` uploads to (`''` = none). Channels are defined in the config file.
    """
    unknown = set(settings) - set(_SETTINGS)
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)}; known: {', '.join(_SETTINGS)}")
    _overrides.update(settings)
    _current_config(**settings)  # validate now, not at the next load


def get_config() -> dict[str, Any]:
    """The settings in force: a copy, safe to change."""
    cfg = _current_config()
    return {
        "fr": list(cfg.fr), "to": cfg.to, "storage_dir": str(cfg.storage_dir), "use_hard_links": cfg.use_hard_links,
        "channel_timeout": cfg.channel_timeout, "channels": sorted(cfg.channels),
        "config_file": str(cfg.config_file) if cfg.config_file else None,
    }  # fmt: skip


def check_channel(name: str) -> None:
    """ConfigError unless the channel `name` can be used now: one the config names, with its
    password at hand (ChannelMisconfigured when its password variable is not set)."""
    password = _current_config().channel(name).password
    if isinstance(password, MissingPassword):
        raise password.error()


@contextlib.contextmanager
def config(**settings: Any) -> Iterator[None]:
    """`with ka.config(fr='lab'):` — settings for the block, restored afterwards."""
    saved = dict(_overrides)
    try:
        set_config(**settings)
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def _current_config(**call: Any) -> Config:
    merged = {**_overrides, **{k: v for k, v in call.items() if v is not None}}
    config_file = merged.pop("config_file", None)
    fr, to = merged.pop("fr", None), merged.pop("to", None)
    cfg = load_config(config_file, **merged)
    if fr is not None:
        cfg = cfg.replace(fr=tuple(c.name for c in cfg.read_channels(fr)))
    if to is not None:
        cfg = cfg.replace(to=to or None)
        cfg.write_channel()
    return cfg


def resolver(fr: Names = None, **settings: Any) -> Resolver:
    """The resolver for the current settings (one per distinct configuration, reused)."""
    cfg = _current_config(fr=fr, **settings)
    key = repr(cfg)
    with _lock:
        if key not in _resolvers:
            _resolvers[key] = Resolver.from_config(cfg)
        return _resolvers[key]


# -- storing -----------------------------------------------------------------------
def store_file(path: str | os.PathLike[str], basename: str | None = None, *, to: str | None = None) -> str:
    """Store a local file; return `sha1://<hash>/<basename>`. Uploads to `to` when set.

    NotFound if there is no such file; InvalidInput for a fifo, socket or device, or a
    `path` or `basename` of the wrong type.
    """
    path = _path_arg(path, "store_file")
    name = _name_arg(basename or path.name)
    cfg = _current_config(to=to)
    _check_storable(path)
    digests = _put_file(cfg, LocalStore.from_config(cfg), path)
    return format_url(file_url("sha1", digests.sha1, name))


def store_bytes(data: bytes, basename: str = "file.dat", *, to: str | None = None) -> str:
    """Store a byte string (or any buffer: bytearray, memoryview, array); return its `sha1://` URL.

    InvalidInput for `data` that is not bytes (a str: see store_text) or a `basename` that is not a str.
    """
    try:
        view = memoryview(data)
    except TypeError as err:
        raise InvalidInput(
            f"store_bytes takes bytes, not {type(data).__name__}; store_text takes a str, "
            "store_object a JSON object, store_npy an array"
        ) from err
    name = _name_arg(basename)
    cfg = _current_config(to=to)
    store = LocalStore.from_config(cfg)
    # bytes go as they are (a BytesIO shares them, not copies); other buffers as bytes, so len() counts bytes
    flat = data if isinstance(data, bytes) else view.tobytes()  # in C order, whatever the buffer's shape
    digests = store.put_bytes(flat)
    _upload(cfg, store, "sha1", digests.sha1, digests.size)
    return format_url(file_url("sha1", digests.sha1, name))


def store_text(text: str, basename: str = "file.txt", *, to: str | None = None) -> str:
    """Store a string as UTF-8; return its `sha1://` URL.

    InvalidInput for `text` that is not a str (bytes: see store_bytes) or has no UTF-8 form.
    """
    if not isinstance(text, str):
        raise InvalidInput(f"store_text takes a str, not {type(text).__name__}; store_bytes takes bytes")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate, as os.fsdecode makes of undecodable bytes
        raise InvalidInput(f"the text cannot be encoded as UTF-8 ({err.reason} at {err.start})") from err
    return store_bytes(data, basename, to=to)


def store_object(obj: Any, basename: str = "file.json", *, to: str | None = None) -> str:
    """Store a JSON-serializable object (serialized as the original kachery did).

    InvalidInput for what JSON cannot hold (a set, a numpy number, a tuple key, a cycle), naming it.
    """
    try:
        text = json.dumps(obj)  # the defaults, NaN included: the original's bytes, hence its URLs
    except (TypeError, ValueError, RecursionError) as err:
        raise InvalidInput(
            f"store_object stores JSON, and this is not: {err} (convert it first: a set to a list, "
            "a numpy number with .item(); store_npy stores an array)"
        ) from err
    return store_bytes(text.encode("utf-8"), basename, to=to)


def store_npy(array: Any, basename: str = "file.npy", *, to: str | None = None) -> str:
    """Store a numpy array (or what numpy makes one of) in `.npy` format.

    InvalidInput for an array of Python objects (dtype=object): it would be a pickle, which
    runs code when it is loaded, so none is ever stored; and for what is no array (ragged lists).
    """
    import numpy as np

    try:
        array = np.asanyarray(array)  # as np.save would: the same bytes
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"store_npy stores an array, and numpy makes none of this: {err}") from err
    if array.dtype.hasobject:
        raise InvalidInput(
            "store_npy does not store an array of Python objects (dtype=object): it would be a pickle, "
            "and a pickle runs code when it is loaded. Give it a numeric or string dtype, "
            "or store the values with store_object"
        )
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return store_bytes(buf.getvalue(), basename, to=to)


def store_dir(path: str | os.PathLike[str], label: str | None = None, *, to: str | None = None) -> str:
    """Store a directory tree and its manifest; return `sha1dir://<hash>.<label>`.

    An explicit label must be a non-empty str without '/' or '?' (InvalidInput, before anything
    is stored); InvalidInput too for a `path` that is not one.
    """
    path = _path_arg(path, "store_dir")
    if label is not None:
        check_label(_name_arg(label, "label"))
    cfg = _current_config(to=to)
    store = LocalStore.from_config(cfg)

    with store.group() as group:

        def store_one(file: Path) -> FileEntry:
            digests = _put_file(cfg, store, file, group)
            return FileEntry(digests.size, digests.sha1)

        root = manifest.build(path, store_one)
    digests = store.put_bytes(manifest.serialize(root))
    _upload(cfg, store, "sha1", digests.sha1, digests.size)
    name = path.resolve().name if label is None else label
    return format_url(KacheryURL("sha1", digests.sha1, True, name))


def _path_arg(path: object, store: str) -> Path:
    """`path` as a Path; InvalidInput for what is not a str or os.PathLike path."""
    try:
        return Path(path)  # type: ignore[arg-type]  # checked here
    except TypeError as err:  # None, a number, bytes
        raise InvalidInput(f"{store} takes a path, not {type(path).__name__}: a str or pathlib.Path") from err


def _name_arg(name: object, what: str = "basename") -> str:
    """`name` if it is a str; InvalidInput otherwise."""
    if not isinstance(name, str):
        raise InvalidInput(f"{what} must be a str, not {type(name).__name__}")
    return name


def _check_storable(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise NotFound(f"no such file: {path}") from err
    # Opening a fifo would wait for a writer forever; a directory is put_file's to refuse.
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InvalidInput(
            f"{path} is not a regular file (a fifo, socket or device): only files and directories are stored"
        )


def _put_file(cfg: Config, store: LocalStore, path: Path, group: CommitGroup | None = None) -> Digests:
    """Store a file locally and, with a `to` channel, upload it at the same time.

    Without a channel, a `group` commits the blob with others (it is linked in later); an
    upload needs the blob linked in at once.

    The sha1 names the upload, so it is computed first (a quick pass); then the local copy
    and the upload read the file side by side. If the file changed meanwhile the server
    refuses the upload (its bytes do not match), and what was stored locally is sent.
    """
    channel = _write_channel(cfg)
    if channel is None:
        return store.put_file(path, hard_link=cfg.use_hard_links, group=group)
    try:
        first = hash_file(path, md5=False)
    except FileNotFoundError as err:
        raise NotFound(f"no such file: {path}") from err
    from concurrent.futures import ThreadPoolExecutor  # only uploads need it: commands start faster

    with ThreadPoolExecutor(1) as pool, progress_bar(first.size, f"upload to {channel.name}") as progress:
        upload = pool.submit(channel.upload, "sha1", first.sha1, path, first.size, progress)
        digests = store.put_file(path, hard_link=cfg.use_hard_links)
        try:
            upload.result()
            sent = digests.sha1 == first.sha1
        except HashMismatch:
            sent = False
    if not sent:
        channel.upload("sha1", digests.sha1, store.blob_path("sha1", digests.sha1), digests.size)
    store.note_remote("sha1", digests.sha1, channel.name)
    return digests


def _upload(cfg: Config, store: LocalStore, alg: str, digest: str, size: int) -> None:
    """Upload a stored blob to the `to` channel, if there is one."""
    channel = _write_channel(cfg)
    if channel is None:
        return
    with progress_bar(size, f"upload {digest[:10]}… to {channel.name}") as progress:
        channel.upload(alg, digest, store.blob_path(alg, digest), size, progress=progress)
    store.note_remote(alg, digest, channel.name)


def _write_channel(cfg: Config) -> HttpChannel | None:
    target = cfg.write_channel()
    if target is None:
        return None
    from kacheryfs.remote import HttpChannel

    return HttpChannel(target.name, target.url, target.channel, target.password, timeout=cfg.channel_timeout)


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str) -> Iterator[Callable[[int], None] | None]:
    """A tqdm progress callback on a terminal for transfers over 4 MB (or of unknown size); None otherwise."""
    if (total is not None and total < 4_000_000) or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr) as bar:
        yield bar.update


# -- loading -----------------------------------------------------------------------
@contextlib.contextmanager
def naming(url: str) -> Iterator[None]:
    """Errors about what `url` names say the URL: the resolver and manifest know only hashes and sub-paths."""
    try:
        yield
    except (NotFound, InvalidManifest, IsADirectory, NotADirectory) as err:
        if url in str(err):
            raise
        raise type(err)(f"{url}: {err}") from err


def _local_path(url: str, fr: Names) -> Path:
    res = resolver(fr)
    with naming(url):
        ref = res.blob_ref(url)
    return res.ensure(ref.alg, ref.digest, ref.size, progress=progress_bar)


def load_file(url: str, dest: str | os.PathLike[str] | None = None, *, fr: Names = None) -> str:
    """Make the file a URL names available locally (fetching and verifying it if needed).

    Returns the path in the local store, or `dest` after copying there (a file there is
    replaced, a directory is DestinationExists). A plain local path that exists is returned
    as it is. Raises NotFound when no store has it.
    """
    if "://" not in url and os.path.exists(url):
        return url
    if dest is not None and os.path.isdir(dest):
        raise DestinationExists(f"{dest} is a directory: give the path of a file to write")
    if dest is not None:
        _check_folder_of(Path(os.path.realpath(dest)))  # before a fetch that could take long
    path = _local_path(url, fr)
    if dest is None:
        return str(path)
    try:
        _copy_out(path, Path(os.path.realpath(dest)))  # through a symlink, as cp writes
    except OSError as err:
        raise _write_error(err, dest) from err
    return str(dest)


def _copy_out(blob: Path, target: Path) -> None:
    """Copy a blob to `target`: a regular file whole or not at all (a temp file beside it,
    renamed over it); anything else that is there (a fifo, a device) is written in place."""
    if target.exists() and not target.is_file():
        with open(blob, "rb") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        return
    partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.kachery-partial")  # one per load
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))  # umask applies
        shutil.copyfile(blob, partial)  # in the kernel (copy_file_range, sendfile) where it can
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _check_folder_of(dest: Path) -> None:
    """InvalidInput unless the folder `dest` is to be written into exists."""
    if not dest.parent.is_dir():
        raise InvalidInput(f"cannot write {dest}: there is no folder {dest.parent}")


def _write_error(err: OSError, dest: str | os.PathLike[str]) -> KacheryError:
    """The error of a failed write of `dest` (outside the store): StoreFull for a full disk."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"no space left on the disk of {dest}")
    return KacheryError(f"cannot write {dest}: {err.strerror or err}")


def load_bytes(
    url: str, start: int | None = None, end: int | None = None, *, fr: Names = None, verify: bool | None = None
) -> bytes:
    """Bytes [start, end) of the file a URL names (end exclusive).

    Bytes are verified against the hash, which needs the whole file: a range of a blob not
    stored here is read from the whole blob, fetched, verified and kept, for blobs up to
    VERIFIED_RANGE_MAX (or any blob with `verify=True`). A range of a larger one is fetched
    alone, unverified, with a warning (`verify=False`: always so, without the warning).

    InvalidInput (a ValueError) for a range that does not fit the file: a negative bound,
    a start past the end, an end before the start. An end past the end reads to the end.
    """
    res = resolver(fr)
    with naming(url):
        ref = res.blob_ref(url)
    if start is None and end is None:
        with res.open_blob(ref.alg, ref.digest, ref.size, progress=progress_bar) as f:
            return f.read()
    size = ref.size if ref.size is not None else find_size(res, ref)
    lo, hi = check_range(start, end, size)
    if not whole_for_range(res, ref, size, verify):
        return res.read_range(ref.alg, ref.digest, lo, hi)
    with res.open_blob(ref.alg, ref.digest, size, progress=progress_bar) as f:
        f.seek(lo)
        return f.read(hi - lo)


VERIFIED_RANGE_MAX = 64 << 20


def whole_for_range(res: Resolver, ref: BlobRef, size: int, verify: bool | None) -> bool:
    """Whether a range read goes through the whole blob, fetched and verified (see `load_bytes`)."""
    if res.store.has(ref.alg, ref.digest):
        return True
    if verify is None:
        if size <= VERIFIED_RANGE_MAX:
            return True
        log.warning(
            "%s://%s: a range of this %d-byte blob is fetched alone and cannot be checked against its hash; "
            "verify=True (kachery-cat --verify) fetches and checks the whole blob",
            ref.alg, ref.digest, size,
        )  # fmt: skip
    return bool(verify)


def check_range(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """Validate a byte range against a file size; InvalidInput with the reason otherwise."""
    lo = 0 if start is None else start
    hi = size if end is None else end
    if lo < 0 or hi < 0:
        raise InvalidInput(f"negative byte range [{start}, {end}): bytes are counted from 0 at the start of the file")
    if lo > size:
        raise InvalidInput(f"start {lo} is past the end of the file ({size} bytes)")
    if hi < lo:
        raise InvalidInput(f"end {hi} is before start {lo}: the range is [start, end), end exclusive")
    return lo, min(hi, size)


def find_size(res: Resolver, ref: BlobRef) -> int:
    """The size of a blob, asking the channels when it is not local (NotFound if nobody has it)."""
    found = res.find(ref.alg, ref.digest)
    if found is None:
        raise NotFound(f"{ref.alg}://{ref.digest} was found in no store or channel")
    return found[1]


# The load_* below refuse bytes that are not what they decode with InvalidInput, not a
# bad-data error: the bytes verified against their hash, so they are the file that was
# stored; the call asked for the wrong kind of file (as IsADirectory), and another load_* reads it.
def load_text(url: str, *, fr: Names = None) -> str:
    """The UTF-8 text of a file URL; InvalidInput if it is not UTF-8 (load_bytes reads any file)."""
    data = load_bytes(url, fr=fr)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInput(
            f"{url} is not UTF-8 text ({err.reason} at byte {err.start}): load_bytes reads it as bytes"
        ) from err


def load_object(url: str, *, fr: Names = None) -> Any:
    """The JSON object stored at a URL; InvalidInput if it is not JSON."""
    data = load_bytes(url, fr=fr)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # not JSON, not text, or nested past Python's recursion limit
        raise InvalidInput(f"{url} is not JSON ({err}): load_text or load_bytes reads it") from err


def load_npy(url: str, *, fr: Names = None) -> Any:
    """The numpy array stored at a URL (`.npy` format, no pickles).

    InvalidInput if the file is not an .npy array (an .npz, text, a pickle) or is an array of
    Python objects, which is a pickle: never loaded, since loading one runs code.
    """
    import numpy as np

    res = resolver(fr)
    with naming(url):
        ref = res.blob_ref(url)
    with res.open_blob(ref.alg, ref.digest, ref.size, progress=progress_bar) as f:
        magic = np.lib.format.MAGIC_PREFIX
        if f.read(len(magic)) != magic:  # np.load would call it pickled data, whatever it is
            raise InvalidInput(f"{url} is not an .npy array (it does not start as one): load_bytes reads it as bytes")
        f.seek(0)
        try:
            return np.load(f, allow_pickle=False)
        except ValueError as err:
            raise InvalidInput(
                f"{url} is not an .npy array load_npy can read ({err}); an array of Python objects "
                "is a pickle and is never loaded, since loading one runs code"
            ) from err


def read_dir(url: str, recursive: bool = True, *, fr: Names = None) -> dict[str, Any]:
    """The manifest of a `sha1dir://` URL (or a sub-directory) as a dict.

    With `recursive=False` sub-directories are listed with empty contents, as the
    original did.
    """
    with naming(url):
        node = resolver(fr).dir_node(url)
    if recursive:
        return node.to_json()
    return {
        "files": {n: e.to_json() for n, e in sorted(node.files.items())},
        "dirs": {n: {} for n in sorted(node.dirs)},
    }


def load_dir(url: str, dest: str | os.PathLike[str], *, fr: Names = None, jobs: int = 8) -> str:
    """Download a whole snapshot (or sub-directory) into `dest`, which must not exist.

    Files are fetched `jobs` at a time, verified, and kept in the local store too.
    """
    dest = Path(dest)
    if dest.exists():
        raise DestinationExists(f"{dest} already exists: load_dir writes a new directory, give a path not yet there")
    _check_folder_of(dest)
    res = resolver(fr)
    with naming(url):
        node = res.dir_node(url)
    # Fetched in parallel first; a blob the cache could not keep is fetched again, alone,
    # when it is copied out, so only what fails then is an error.
    _fetch_with_progress(res, [url], jobs, strict=False)
    tmp = dest.with_name(dest.name + ".kachery-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _materialize(node, tmp, res)
        os.replace(tmp, dest)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        if isinstance(err, OSError):
            raise _write_error(err, dest) from err
        raise
    return str(dest)


def prefetch(*urls: str, fr: Names = None, jobs: int = 8) -> PrefetchResult:
    """Fetch files or whole snapshots into the local store, `jobs` at a time, verified.

    Blobs already present are skipped, so calling it again resumes an interrupted prefetch.
    """
    res = resolver(fr)
    return _fetch_with_progress(res, urls, jobs)


def _fetch_with_progress(res: Resolver, urls: Sequence[str], jobs: int, strict: bool = True) -> PrefetchResult:
    from kacheryfs.parallel_fetch import blobs_of, fetch_all  # here, not at the top: kachery-cat & co. start faster

    refs = blobs_of(res, urls)
    total_bytes = sum(r.size or 0 for r in refs)
    with _files_progress_bar(len(refs), total_bytes) as progress:
        result = fetch_all(res, refs, jobs, progress)
    if result.failed and strict:
        shown = "\n  ".join(result.failed[:20])
        error = _common_error(result.errors)
        raise error(f"{len(result.failed)} of {len(refs)} blob(s) could not be fetched:\n  {shown}")
    return result


def _common_error(errors: Sequence[Exception]) -> type[KacheryError]:
    """The error every failure shares (NotFound when nobody had any blob), else ChannelUnavailable."""
    kinds = {type(err) for err in errors}
    if len(kinds) == 1:
        (kind,) = kinds
        if issubclass(kind, KacheryError):
            return kind
    return ChannelUnavailable


@contextlib.contextmanager
def _files_progress_bar(files: int, total_bytes: int) -> Iterator[Callable[[int, int], None] | None]:
    """Files, bytes, rate and ETA on a terminal; nothing when stderr is not a tty."""
    if not sys.stderr.isatty() or files < 2:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total_bytes, unit="B", unit_scale=True, file=sys.stderr, desc=f"0/{files} files") as bar:
        done = 0

        def update(nfiles: int, nbytes: int) -> None:
            nonlocal done
            done += nfiles
            bar.set_description(f"{done}/{files} files", refresh=False)
            bar.update(nbytes)

        yield update


def _materialize(node: DirNode, target: Path, res: Resolver) -> None:
    target.mkdir(parents=True)
    for name, entry in node.files.items():
        with res.open_blob(entry.alg, entry.digest, entry.size) as src, open(target / name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    for name, sub in node.dirs.items():
        _materialize(sub, target / name, res)


def get_file_info(url: str, *, fr: Names = None) -> dict[str, Any]:
    """Where a file is and what it is, without downloading it.

    `{"path": <local path or None>, "size", "sha1", "md5", "found_in": "local"|<channel>}`
    """
    res = resolver(fr)
    with naming(url):
        ref = res.blob_ref(url)
    found = res.find(ref.alg, ref.digest)
    if found is None:
        raise NotFound(f"{url} was found in no store or channel")
    where, size = found
    info: dict[str, Any] = {"path": None, "size": size, "sha1": None, "md5": None, "found_in": where}
    info[ref.alg] = ref.digest
    if where == "local":
        path = res.store.blob_path(ref.alg, ref.digest)
        digests = res.store.digests(ref.alg, ref.digest)
        info.update(path=str(path), sha1=digests.sha1, md5=digests.md5)
    return info
