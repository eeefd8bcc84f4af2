"""`jaxdpo export` and `[log]` live metrics, on a run labeled by people through the answer files:
two stops and two resumes, answers a, b, tie and skip with the side shown left (or not said).

The dataset is checked against what the annotators wrote and against `labels.jsonl` read through
`LabelLog`; the adapter against transformers + PEFT (and the merged checkpoint against transformers)
on the run's own model; TensorBoard's event files and W&B's offline run file are read back."""

from __future__ import annotations

import json

import datasets
import jax
import numpy as np
import pytest
from flax import nnx

from jaxdpo import embedded
from jaxdpo.cli import EXIT_LABELS_PENDING, main
from jaxdpo.config import config_from_dict
from jaxdpo.errors import EXIT_USER_ERROR
from jaxdpo.experiment.checkpoints import TrackCheckpoints
from jaxdpo.experiment.folder import save_config
from jaxdpo.experiment.storage import LABELS, METRICS, LabelLog, LabelRecord, Track
from jaxdpo.export import LABEL_COLUMNS, NOT_RECORDED
from jaxdpo.models import Decoder, init_lora, load_pretrained, save_pretrained
from jaxdpo.oracles.human import human_folder
from tests.experiment.test_live import tensorboard_scalars, wandb_history
from tests.test_loop import TINY, write_toml
from tests.tolerance import assert_close

CONFIG = {
    **TINY, "run": {"methods": ["random"], "seeds": [0], "rounds": 2}, "oracle": {"kind": "human"},
    "log": {"tensorboard": True, "wandb_project": "jaxdpo-tests"},
}
TRACK = "random-seed0"
ANSWERS = [  # per stop: (preferred, left) per pair; left None: a hand-written line that does not say
    [("a", "b"), ("b", "a"), ("tie", "a"), ("skip", "b")],
    [("b", None), ("tie", "b"), ("a", "a"), ("skip", "a")],
]
PROCESSES = 3  # the first run and two resumes


