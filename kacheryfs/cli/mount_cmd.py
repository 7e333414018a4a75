"""Mount hash URLs as files: <MOUNTPOINT>/sha1/<hash>, /md5/<hash>, /sha1dir/<hash>.<label>/<path>.

Returns once the mount answers (the daemon keeps running in the background), or fails with
the reason. Files are fetched from the channels on first read, verified, and kept in the
local store.

examples:
  kacheryfs mount ~/kachery
  kacheryfs mount /mnt/kachery --fr lab,public --allow-other
  kacheryfs mount ~/kachery --foreground -o max_threads=128
  cat ~/kachery/sha1dir/<hash>.ds001/subdir1/file1.txt
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from kacheryfs.cli.common import add_fr
from kacheryfs.config import Config, load_config, slow_failover
from kacheryfs.errors import MountError
from kacheryfs.mount import daemon
from kacheryfs.mount.paths import default_mountpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", nargs="?", type=Path, help="an empty directory (default: [mount] mountpoint)")
    p.add_argument("--config", type=Path, help="config file (default: $KACHERY_CONFIG or the user config)")
    p.add_argument("--storage-dir", type=Path, help="local store (default: $KACHERY_STORAGE_DIR or config)")
    add_fr(p)
    p.add_argument("--foreground", action="store_true", help="run in this process, logging to stderr")
    p.add_argument("--allow-other", action="store_true", default=None, help="let other users read the mount")
    p.add_argument("--log-file", type=Path, help="daemon log (default: [mount] log_file, else a per-mount file)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS", help="extra FUSE options")


def run(args: argparse.Namespace) -> int:
    config = load_config(
        args.config, storage_dir=args.storage_dir, fr=args.fr, allow_other=args.allow_other, log_file=args.log_file
    )
    mountpoint = (args.mountpoint or default_mountpoint(config)).expanduser().absolute()
    args.options = fuse_options(args.options)
    failover = slow_failover(config)
    if failover:
        print(f"kacheryfs: warning: {failover}", file=sys.stderr)
    if args.foreground:
        daemon.configure_logging(config.log_file, config.log_level)
        daemon.serve(config, mountpoint, args.options)
        return 0
    daemon.check_fuse()
    daemon.check_mountpoint(mountpoint)
    with daemon.mounting(mountpoint):
        daemon.check_mountpoint(mountpoint)  # again: another mount may have been made meanwhile
        return _start(args, config, mountpoint)


def fuse_options(options: list[str]) -> list[str]:
    """The -o options worth passing to FUSE: mount(8)'s generic ones (rw, noatime, …) mean
    nothing here (the hash views are read-only, staging/ writable, whatever they say), and
    max_read is kacheryfs's own choice."""
    from kacheryfs.cli.main import GENERIC_MOUNT_OPTIONS

    kept = []
    for option in (o for group in options for o in group.split(",") if o):
        key = option.partition("=")[0]
        if key == "max_read":
            raise MountError("-o max_read: kacheryfs sets the read size itself (1 MiB reads)")
        if key not in GENERIC_MOUNT_OPTIONS:
            kept.append(option)
    return kept


def _start(args: argparse.Namespace, config: Config, mountpoint: Path) -> int:
    """Start the daemon in the background; return once its mount answers."""
    log_file = (config.log_file or daemon.default_log_file(mountpoint)).absolute()
    argv = ["mount", str(mountpoint), "--foreground", "--log-file", str(log_file)]
    if args.config:
        argv += ["--config", str(args.config.absolute())]
    # the store this command found (flag, environment or config file, made absolute here):
    # the daemon runs from / and may not see the same environment
    argv += ["--storage-dir", str(config.storage_dir)]
    if args.fr is not None:
        argv += ["--fr", args.fr]
    if args.allow_other:
        argv.append("--allow-other")
    for option in args.options:
        argv += ["-o", option]
    pid = daemon.start(argv, mountpoint, log_file, config.readahead_kb)
    print(f"kacheryfs: mounted at {mountpoint} (daemon pid {pid}, log {log_file})", file=sys.stderr)
    if config.idle_poll:  # asked for outright: say so if it cannot be had
        poll: dict[str, object] = {}
        with contextlib.suppress(MountError, ValueError):  # stopped already: nothing to say
            poll = daemon.daemon_status(mountpoint).get("idle_poll") or {}  # type: ignore[assignment]
        if not poll.get("on", True):
            print(f"kacheryfs: idle_poll = true, but idle polling is off: {poll['why']}", file=sys.stderr)
    return 0
