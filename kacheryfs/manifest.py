"""Directory manifests: the JSON that a `sha1dir://` URL hashes, parsed, validated and built.

Reading accepts every manifest the original kachery wrote (names in any order, default
separators, `md5` entries, `\\uXXXX` escapes) without re-serializing it: the URL's hash is
checked against the stored bytes by the caller. Writing sorts names at every level so the
same tree yields the same URL everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kacheryfs.errors import InvalidInput, InvalidManifest, IsADirectory, NotADirectory, NotFound, StoreError
from kacheryfs.uri import is_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot: its size and at least one digest."""

    size: int
    sha1: str | None = None
    md5: str | None = None

    @property
    def alg(self) -> str:
        """The algorithm to fetch this file by (sha1 when known)."""
        return "sha1" if self.sha1 else "md5"

    @property
    def digest(self) -> str:
        return self.sha1 or self.md5 or ""

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"size": self.size}
        if self.sha1:
            out["sha1"] = self.sha1
        if self.md5:
            out["md5"] = self.md5
        return out


@dataclass
class DirNode:
    """One directory of a snapshot."""

    files: dict[str, FileEntry] = field(default_factory=dict)
    dirs: dict[str, DirNode] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "files": {name: self.files[name].to_json() for name in sorted(self.files)},
            "dirs": {name: self.dirs[name].to_json() for name in sorted(self.dirs)},
        }

    def total_size(self) -> int:
        return sum(f.size for f in self.files.values()) + sum(d.total_size() for d in self.dirs.values())

    def walk(self, prefix: str = "") -> Iterator[tuple[str, FileEntry]]:
        """Every (relative path, FileEntry) below this directory."""
        for name, entry in self.files.items():
            yield prefix + name, entry
        for name, sub in self.dirs.items():
            yield from sub.walk(prefix + name + "/")

    def resolve(self, subpath: str) -> FileEntry | DirNode:
        """The file or directory at `subpath` ('' is this directory); NotFound otherwise."""
        node: DirNode = self
        parts = [p for p in subpath.split("/") if p]
        for i, part in enumerate(parts):
            if part in node.dirs:
                node = node.dirs[part]
            elif part in node.files:
                if i != len(parts) - 1:
                    raise NotADirectory(f"{'/'.join(parts[: i + 1])} is a file, not a directory")
                return node.files[part]
            else:
                raise NotFound(f"no {'/'.join(parts[: i + 1])!r} in this snapshot")
        return node

    def resolve_file(self, subpath: str) -> FileEntry:
        found = self.resolve(subpath)
        if isinstance(found, DirNode):
            raise IsADirectory(f"{subpath or '/'} is a directory in this snapshot, not a file")
        return found

    def resolve_dir(self, subpath: str) -> DirNode:
        found = self.resolve(subpath)
        if not isinstance(found, DirNode):
            raise NotADirectory(f"{subpath} is a file in this snapshot, not a directory")
        return found


def serialize(root: DirNode) -> bytes:
    """The canonical bytes of a manifest: sorted names, the original's separators, ASCII."""
    return json.dumps(root.to_json()).encode("ascii")


def parse(data: bytes) -> DirNode:
    """Parse and validate manifest bytes; InvalidManifest with the reason otherwise."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidManifest(f"directory manifest is not valid JSON: {err}") from err
    return _parse_dir(obj, "")


def _parse_dir(obj: object, where: str) -> DirNode:
    if not isinstance(obj, dict):
        raise InvalidManifest(f"manifest entry {where or '/'} is not an object")
    files, dirs = obj.get("files", {}), obj.get("dirs", {})
    if not isinstance(files, dict) or not isinstance(dirs, dict):
        raise InvalidManifest(f"'files' and 'dirs' of {where or '/'} must be objects")
    node = DirNode()
    for name, entry in files.items():
        _check_name(name, where)
        node.files[name] = _parse_file(entry, where + name)
    for name, sub in dirs.items():
        _check_name(name, where)
        if name in node.files:
            raise InvalidManifest(f"{where + name!r} is both a file and a directory")
        node.dirs[name] = _parse_dir(sub, where + name + "/")
    return node


def _check_name(name: str, where: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise InvalidManifest(f"invalid name {name!r} in {where or '/'}: names may not be empty, '.', '..' or hold '/'")


def _parse_file(entry: object, where: str) -> FileEntry:
    if not isinstance(entry, dict):
        raise InvalidManifest(f"file entry {where!r} is not an object")
    size = entry.get("size")
    if isinstance(size, float) and size.is_integer():
        size = int(size)  # simplejson may have written 1e6-style sizes
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidManifest(f"file {where!r} has invalid size {size!r}")
    sha1, md5 = entry.get("sha1"), entry.get("md5")
    if sha1 is None and md5 is None:
        raise InvalidManifest(f"file {where!r} has neither a sha1 nor an md5")
    if sha1 is not None and not (isinstance(sha1, str) and is_hash("sha1", sha1)):
        raise InvalidManifest(f"file {where!r} has a malformed sha1 {sha1!r}")
    if md5 is not None and not (isinstance(md5, str) and is_hash("md5", md5)):
        raise InvalidManifest(f"file {where!r} has a malformed md5 {md5!r}")
    return FileEntry(size, sha1.lower() if sha1 else None, md5.lower() if md5 else None)


def build(directory: str | Path, store_file: Callable[[Path], FileEntry]) -> DirNode:
    """The manifest of a local directory, calling `store_file` on every file in it.

    Symlinks are followed, as the original did: what they point to is stored, with a warning
    for one that leads out of the directory. A symlink loop, or a name that is not UTF-8
    (a manifest is JSON), is InvalidInput (the tree given is bad input, exit code 2); fifos,
    sockets and devices are skipped with a warning, as the original did silently.
    """
    root = Path(directory)
    if not root.is_dir():
        if root.exists():
            raise InvalidInput(f"{root} is not a directory: store a file with store_file or kachery-store")
        raise NotFound(f"no such directory: {root}")
    return _build(root, store_file, ancestors=frozenset(), top=os.path.realpath(root))


def _build(
    path: Path, store_file: Callable[[Path], FileEntry], ancestors: frozenset[tuple[int, int]], top: str
) -> DirNode:
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino)
    if ident in ancestors:
        raise InvalidInput(f"symlink loop at {path}: it leads back to one of its own parent directories")
    ancestors = ancestors | {ident}
    node = DirNode()
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except PermissionError as err:
        raise StoreError(f"cannot list {path}: permission denied") from err
    for entry in entries:
        try:
            entry.name.encode()
        except UnicodeEncodeError:
            raise InvalidInput(f"{entry.path!r}: a file name must be valid UTF-8 to go into a manifest") from None
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.commonpath([top, target]) != top:
                log.warning("%s is a symlink out of the directory: storing what it points to, %s", entry.path, target)
        try:
            mode = os.stat(entry.path).st_mode  # follows symlinks
        except FileNotFoundError:
            log.warning("skipping %s: broken symlink", entry.path)
            continue
        except OSError as err:
            if err.errno == 40:  # ELOOP: a link to itself
                raise InvalidInput(f"symlink loop at {entry.path}: it links to itself") from err
            raise
        if stat.S_ISDIR(mode):
            node.dirs[entry.name] = _build(Path(entry.path), store_file, ancestors, top)
        elif stat.S_ISREG(mode):
            node.files[entry.name] = store_file(Path(entry.path))
        else:
            log.warning("skipping %s: not a regular file or directory", entry.path)
    return node
