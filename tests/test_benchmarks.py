"""Every benchmark script starts (imports resolve, arguments parse): they run outside the suite,
so a moved or renamed name would otherwise break them unnoticed."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_starts(script):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-2000:]
