"""Shared fixtures: every test gets its own storage dir and an empty config file."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kacheryfs import api

pytest_plugins = ["fixtures_server", "fixtures_mount"]


@pytest.fixture(autouse=True)
def isolated_kachery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """KACHERY_STORAGE_DIR and KACHERY_CONFIG point into this test's temp dir."""
    storage = tmp_path / "storage"
    config = tmp_path / "config.toml"
    config.write_text("")
    monkeypatch.setenv("KACHERY_STORAGE_DIR", str(storage))
    monkeypatch.setenv("KACHERY_CONFIG", str(config))
    api._overrides.clear()
    api._resolvers.clear()
    yield storage
    api._overrides.clear()
    api._resolvers.clear()


@pytest.fixture
def storage_dir(isolated_kachery: Path) -> Path:
    return isolated_kachery


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return Path(os.environ["KACHERY_CONFIG"])


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """`tmpfs("4m")`: a fresh tmpfs of that size, for disk-full tests (mounting needs root)."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        if os.geteuid() != 0:
            if os.environ.get("CI"):
                pytest.fail("CI runs as root: a tmpfs for the disk-full tests must be mountable")
            pytest.skip("mounting a tmpfs needs root")
        mnt = tmp_path / f"tmpfs-{len(mounted)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
