"""Serve DIR (a store layout plus DIR/kachery.json) to other machines over HTTP.

Logs one line per request to stderr (method, path, status, bytes, ms); KACHERY_LOG_LEVEL=WARNING
keeps only warnings and errors.

examples:
  kacheryfs serve /srv/kachery --host 0.0.0.0 --port 8080
  kacheryfs serve ./lab-store              # 127.0.0.1, a free port (printed)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from pathlib import Path


def _port(text: str) -> int:
    """0 (any free port) to 65535: checked here, where bind() would refuse it with a traceback."""
    if text.isascii() and text.isdigit() and int(text) <= 65535:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 0 (any free one) to 65535")


def _seconds(text: str) -> float:
    """A finite number of seconds more than 0 (nan and inf would turn a timeout off unseen)."""
    with contextlib.suppress(ValueError):
        if math.isfinite(seconds := float(text)) and seconds > 0:
            return seconds
    raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds more than 0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="storage directory holding kachery.json")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=0, help="port (default: any free port, printed on start)")
    p.add_argument(
        "--stall-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="drop a transfer that moves nothing for this long, freeing its slot: an upload whose client"
        " sends nothing, or a download whose client reads nothing (default 60)",
    )


def run(args: argparse.Namespace) -> int:
    from kacheryfs.server.app import STALL_TIMEOUT
    from kacheryfs.server.app import run as serve

    stall_timeout = STALL_TIMEOUT if args.stall_timeout is None else args.stall_timeout
    # The one place the server's configuration meets the process environment.
    log_level = os.environ.get("KACHERY_LOG_LEVEL", "INFO").upper()
    serve(args.directory, os.environ, host=args.host, port=args.port, stall_timeout=stall_timeout, log_level=log_level)
    return 0
