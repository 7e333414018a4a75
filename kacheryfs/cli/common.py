"""What every kacheryfs command shares: argument parsing style and error → exit code.

Results go to stdout, messages to stderr. Exit codes: 0 ok, 1 not found, 2 bad usage, URL
or input (e.g. a symlink loop in a tree to store), 3 other kacheryfs error, 4 bad data
(hash mismatch, invalid manifest), 5 local store error (5 also for disk full), 6 channel
unavailable, 7 refused by a channel, 8 over a channel quota, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kacheryfs.config import Config, load_config
from kacheryfs.errors import KacheryError

EXIT_CODES_HELP = (
    "exit codes: 0 ok, 1 not found, 2 bad usage, URL or input, 4 bad data (hash mismatch), 5 local store error\n"
    "or disk full, 6 channel unavailable, 7 refused by a channel, 8 over a quota, 3 any other error"
)


def parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help ends with examples and the exit codes, with --version."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"examples:\n{examples}\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(p)
    return p


def add_version(p: argparse.ArgumentParser) -> None:
    """--version: this kacheryfs's version."""
    from kacheryfs import __version__

    p.add_argument("--version", action="version", version=f"kacheryfs {__version__}")


def add_fr(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fr", "-f", metavar="NAMES", help="channels to read from, comma-separated, tried in order")


def add_to(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", "-t", metavar="NAME", help="channel to upload to after storing locally")


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command body, turning errors into a message on stderr and an exit code."""
    logging.basicConfig(level=os.environ.get("KACHERY_LOG_LEVEL", "WARNING"), format="%(levelname)s %(message)s")
    prog = os.path.basename(sys.argv[0]).replace("__main__.py", "kacheryfs")  # `python -m kacheryfs`
    try:
        return main(argv)
    except KacheryError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return err.exit_code
    except ValueError as err:  # bad ranges and other bad usage the parser could not see
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1 if isinstance(err, FileNotFoundError) else 3
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error; keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--config and --storage-dir, as every operator command takes them."""
    p.add_argument("--config", type=Path, help="config file (default: $KACHERY_CONFIG or the user config)")
    p.add_argument("--storage-dir", type=Path, help="local store (default: $KACHERY_STORAGE_DIR or config)")


def config_from(args: argparse.Namespace) -> Config:
    """The Config for a command: its flags over the environment and the config file."""
    return load_config(args.config, storage_dir=args.storage_dir, fr=getattr(args, "fr", None))


def human(nbytes: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"
