"""Algorithm 1 end to end on the embedded task at the smallest shapes, kill-and-resume, human labels.

The SFT model is trained once per session (`sft_dir`) and copied into each run folder, so only the
loop itself runs per test."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxdpo import experiment as loop
from jaxdpo.cli import EXIT_CONFIG, EXIT_LABELS_PENDING, main
from jaxdpo.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "run": {"methods": ["activedpo", "random", "aplp"], "seeds": [0], "rounds": 2},
    "data": {"prompts_per_round": 8},
    "selection": {"batch_size": 4},
    "features": {"dim": 256, "chunk_size": 8},
    "lora": {"rank": 2, "alpha": 4.0},
    "dpo": {"epochs": 2, "batch_size": 4},
    "eval": {"prompts": 8},
}
TIMING = ("_s",)


def write_toml(path: Path, config: dict) -> Path:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    from jaxdpo import embedded
    from jaxdpo.models import save_pretrained

    return save_pretrained(embedded.train_sft(steps=150), tmp_path_factory.mktemp("sft") / "sft-model")


def new_run(tmp_path: Path, sft_dir: Path, name: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    shutil.copytree(sft_dir, out / "sft-model")
    return out


def without_timings(rows):
    return [{k: v for k, v in row.items() if not k.endswith(TIMING)} for row in rows]


def assert_same_metrics(got, expected):
    got, expected = without_timings(got), without_timings(expected)
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    for a, b in zip(got, expected):
        for key, value in b.items():
            assert a[key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value), key


def assert_finite_metrics(rows):
    for row in rows:
        for key in ("eval_reward", "eval_reward_stderr", "win_rate", "train_loss"):
            if key in row or key != "train_loss":
                assert np.isfinite(row[key]), (key, row)
        assert 0 <= row["win_rate"] <= 1


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, sft_dir):
    out = new_run(tmp_path_factory.mktemp("ref"), sft_dir, "run")
    rows = loop.run(config_from_dict(TINY), out)
    return out, rows


def test_end_to_end(reference_run):
    out, rows = reference_run
    assert {(r["method"], r["round"]) for r in rows} == {(m, t) for m in ("activedpo", "random", "aplp") for t in range(3)}
    for row in rows:
        assert row["labels"] == 4 * row["round"]
    assert_finite_metrics(rows)
    assert all("generation_s" in r and "training_s" in r for r in rows if r["round"] > 0)
    assert any("features_s" in r for r in rows if r["method"] == "activedpo" and r["round"] > 0)
    labels = loop.read_labels(out / loop.LABELS)
    assert len(labels) == 3 * 2 * 4
    assert all(r.preferred in ("a", "b") and r.response_a != "" for r in labels)
    on_disk = [json.loads(line) for line in (out / loop.METRICS).read_text().splitlines()]
    assert without_timings(on_disk) == without_timings(rows)
    # round 0 is the same initial model for every method
    assert len({r["eval_reward"] for r in rows if r["round"] == 0}) == 1


def test_apo_and_near_tie_end_to_end(tmp_path, sft_dir):
    """The two methods the reference run leaves out: APO generates with the initial model and reads
    frozen last-token features; near-tie reads margins, gradient features and the prior."""
    config = config_from_dict({**TINY, "run": {"methods": ["apo", "near_tie"], "seeds": [0], "rounds": 2}})
    rows = loop.run(config, new_run(tmp_path, sft_dir, "more"))
    assert [(r["method"], r["round"], r["labels"]) for r in rows] == [(m, t, 4 * t) for m in ("apo", "near_tie") for t in range(3)]
    assert_finite_metrics(rows)
    assert all("features_s" in r for r in rows if r["round"] > 0)
    assert all("rewards_s" in r for r in rows if r["method"] == "near_tie" and r["round"] > 0)


def test_rerun_without_resume_is_refused(reference_run):
    out, _ = reference_run
    with pytest.raises(FileExistsError, match="--resume"):
        loop.run(config_from_dict(TINY), out)


def test_sigkill_mid_round_then_resume_matches_uninterrupted(tmp_path, sft_dir, reference_run):
    _, expected = reference_run
    out = new_run(tmp_path, sft_dir, "killed")
    config = write_toml(tmp_path / "tiny.toml", TINY)
    command = [sys.executable, "-m", "jaxdpo.cli", "run", str(config), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # kill once the second track has labeled its first round (labels on disk, its checkpoint not yet)
    while time.time() < deadline and process.poll() is None:
        rows = loop.read_labels(out / loop.LABELS)
        if any(r.method == "random" for r in rows):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    labels_before = loop.read_labels(out / loop.LABELS)
    assert subprocess.run([*command, "--resume"], env=env, capture_output=True).returncode == 0
    labels_after = loop.read_labels(out / loop.LABELS)
    assert labels_after[: len(labels_before)] == labels_before  # nothing lost or rewritten
    keys = [(r.method, r.seed, r.round, r.pick) for r in labels_after]
    assert len(keys) == len(set(keys)) == 24  # nothing collected twice
    reference = loop.read_labels(reference_run[0] / loop.LABELS)
    assert sorted(labels_after, key=str) == sorted(reference, key=str)
    resumed = [json.loads(line) for line in (out / loop.METRICS).read_text().splitlines()]
    assert_same_metrics(resumed, expected)  # the test process compiles with XLA optimizations off: float noise


def test_human_oracle_round_trip(tmp_path, sft_dir):
    config = {**TINY, "run": {"methods": ["activedpo"], "seeds": [0], "rounds": 1}, "oracle": {"kind": "human"}}
    out = new_run(tmp_path, sft_dir, "human")
    path = write_toml(tmp_path / "human.toml", config)
    assert main(["run", str(path), "--out", str(out)]) == EXIT_LABELS_PENDING
    requests = out / "human" / "activedpo-seed0-round001.requests.jsonl"
    rows = [json.loads(line) for line in requests.read_text().splitlines()]
    assert len(rows) == 4
    labels = out / "human" / "activedpo-seed0-round001.labels.jsonl"
    labels.write_text("".join(json.dumps({"id": r["id"], "preferred": "ab"[i % 2]}) + "\n" for i, r in enumerate(rows)))
    assert main(["run", str(path), "--out", str(out), "--resume"]) == 0
    collected = loop.read_labels(out / loop.LABELS)
    assert [r.preferred for r in collected] == ["a", "b", "a", "b"]
    assert [r.response_a for r in collected] == [r["response_a"] for r in rows]
    assert (out / "curves.png").stat().st_size > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"run": {"methods": ["activedpo", "bogus"]}}, "run.methods[1]"),
        ({"selection": {"batch_size": 10_000}}, "selection.batch_size"),
        ({"model": {"path": "/nonexistent/model"}, "data": {"source": "tldr"}, "oracle": {"kind": "reward_model", "path": "/x"}}, "model.path"),
        ({"dpo": {"learning_rate": -1}}, "dpo.learning_rate"),
    ],
)
def test_config_errors_fail_at_start_naming_the_key(tmp_path, capsys, change, message):
    path = write_toml(tmp_path / "bad.toml", change)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == EXIT_CONFIG
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
