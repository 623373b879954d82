"""Smoke test: the benchmark's quick mode runs, prints its table, verifies copies.

Timings are printed for people to read; nothing here asserts on them.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import imagekit

BENCHMARK = Path(__file__).with_name("bench_copy.py")


@pytest.mark.benchmark
@pytest.mark.timeout(1200)
def test_quick_benchmark_runs_and_verifies_every_copy(tmp_path):
    """Quick mode finishes, prints a row per copier and checks every copy."""
    imagekit.require_tool("skopeo")

    finished = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1100,
    )

    assert finished.returncode == 0, finished.stderr[-3000:]
    output = finished.stdout
    assert re.search(r"^image\s+copier\s+n\s+median s", output, re.MULTILINE)
    for copier in ("cp", "skopeo", "dirimage (server)", "dirimage rerun (server)"):
        assert re.search(
            rf"^16MiB-4-layers\s+{re.escape(copier)}\s+1\s", output, re.MULTILINE
        ), copier
    assert "dirimage (embedded, 2nd)" in output
    copies = re.search(r"^all (\d+) copies verified", output, re.MULTILINE)
    assert copies is not None and int(copies.group(1)) >= 18
    assert re.search(r"^(met|MISSED)\s", output, re.MULTILINE)
    assert list(tmp_path.iterdir()) == [], "the benchmark left its workdir behind"
