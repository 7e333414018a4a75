"""The Python API, working on the local store."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading

import numpy as np
import pytest

import kacheryfs as ka
from kacheryfs.errors import (
    ConfigError,
    InvalidInput,
    InvalidManifest,
    InvalidURL,
    IsADirectory,
    KacheryError,
    NotADirectory,
    NotFound,
)


def _tree(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_text("beta")
    (root / "sub" / "deeper" / "c.bin").write_bytes(bytes(range(256)))
    return root


def test_text_round_trip():
    url = ka.store_text("hello")
    assert url == f"sha1://{hashlib.sha1(b'hello').hexdigest()}/file.txt"
    assert ka.load_text(url) == "hello"


def test_object_round_trip_uses_the_original_serialization():
    obj = {"b": 1, "a": [1, 2]}
    url = ka.store_object(obj)
    assert ka.load_object(url) == obj
    assert url.split("/")[2] == hashlib.sha1(json.dumps(obj).encode()).hexdigest()


def test_npy_round_trip():
    array = np.arange(144, dtype=np.float32).reshape(12, 12)
    url = ka.store_npy(array)
    assert url.endswith("/file.npy")
    np.testing.assert_array_equal(ka.load_npy(url), array)


def test_store_file_keeps_the_basename(tmp_path):
    (tmp_path / "data.csv").write_text("x,y\n")
    url = ka.store_file(tmp_path / "data.csv")
    assert url.endswith("/data.csv")
    assert ka.store_file(tmp_path / "data.csv", basename="other.csv").endswith("/other.csv")
    assert open(ka.load_file(url)).read() == "x,y\n"


def test_load_file_to_dest(tmp_path):
    url = ka.store_text("copy me")
    dest = tmp_path / "out.txt"
    assert ka.load_file(url, dest=dest) == str(dest)
    assert dest.read_text() == "copy me"


def test_load_bytes_range_is_end_exclusive():
    url = ka.store_text("0123456789")
    assert ka.load_bytes(url, 2, 5) == b"234"
    assert ka.load_bytes(url, start=7) == b"789"
    assert ka.load_bytes(url, end=3) == b"012"
    with pytest.raises(ValueError):
        ka.load_bytes(url, 11, 12)
    with pytest.raises(ValueError):
        ka.load_bytes(url, -1, 2)


def test_store_dir_and_load_through_subpaths(tmp_path):
    url = ka.store_dir(_tree(tmp_path / "ds001"))
    assert url.startswith("sha1dir://") and url.endswith(".ds001")
    assert ka.load_text(url + "/sub/b.txt") == "beta"
    assert ka.load_bytes(url + "/sub/deeper/c.bin") == bytes(range(256))


def test_a_file_named_with_a_question_mark_is_read_by_its_name_not_its_neighbour(tmp_path):
    tree = tmp_path / "hd"
    tree.mkdir()
    (tree / "c?d").write_text("the file c?d")
    (tree / "c").write_text("its neighbour c")
    url = ka.store_dir(tree)
    assert ka.load_text(url + "/c?d") == "the file c?d"
    assert ka.load_text(url + "/c?manifest=x") == "its neighbour c"  # no such name: a query, ignored
    assert ka.load_text(url + "/c?") == "its neighbour c"  # as the original kachery read it
    snapshot = tmp_path / "mnt" / "sha1dir" / url.removeprefix("sha1dir://")
    assert ka.mount_path(url + "/c?d", tmp_path / "mnt") == snapshot / "c"  # nothing on the mount to tell
    snapshot.mkdir(parents=True)
    (snapshot / "c?d").touch()  # as a mount of that snapshot lists it
    assert ka.mount_path(url + "/c?d", tmp_path / "mnt") == snapshot / "c?d"


@pytest.mark.parametrize("given", [None, 123, b"sha1://0"])
def test_a_url_that_is_not_text_is_an_invalid_url_everywhere(given, tmp_path):
    for call in (ka.load_text, ka.load_bytes, ka.get_file_info, lambda url: ka.mount_path(url, tmp_path)):
        with pytest.raises(InvalidURL, match="expected a URL string"):
            call(given)


def test_storing_a_file_as_a_directory_or_back_is_bad_input_that_says_what_to_use(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InvalidInput, match="not a directory: store a file with store_file"):
        ka.store_dir(tmp_path / "f.txt")
    with pytest.raises(InvalidInput, match="is a directory: store it with store_dir"):
        ka.store_file(tmp_path)


def test_a_load_into_a_folder_that_does_not_exist_says_so_before_fetching(tmp_path):
    url = ka.store_text("hello")
    with pytest.raises(InvalidInput, match="there is no folder"):
        ka.load_file(url, tmp_path / "no" / "x.txt")
    with pytest.raises(InvalidInput, match="there is no folder"):
        ka.load_dir(ka.store_dir(_tree(tmp_path / "d")), tmp_path / "no" / "d")
    assert not (tmp_path / "no").exists()


def test_a_load_writes_through_a_symlink_and_into_a_fifo_and_leaves_no_temp_file(tmp_path):
    url = ka.store_text("hello")
    (tmp_path / "target").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    ka.load_file(url, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target").read_text() == "hello"
    os.mkfifo(tmp_path / "fifo")
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append((tmp_path / "fifo").read_bytes()))
    reader.start()
    ka.load_file(url, tmp_path / "fifo")
    reader.join(timeout=10)
    assert read == [b"hello"] and stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("toml", "storage"))) == [
        "fifo",
        "link",
        "target",
    ]


def test_a_failed_load_dir_leaves_nothing_behind(tmp_path):
    digest = ka.store_text("hello").split("/")[2]
    listing = {"files": {"a.txt": {"size": 6, "sha1": digest}}, "dirs": {}}  # the blob has 5 bytes
    url = "sha1dir://" + ka.store_text(json.dumps(listing)).split("/")[2] + ".bad"
    with pytest.raises(KacheryError):
        ka.load_dir(url, tmp_path / "out")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_reading_a_file_url_as_a_directory_is_bad_usage():
    with pytest.raises(NotADirectory, match="is a file URL, not a directory URL"):
        ka.read_dir(ka.store_text("x"))


def test_same_tree_gives_the_same_url_anywhere(tmp_path):
    one = ka.store_dir(_tree(tmp_path / "x" / "ds"))
    two = ka.store_dir(_tree(tmp_path / "y" / "ds"))
    assert one == two


def test_store_dir_label(tmp_path):
    assert ka.store_dir(_tree(tmp_path / "d"), label="my.label").endswith(".my.label")


@pytest.mark.parametrize("label", ["a/b", "", "v1?x"])
def test_store_dir_refuses_a_label_that_breaks_the_url_before_storing(tmp_path, storage_dir, label):
    with pytest.raises(InvalidInput, match="label"):
        ka.store_dir(_tree(tmp_path / "d"), label=label)
    assert not storage_dir.exists() or not any(p.is_file() for p in storage_dir.rglob("*"))


def test_read_dir_recursive_and_not(tmp_path):
    url = ka.store_dir(_tree(tmp_path / "d"))
    full = ka.read_dir(url)
    assert full["files"]["a.txt"]["size"] == 5
    assert "b.txt" in full["dirs"]["sub"]["files"]
    shallow = ka.read_dir(url, recursive=False)
    assert shallow["dirs"] == {"sub": {}}
    assert ka.read_dir(url + "/sub")["files"]["b.txt"]["size"] == 4


def test_load_dir_recreates_the_tree(tmp_path):
    src = _tree(tmp_path / "d")
    url = ka.store_dir(src)
    out = ka.load_dir(url, tmp_path / "out")
    for rel in ("a.txt", "sub/b.txt", "sub/deeper/c.bin"):
        assert (tmp_path / "out" / rel).read_bytes() == (src / rel).read_bytes()
    assert out == str(tmp_path / "out")
    with pytest.raises(FileExistsError):
        ka.load_dir(url, tmp_path / "out")


def test_get_file_info(tmp_path):
    url = ka.store_text("info")
    info = ka.get_file_info(url)
    assert info["size"] == 4 and info["found_in"] == "local"
    assert info["sha1"] == hashlib.sha1(b"info").hexdigest()
    assert info["md5"] == hashlib.md5(b"info").hexdigest()
    assert open(info["path"], "rb").read() == b"info"


def test_md5_url_resolves_locally_for_content_stored_here():
    ka.store_text("by md5")
    assert ka.load_text(f"md5://{hashlib.md5(b'by md5').hexdigest()}/x.txt") == "by md5"


def test_unknown_hash_raises_not_found():
    with pytest.raises(NotFound):
        ka.load_text("sha1://" + "0" * 40 + "/x")


def test_prefetch_of_a_hash_nobody_has_raises_not_found():
    with pytest.raises(NotFound):
        ka.prefetch("sha1://" + "0" * 40 + "/x")


def test_unknown_subpath_raises_not_found(tmp_path):
    url = ka.store_dir(_tree(tmp_path / "d"))
    with pytest.raises(NotFound):
        ka.load_text(url + "/nope.txt")


def test_a_missing_snapshot_is_not_found_naming_its_url():
    url = "sha1dir://" + "0" * 40 + ".x/a/b"
    with pytest.raises(NotFound, match=re.escape(url)):
        ka.load_text(url)


def test_directory_where_a_file_is_needed(tmp_path):
    url = ka.store_dir(_tree(tmp_path / "d"))
    with pytest.raises(IsADirectory):
        ka.load_text(url + "/sub")


def test_manifest_blob_that_is_not_json(tmp_path):
    text_url = ka.store_text("not a manifest")
    with pytest.raises(InvalidManifest):
        ka.read_dir(text_url.replace("sha1://", "sha1dir://").rsplit("/", 1)[0])


def test_malformed_url_raises_invalid_url():
    with pytest.raises(ka.InvalidURL):
        ka.load_text("sha1://nothex")


def test_set_config_and_context_manager(tmp_path):
    before = ka.get_config()
    with ka.config(storage_dir=str(tmp_path / "other")):
        assert ka.get_config()["storage_dir"] == str(tmp_path / "other")
        url = ka.store_text("elsewhere")
    assert ka.get_config() == before
    with pytest.raises(NotFound):
        ka.load_text(url)


def test_unknown_channel_is_a_clear_error():
    with pytest.raises(ConfigError, match="not configured"):
        ka.load_text("sha1://" + "0" * 40, fr="nowhere")
    with pytest.raises(ConfigError, match="unknown setting"):
        ka.set_config(colour="blue")


def test_store_dir_makes_its_blobs_durable_in_groups_not_one_fsync_each(tmp_path, monkeypatch):
    from kacheryfs.store import local

    root = tmp_path / "many"
    root.mkdir()
    for i in range(300):
        (root / f"{i:03d}.txt").write_text(f"file {i}")
    calls = {"fsync": 0, "syncfs": 0}
    real_fsync, real_syncfs = local.os.fsync, local._syncfs

    def fsync(fd):
        calls["fsync"] += 1
        real_fsync(fd)

    def syncfs(fd):
        calls["syncfs"] += 1
        return real_syncfs(fd)

    monkeypatch.setattr(local.os, "fsync", fsync)
    monkeypatch.setattr(local, "_syncfs", syncfs)
    url = ka.store_dir(root)
    assert calls == {"fsync": 2, "syncfs": 6}  # the manifest's own commit; 3 groups of ≤ 128 files, 2 syncs each
    assert ka.load_text(f"{url}/299.txt") == "file 299"


def test_relative_paths_in_a_config_file_are_relative_to_the_file_and_others_to_the_caller(tmp_path, monkeypatch):
    from kacheryfs.config import load_config

    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "config.toml"
    config.write_text('storage_dir = "store"\n[mount]\nlog_file = "log/mount.log"\n')
    monkeypatch.chdir(tmp_path)
    loaded = load_config(config, env={})
    assert loaded.storage_dir == tmp_path / "etc" / "store"
    assert loaded.log_file == tmp_path / "etc" / "log" / "mount.log"
    assert load_config(config, env={"KACHERY_STORAGE_DIR": "here"}).storage_dir == tmp_path / "here"


def test_a_config_file_with_several_unknown_keys_names_them_all(tmp_path):
    from kacheryfs.config import load_config

    config = tmp_path / "config.toml"
    config.write_text(
        'colour = "blue"\nchanel_timeout = 3\nfetch_timeout = 5\n[mount]\nlogfile = "x"\n[cache]\nmax_sise = "1 GiB"\n'
        '[channels.lab]\nurl = "http://127.0.0.1:1"\npasword = "p"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(config, env={})
    assert (
        "unknown keys colour, chanel_timeout (did you mean channel_timeout?), fetch_timeout (it belongs under "
        "[mount]), [mount] logfile (did you mean log_file?), [cache] max_sise (did you mean max_size?), "
        "[channels.lab] pasword (did you mean password?)"
    ) in str(err.value)
    config.write_text('[channels.lab]\nulr = "http://127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match=r"needs at least url = .*\(unknown: ulr \(did you mean url\?\)\)"):
        load_config(config, env={})


@pytest.mark.parametrize(
    "line",
    ["[mount]\nfetch_timeout = -1", "channel_timeout = 0", "[mount]\nentry_timeout = -5",
     "[mount]\nreadahead_kb = -3", "[mount]\nreadahead_kb = 1.5", '[mount]\nlog_level = "CHATTY"'],
)  # fmt: skip
def test_values_that_cannot_work_are_refused_when_the_file_is_read(tmp_path, line):
    from kacheryfs.config import load_config

    config = tmp_path / "config.toml"
    config.write_text(line + "\n")
    with pytest.raises(ConfigError, match="invalid value"):
        load_config(config, env={})


def test_a_manifest_giving_a_wrong_size_is_bad_data_not_other_bytes():
    blob = hashlib.sha1(b"hello\n").hexdigest()
    ka.store_text("hello\n")
    manifest = {"files": {"short": {"size": 2, "sha1": blob}, "right": {"size": 6, "sha1": blob}}, "dirs": {}}
    snapshot = ka.store_object(manifest).split("/")[2]
    assert ka.load_text(f"sha1dir://{snapshot}.x/right") == "hello\n"
    with pytest.raises(InvalidManifest, match="where 2 were expected"):
        ka.load_text(f"sha1dir://{snapshot}.x/short")


def test_every_kacheryfs_error_is_importable_from_the_package():
    import kacheryfs.errors

    defined = {n for n, v in vars(kacheryfs.errors).items() if isinstance(v, type) and issubclass(v, ka.KacheryError)}
    assert defined <= set(ka.__all__)
    assert all(getattr(ka, name) is getattr(kacheryfs.errors, name) for name in defined)


@pytest.mark.parametrize(
    ("start", "end", "reason"),
    [(11, 12, "start 11 is past the end of the file"), (-3, None, "negative"), (5, 2, "end 2 is before start 5")],
)
def test_a_byte_range_that_does_not_fit_the_file_is_bad_input_saying_why(start, end, reason):
    url = ka.store_text("0123456789")
    with pytest.raises(InvalidInput, match=reason):
        ka.load_bytes(url, start, end)


@pytest.mark.parametrize("array", [np.array([1, "a", None], dtype=object), {1, 2}])
def test_an_array_of_python_objects_is_never_stored_as_a_pickle(array):
    with pytest.raises(InvalidInput, match=r"Python objects \(dtype=object\).*runs code when it is loaded"):
        ka.store_npy(array)


def test_a_ragged_list_is_not_an_array_to_store():
    with pytest.raises(InvalidInput, match="store_npy stores an array"):
        ka.store_npy([[1], [1, 2]])


def test_load_npy_of_a_file_that_is_not_npy_says_so_not_pickle():
    url = ka.store_text("just text")
    with pytest.raises(InvalidInput, match="is not an .npy array") as raised:
        ka.load_npy(url)
    assert "pickle" not in str(raised.value)


def test_load_npy_refuses_an_npy_of_python_objects():
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([1, None], dtype=object), allow_pickle=True)  # as another program may have stored it
    url = ka.store_bytes(buf.getvalue(), "objects.npy")
    with pytest.raises(InvalidInput, match="never loaded, since loading one runs code"):
        ka.load_npy(url)


@pytest.mark.parametrize(("obj", "type_name"), [({1, 2}, "set"), (np.int64(3), "int64"), ({(1, 2): 3}, "tuple")])
def test_store_object_of_what_json_cannot_hold_names_the_type(obj, type_name):
    with pytest.raises(InvalidInput, match=f"store_object stores JSON.*{type_name}"):
        ka.store_object(obj)


def test_store_object_keeps_the_original_nan_serialization():
    url = ka.store_object({"x": float("nan")})
    assert url.split("/")[2] == hashlib.sha1(b'{"x": NaN}').hexdigest()


def test_load_text_of_bytes_that_are_not_utf8_points_to_load_bytes():
    url = ka.store_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(InvalidInput, match="is not UTF-8 text.*load_bytes reads it as bytes"):
        ka.load_text(url)


@pytest.mark.parametrize(
    "data", [b"not json", b"\xff\xfe\x00", b"[" * 100_000], ids=["text", "not utf-8", "nested too deep"]
)
def test_load_object_of_bytes_that_are_not_json_says_so(data):
    url = ka.store_bytes(data)
    with pytest.raises(InvalidInput, match="is not JSON"):
        ka.load_object(url)


@pytest.mark.parametrize(
    ("store", "given", "message"),
    [
        (ka.store_text, b"x", "store_text takes a str, not bytes; store_bytes takes bytes"),
        (ka.store_text, None, "store_text takes a str, not NoneType"),
        (ka.store_text, "\udc80", "cannot be encoded as UTF-8"),
        (ka.store_bytes, "text", "store_bytes takes bytes, not str; store_text takes a str"),
        (ka.store_bytes, None, "store_bytes takes bytes, not NoneType"),
        (ka.store_file, None, "store_file takes a path, not NoneType"),
        (ka.store_file, b"/etc/hostname", "store_file takes a path, not bytes"),
        (ka.store_dir, 3, "store_dir takes a path, not int"),
    ],
)
def test_a_store_given_the_wrong_type_says_which_store_takes_it(store, given, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        store(given)


def test_a_basename_or_label_that_is_not_a_string_is_bad_input(tmp_path):
    with pytest.raises(InvalidInput, match="basename must be a str, not int"):
        ka.store_bytes(b"x", 12)
    with pytest.raises(InvalidInput, match="label must be a str, not int"):
        ka.store_dir(_tree(tmp_path / "d"), label=3)


def test_store_bytes_stores_the_bytes_of_any_buffer():
    array = np.arange(3, dtype=np.int64)
    assert ka.load_bytes(ka.store_bytes(array)) == array.tobytes()
    assert ka.load_bytes(ka.store_bytes(memoryview(array)[::2])) == array[::2].tobytes()
    assert ka.load_bytes(ka.store_bytes(bytearray(b"ab"))) == b"ab"
    assert ka.load_bytes(ka.store_bytes(np.zeros((0, 3)))) == b""  # an empty array is empty bytes
