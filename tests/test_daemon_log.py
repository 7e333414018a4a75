"""The mount daemon's log file: rotated, with a background daemon's stderr following it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# A daemon as `kacheryfs mount` starts it in the background: its stderr is the log file.
_DAEMON = textwrap.dedent(
    """
    import logging, os, sys
    from pathlib import Path
    from kacheryfs.mount import daemon

    daemon.LOG_BYTES = 4096
    log_file = Path(sys.argv[1])
    daemon.configure_logging(log_file, "INFO")
    os.write(2, b"before rotation\\n")
    for i in range(400):
        logging.getLogger("kacheryfs.test").info("line %d of a long-running mount", i)
    os.write(2, b"after rotation\\n")
    """
)


def test_the_log_rotates_and_stderr_follows_it_to_the_new_file(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log_file = logs / "mount.log"
    with open(log_file, "ab") as stderr:
        subprocess.run([sys.executable, "-c", _DAEMON, str(log_file)], stderr=stderr, check=True, timeout=60)
    assert sorted(p.name for p in logs.iterdir()) == ["mount.log", "mount.log.1", "mount.log.2", "mount.log.3"]
    assert all(p.stat().st_size <= 4096 for p in logs.iterdir())
    current = log_file.read_text()
    assert "line 399 " in current and "after rotation" in current
    assert "before rotation" not in current


def test_a_foreground_daemon_logging_to_a_file_leaves_its_terminal_alone(tmp_path: Path) -> None:
    log_file = tmp_path / "mount.log"
    out = subprocess.run(
        [sys.executable, "-c", _DAEMON, str(log_file)], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stderr == "before rotation\nafter rotation\n"
    assert "after rotation" not in log_file.read_text()
