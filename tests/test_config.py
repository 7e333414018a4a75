"""The config file as the commands meet it: a channel whose password variable is not set stops
only what uses that channel; timeouts that cannot fail over are warned about (real processes)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from fixtures_mount import mounted_at
from fixtures_server import ServerProcess

import kacheryfs as ka
from kacheryfs.config import load_config, slow_failover
from kacheryfs.errors import ChannelMisconfigured, ConfigError
from kacheryfs.store import LocalStore

pytestmark = pytest.mark.timeout(120)
UNSET = "KACHERYFS_TEST_UNSET_PASSWORD"
MISSING = "0" * 40  # a blob no store or channel has


def config_with_unset_password(url: str = "http://127.0.0.1:9", public: str | None = None) -> str:
    """`lab` (at `url`) to read from and upload to, its password in $UNSET; then `public`, if given."""
    lab = f'[channels.lab]\nurl = "{url}"\npassword_env = "{UNSET}"\n'
    if public is None:
        return f'fr = ["lab"]\nto = "lab"\n{lab}'
    return f'fr = ["lab", "public"]\nto = "lab"\n{lab}[channels.public]\nurl = "{public}"\n'


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != UNSET}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, env=env)


def unset_variable_named(config: Path) -> str:
    """What an error about the unset password variable of `lab` says, the file and variable named."""
    return f"[channels.lab] in {config} takes its password from ${UNSET}, which is not set"


def test_a_channel_whose_password_variable_is_unset_stops_no_local_command(tmp_path: Path, config_file: Path) -> None:
    config_file.write_text(config_with_unset_password())
    (tmp_path / "a.txt").write_text("kept here\n")
    store = run("kachery-store", str(tmp_path / "a.txt"), "--to", "")
    assert store.returncode == 0, store.stderr
    cat = run("kachery-cat", store.stdout.strip())
    assert (cat.returncode, cat.stdout) == (0, "kept here\n"), cat.stderr
    du = run("kacheryfs", "du")
    assert du.returncode == 0, du.stderr


def test_reading_through_a_channel_whose_password_variable_is_unset_is_a_config_error_naming_it(
    config_file: Path,
) -> None:
    config_file.write_text(config_with_unset_password())
    cat = run("kachery-cat", f"sha1://{MISSING}")
    assert cat.returncode == ConfigError.exit_code, cat.stderr
    assert f"could not fetch sha1://{MISSING}: lab: {unset_variable_named(config_file)}" in cat.stderr, cat.stderr


def test_kachery_store_to_a_channel_whose_password_variable_is_unset_refuses_before_storing_anything(
    tmp_path: Path, config_file: Path, storage_dir: Path
) -> None:
    config_file.write_text(config_with_unset_password())
    (tmp_path / "a.txt").write_bytes(b"to upload\n")
    (tmp_path / "b.txt").write_bytes(b"and this\n")
    store = run("kachery-store", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    assert store.returncode == ConfigError.exit_code and store.stdout == "", store.stderr
    assert store.stderr.count(unset_variable_named(config_file)) == 1
    assert not LocalStore(storage_dir).has("sha1", hashlib.sha1(b"to upload\n").hexdigest())


def test_the_api_stores_locally_then_says_the_upload_channel_has_no_password(
    config_file: Path, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET, raising=False)
    config_file.write_text(config_with_unset_password())
    with pytest.raises(ChannelMisconfigured, match=re.escape(unset_variable_named(config_file))):
        ka.store_bytes(b"to upload\n")
    assert LocalStore(storage_dir).has("sha1", hashlib.sha1(b"to upload\n").hexdigest())


def test_the_channels_after_one_whose_password_variable_is_unset_still_serve_reads(
    config_file: Path, server: ServerProcess
) -> None:
    digest = LocalStore(server.directory).put_bytes(b"on public\n").sha1
    config_file.write_text(config_with_unset_password(server.url, public=server.url))
    cat = run("kachery-cat", f"sha1://{digest}")
    assert (cat.returncode, cat.stdout) == (0, "on public\n"), cat.stderr


def test_a_mount_reading_from_a_channel_whose_password_variable_is_unset_starts_and_names_it(
    tmp_path: Path, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET, raising=False)
    digest = LocalStore(server.directory).put_bytes(b"on public\n").sha1
    with mounted_at(tmp_path, tmp_path / "storage", config_with_unset_password(server.url, server.url)) as mount:
        assert mount.path(f"sha1://{digest}/a.txt").read_bytes() == b"on public\n"
        with pytest.raises(OSError) as failed:
            mount.path(f"sha1://{MISSING}/b.txt").read_bytes()
        assert failed.value.errno == errno.EIO  # a channel that cannot be used, as one that fails
        assert unset_variable_named(mount.config) in mount.log_text()


def timeouts_config(path: Path, fr: str, fetch_timeout: float, channel_timeout: float) -> Path:
    path.write_text(
        f"fr = {fr}\nchannel_timeout = {channel_timeout}\n[mount]\nfetch_timeout = {fetch_timeout}\n"
        '[channels.lab]\nurl = "http://lab"\n[channels.public]\nurl = "http://public"\n'
    )
    return path


def test_only_a_fetch_timeout_that_cannot_outlast_a_silent_channel_before_another_is_warned_about(
    tmp_path: Path,
) -> None:
    two, one = '["lab", "public"]', '["lab"]'

    def why(name: str, fr: str, fetch: float, channel: float) -> str | None:
        return slow_failover(load_config(timeouts_config(tmp_path / name, fr, fetch, channel), env={}))

    assert why("fine.toml", two, 30.5, 10.5) is None and why("one-channel.toml", one, 5.5, 10.5) is None
    assert "fetch_timeout (5.5 s) is not more than channel_timeout (10.5 s)" in (why("a.toml", two, 5.5, 10.5) or "")
    assert "fetch_timeout (7.5 s) is not more than channel_timeout (7.5 s)" in (why("b.toml", two, 7.5, 7.5) or "")


def test_the_slow_failover_warning_comes_from_mount_not_from_every_command(tmp_path: Path) -> None:
    config = timeouts_config(tmp_path / "config.toml", '["lab", "public"]', 5.5, 10.5)
    env = dict(os.environ, KACHERY_CONFIG=str(config), KACHERY_STORAGE_DIR=str(tmp_path / "s"))
    du = subprocess.run(["kacheryfs", "du"], capture_output=True, text=True, env=env, timeout=60)
    assert du.returncode == 0 and "fetch_timeout" not in du.stderr
    mount = subprocess.run(["kacheryfs", "mount", str(tmp_path / "nope")], capture_output=True, text=True, env=env,
                           timeout=60)  # fmt: skip
    assert "warning: fetch_timeout (5.5 s) is not more than channel_timeout (10.5 s)" in mount.stderr
