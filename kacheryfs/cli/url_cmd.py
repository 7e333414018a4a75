"""Print the hash URL of files or directories under a kacheryfs mount (e.g. in staging/).

A staged file has its URL once it is closed; a staging directory's URL is that of its
current contents, stored on demand.

examples:
  cp -r ds001 /mnt/kachery/staging/ && kacheryfs url /mnt/kachery/staging/ds001
  kacheryfs url /mnt/kachery/staging/*.csv
"""

from __future__ import annotations

import argparse
import sys

from kacheryfs.errors import KacheryError
from kacheryfs.mount.paths import url_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH")


def run(args: argparse.Namespace) -> int:
    first_failure = 0
    for path in args.paths:
        try:
            print(url_of(path), flush=True)
        except KacheryError as err:  # the other paths still get theirs
            print(f"kacheryfs: {err}", file=sys.stderr)
            first_failure = first_failure or err.exit_code
    return first_failure
