"""`python -m kacheryfs.server DIR [--host H] [--port P]`: run the storage server, as `kacheryfs serve` does."""

from __future__ import annotations

import argparse
import sys

from kacheryfs.cli import serve_cmd
from kacheryfs.errors import KacheryError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kacheryfs.server",
        description=serve_cmd.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_cmd.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve_cmd.run(args)
    except KacheryError as err:
        print(f"kacheryfs serve: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
