"""`jaxdpo export`: a run's products in the formats the Hugging Face ecosystem reads.

- `export_labels`: every paid label of `labels.jsonl` as a `datasets.Dataset` in the preference
  format TRL's `DPOTrainer` reads (`prompt`, `chosen`, `rejected` as text), one row per label in
  the log's order (`LABEL_COLUMNS` says what each column holds). A tie or a skip has no chosen or
  rejected response: its row says which in `no_preference` and keeps the pair in `response_a`
  and `response_b`; `dataset.filter(lambda row: row["no_preference"] is None)` leaves the rows
  DPO trains on. Written with `save_to_disk` (read back with `datasets.load_from_disk`), or as
  JSON Lines or Parquet (`datasets.load_dataset("json" | "parquet", data_files=...)`).
- `export_adapter`: a track's LoRA after a round as a PEFT adapter folder
  (`jaxdpo.models.peft`), or merged into the base model's weights as a whole HF checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from jaxdpo.errors import UserError

# The run machinery (JAX, orbax) is imported where it is used: the CLI's parser reads FORMATS.

Format = Literal["disk", "jsonl", "parquet"]
FORMATS: tuple[Format, ...] = ("disk", "jsonl", "parquet")
NOT_RECORDED = "tie or skip"
"""`no_preference` of a label without a preference from a run that did not record which it was."""

LABEL_COLUMNS = {
    "prompt": "the prompt, as the oracle saw it",
    "chosen": "the preferred response (null for a tie or a skip)",
    "rejected": "the other response (null for a tie or a skip)",
    "no_preference": f'"tie" or "skip" for a label without a preference ("{NOT_RECORDED}" from runs that did not record which); null otherwise',
    "id": "the pair's id, e.g. activedpo-seed0-round003-pick017 (the id it was asked under)",
    "method": "the selection method of the track that picked the pair",
    "seed": "the track's seed",
    "round": "the round it was picked in (1 = the first)",
    "pick": "its place in the round's selection order (0 = picked first)",
    "candidate": "its index in the round's pool of candidate pairs",
    "response_a": "the first response of the pair as asked",
    "response_b": "the second response",
    "preferred": '"a" or "b": which of them was preferred (null for a tie or a skip)',
    "left": '"a" or "b": the response people saw on the left (null: not shown to people, or not recorded)',
    "score_chosen": "the oracle's score of the chosen response (reward-model and synthetic oracles; null otherwise)",
    "score_rejected": "the oracle's score of the rejected response",
    "votes": 'each annotator\'s vote, [{"annotator": ..., "vote": "a" | "b" | "skip"}] (oracles with several annotators; null otherwise)',
}


def format_of(path: Path, name: str | None) -> Format:
    """`name`, or the one `path`'s suffix implies: .jsonl/.json → jsonl, .parquet → parquet, else disk."""
    if name is not None:
        return name
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(Path(path).suffix, "disk")


def label_row(record) -> dict:
    """One `LabelRecord` as a row of the exported dataset (`LABEL_COLUMNS`)."""
    a_first = record.preferred == "a"
    chosen, rejected = (record.response_a, record.response_b) if a_first else (record.response_b, record.response_a)
    score_chosen, score_rejected = (record.score_a, record.score_b) if a_first else (record.score_b, record.score_a)
    has_preference = record.preferred is not None
    row = {
        "prompt": record.prompt,
        "chosen": chosen if has_preference else None,
        "rejected": rejected if has_preference else None,
        "no_preference": None if has_preference else record.no_preference or NOT_RECORDED,
        "id": record.request_id,
        "method": record.method,
        "seed": record.seed,
        "round": record.round,
        "pick": record.pick,
        "candidate": record.candidate,
        "response_a": record.response_a,
        "response_b": record.response_b,
        "preferred": record.preferred,
        "left": record.left,
        "score_chosen": score_chosen if has_preference else None,
        "score_rejected": score_rejected if has_preference else None,
        "votes": None if record.votes is None else [{"annotator": who, "vote": vote} for who, vote in record.votes],
    }
    return {column: row[column] for column in LABEL_COLUMNS}


def labels_dataset(records: list):
    """`LabelRecord`s as a `datasets.Dataset` with a fixed schema (the same columns and types
    whatever the oracle, also with no labels yet)."""
    import datasets

    text, integer, number = datasets.Value("string"), datasets.Value("int64"), datasets.Value("float64")
    types = {"seed": integer, "round": integer, "pick": integer, "candidate": integer, "score_chosen": number, "score_rejected": number,
             "votes": [{"annotator": text, "vote": text}]}
    features = datasets.Features({column: types.get(column, text) for column in LABEL_COLUMNS})
    return datasets.Dataset.from_list([label_row(record) for record in records], features=features)


