"""`python -m kacheryfs SUBCOMMAND`: the same as the `kacheryfs` command (the mount daemon runs this way)."""

import sys

from kacheryfs.cli.main import main

sys.exit(main())
