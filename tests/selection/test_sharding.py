"""select_batch with features sharded along the candidate axis over 4 (host) devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.tolerance import F32_EPS


def test_sharded_selection_matches_one_device():
    script = Path(__file__).with_name("sharded_run.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert not result["gathers_feature_matrix"]
    for mode in ("full", "lazy", "lazy_prior", "pairs"):
        assert result[mode]["shards"] == 4
        assert result[mode]["same_picks"], result
        assert result[mode]["max_score_diff"] < 64 * F32_EPS, result  # relative to the largest score