def export_labels(run_dir: Path, out: Path, fmt: Format) -> dict[str, int]:
    """Write the labels of the run in `run_dir` to `out` in `fmt`; returns how many labels of each
    kind ("preference", "tie", "skip", NOT_RECORDED) were written."""
    from jaxdpo.data import quiet_progress
    from jaxdpo.experiment.folder import saved_config
    from jaxdpo.experiment.storage import LABELS, read_labels

    saved_config(run_dir)  # a run folder, or a clear error
    records = read_labels(Path(run_dir) / LABELS)
    refuse_to_overwrite(out, run_dir)
    dataset = labels_dataset(records)
    try:
        with quiet_progress():
            if fmt == "disk":
                dataset.save_to_disk(str(out))
            elif fmt == "jsonl":
                dataset.to_json(str(out), lines=True)
            else:
                dataset.to_parquet(str(out))
    except (OSError, ValueError) as error:
        raise UserError(f"--out {out}: cannot write the dataset there ({error})") from error
    kinds = [row["no_preference"] or "preference" for row in dataset]
    return {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}


def base_model(run_dir: Path, config: dict) -> str:
    """The policy the run adapted: the embedded task's `DIR/sft-model`, or the config's model.path."""
    path = config["model"]["path"]
    return str((Path(run_dir) / "sft-model").absolute()) if path == "embedded" else path


def export_adapter(run_dir: Path, track_name: str, out: Path, *, round_: int | None = None, merged: bool = False) -> tuple[int, str]:
    """Write the LoRA of `track_name` ("activedpo-seed0") after `round_` (default: its latest kept
    checkpoint) to `out`: a PEFT adapter folder, or with `merged` the base model with the adapter
    merged in (plus its tokenizer). Returns (the round, the base model)."""
    from jaxdpo.experiment.checkpoints import TrackCheckpoints
    from jaxdpo.experiment.folder import saved_config
    from jaxdpo.experiment.storage import Track
    from jaxdpo.models import save_peft_adapter

    run_dir = Path(run_dir)
    config = saved_config(run_dir)
    try:
        track = Track.from_name(track_name)
    except ValueError as error:
        raise UserError(f"--track: {error}") from error
    if not (run_dir / "checkpoints" / track.name).is_dir():
        kept = sorted(p.name for p in (run_dir / "checkpoints").glob("*-seed*") if p.is_dir())
        raise UserError(f"--track: {run_dir} has no checkpoints of {track.name}; its tracks: {', '.join(kept) or 'none yet'}")
    checkpoints = TrackCheckpoints(run_dir, track, read_only=True)
    rounds = checkpoints.rounds()
    if not rounds:
        raise UserError(f"--track: {track.name} has no checkpoint yet")
    round_ = rounds[-1] if round_ is None else round_
    if round_ not in rounds:
        raise UserError(f"--round {round_}: {track.name} has checkpoints of rounds {', '.join(map(str, rounds))} (a run keeps the last two)")
    lora = checkpoints.restore_lora(round_, alpha=config["lora"]["alpha"])
    base = base_model(run_dir, config)
    refuse_to_overwrite(out, run_dir, base)
    if merged:
        write_merged(base, lora, out, dtype=config["model"]["dtype"])
    else:
        save_peft_adapter(lora, out, base_model=base)
    return round_, base


def write_merged(base: str, lora, out: Path, *, dtype: str) -> None:
    """The base checkpoint folder with `lora` merged into its weights (W + (α/r)·A B), as a whole
    HF checkpoint: weights, config and the base's tokenizer."""
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from jaxdpo.models import load_pretrained, save_pretrained

    if not Path(base).is_dir():
        raise UserError(f"--merged needs the base model's weights in a local folder; model.path {base!r} is not one")
    save_pretrained(load_pretrained(base, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32), out, lora=lora)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def refuse_to_overwrite(out: Path, *protected: str | Path) -> None:
    """An export never writes into the run folder (its labels, config and checkpoints would be
    replaced: `--out DIR/labels.jsonl`) or into the base model's folder."""
    target = Path(out).resolve()
    for folder in map(Path, protected):
        if target == folder.resolve() or folder.resolve() in target.parents:
            raise UserError(f"--out {out} is inside {folder}, whose files the export could replace; write it outside that folder")
