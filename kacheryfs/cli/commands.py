"""The seed's commands: kachery-store, -load, -cat, -ls, -info, -load-dir."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from kacheryfs import api
from kacheryfs.cli.common import add_fr, add_to, parser, run
from kacheryfs.errors import ChannelUnavailable, KacheryError
from kacheryfs.resolver import BlobRef
from kacheryfs.uri import check_label, parse_url

_CAT_CHUNK = 8 << 20


def _store(argv: Sequence[str] | None) -> int:
    p = parser(
        "kachery-store",
        "Store files or directories in the local store (and upload them with --to); print one URL per path\n"
        "stored, in order: also when its upload failed, as the URL works here, from the local store.\n"
        "A path that cannot be stored or uploaded is reported on stderr and the others are still stored and\n"
        "uploaded; the exit code is that of the first failure. Once the channel is found unavailable, the\n"
        "paths after it are stored locally only.\n"
        "In a directory, symlinks are followed: what they point to is stored (with a warning when that is\n"
        "outside the directory); fifos, sockets and devices are skipped.",
        "  kachery-store data.csv                 # sha1://<hash>/data.csv\n"
        "  kachery-store ds001 --label ds001      # sha1dir://<hash>.ds001\n"
        "  kachery-store big.dat --to lab         # also upload to channel 'lab'",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="file or directory to store")
    p.add_argument("--label", help="label of a directory URL (default: the directory's name); no '/' or '?'")
    add_to(p)
    args = p.parse_args(argv)
    if args.label is not None:
        check_label(args.label)  # before any path is stored
        for path in args.paths:
            if os.path.exists(path) and not os.path.isdir(path):
                print(f"kachery-store: --label names directories: {path} is stored without it", file=sys.stderr)
    with api.config(to=args.to):  # a channel not configured is refused here, before any path is stored
        to = api.get_config()["to"] or ""  # --to, else the config's; "": store locally only
        if to:
            api.check_channel(to)  # one without its password too
    first_failure = 0
    for i, path in enumerate(args.paths):
        try:
            url, upload_error = _store_one(path, args.label, to)
        except KacheryError as err:  # not stored: the other paths still are
            print(f"kachery-store: {path}: {err}", file=sys.stderr)
            first_failure = first_failure or err.exit_code
            continue
        print(url, flush=True)
        if upload_error is not None:
            first_failure = first_failure or upload_error.exit_code
            # A dead channel would cost its whole timeout again for every path after this one.
            dead = isinstance(upload_error, ChannelUnavailable) and i + 1 < len(args.paths)
            rest = "; the paths after it are stored locally only" if dead else ""
            print(f"kachery-store: {path}: stored but not uploaded to '{to}': {upload_error}{rest}", file=sys.stderr)
            to = "" if dead else to
    return first_failure


def _store_one(path: str, label: str | None, to: str) -> tuple[str, KacheryError | None]:
    """Store `path` locally and upload it to `to`: its URL, and why the upload failed if it did.

    Raises what keeps `path` from being stored locally.
    """
    try:
        return _store_to(path, label, to), None
    except KacheryError as err:
        if not to:
            raise
        upload_error = err
    # Storing alone tells which of the two failed (a server's full disk is StoreFull too), and stores
    # the rest of a directory whose upload stopped part way.
    return _store_to(path, label, ""), upload_error


def _store_to(path: str, label: str | None, to: str) -> str:
    if os.path.isdir(path):
        return api.store_dir(path, label=label, to=to)
    return api.store_file(path, to=to)


def _load(argv: Sequence[str] | None) -> int:
    p = parser(
        "kachery-load",
        "Fetch (and verify) the file a URL names; print its local path. A sha1dir directory needs --dest.",
        "  kachery-load sha1://<hash>/data.csv\n"
        "  kachery-load sha1dir://<hash>.ds001/subdir1/file1.txt --fr lab\n"
        "  kachery-load sha1dir://<hash>.ds001 --dest ./ds001",
    )
    p.add_argument("url")
    p.add_argument("--dest", help="copy the file (or directory) here instead of printing the store path")
    add_fr(p)
    args = p.parse_args(argv)
    url = parse_url(args.url)
    with api.naming(args.url):
        found = api.resolver(args.fr).resolve(url) if url.is_dir else None
    if url.is_dir and not isinstance(found, BlobRef):
        if not args.dest:
            raise ValueError(f"{args.url} is a directory: give --dest DIR to download it")
        print(api.load_dir(args.url, args.dest, fr=args.fr))
        return 0
    print(api.load_file(args.url, args.dest, fr=args.fr))
    return 0


def _cat(argv: Sequence[str] | None) -> int:
    p = parser(
        "kachery-cat",
        "Write the bytes of the file a URL names to stdout (streamed; --end is exclusive).",
        "  kachery-cat sha1://<hash>/notes.txt\n  kachery-cat sha1://<hash>/big.dat --start 100 --end 200 | xxd",
    )
    p.add_argument("url")
    p.add_argument("--start", type=int, help="first byte (default 0)")
    p.add_argument("--end", type=int, help="byte after the last one (default: end of file)")
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        help="for a range of a blob not stored here: fetch and check the whole blob first (default: for blobs "
        "up to 64 MiB; a range of a larger one comes unchecked, with a warning)",
    )
    add_fr(p)
    args = p.parse_args(argv)
    res = api.resolver(args.fr)
    with api.naming(args.url):
        ref = res.blob_ref(args.url)
    out = sys.stdout.buffer
    out.flush()
    if args.start is None and args.end is None:
        with res.open_blob(ref.alg, ref.digest, ref.size, progress=api.progress_bar) as f:
            _copy_to_stdout(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        return 0
    size = ref.size if ref.size is not None else api.find_size(res, ref)
    lo, hi = api.check_range(args.start, args.end, size)
    if api.whole_for_range(res, ref, size, args.verify):
        with res.open_blob(ref.alg, ref.digest, size, progress=api.progress_bar) as f:
            _copy_to_stdout(f.fileno(), lo, hi - lo)
        return 0
    for pos in range(lo, hi, _CAT_CHUNK):
        out.write(res.read_range(ref.alg, ref.digest, pos, min(hi, pos + _CAT_CHUNK)))
    out.flush()
    return 0


def _copy_to_stdout(fd: int, offset: int, count: int) -> None:
    """Copy `count` bytes from `fd` at `offset` to stdout in the kernel when it can."""
    out = sys.stdout.fileno()
    try:
        while count > 0:
            sent = os.sendfile(out, fd, offset, min(count, 1 << 30))
            if sent == 0:
                break
            offset += sent
            count -= sent
    except OSError as err:
        if isinstance(err, BrokenPipeError):
            raise
        while count > 0 and (chunk := os.pread(fd, min(count, _CAT_CHUNK), offset)):
            sys.stdout.buffer.write(chunk)
            offset += len(chunk)
            count -= len(chunk)
        sys.stdout.buffer.flush()


def _ls(argv: Sequence[str] | None) -> int:
    p = parser(
        "kachery-ls",
        "List a sha1dir directory: sub-directories first (with a trailing /), then files, each sorted.",
        "  kachery-ls sha1dir://<hash>.ds001\n  kachery-ls sha1dir://<hash>.ds001/subdir1 --long",
    )
    p.add_argument("url")
    p.add_argument("--long", "-l", action="store_true",
                   help="also print each file's size and hash (sha1; md5 where the manifest has no sha1)")  # fmt: skip
    add_fr(p)
    args = p.parse_args(argv)
    with api.naming(args.url):
        node = api.resolver(args.fr).dir_node(args.url)
    for name in sorted(node.dirs):
        print(f"{name}/")
    for name in sorted(node.files):
        entry = node.files[name]
        print(f"{name}\t{entry.size}\t{entry.digest}" if args.long else name)
    return 0


def _info(argv: Sequence[str] | None) -> int:
    p = parser(
        "kachery-info",
        'Print JSON {"path", "size", "sha1", "md5", "found_in"} for a URL without downloading it.',
        "  kachery-info sha1://<hash>/data.csv\n  kachery-info sha1dir://<hash>.ds001/subdir1/file1.txt --fr lab",
    )
    p.add_argument("url")
    add_fr(p)
    args = p.parse_args(argv)
    print(json.dumps(api.get_file_info(args.url, fr=args.fr), indent=4))
    return 0


def _load_dir(argv: Sequence[str] | None) -> int:
    p = parser(
        "kachery-load-dir",
        "Download a whole sha1dir snapshot into a new directory.",
        "  kachery-load-dir sha1dir://<hash>.ds001 --dest ./ds001 --fr lab",
    )
    p.add_argument("url")
    p.add_argument("--dest", required=True, help="directory to create")
    add_fr(p)
    args = p.parse_args(argv)
    print(api.load_dir(args.url, args.dest, fr=args.fr))
    return 0


def store_main() -> int:
    return run(_store)


def load_main() -> int:
    return run(_load)


def cat_main() -> int:
    return run(_cat)


def ls_main() -> int:
    return run(_ls)


def info_main() -> int:
    return run(_info)


def load_dir_main() -> int:
    return run(_load_dir)
