"""Show what a kacheryfs mount's daemon is doing: cache, hits and misses, fetches, bytes per channel, errors.

examples:
  kacheryfs status ~/kachery
  kacheryfs status ~/kachery --json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from kacheryfs.cli.common import human
from kacheryfs.config import load_config
from kacheryfs.mount import daemon
from kacheryfs.mount.paths import default_mountpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", nargs="?", type=Path, help="the mount (default: [mount] mountpoint)")
    p.add_argument("--config", type=Path, help="config file naming the default mountpoint")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")


def run(args: argparse.Namespace) -> int:
    mountpoint = (args.mountpoint or default_mountpoint(load_config(args.config))).expanduser().absolute()
    real = Path(os.path.realpath(mountpoint))
    if daemon.is_staging_mount(real, daemon.kacheryfs_mounts()):
        mountpoint = real.parent  # the staging mount's daemon is the one of the mount it is on
    status = daemon.daemon_status(mountpoint)
    print(json.dumps(status, indent=2) if args.json else _format(mountpoint, status))
    return 0


def _idle_poll_lines(poll: dict[str, Any] | None) -> list[str]:
    if poll is None:
        return []
    if not poll["on"]:
        return [f"idle polling    off: {poll['why']}"]
    if poll.get("wakeup_us") is not None:
        took = f" (a wake-up across CPUs costs {poll['wakeup_us']:.0f} µs)"
    else:
        took = f" ({poll['why']})"
    return [f"idle polling    on: idle CPUs poll until {poll['hold_ms']:g} ms after a request{took}"]


def _format(mountpoint: Path, s: dict[str, Any]) -> str:
    why_daemon = f" (passthrough off: {s['reads_why']})" if s.get("reads_why") else ""
    lines = [
        f"mount           {mountpoint} (daemon pid {s['pid']}, up {s['uptime_s']:.0f} s)",
        f"local store     {s['storage_dir']}: "
        + (
            "size being counted" if s["cache_blobs"] is None else f"{s['cache_blobs']} blobs, {human(s['cache_bytes'])}"
        ),
        f"channels        {', '.join(s['channels']) or 'none (local store only)'}",
        *_channel_lines(s.get("channel_states", [])),
        f"reads           by the {s['reads']}{why_daemon}",
        f"blobs held      {s['blobs_held']} (being read or read last; kept from eviction)",
        *_idle_poll_lines(s.get("idle_poll")),
        f"hits / misses   {s['hits']} / {s['misses']}",
        f"fetching now    {s['fetches_in_progress']}"
        + (f" ({s['lookups_in_progress']} names being looked up)" if s.get("lookups_in_progress") else ""),
        f"errors          {s['errors']} failed reads or lookups"
        + (f"; {s['channel_failures']} requests found a channel unreachable" if s.get("channel_failures") else ""),
    ]
    for channel, nbytes in sorted(s["bytes_by_channel"].items()):
        lines.append(f"fetched from    {channel}: {human(nbytes)}")
    staging = s.get("staging")
    if staging:
        lines.append(f"staging         {staging['dir']}: {staging['open_for_write']} open for writing")
        if s.get("staging_shared"):
            lines.append("                on the mount's own connection (not root): every open of a blob is a request")
        lines.append(f"uploads         {staging['uploads_pending']} pending")
        lines += [f"  failing: {e}" for e in staging["uploads_failing"]]
    if s["recent_errors"]:
        lines.append("recent errors:")
        lines += [f"  {e}" for e in s["recent_errors"]]
    return "\n".join(lines)


def _channel_lines(states: list[dict[str, Any]]) -> list[str]:
    """One line per channel: up, or down since when and until when it is skipped; its last error."""
    lines = []
    for c in states:
        if c["state"] == "down":
            state = f"down since {c['down_since']} (next try in {c['next_try_in_s']:.0f} s)"
        else:
            state = "up" + (f" ({c['failures']} failures)" if c["failures"] else "")
        lines.append(f"  {c['name']:<13} {state}")
        if c["last_error"]:
            lines.append(f"  {'':<13} last error: {c['last_error']}")
    return lines
