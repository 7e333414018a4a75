"""The kacheryfs storage server: password-protected channels over HTTP on a LocalStore.

`run(directory, environ, host, port)` serves until stopped; `make_app(directory, environ)` gives
the aiohttp application for embedding. `kacheryfs serve DIR` and `python -m kacheryfs.server DIR`
call `run` with the process environment: nothing below them reads it.
"""

from kacheryfs.server.app import make_app, run

__all__ = ["make_app", "run"]
