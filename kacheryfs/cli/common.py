"""What every kacheryfs command shares: argument parsing style and error → exit code.

Results go to stdout, messages to stderr. Exit codes: 0 ok, 1 not found, 2 bad usage or
URL, 3 other kacheryfs error, 4 bad data (hash mismatch, invalid manifest), 5 local store
error (5 also for disk full), 6 channel unavailable, 7 refused by a channel, 8 over a
channel quota, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from kacheryfs.errors import KacheryError

EXIT_CODES_HELP = (
    "exit codes: 0 ok, 1 not found, 2 bad usage or URL, 4 bad data (hash mismatch), 5 local store error or disk\n"
    "full, 6 channel unavailable, 7 refused by a channel, 8 over a quota, 3 any other error"
)


def parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help ends with examples and the exit codes."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"examples:\n{examples}\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_fr(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fr", "-f", metavar="NAMES", help="channels to read from, comma-separated, tried in order")


def add_to(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", "-t", metavar="NAME", help="channel to upload to after storing locally")


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command body, turning errors into a message on stderr and an exit code."""
    logging.basicConfig(level=os.environ.get("KACHERY_LOG_LEVEL", "WARNING"), format="%(levelname)s %(message)s")
    prog = os.path.basename(sys.argv[0])
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
