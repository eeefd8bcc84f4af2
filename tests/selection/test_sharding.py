"""select_batch with candidates split over 4 (host) devices, and the layout of pairs over a mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdpo.experiment.stages import triplets
from jaxdpo.selection import layout_pairs
from jaxdpo.selection.sharded import plan_moves
from tests.tolerance import F32_EPS


def test_sharded_selection_matches_one_device():
    script = Path(__file__).with_name("sharded_run.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert not result["gathers_feature_matrix"]
    assert result["unordered_collectives"] == []
    assert result["placed"] == {"rows": 48, "pairs": 72, "padding": 12}  # 10 prompts of 4 over 4 devices: 3 each
    assert result["placed_on_devices"] == {"padded": True, "even": True, "replicated": True}
    assert result["moved_rows"] == {"gathers": False, "permutes": True}
    modes = ("full", "lazy", "lazy_prior", "pairs_full", "pairs_lazy", "pairs_prior", "pairs_bounds", "pairs_wide_prior")
    for mode in (*modes, "lazy_active", "pairs_active", "pairs_active_values"):  # the last three first on active sets
        assert result[mode].get("shards", 4) == 4
        if mode in ("full", "lazy", "lazy_active"):
            assert result[mode]["first"] == 3, result  # row 40 on another device ties it
        elif mode not in ("lazy_prior", "pairs_prior", "pairs_wide_prior"):
            assert 6 <= result[mode]["first"] < 12, result  # prompt 1's pairs; prompt 8's (48..53) tie them
        assert result[mode]["same_picks"], result
        assert result[mode]["max_score_diff"] < 64 * F32_EPS, result  # relative to the largest score


@pytest.mark.parametrize("devices", [1, 2, 3, 7])
def test_pairs_are_cut_between_prompts_into_balanced_runs(devices):
    pairs = triplets(10, 3)  # prompt i: rows 3i..3i+2, pairs 3i..3i+2
    mask = np.arange(30) % 5 != 0
    layout = layout_pairs(pairs, devices, rows=30, mask=mask)
    per_rows, per_pairs = len(layout.rows) // devices, len(layout.pairs) // devices
    assert per_pairs == 3 * -(-10 // devices) and per_rows == per_pairs  # whole prompts, as even as they allow
    real = layout.positions >= 0
    np.testing.assert_array_equal(layout.positions[real], np.arange(30))  # the caller's order is kept
    np.testing.assert_array_equal(layout.mask, np.where(real, mask[np.maximum(layout.positions, 0)], False))
    owner = np.arange(len(layout.pairs)) // per_pairs
    np.testing.assert_array_equal(layout.pairs // per_rows, np.stack([owner, owner], axis=1))  # rows of the pair's device
    np.testing.assert_array_equal(layout.rows[layout.pairs[real]], pairs)  # the same φ
    padding = layout.pairs[~real]
    assert np.all(padding[:, 0] == padding[:, 1])  # φ = 0, and ineligible


def test_interleaved_pairs_stay_together():
    pairs = np.array([[0, 3], [1, 2], [2, 4]], np.int32)  # every cut would split a prompt
    layout = layout_pairs(pairs, 2, rows=5)
    np.testing.assert_array_equal(layout.positions[:3], [0, 1, 2])
    assert np.all(layout.positions[3:] == -1)


@settings(max_examples=60, deadline=None)
@given(prompts=st.integers(1, 30), m=st.integers(2, 5), devices=st.sampled_from([2, 3, 4, 6, 8]), data=st.data())
def test_moved_blocks_give_every_device_its_rows(prompts, m, devices, data):
    """plan_moves: each round a permutation (a device sends and receives at most one block), and
    what each device receives, taken as `take` says, is its slice of the layout."""
    rows = prompts * m
    sources = data.draw(st.sampled_from([s for s in range(1, devices + 1) if devices % s == 0 and rows % s == 0]))
    layout = layout_pairs(triplets(prompts, m), devices, rows=rows)
    block_of_device = np.arange(devices) // (devices // sources)  # source block b held by devices//sources devices
    moves = plan_moves(layout.rows, block_of_device, rows // sources)
    g = np.arange(rows, dtype=np.float64) + 1  # row r holds r + 1; a zero row is 0
    blocks = g.reshape(sources, -1)
    for moved in moves.rounds:
        assert len({src for src, _ in moved}) == len({dst for _, dst in moved}) == len(moved)
    for t in range(devices):
        received = [blocks[block_of_device[src]] if dst == t else np.zeros(rows // sources) for moved in moves.rounds
                    for src, dst in [next(((s, d) for s, d in moved if d == t), (-1, -1))]]
        got = np.concatenate([*received, [0.0]])[moves.take[t]]
        want = layout.rows.reshape(devices, -1)[t] + 1.0
        np.testing.assert_array_equal(got, want)
    assert len(moves.rounds) <= -(-devices // sources) + 2  # a device's rows span a few source blocks
