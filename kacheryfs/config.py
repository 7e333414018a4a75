"""Configuration, read in one place: flags > environment > TOML file > defaults.

The result is a typed `Config` that flows down; nothing below this module reads
`os.environ`. `mount.example.toml` at the repository root shows every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from kacheryfs.auth import MissingPassword
from kacheryfs.errors import ConfigError

APP_NAME = "kachery"


@dataclass(frozen=True)
class ChannelConfig:
    """One named remote: a server URL, the channel on it, and its password (None = public).

    The password is a MissingPassword when `password_env` names a variable that is not set:
    the channel refuses to be used, so a config naming it still serves every other command.
    """

    name: str
    url: str
    channel: str
    password: str | MissingPassword | None = None


@dataclass(frozen=True)
class Config:
    """Everything kacheryfs can be told; defaults are what a new user gets."""

    storage_dir: Path
    channels: Mapping[str, ChannelConfig] = field(default_factory=dict)
    fr: tuple[str, ...] = ()
    to: str | None = None
    use_hard_links: bool = False
    channel_timeout: float = 10.0  # seconds one channel may cost a read before the next is tried
    fetch_timeout: float = 30.0  # seconds a mount open may wait for a fetch before EIO
    mountpoint: Path | None = None
    allow_other: bool = False
    log_file: Path | None = None
    log_level: str = "INFO"
    entry_timeout: float = 86400.0
    attr_timeout: float = 86400.0
    negative_timeout: float = 5.0
    readahead_kb: int = 1008
    passthrough: bool = True
    idle_poll: bool | None = None  # None: "auto" (where a wake-up across CPUs is slow)
    staging_dir: Path | None = None
    staging_to: str | None = None
    cache_max_size: int | None = None
    min_free_space: int = 0
    track_access: bool = True
    config_file: Path | None = None

    def channel(self, name: str) -> ChannelConfig:
        """The channel called `name`; ConfigError naming the known ones otherwise."""
        try:
            return self.channels[name]
        except KeyError:
            known = ", ".join(sorted(self.channels)) or "none"
            where = self.config_file or default_config_path()
            raise ConfigError(
                f"channel {name!r} is not configured (known: {known}); add [channels.{name}] to {where}"
            ) from None

    def read_channels(self, fr: str | list[str] | tuple[str, ...] | None = None) -> list[ChannelConfig]:
        """The channels to read from, in order (`fr` overrides the configured list; '' = none)."""
        names = self.fr if fr is None else parse_names(fr)
        return [self.channel(n) for n in names]

    def write_channel(self, to: str | None = None) -> ChannelConfig | None:
        name = self.to if to is None else (to or None)
        return self.channel(name) if name else None

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def parse_names(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`"a,b"` or `["a", "b"]` → `("a", "b")`."""
    if isinstance(value, str):
        return tuple(n.strip() for n in value.split(",") if n.strip())
    return tuple(value)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(value: int | str, key: str = "size") -> int:
    """`"50 GiB"`, `"500MB"`, `1024` → bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ConfigError(f'{key} = {value!r} is not a size (examples: 1048576, "500 MB", "50 GiB")')
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    factor = base ** "BKMGT".index(unit[0]) if unit and unit[0] != "B" else 1
    return int(number * factor)


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def default_storage_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


# TOML layout: key in file → (Config field, converter)
def _positive(value: Any) -> float:
    """A duration or count that must be more than zero."""
    number = float(value)
    if not number > 0:
        raise ValueError("must be more than 0")
    return number


def _not_negative(value: Any) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must be 0 or more")
    return number


def _log_level(value: Any) -> str:
    level = str(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def _auto_or_bool(value: Any) -> bool | None:
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise ValueError('"auto", true or false')
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError("must be a whole number more than 0")
    return int(value)


_TOP = {"storage_dir": Path, "fr": parse_names, "to": str, "use_hard_links": bool, "channel_timeout": _positive}
_SECTIONS: dict[str, dict[str, Any]] = {
    "mount": {
        "mountpoint": Path, "allow_other": bool, "log_file": Path, "log_level": _log_level,
        "entry_timeout": _not_negative, "attr_timeout": _not_negative, "negative_timeout": _not_negative,
        "fetch_timeout": _positive, "readahead_kb": _positive_int, "passthrough": bool,
        "idle_poll": _auto_or_bool,
    },
    "staging": {"dir": ("staging_dir", Path), "to": ("staging_to", str)},
    "cache": {
        "max_size": ("cache_max_size", parse_size), "min_free_space": ("min_free_space", parse_size),
        "track_access": ("track_access", bool),
    },
}  # fmt: skip


def _convert(key: str, conv: Any, value: Any, where: Path) -> Any:
    if conv is Path:  # relative to the file's directory: a daemon or a service reads it from anywhere
        return where.parent.absolute() / Path(os.path.expanduser(str(value)))
    if conv is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    try:
        return conv(value, key) if conv is parse_size else conv(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid value for {key}: {value!r} ({err})") from err


def _from_toml(data: dict[str, Any], env: Mapping[str, str], where: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    unknown: list[str] = []  # all of them at once: a file with two typos is fixed in one go
    for key, value in data.items():
        if key in _TOP:
            out[key] = _convert(key, _TOP[key], value, where)
        elif key in _SECTIONS and isinstance(value, dict):
            for sub, subval in value.items():
                spec = _SECTIONS[key].get(sub)
                if spec is None:
                    unknown.append(f"[{key}] {sub}" + _did_you_mean(sub, _SECTIONS[key]))
                    continue
                name, conv = spec if isinstance(spec, tuple) else (sub, spec)
                out[name] = _convert(f"{key}.{sub}", conv, subval, where)
        elif key == "channels" and isinstance(value, dict):
            out["channels"] = {n: _channel(n, c, env, where, unknown) for n, c in value.items()}
        else:
            home = next((f"[{section}]" for section, keys in _SECTIONS.items() if key in keys), None)
            hint = f" (it belongs under {home})" if home else _did_you_mean(key, [*_TOP, *_SECTIONS, "channels"])
            unknown.append(key + hint)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)} in {where} "
            "(every key is shown, with a comment, in mount.example.toml of the kacheryfs sources)"
        )
    return out


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _channel(name: str, spec: Any, env: Mapping[str, str], where: Path, unknown: list[str]) -> ChannelConfig:
    """The channel [channels.`name`] describes; its unknown keys are added to `unknown`."""
    keys = ("url", "channel", "password", "password_env")
    if not isinstance(spec, dict) or "url" not in spec:
        typos = [key + _did_you_mean(key, keys) for key in spec if key not in keys] if isinstance(spec, dict) else []
        unknown_keys = f" (unknown: {', '.join(typos)})" if typos else ""
        raise ConfigError(f'[channels.{name}] in {where} needs at least url = "http://…"{unknown_keys}')
    unknown += [f"[channels.{name}] {key}" + _did_you_mean(key, keys) for key in spec if key not in keys]
    password: str | MissingPassword | None = spec.get("password")
    if "password_env" in spec:
        var = spec["password_env"]
        unset = f"[channels.{name}] in {where} takes its password from ${var}, which is not set"
        password = env.get(var, MissingPassword(f"{unset}: set it to use channel {name!r}"))
    return ChannelConfig(name, str(spec["url"]).rstrip("/"), str(spec.get("channel", name)), password)


def load_config(config_file: str | Path | None = None, env: Mapping[str, str] | None = None, **flags: Any) -> Config:
    """Build the Config: `flags` (None values ignored) > `env` > the TOML file > defaults."""
    env = os.environ if env is None else env
    path = Path(config_file) if config_file else Path(env["KACHERY_CONFIG"]) if env.get("KACHERY_CONFIG") else None
    values: dict[str, Any] = {}
    candidate = path or default_config_path()
    if candidate.exists():
        import tomllib  # here, not at the top: every command starts faster without it when there is no file

        try:
            data = tomllib.loads(candidate.read_text())
        except (tomllib.TOMLDecodeError, OSError) as err:
            raise ConfigError(f"cannot read config file {candidate}: {err}") from err
        values.update(_from_toml(data, env, candidate))
        values["config_file"] = candidate
    elif path is not None:
        raise ConfigError(f"config file {path} does not exist")
    if env.get("KACHERY_STORAGE_DIR"):
        values["storage_dir"] = Path(env["KACHERY_STORAGE_DIR"])
    for key, value in flags.items():
        if value is None:
            continue
        if key not in Config.__dataclass_fields__:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = parse_names(value) if key == "fr" else value
    values.setdefault("storage_dir", default_storage_dir())
    # absolute now (a relative one from the environment or a flag is the caller's): the mount
    # daemon runs from /
    values["storage_dir"] = Path(values["storage_dir"]).expanduser().absolute()
    config = Config(**values)
    for name in config.fr:
        config.channel(name)
    if config.to:
        config.channel(config.to)
    return config


def slow_failover(config: Config) -> str | None:
    """Why a mount with this config fails opens before it asks the channel after one that
    hangs (its fetch_timeout is not above channel_timeout); None when it does not."""
    if len(config.fr) < 2 or config.fetch_timeout > config.channel_timeout:
        return None
    return (
        f"fetch_timeout ({config.fetch_timeout:g} s) is not more than channel_timeout ({config.channel_timeout:g} s): "
        "an open fails with EIO before the next channel is asked after one that hangs; make fetch_timeout larger"
    )
