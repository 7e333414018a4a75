"""The server's channels, read from `DIR/kachery.json`: names, signing keys and quotas.

Every key is checked at start, and a bad one is named in the ConfigError
(`channels[1].uploadQuotas[0].maxFileSize`), so a typo never surfaces as a refused request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kacheryfs import auth
from kacheryfs.errors import ConfigError, Forbidden, TooLarge

CONFIG_NAME = "kachery.json"
_QUOTA_LIMITS = {
    "maxFileSize": "max_file_size",
    "maxSimultaneous": "max_simultaneous",
    "maxNumFilesPerDay": "max_files_per_day",
    "maxNumBytesPerDay": "max_bytes_per_day",
}


@dataclass(frozen=True)
class Quota:
    """One size class of transfers and its limits."""

    name: str
    max_file_size: int
    max_simultaneous: int
    max_files_per_day: int
    max_bytes_per_day: int


@dataclass(frozen=True)
class ServerChannel:
    """A channel as the server knows it: the key that checks signatures, and its quotas."""

    name: str
    key: bytes
    public: bool
    download_quotas: tuple[Quota, ...]
    upload_quotas: tuple[Quota, ...]

    def quota(self, direction: str, size: int) -> Quota:
        """The first quota of `direction` ("download" or "upload") that admits `size` bytes."""
        quotas = self.upload_quotas if direction == "upload" else self.download_quotas
        if not quotas:
            raise Forbidden(f"channel {self.name!r} does not allow {direction}s")
        for quota in quotas:
            if size <= quota.max_file_size:
                return quota
        largest = max(q.max_file_size for q in quotas)
        raise TooLarge(f"{size} bytes is over the {largest}-byte {direction} limit of channel {self.name!r}")


def load_channels(directory: Path, environ: Mapping[str, str]) -> dict[str, ServerChannel]:
    """Parse `directory/kachery.json`; ConfigError naming the file and the bad key otherwise.

    `environ` resolves passwords given as `{"env": "VARIABLE"}`: the caller passes it in.
    """
    path = directory / CONFIG_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f'{path} is missing: create it with a "channels" list (see docs/protocol.md)') from err
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read as JSON: {err}") from err
    entries = doc.get("channels") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f'{path} must hold an object with a "channels" list')
    channels: dict[str, ServerChannel] = {}
    for i, entry in enumerate(entries):
        channel = _channel(entry, f"{path}: channels[{i}]", environ)
        if channel.name in channels:
            raise ConfigError(f"{path}: channels[{i}].name {channel.name!r} is used twice")
        channels[channel.name] = channel
    return channels


def _channel(entry: Any, where: str, environ: Mapping[str, str]) -> ServerChannel:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be an object")
    name = _field(entry, "name", str, where)
    public = entry.get("public", False)
    if not isinstance(public, bool):
        raise ConfigError(f"{where}.public must be true or false")
    return ServerChannel(
        name=name,
        key=auth.channel_key(name, _password(entry.get("password"), f"{where}.password", environ)),
        public=public,
        download_quotas=_quotas(entry.get("downloadQuotas", []), f"{where}.downloadQuotas"),
        upload_quotas=_quotas(entry.get("uploadQuotas", []), f"{where}.uploadQuotas"),
    )


def _password(value: Any, where: str, environ: Mapping[str, str]) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("env"), str):
        try:
            return environ[value["env"]]
        except KeyError:
            raise ConfigError(f"{where} names the environment variable {value['env']}, which is not set") from None
    raise ConfigError(f'{where} must be a non-empty string or {{"env": "VARIABLE"}}')


def _quotas(value: Any, where: str) -> tuple[Quota, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list (empty: the operation is not allowed)")
    quotas = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{here} must be an object")
        limits = {attr: _count(item.get(key), f"{here}.{key}") for key, attr in _QUOTA_LIMITS.items()}
        quotas.append(Quota(name=_field(item, "name", str, here), **limits))
    return tuple(quotas)


def _count(value: Any, where: str) -> int:
    # The original's example config writes limits as 1e6, so integral floats are accepted.
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 0:
        raise ConfigError(f"{where} must be a non-negative whole number, got {value!r}")
    return int(value)


def _field(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ConfigError(f"{where}.{key} is missing")
    if not isinstance(obj[key], kind) or (kind is str and not obj[key]):
        raise ConfigError(f"{where}.{key} must be a non-empty {kind.__name__}")
    return obj[key]
