"""scripts/bench.py runs end to end on tiny data and prints its core table (no timing claims here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def test_quick_core_run_prints_the_core_table_with_numeric_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--only", "core", "--size-gib", "0.01", "--files", "100"]
    proc = subprocess.run([*cmd, "--json", str(out_json)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert "== core" in proc.stdout
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("kachery-")]
    assert len(rows) == 4, proc.stdout
    for row in rows:
        assert re.fullmatch(r"\d+\.\d\d", row[3].strip()), row

    core = json.loads(out_json.read_text())["sections"]["core"]
    assert core["errors"] == []
    assert all(isinstance(m["ratio"], float) for m in core["measurements"])
