"""`python -m kacheryfs.server DIR [--host H] [--port P]`: run the storage server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kacheryfs.errors import KacheryError
from kacheryfs.server.app import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kacheryfs.server", description=__doc__)
    parser.add_argument("directory", type=Path, help="storage directory holding kachery.json")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    args = parser.parse_args(argv)
    try:
        run(args.directory, args.host, args.port)
    except KacheryError as err:
        print(f"kacheryfs serve: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
