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
from jaxdpo.cli import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_LABELS_PENDING, EXIT_TERMINATED, main
from jaxdpo.config import config_from_dict
from jaxdpo.errors import EXIT_USER_ERROR, UserError
from jaxdpo.experiment.folder import RunLock
from tests.tolerance import assert_close

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
            if isinstance(value, float):  # float32 results written as JSON: a resumed run computes them again
                assert_close(a[key], value, ulps=64, scale=max(abs(value), 1.0), err_msg=key)
            else:
                assert a[key] == value, key


def assert_finite_metrics(rows):
    for row in rows:
        for key in ("eval_reward", "eval_reward_stderr", "win_rate", "train_loss", "ref_nll", "kl_to_ref", "kl_to_ref_stderr"):
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
    # round 0 is the same initial model for every method: the same reward and reference NLL, no KL to itself;
    # DPO moves both guards (their values against transformers: tests/experiment/test_evaluation.py)
    assert len({r["eval_reward"] for r in rows if r["round"] == 0}) == 1
    [start_nll] = {r["ref_nll"] for r in rows if r["round"] == 0}
    assert all(r["kl_to_ref"] == 0.0 for r in rows if r["round"] == 0)
    assert all(r["ref_nll"] != start_nll and r["kl_to_ref"] != 0.0 for r in rows if r["round"] == 2)
    assert (out / "sft-model" / "tokenizer.json").exists()  # the SFT folder is a whole checkpoint: model.path can name it


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
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        loop.run(config_from_dict(TINY), out)


def test_texts_have_no_special_tokens(reference_run):
    out, _ = reference_run
    for record in loop.read_labels(out / loop.LABELS):
        for text in (record.response_a, record.response_b):
            assert not {"<eos>", "<pad>", "<bos>"} & set(text.split()), text


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_damaged_folder_resumes_to_the_uninterrupted_result(tmp_path, reference_run, caplog):
    """An unlucky folder, each track hit differently, resumed once (issue: nothing lost, nothing paid twice):
    - activedpo: its latest checkpoint is damaged (falls back to round 1) and two of its round-1
      labels are gone from labels.jsonl (its round-1 checkpoint trained on them: written back);
    - random: killed while appending its round-2 labels (the log ends mid-line, no round-2 checkpoint);
    - aplp: finished, but labels.jsonl lost its round-2 labels (written back from the final checkpoint)."""
    reference, expected = reference_run
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "activedpo-seed0" / "2" / "state")
    shutil.rmtree(out / "checkpoints" / "random-seed0" / "2")
    records, lines = loop.read_labels(out / loop.LABELS), lines_of(out / loop.LABELS)
    drop = {i for i, r in enumerate(records) if (r.method, r.round) == ("activedpo", 1) and r.pick < 2}
    drop |= {i for i, r in enumerate(records) if (r.method, r.round) == ("aplp", 2)}
    random_round2 = [i for i, r in enumerate(records) if (r.method, r.round) == ("random", 2)]
    kept = [line for i, line in enumerate(lines) if i not in drop and i not in random_round2]
    torn = [lines[i] for i in random_round2[:2]] + [lines[random_round2[2]][:40]]
    (out / loop.LABELS).write_text("".join(kept + torn))
    with caplog.at_level("WARNING", logger="jaxdpo"):
        rows = loop.run(config_from_dict(TINY), out, resume=True)
    assert_same_metrics(rows, expected)
    after = loop.read_labels(out / loop.LABELS)
    assert sorted(after, key=str) == sorted(loop.read_labels(reference / loop.LABELS), key=str)  # every label, once
    messages = caplog.text
    assert "cut short" in messages and "checkpoint activedpo-seed0/2 is damaged (state/" in messages and "continued from step 1" in messages
    assert all(len(record.getMessage().splitlines()) <= 2 for record in caplog.records)  # no spec dumps
    assert "2 labels of activedpo-seed0 were missing" in messages and "4 labels of aplp-seed0 were missing" in messages
    assert list((out / "checkpoints" / "damaged").iterdir())  # the damaged step is set aside, not deleted
    assert loop.run(config_from_dict(TINY), out, resume=True) == rows  # and the folder is whole again


def test_damage_inside_labels_log_names_the_line(tmp_path, reference_run):
    reference, _ = reference_run
    out = tmp_path / "edited"
    shutil.copytree(reference, out)
    lines = lines_of(out / loop.LABELS)
    lines[5] = lines[5].replace('"pick": ', '"pick": 9', 1)  # still valid JSON, no longer what was written
    (out / loop.LABELS).write_text("".join(lines))
    with pytest.raises(UserError, match=r"line 6 is damaged \(the checksum does not match"):
        loop.run(config_from_dict(TINY), out, resume=True)


