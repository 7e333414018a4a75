"""Directory manifests: the original's byte form, validation, building from disk."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from kacheryfs import manifest
from kacheryfs.errors import InvalidInput, InvalidManifest, IsADirectory, NotADirectory, NotFound
from kacheryfs.manifest import DirNode, FileEntry

S1 = "a" * 40
S2 = "b" * 40
M1 = "c" * 32


def _entry(path):
    return FileEntry(path.stat().st_size, "0" * 40)


def test_original_unsorted_byte_form_is_read_as_it_is():
    raw = ('{"files": {"z.txt": {"size": 3, "sha1": "' + S1 + '"}, "a.txt": {"size": 1, "sha1": "' + S2 + '"}}, '
           '"dirs": {"sub": {"files": {}, "dirs": {}}}}').encode()  # fmt: skip
    node = manifest.parse(raw)
    assert list(node.files) == ["z.txt", "a.txt"]
    assert node.resolve_file("z.txt") == FileEntry(3, S1)
    assert node.resolve_dir("sub").files == {}


def test_md5_entries_and_unicode_escapes():
    raw = b'{"files": {"caf\\u00e9.bin": {"size": 7, "md5": "' + M1.encode() + b'"}}, "dirs": {}}'
    entry = manifest.parse(raw).resolve_file("café.bin")
    assert (entry.alg, entry.digest, entry.size) == ("md5", M1, 7)


def test_serialize_sorts_names_and_uses_the_original_separators():
    node = DirNode(files={"b": FileEntry(1, S1), "a": FileEntry(2, S2)}, dirs={"é": DirNode()})
    text = manifest.serialize(node).decode()
    assert text == (
        '{"files": {"a": {"size": 2, "sha1": "' + S2 + '"}, "b": {"size": 1, "sha1": "' + S1 + '"}}, '
        '"dirs": {"\\u00e9": {"files": {}, "dirs": {}}}}'
    )
    assert manifest.parse(text.encode()).to_json() == node.to_json()


def test_resolve_subpaths():
    node = manifest.parse(json.dumps({"files": {}, "dirs": {"d": {"files": {"f": {"size": 1, "sha1": S1}}}}}).encode())
    assert node.resolve("d/f") == FileEntry(1, S1)
    assert isinstance(node.resolve(""), DirNode)
    with pytest.raises(NotFound):
        node.resolve("d/nope")
    with pytest.raises(NotADirectory):
        node.resolve("d/f/x")
    with pytest.raises(IsADirectory):
        node.resolve_file("d")


@pytest.mark.parametrize(
    "obj, reason",
    [
        ({"files": {"..": {"size": 1, "sha1": S1}}, "dirs": {}}, "invalid name"),
        ({"files": {"a/b": {"size": 1, "sha1": S1}}, "dirs": {}}, "invalid name"),
        ({"files": {"": {"size": 1, "sha1": S1}}, "dirs": {}}, "invalid name"),
        ({"files": {}, "dirs": {".": {"files": {}, "dirs": {}}}}, "invalid name"),
        ({"files": {"a": {"size": -1, "sha1": S1}}, "dirs": {}}, "invalid size"),
        ({"files": {"a": {"size": "1", "sha1": S1}}, "dirs": {}}, "invalid size"),
        ({"files": {"a": {"size": 1, "sha1": "xyz"}}, "dirs": {}}, "malformed sha1"),
        ({"files": {"a": {"size": 1}}, "dirs": {}}, "neither"),
        ({"files": [], "dirs": {}}, "must be objects"),
        ([1, 2], "not an object"),
    ],
)
def test_invalid_manifests_are_rejected_with_the_reason(obj, reason):
    with pytest.raises(InvalidManifest, match=reason):
        manifest.parse(json.dumps(obj).encode())


def test_non_json_is_rejected():
    with pytest.raises(InvalidManifest, match="not valid JSON"):
        manifest.parse(b"\x89PNG not json")


def test_build_follows_file_symlinks_and_is_sorted(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("bb")
    (tmp_path / "d" / "a.txt").write_text("a")
    os.symlink(tmp_path / "d" / "a.txt", tmp_path / "d" / "link.txt")
    node = manifest.build(tmp_path / "d", _entry)
    assert list(node.files) == ["a.txt", "b.txt", "link.txt"]
    assert node.files["link.txt"].size == 1


def test_build_warns_of_a_symlink_out_of_the_directory_and_stores_its_target(tmp_path, caplog):
    (tmp_path / "d").mkdir()
    (tmp_path / "outside.txt").write_text("outside")
    os.symlink(tmp_path / "outside.txt", tmp_path / "d" / "out")
    (tmp_path / "d" / "a.txt").write_text("a")
    os.symlink("a.txt", tmp_path / "d" / "in")  # to a file inside: no warning
    node = manifest.build(tmp_path / "d", _entry)
    assert node.files["out"].size == 7 and node.files["in"].size == 1
    warned = [r.getMessage() for r in caplog.records if "symlink out of the directory" in r.getMessage()]
    assert len(warned) == 1 and str(tmp_path / "outside.txt") in warned[0]


def test_build_refuses_a_name_a_manifest_cannot_hold(tmp_path):
    (tmp_path / "d").mkdir()
    (Path(os.fsdecode(os.fsencode(tmp_path / "d") + b"/\xff.txt"))).write_text("x")
    with pytest.raises(InvalidInput, match="UTF-8"):
        manifest.build(tmp_path / "d", _entry)


def test_build_refuses_a_symlink_loop(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "d", tmp_path / "d" / "sub" / "up")
    with pytest.raises(InvalidInput, match="loop"):
        manifest.build(tmp_path / "d", _entry)


def test_build_skips_fifos_and_sockets_with_a_warning(tmp_path, caplog):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    os.mkfifo(tmp_path / "d" / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "d" / "sock"))
    try:
        node = manifest.build(tmp_path / "d", _entry)
    finally:
        sock.close()
    assert list(node.files) == ["f"]
    assert "fifo" in caplog.text and "sock" in caplog.text


def test_build_of_missing_directory_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        manifest.build(tmp_path / "nope", _entry)
