"""mount.example.toml stays a valid config that shows every key the config reader knows."""

from __future__ import annotations

import tomllib
from pathlib import Path

from kacheryfs.config import _SECTIONS, _TOP, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "mount.example.toml"


def test_the_example_config_loads() -> None:
    cfg = load_config(EXAMPLE, env={"KACHERY_LAB_PASSWORD": "s3cret"})
    assert cfg.fr == ("lab", "public") and cfg.channel("lab").password == "s3cret"
    assert cfg.channel("public").password is None and cfg.fetch_timeout == 30.0


def test_the_example_config_shows_every_key() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(_TOP) <= set(data)
    for section, keys in _SECTIONS.items():
        assert set(keys) == set(data[section]), section
    shown = {key for channel in data["channels"].values() for key in channel}
    assert shown == {"url", "channel", "password_env"}  # `password` is shown as a comment beside password_env
    assert "password = " in EXAMPLE.read_text()