def test_a_second_process_on_the_folder_is_refused(tmp_path, reference_run):
    reference, _ = reference_run
    out = tmp_path / "locked"
    shutil.copytree(reference, out)
    with RunLock(out):
        with pytest.raises(UserError, match=r"in use by another jaxdpo process \(pid \d+\)"):
            loop.run(config_from_dict(TINY), out, resume=True)
    (out / ".lock").write_text("999999")  # a stale lock of a dead process
    assert len(loop.run(config_from_dict(TINY), out, resume=True)) == 9


def test_resume_of_a_folder_without_a_run_fails_and_creates_nothing(tmp_path, capsys):
    path = write_toml(tmp_path / "tiny.toml", TINY)
    assert main(["run", str(path), "--out", str(tmp_path / "typo"), "--resume"]) == EXIT_USER_ERROR
    assert "holds no run to resume" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_errors_after_start_are_one_line_and_leave_nothing_that_blocks_a_rerun(tmp_path, reference_run, capsys, monkeypatch):
    sft_dir = reference_run[0] / "sft-model"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"topic{i % 4} w{i % 16:02d} w{i // 16:02d} w01 :"}) + "\n" for i in range(20)))
    base = {**TINY, "model": {"path": str(sft_dir)}, "data": {"source": "jsonl", "path": str(prompts), "prompts_per_round": 8},
            "oracle": {"kind": "human"}, "eval": {"prompts": 30}}
    path = write_toml(tmp_path / "few.toml", base)
    for _ in range(2):  # the same command fails the same way twice: no config.json was left behind
        assert main(["run", str(path), "--out", str(tmp_path / "few")]) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert "eval.prompts: 30 prompts are held out from data.split 'train', which has only 20" in err
        assert "Traceback" not in err and sum(line.startswith("error:") for line in err.splitlines()) == 1
    no_tokenizer = tmp_path / "bare-model"
    shutil.copytree(sft_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    write_toml(path, {**base, "model": {"path": str(no_tokenizer)}, "eval": {"prompts": 4}})
    assert main(["run", str(path), "--out", str(tmp_path / "bare")]) == EXIT_USER_ERROR
    assert "holds no tokenizer" in capsys.readouterr().err

    prompts.write_text(prompts.read_text() + '{"prompt": "cut sh')  # a line cut short
    write_toml(path, {**base, "eval": {"prompts": 4}})
    assert main(["run", str(path), "--out", str(tmp_path / "torn")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"data.path: cannot load the jsonl prompts: {prompts}: line 21 is not valid JSON: Unterminated string" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr("socket.getaddrinfo", unreachable)
    hub = {**base, "model": {"path": "someone/some-model"}, "oracle": {"kind": "reward_model", "path": "someone/reward-model"},
           "data": {"source": "tldr", "prompts_per_round": 8}, "eval": {"prompts": 4}}
    write_toml(path, hub)
    assert main(["run", str(path), "--out", str(tmp_path / "hub")]) == EXIT_USER_ERROR
    assert (  # every name at once, before anything is loaded
        "model.path 'someone/some-model', oracle.path 'someone/reward-model', data.source 'openai/summarize_from_feedback': "
        "not local folders, not in the Hugging Face cache, and the hub"
    ) in capsys.readouterr().err


def test_ctrl_c_says_how_to_continue(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run", interrupted)
    assert main(["run", "--out", str(tmp_path / "x")]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"interrupted (SIGINT): every label collected so far is saved; continue with: jaxdpo run --resume --out {tmp_path / 'x'}" in err


def launch(args: list[str], log: Path) -> subprocess.Popen:
    """`jaxdpo ARGS` in a subprocess, SIGINT at its default (not ignored as in a background job)."""
    entry = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from jaxdpo.cli import entry; entry()"
    with log.open("w") as stream:
        return subprocess.Popen([sys.executable, "-c", entry, *args], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=stream, stderr=stream)


def wait_until(condition, process: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not condition():
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before the signal"


def test_signals_then_resume_match_uninterrupted(tmp_path, sft_dir, reference_run):
    """A restart loop that always passes --resume: first on a folder a start killed before its
    config.json left behind (the lock of a dead process, the SFT model), then SIGINT once the
    second track has labels and SIGTERM once the third has (each: its exit code and message,
    nothing else), then a run to the end: every label once, the same labels and metrics as the
    uninterrupted run."""
    reference, expected = reference_run
    out = new_run(tmp_path, sft_dir, "signals")
    (out / ".lock").write_text("999999")
    config = write_toml(tmp_path / "tiny.toml", TINY)
    args, log = ["run", str(config), "--out", str(out), "--resume"], tmp_path / "log"
    for signum, code, track in ((signal.SIGINT, EXIT_INTERRUPTED, "random"), (signal.SIGTERM, EXIT_TERMINATED, "aplp")):
        process = launch(args, log)
        wait_until(lambda: any(r.method == track for r in loop.read_labels(out / loop.LABELS)), process)  # its labels on disk, its checkpoint not
        process.send_signal(signum)
        assert process.wait(timeout=120) == code, log.read_text()
        err = log.read_text()
        assert f"interrupted ({signal.Signals(signum).name}): every label collected so far is saved; continue with: jaxdpo run {config} --resume --out {out}" in err
        assert "Traceback" not in err and "Fatal Python error" not in err
        stopped = loop.read_labels(out / loop.LABELS)
    assert launch(args, log).wait() == 0, log.read_text()
    labels = loop.read_labels(out / loop.LABELS)
    assert labels[: len(stopped)] == stopped  # nothing lost or rewritten
    assert len({(r.method, r.seed, r.round, r.pick) for r in labels}) == len(labels) == 24  # nothing collected twice
    assert sorted(labels, key=str) == sorted(loop.read_labels(reference / loop.LABELS), key=str)
    assert_same_metrics([json.loads(line) for line in (out / loop.METRICS).read_text().splitlines()], expected)


def test_flipped_bytes_in_a_checkpoint_fall_back_to_the_step_before(tmp_path, reference_run, caplog):
    reference, expected = reference_run
    out = tmp_path / "flipped"
    shutil.copytree(reference, out)
    step = out / "checkpoints" / "random-seed0" / "2"
    data = max((path for path in (step / "state").rglob("*") if path.is_file() and path.parent.name == "d"), key=lambda path: path.stat().st_size)
    content = bytearray(data.read_bytes())
    for i in range(len(content) // 4, len(content) // 4 + min(400, len(content) // 2)):
        content[i] ^= 0xFF
    data.write_bytes(content)  # the same size and structure: only the values are wrong
    with caplog.at_level("WARNING", logger="jaxdpo"):
        rows = loop.run(config_from_dict(TINY), out, resume=True)
    [warning] = [record.getMessage() for record in caplog.records if "damaged" in record.getMessage()]
    assert f"checkpoint random-seed0/2 is damaged ({data.relative_to(step)} differs from what was written (SHA-256 mismatch)); moved it to {out / 'checkpoints' / 'damaged'}" in warning
    assert warning.endswith("continued from step 1") and "\n" not in warning
    assert_same_metrics(rows, expected)
    assert sorted(loop.read_labels(out / loop.LABELS), key=str) == sorted(loop.read_labels(reference / loop.LABELS), key=str)


def test_human_oracle_asks_every_track_at_once_and_resumes(tmp_path, sft_dir, capsys):
    config = {**TINY, "run": {"methods": ["activedpo", "random"], "seeds": [0], "rounds": 1}, "oracle": {"kind": "human"}}
    out = new_run(tmp_path, sft_dir, "human")
    path = write_toml(tmp_path / "human.toml", config)
    assert main(["run", str(path), "--out", str(out)]) == EXIT_LABELS_PENDING
    assert f"continue with: jaxdpo run {path} --resume --out {out}" in " ".join(capsys.readouterr().err.split())  # the full command
    [requests] = sorted((out / "human").glob("*.requests.jsonl"))  # one file for both tracks
    rows = [json.loads(line) for line in requests.read_text().splitlines()]
    assert sorted({r["track"] for r in rows}) == ["activedpo-seed0", "random-seed0"] and len(rows) == 8
    metrics = (out / loop.METRICS).read_text()
    assert "NaN" not in metrics and all(json.loads(line)["eval_reward"] is None for line in metrics.splitlines())
    answers = requests.with_name(requests.name.replace(".requests", ".labels"))
    answers.write_text(json.dumps({"id": [rows[0]["id"]], "preferred": "a"}) + "\n")
    assert main(["run", str(path), "--out", str(out), "--resume"]) == EXIT_USER_ERROR  # a bad answer file: one line, nothing lost
    choices = ["a", "b", "tie", "skip"]
    answers.write_text("".join(json.dumps({"id": r["id"], "preferred": choices[i % 4]}) + "\n" for i, r in enumerate(rows)))
    assert main(["run", str(path), "--out", str(out), "--resume"]) == 0
    collected = loop.read_labels(out / loop.LABELS)
    assert [r.preferred for r in collected] == ["a", "b", None, None] * 2  # ties and skips are kept, without a preference
    assert [r.response_a for r in collected] == [r["response_a"] for r in rows]
    final = [json.loads(line) for line in (out / loop.METRICS).read_text().splitlines()]
    assert [r["labels"] for r in final if r["round"] == 1] == [2, 2]


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


def test_memory_plan_refuses_a_run_that_cannot_fit_before_the_first_round(tmp_path, sft_dir, monkeypatch):
    from jaxdpo.experiment import memory

    monkeypatch.setattr(memory, "device_memory", lambda: 2**14)
    out = new_run(tmp_path, sft_dir, "tight")
    with pytest.raises(UserError, match=r"generation.chunk_rows: the generation: responses \(3 per prompt\) stage needs .* GiB per device, more than"):
        loop.run(config_from_dict(TINY), out, plan=True)
    assert json.loads((out / "memory-plan.json").read_text())["stages"][0]["key"] == "generation.chunk_rows"
    assert not (out / loop.CONFIG).exists() and not (out / loop.LABELS).exists()
