"""System integration: an /etc/fstab line mounted through mount.fuse3 with mount(8) and umount(8)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from fixtures_mount import is_mounted, require_fuse

from kacheryfs.cli.main import from_fstab
from kacheryfs.store import LocalStore


def test_fstab_options_become_mount_flags():
    argv = ["kacheryfs", "/mnt/k", "-o", "rw,config=/etc/k.toml,allow_other,nodev,_netdev,max_threads=8"]
    assert from_fstab(argv) == ["mount", "/mnt/k", "--config", "/etc/k.toml", "--allow-other", "-o", "max_threads=8"]


def test_fstab_line_mounts_with_mount_and_unmounts_with_umount(tmp_path):
    require_fuse()
    if os.geteuid() != 0 or not shutil.which("mount.fuse3"):
        if os.environ.get("CI"):
            pytest.fail("CI runs as root with fuse3 installed: the fstab test must run")
        pytest.skip("mount(8) of an fstab line needs root and mount.fuse3")
    store = LocalStore(tmp_path / "store")
    digests = store.put_bytes(b"through fstab\n")
    config = tmp_path / "config.toml"
    config.write_text(f'storage_dir = "{tmp_path / "store"}"\n\n[mount]\nlog_file = "{tmp_path / "mount.log"}"\n')
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"kacheryfs {mnt} fuse.kacheryfs config={config},allow_other 0 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KACHERY_")}
    subprocess.run(["mount", "-T", str(fstab), str(mnt)], check=True, timeout=60, env=env)
    try:
        assert is_mounted(mnt)
        assert (mnt / "sha1" / digests.sha1).read_bytes() == b"through fstab\n"
        assert "allow_other" in next(line for line in open("/proc/self/mounts") if str(mnt) in line)
    finally:
        subprocess.run(["umount", "-R", str(mnt)], timeout=60, check=False)  # -R: staging is a mount of its own
    assert not is_mounted(mnt)


def test_a_mistyped_subcommand_is_a_usage_error_not_a_mount(tmp_path):
    done = subprocess.run(["kacheryfs", "stauts", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "invalid choice" in done.stderr
