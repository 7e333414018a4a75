"""The kachery-* commands, run as real processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest


def sh(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), input=input, capture_output=True, timeout=60, env=os.environ.copy())


def out(*args: str) -> str:
    result = sh(*args)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "ds001"
    (root / "subdir1").mkdir(parents=True)
    (root / "subdir1" / "file1.txt").write_text("one\n")
    (root / "top.txt").write_text("top\n")
    (root / "zdir").mkdir()
    return root


@pytest.mark.parametrize(
    "command", ["kachery-store", "kachery-load", "kachery-cat", "kachery-ls", "kachery-info", "kacheryfs"]
)
def test_help_explains_with_an_example(command):
    text = out(command, "--help")
    assert "example" in text and "exit codes" in text


def test_store_prints_one_url_per_path(tmp_path, tree):
    (tmp_path / "f.bin").write_bytes(b"abc")
    lines = out("kachery-store", str(tmp_path / "f.bin"), str(tree)).splitlines()
    assert lines[0] == f"sha1://{hashlib.sha1(b'abc').hexdigest()}/f.bin"
    assert lines[1].startswith("sha1dir://") and lines[1].endswith(".ds001")


def test_store_prints_a_name_with_a_newline_on_one_line(tmp_path):
    (tmp_path / "new\nline\t.txt").write_bytes(b"abc")
    assert out("kachery-store", str(tmp_path / "new\nline\t.txt")).endswith("/new_line_.txt")


@pytest.mark.parametrize("command", ["kacheryfs", "kachery-store", "kachery-cat", "kachery-ls"])
def test_every_command_tells_the_version_the_package_declares(command):
    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["version"]
    assert out(command, "--version") == f"kacheryfs {declared}"


def test_store_label(tree):
    assert out("kachery-store", str(tree), "--label", "v1.0").endswith(".v1.0")


def test_store_label_given_with_a_file_says_the_file_goes_without_it(tree):
    result = sh("kachery-store", str(tree / "top.txt"), str(tree), "--label", "v1")
    urls = result.stdout.decode().split()
    assert result.returncode == 0 and urls[0].endswith("/top.txt") and urls[1].endswith(".v1")
    assert f"{tree / 'top.txt'} is stored without it".encode() in result.stderr


@pytest.mark.parametrize("label", ["a/b", ""])
def test_store_refuses_a_bad_label_before_storing_anything(tree, label):
    result = sh("kachery-store", str(tree / "top.txt"), str(tree), "--label", label)
    assert result.returncode == 2 and b"label" in result.stderr and not result.stdout


def test_store_refuses_a_fifo_given_directly(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    result = subprocess.run(["kachery-store", str(tmp_path / "fifo")], capture_output=True, timeout=20)
    assert result.returncode == 2 and b"not a regular file" in result.stderr


def test_store_stores_every_path_that_exists_and_reports_each_missing_one(tmp_path, tree):
    result = sh("kachery-store", str(tree / "top.txt"), "/nonexistent1", str(tree), "/nonexistent2")
    urls = result.stdout.decode().splitlines()
    assert result.returncode == 1 and len(urls) == 2 and urls[1].startswith("sha1dir://")
    assert b"/nonexistent1" in result.stderr and b"/nonexistent2" in result.stderr


def test_load_prints_a_local_path(tree):
    url = out("kachery-store", str(tree / "top.txt"))
    assert open(out("kachery-load", url)).read() == "top\n"


def test_load_directory_needs_dest(tmp_path, tree):
    url = out("kachery-store", str(tree))
    result = sh("kachery-load", url)
    assert result.returncode == 2 and b"--dest" in result.stderr
    out("kachery-load", url, "--dest", str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "subdir1" / "file1.txt").read_text() == "one\n"


def test_cat_streams_bytes_and_ranges(tmp_path):
    data = os.urandom(20 << 20)
    (tmp_path / "big").write_bytes(data)
    url = out("kachery-store", str(tmp_path / "big"))
    assert sh("kachery-cat", url).stdout == data
    assert sh("kachery-cat", url, "--start", "5", "--end", "100").stdout == data[5:100]
    assert sh("kachery-cat", url, "--start", str(len(data) - 3)).stdout == data[-3:]


def test_cat_into_a_closed_pipe_is_not_an_error(tmp_path):
    (tmp_path / "big").write_bytes(os.urandom(8 << 20))
    url = out("kachery-store", str(tmp_path / "big"))
    result = subprocess.run(f"kachery-cat {url} | head -c 10 >/dev/null", shell=True, capture_output=True, timeout=30)
    assert result.returncode == 0 and b"Traceback" not in result.stderr


def test_cat_of_a_sha1dir_subpath(tree):
    url = out("kachery-store", str(tree))
    assert out("kachery-cat", f"{url}/subdir1/file1.txt") == "one"


def test_ls_lists_directories_first_with_a_slash(tree):
    url = out("kachery-store", str(tree))
    assert out("kachery-ls", url).splitlines() == ["subdir1/", "zdir/", "top.txt"]
    assert out("kachery-ls", url + "/subdir1").splitlines() == ["file1.txt"]


def test_info_prints_json(tree):
    url = out("kachery-store", str(tree / "top.txt"))
    info = json.loads(out("kachery-info", url))
    assert set(info) >= {"path", "size", "sha1", "md5"}
    assert info["size"] == 4 and info["md5"] == hashlib.md5(b"top\n").hexdigest()


@pytest.mark.parametrize(
    "args, code",
    [
        (["kachery-cat", "sha1://nothex"], 2),
        (["kachery-cat", "sha1://" + "0" * 40], 1),
        (["kachery-info", "md5://" + "0" * 32], 1),
        (["kachery-store", "/nonexistent/file"], 1),
        (["kachery-cat", "sha1://" + "0" * 40, "--fr", "nowhere"], 2),
        (["kachery-store", "/etc/hostname", "--to", "nowhere"], 2),
        (["kachery-cat"], 2),
        (["kacheryfs", "prefetch", "sha1://" + "0" * 40], 1),
    ],
)
def test_failures_exit_non_zero_with_a_message(args, code):
    result = sh(*args)
    assert result.returncode == code
    assert result.stderr and b"Traceback" not in result.stderr


def test_bad_ranges_are_usage_errors(tree):
    url = out("kachery-store", str(tree / "top.txt"))
    for args in (["--start", "10"], ["--start", "-1"], ["--start", "3", "--end", "1"]):
        result = sh("kachery-cat", url, *args)
        assert result.returncode == 2 and b"Traceback" not in result.stderr


def test_sha1dir_subpath_errors(tree):
    url = out("kachery-store", str(tree))
    assert sh("kachery-cat", url + "/missing").returncode == 1
    assert sh("kachery-cat", url + "/subdir1").returncode == 2


@pytest.mark.parametrize("target", ["loop", ".."])
def test_store_of_a_tree_with_a_symlink_loop_is_bad_input(tree, target):
    os.symlink(target, tree / "subdir1" / "loop")
    result = sh("kachery-store", str(tree))
    assert result.returncode == 2 and b"symlink loop" in result.stderr


def test_load_dir_to_an_existing_path_is_a_usage_error_naming_it(tmp_path, tree):
    url = out("kachery-store", str(tree))
    (tmp_path / "out1").mkdir()
    for command in (["kachery-load-dir", url], ["kachery-load", url]):
        result = sh(*command, "--dest", str(tmp_path / "out1"))
        assert result.returncode == 2 and str(tmp_path / "out1").encode() in result.stderr


def test_load_of_a_file_onto_a_directory_is_a_usage_error_naming_it(tmp_path, tree):
    url = out("kachery-store", str(tree / "top.txt"))
    (tmp_path / "out1").mkdir()
    result = sh("kachery-load", url, "--dest", str(tmp_path / "out1"))
    assert result.returncode == 2 and str(tmp_path / "out1").encode() in result.stderr
    assert b"Errno" not in result.stderr


def test_errors_about_what_a_url_names_name_the_url(tree):
    snapshot = out("kachery-store", str(tree))
    text = out("kachery-store", str(tree / "top.txt"))
    not_a_manifest = text.replace("sha1://", "sha1dir://").rsplit("/", 1)[0] + ".x"
    missing = "sha1dir://" + "0" * 40 + ".x/a/b"
    cases = [
        ("kachery-cat", snapshot + "/nonexistent.txt"),
        ("kachery-ls", not_a_manifest),
        ("kachery-cat", missing),
        ("kachery-load", missing),
    ]
    for command, url in cases:
        result = sh(command, url)
        assert result.returncode != 0 and url.encode() in result.stderr, (command, result.stderr)
