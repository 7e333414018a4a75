"""Shared fixtures: every test gets its own storage dir and an empty config file."""

from __future__ import annotations

import os
from collections.abc import Iterator
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
