"""Parse and format kachery hash URLs (`sha1://`, `md5://`, `sha1dir://`, `md5dir://`).

A URL names bytes by their hash. File URLs may carry an informational name
(`sha1://<hash>/data.csv`); directory URLs carry an informational label and a sub-path
inside the snapshot (`sha1dir://<hash>.ds001/subdir1/file1.txt`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kacheryfs.errors import InvalidInput, InvalidURL

HEX_LENGTH = {"sha1": 40, "md5": 32}
ALGORITHMS = tuple(HEX_LENGTH)
_SCHEMES = {"sha1": ("sha1", False), "md5": ("md5", False), "sha1dir": ("sha1", True), "md5dir": ("md5", True)}
_SCHEME_RE = re.compile(r"^([A-Za-z0-9]+)://(.*)$", re.DOTALL)
_HEX_RE = re.compile(r"^[0-9a-fA-F]+$")


def is_hash(alg: str, value: str) -> bool:
    """True when `value` is a well-formed lower- or upper-case hex digest for `alg`."""
    return len(value) == HEX_LENGTH.get(alg, -1) and bool(_HEX_RE.match(value))


def check_hash(alg: str, value: str) -> str:
    """Return `value` in lower case, or raise InvalidURL if it is not a digest for `alg`."""
    if alg not in HEX_LENGTH:
        raise InvalidURL(f"unknown hash algorithm {alg!r}: use sha1 or md5")
    if not is_hash(alg, value):
        raise InvalidURL(f"{value!r} is not a {alg} digest ({HEX_LENGTH[alg]} hex characters)")
    return value.lower()


def check_label(label: str) -> str:
    """Return `label`, or raise InvalidInput if `sha1dir://<hash>.<label>` would not parse back to it."""
    try:
        parsed = parse_url(f"sha1dir://{'0' * 40}.{label}").label
    except InvalidURL:
        parsed = None
    if not label or parsed != label:
        raise InvalidInput(
            f"invalid label {label!r}: a label is not empty, has no '/', '?' or NUL, nor space at either end"
        )
    return label


@dataclass(frozen=True)
class KacheryURL:
    """A parsed hash URL.

    `name` is the informational file name of a file URL (may be empty). `label` is the
    informational label of a directory URL (None when the URL has no `.`). `path` is the
    sub-path inside a directory snapshot, without leading or trailing slashes.
    """

    alg: str
    hash: str
    is_dir: bool = False
    label: str | None = None
    path: str = ""
    name: str = ""
    query: str | None = None

    @property
    def scheme(self) -> str:
        return self.alg + ("dir" if self.is_dir else "")

    @property
    def basename(self) -> str:
        """The last component of the name or sub-path: a good default file name."""
        if self.is_dir:
            return self.path.rsplit("/", 1)[-1] if self.path else (self.label or self.hash)
        return self.name.rsplit("/", 1)[-1] if self.name else self.hash

    @property
    def literal_path(self) -> str | None:
        """The sub-path with its `?` and query put back, for a snapshot whose name holds a `?`.

        `sha1dir://<hash>.hd/c?d` is the sub-path `c` with the query `d`, or the file `c?d`:
        the resolver looks for the literal name first. None when there is no query.
        """
        if not self.is_dir or not self.path or self.query is None:
            return None
        return "/".join(part for part in f"{self.path}?{self.query}".split("/") if part)

    def child(self, subpath: str) -> KacheryURL:
        """The directory URL of `subpath` below this one."""
        if not self.is_dir:
            raise InvalidURL(f"{self} is not a directory URL")
        joined = "/".join(p for p in (self.path, subpath.strip("/")) if p)
        return replace(self, path=joined, query=None)

    def __str__(self) -> str:
        return format_url(self)


def format_url(url: KacheryURL) -> str:
    """The canonical text of `url` (lower-case hex)."""
    text = f"{url.scheme}://{url.hash}"
    if url.is_dir:
        if url.label is not None:
            text += "." + url.label
        if url.path:
            text += "/" + url.path
    elif url.name:
        text += "/" + url.name
    if url.query is not None:
        text += "?" + url.query
    return text


def as_url(url: KacheryURL | str) -> KacheryURL:
    """`url` parsed if it is text; InvalidURL for anything that is neither text nor a parsed URL."""
    return url if isinstance(url, KacheryURL) else parse_url(url)


def file_url(alg: str, digest: str, name: str = "") -> KacheryURL:
    """The URL of one blob, `name` its informational name.

    Characters that do not print (a newline, a tab) become `_` in the name: a URL is one
    line of text, and the name is never looked up.
    """
    if not name.isprintable():
        name = "".join(c if c.isprintable() else "_" for c in name)
    return KacheryURL(alg=alg, hash=check_hash(alg, digest), name=name)


def parse_url(text: str) -> KacheryURL:
    """Parse a hash URL; raise InvalidURL (quoting the input) for anything malformed.

    The query starts at the first `?`, as the original kachery read it. A snapshot's file
    whose name holds a `?` is still reached by its URL: see `KacheryURL.literal_path`.
    """
    if not isinstance(text, str):
        raise InvalidURL(f"expected a URL string, got {type(text).__name__}: {text!r}")
    match = _SCHEME_RE.match(text.strip())
    if not match:
        raise InvalidURL(
            f"not a kachery URL: {text!r} (expected e.g. sha1://<hash>/name or sha1dir://<hash>.label/path)"
        )
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in _SCHEMES:
        raise InvalidURL(f"unknown scheme {scheme!r} in {text!r}: use sha1://, md5://, sha1dir:// or md5dir://")
    if "\x00" in rest:
        raise InvalidURL(f"NUL character in URL {text!r}")
    alg, is_dir = _SCHEMES[scheme]
    query: str | None = None
    if "?" in rest:
        rest, query = rest.split("?", 1)
    # The seed README printed `sha1:////<hash>/name`; extra leading slashes carry no meaning.
    rest = rest.lstrip("/")
    head, _, tail = rest.partition("/")
    if is_dir:
        digest, dot, label = head.partition(".")
        parts = [p for p in tail.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise InvalidURL(f"'.' and '..' are not allowed in the sub-path of {text!r}")
        path = "/".join(parts)
    else:
        digest, dot, label = head, "", ""
        path = ""
    if not is_hash(alg, digest):
        raise InvalidURL(f"{text!r}: {digest!r} is not a {alg} digest ({HEX_LENGTH[alg]} hex characters)")
    if is_dir:
        return KacheryURL(alg, digest.lower(), True, label if dot else None, path, "", query)
    return KacheryURL(alg, digest.lower(), False, None, "", tail.strip("/"), query)