@pytest.fixture(scope="module")
def human_run(tmp_path_factory):
    """The run folder, after every stop is answered (W&B offline; an untrained policy: only the
    formats matter here)."""
    tmp = tmp_path_factory.mktemp("human-export")
    out = tmp / "run"
    save_pretrained(Decoder(embedded.MODEL_CONFIG, rngs=nnx.Rngs(0)), out / "sft-model")
    command = ["run", str(write_toml(tmp / "human.toml", CONFIG)), "--out", str(out)]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        assert main(command) == EXIT_LABELS_PENDING
        for stop, answers in enumerate(ANSWERS, start=1):
            requests = human_folder(out) / f"batch-{stop:03d}.requests.jsonl"
            ids = [json.loads(line)["id"] for line in requests.read_text().splitlines()]
            lines = [{"id": i, "preferred": preferred, **({"left": left} if left else {})} for i, (preferred, left) in zip(ids, answers)]
            requests.with_name(f"batch-{stop:03d}.labels.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
            assert main([*command, "--resume"]) == (0 if stop == len(ANSWERS) else EXIT_LABELS_PENDING)
    return out


def test_dataset_round_trips_through_load_from_disk_and_holds_what_annotators_said(human_run, tmp_path, capsys):
    assert main(["export", str(human_run), "dataset", "--out", str(tmp_path / "labels")]) == 0
    assert "8 labels (4 preference, 2 tie, 2 skip)" in capsys.readouterr().out
    rows = datasets.load_from_disk(str(tmp_path / "labels")).to_list()
    records = LabelLog(human_run / LABELS).read()
    answers = [answer for stop in ANSWERS for answer in stop]
    assert len(rows) == len(records) == len(answers)
    for row, record, (preferred, left) in zip(rows, records, answers):
        assert list(row) == list(LABEL_COLUMNS)
        assert (row["method"], row["seed"], row["round"], row["pick"], row["candidate"]) == (
            record.method, record.seed, record.round, record.pick, record.candidate)
        assert row["id"] == f"{TRACK}-round{record.round:03d}-pick{record.pick:03d}"
        assert (row["prompt"], row["response_a"], row["response_b"]) == (record.prompt, record.response_a, record.response_b)
        assert row["left"] == left
        if preferred in ("a", "b"):
            other = "b" if preferred == "a" else "a"
            assert (row["chosen"], row["rejected"]) == (getattr(record, f"response_{preferred}"), getattr(record, f"response_{other}"))
            assert (row["preferred"], row["no_preference"]) == (preferred, None)
        else:  # a tie or a skip: never a chosen or rejected response
            assert (row["chosen"], row["rejected"], row["preferred"], row["no_preference"]) == (None, None, None, preferred)
        assert (row["score_chosen"], row["score_rejected"], row["votes"]) == (None, None, None)  # people: no scores, one answer each


@pytest.mark.parametrize("name, fmt, loader", [("labels.jsonl", None, "json"), ("labels.parquet", None, "parquet"), ("labels.out", "jsonl", "json")])
def test_dataset_as_jsonl_and_parquet(human_run, tmp_path, name, fmt, loader):
    assert main(["export", str(human_run), "dataset", "--out", str(tmp_path / name), *(["--format", fmt] if fmt else [])]) == 0
    on_disk = tmp_path / "disk"
    assert main(["export", str(human_run), "dataset", "--out", str(on_disk)]) == 0
    got = datasets.load_dataset(loader, data_files=str(tmp_path / name), split="train", cache_dir=str(tmp_path / "cache")).to_list()
    assert got == datasets.load_from_disk(str(on_disk)).to_list()


def record(pick: int, preferred, **extra) -> LabelRecord:
    return LabelRecord(
        method="activedpo", seed=3, round=1, pick=pick, candidate=10 + pick, prompt="p", response_a="x", response_b="y", prompt_len=1,
        input_ids_a=(1, 2), attention_mask_a=(1, 1), input_ids_b=(1, 3), attention_mask_b=(1, 1), preferred=preferred, **extra,
    )


def test_scores_votes_and_labels_of_older_runs(tmp_path):
    """Scores follow chosen/rejected; votes become a list of records; a label without a preference
    from a run that did not record which kind it was says so instead of guessing."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(config_from_dict({}), run)
    LabelLog(run / LABELS).append([
        record(0, "b", score_a=0.25, score_b=1.5),
        record(1, "a", votes=(("ann1", "a"), ("ann2", "skip"))),
        record(2, None),
    ])
    assert main(["export", str(run), "dataset", "--out", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"]) for r in rows[:1]] == [("y", "x", 1.5, 0.25)]
    assert rows[1]["votes"] == [{"annotator": "ann1", "vote": "a"}, {"annotator": "ann2", "vote": "skip"}]
    assert (rows[2]["chosen"], rows[2]["no_preference"]) == (None, NOT_RECORDED)


@pytest.mark.parametrize("args, message", [
    (["dataset", "--out", "{run}"], "--out {run} is inside {run}"),
    (["dataset", "--out", "{run}/labels.jsonl"], "--out {run}/labels.jsonl is inside {run}, whose files the export could replace"),
    (["adapter", "--track", "random", "--out", "{tmp}/a"], "a track is named METHOD-seedS"),
    (["adapter", "--track", "aplp-seed0", "--out", "{tmp}/a"], f"has no checkpoints of aplp-seed0; its tracks: {TRACK}"),
    (["adapter", "--track", TRACK, "--round", "0", "--out", "{tmp}/a"], f"--round 0: {TRACK} has checkpoints of rounds 1, 2"),
    (["adapter", "--track", TRACK, "--merged", "--out", "{run}/sft-model"], "--out {run}/sft-model is inside {run}"),
])
def test_export_errors_are_one_line(human_run, tmp_path, capsys, args, message):
    args = [a.format(run=human_run, tmp=tmp_path) for a in args]
    before = {path: path.read_bytes() for path in human_run.rglob("*") if path.is_file()}
    assert main(["export", str(human_run), *args]) == EXIT_USER_ERROR
    assert {path: path.read_bytes() for path in human_run.rglob("*") if path.is_file()} == before  # the paid labels first
    err = capsys.readouterr().err
    assert message.format(run=human_run) in err.replace("\n", "") and err.count("error:") == 1
    assert main(["export", str(tmp_path), "dataset", "--out", str(tmp_path / "x")]) == EXIT_USER_ERROR
    assert "holds no run (no config.json)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapted(human_run):
    """(the run's policy, the adapter its checkpoint of the last round holds, restored as the run
    restores it, token rows of its labels)."""
    model = load_pretrained(human_run / "sft-model")
    config = config_from_dict(CONFIG)
    lora = init_lora(model, rank=config.lora.rank, alpha=config.lora.alpha, targets=config.lora.targets, key=jax.random.key(0))
    state = TrackCheckpoints(human_run, Track.from_name(TRACK)).restore(config.dpo.trainer().init(lora)).state
    records = LabelLog(human_run / LABELS).read()
    ids = np.asarray([r.input_ids_a for r in records], np.int32)
    mask = np.asarray([r.attention_mask_a for r in records], np.int32)
    logits = np.asarray(model(ids, attention_mask=mask, lora=state.lora))
    assert np.abs(logits - np.asarray(model(ids, attention_mask=mask))).max() > 1e-3  # DPO moved the adapter
    return state.lora, ids, mask, logits


def test_adapter_loads_into_peft_with_jaxdpos_logits(human_run, adapted, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    from tests.models.conftest import torch_logits

    lora, ids, mask, expected = adapted
    assert main(["export", str(human_run), "adapter", "--track", TRACK, "--out", str(tmp_path / "adapter")]) == 0
    assert f"{TRACK} after round 2: a PEFT adapter" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"]) == (str((human_run / "sft-model").absolute()), lora.rank, lora.alpha)
    base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], attn_implementation="eager")
    got = torch_logits(peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), ids, mask)
    valid = mask.astype(bool)
    assert_close(got[valid], expected[valid], ulps=512)  # transformers' float32 order: 6e-5 of the logits' scale
    assert torch.get_default_dtype() == torch.float32

    assert main(["export", str(human_run), "adapter", "--track", TRACK, "--round", "1", "--out", str(tmp_path / "round1")]) == 0
    with open(tmp_path / "round1" / "adapter_model.safetensors", "rb") as one, open(tmp_path / "adapter" / "adapter_model.safetensors", "rb") as two:
        assert one.read() != two.read()  # round 2 trained on more labels


def test_merged_checkpoint_loads_into_transformers_with_jaxdpos_logits(human_run, adapted, tmp_path):
    pytest.importorskip("torch")
    import transformers

    from tests.models.conftest import torch_logits

    _, ids, mask, expected = adapted
    assert main(["export", str(human_run), "adapter", "--track", TRACK, "--merged", "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    valid = mask.astype(bool)
    assert_close(torch_logits(merged.eval(), ids, mask)[valid], expected[valid], ulps=512)  # W + (α/r)·A B rounded once more
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged").get_vocab() == embedded.build_tokenizer().get_vocab()


def test_tensorboard_holds_every_row_once_after_two_resumes(human_run):
    rows = [json.loads(line) for line in (human_run / METRICS).read_text().splitlines()]
    folder = human_run / "tensorboard" / TRACK
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # each process rewrote the track from its checkpoint
    scalars = tensorboard_scalars(folder)
    numeric = {key for row in rows for key, value in row.items() if isinstance(value, (int, float)) and key != "seed"}
    assert set(scalars) == {f"seconds/{key[:-2]}" if key.endswith("_s") else key for key in numeric}
    for key in numeric:
        tag = f"seconds/{key[:-2]}" if key.endswith("_s") else key
        expected = [(row["labels"], row[key]) for row in rows if row.get(key) is not None]
        assert [step for step, _ in scalars[tag]] == [step for step, _ in expected], tag
        assert_close([value for _, value in scalars[tag]], [value for _, value in expected], ulps=1)  # float32 events
    assert [value for _, value in scalars["labels"]] == [0, 2, 4]  # one point per round, step = labels collected


def test_wandb_offline_runs_continue_one_run_per_track(human_run):
    pytest.importorskip("wandb")
    rows = [json.loads(line) for line in (human_run / METRICS).read_text().splitlines()]
    run_id = json.loads((human_run / "wandb" / "run-ids.json").read_text())[TRACK]
    sessions = sorted((human_run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == PROCESSES  # every process resumed the same run
    history = wandb_history(next(sessions[-1].glob("*.wandb")))
    assert [h["_step"] for h in history] == [row["round"] for row in rows]
    for logged, row in zip(history, rows):
        assert logged["labels"] == row["labels"] and logged.get("train_loss") == pytest.approx(row.get("train_loss"))
        assert logged["seconds/eval"] == pytest.approx(row["eval_s"]) and "seed" not in logged and "eval_reward" not in logged
