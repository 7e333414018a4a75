"""Unmount a kacheryfs mount and wait for its daemon to exit; also clears a stale mount left by a killed daemon.

examples:
  kacheryfs umount ~/kachery
  kacheryfs umount ~/kachery --lazy     # detach now even if files are open
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kacheryfs.config import load_config
from kacheryfs.mount import daemon
from kacheryfs.mount.paths import default_mountpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", nargs="?", type=Path, help="the mount (default: [mount] mountpoint)")
    p.add_argument("--config", type=Path, help="config file naming the default mountpoint")
    p.add_argument("--lazy", action="store_true", help="detach even while files under it are open")


def run(args: argparse.Namespace) -> int:
    mountpoint = args.mountpoint or default_mountpoint(load_config(args.config))
    daemon.unmount(mountpoint.expanduser().absolute(), lazy=args.lazy)
    return 0
