"""What a run keeps in its folder, each format next to its reader and writer.

- `config.json`: the config the run was started with (`prepare_out_dir`).
- `labels.jsonl`: one `LabelRecord` per line, appended and fsynced before training reads it.
- `metrics.jsonl`: one row per method, seed and round, rewritten atomically after every round.
- `checkpoints/<track>/<round>/`: orbax checkpoints of the adapter, its optimizer state and the
  track's metrics history (`TrackCheckpoints`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import orbax.checkpoint as ocp

from jaxdpo.config import ExperimentConfig
from jaxdpo.dpo import TrainState
from jaxdpo.models import LoRA
from jaxdpo.oracles import write_jsonl_atomic
from jaxdpo.sequences import Sequences

LABELS, METRICS, CONFIG = "labels.jsonl", "metrics.jsonl", "config.json"


@dataclasses.dataclass(frozen=True)
class Track:
    """One (method, seed) of a run: `config.run.rounds` rounds of Algorithm 1."""

    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"


# -- labels ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelRecord:
    """One labeled triplet (x, y_a, y_b): where it came from (track, round, pick order, candidate
    index in the round's pool), the texts the oracle saw, the token rows DPO trains on (prompt
    left-padded to `prompt_len`, then the response), and the preference (with the oracle's scores
    when it has them)."""

    method: str
    seed: int
    round: int
    pick: int
    candidate: int
    prompt: str
    response_a: str
    response_b: str
    prompt_len: int
    input_ids_a: tuple[int, ...]
    attention_mask_a: tuple[int, ...]
    input_ids_b: tuple[int, ...]
    attention_mask_b: tuple[int, ...]
    preferred: Literal["a", "b"]
    score_a: float | None = None
    score_b: float | None = None

    @property
    def track(self) -> Track:
        return Track(self.method, self.seed)

    def to_json(self) -> dict:
        row = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        row.update({key: list(row[key]) for key in _TOKEN_FIELDS})
        return {key: value for key, value in row.items() if not (key.startswith("score_") and value is None)}

    @classmethod
    def from_json(cls, row: dict) -> LabelRecord:
        """Parse one line's object; a missing field or a wrong type raises ValueError naming it."""
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        values = {}
        for field in dataclasses.fields(cls):
            if field.name not in row:
                if field.default is dataclasses.MISSING:
                    raise ValueError(f"missing field {field.name!r}")
                continue
            values[field.name] = _parse_field(field.name, row[field.name])
        return cls(**values)


_TOKEN_FIELDS = ("input_ids_a", "attention_mask_a", "input_ids_b", "attention_mask_b")
_INT_FIELDS = ("seed", "round", "pick", "candidate", "prompt_len")


def _parse_field(name: str, value):
    if name in _TOKEN_FIELDS:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"field {name!r} must be a list of integers")
        return tuple(value)
    if name in _INT_FIELDS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"field {name!r} must be an integer, got {value!r}")
        return value
    if name == "preferred":
        if value not in ("a", "b"):
            raise ValueError(f"field 'preferred' must be \"a\" or \"b\", got {value!r}")
        return value
    if name.startswith("score_"):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"field {name!r} must be a number, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {value!r}")
    return value


def append_labels(path: Path, records: Iterable[LabelRecord]) -> None:
    """Append and fsync: the records are on disk when this returns."""
    with Path(path).open("a") as f:
        for record in records:
            f.write(json.dumps(record.to_json()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_labels(path: Path) -> list[LabelRecord]:
    """The records of `labels.jsonl`; a torn last line (a kill mid-write) is ignored, other bad
    lines raise ValueError with the line number."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(LabelRecord.from_json(json.loads(line)))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
        except ValueError as error:
            raise ValueError(f"{path}: line {number}: {error}") from error
    return records


def training_data(records: list[LabelRecord]) -> tuple[Sequences, np.ndarray]:
    """(sequences [2L, s], pairs [L, 2] of (chosen, rejected) rows): rows 2i and 2i + 1 are record
    i's responses a and b."""
    ids, attention, response = [], [], []
    for record in records:
        for tokens, mask in ((record.input_ids_a, record.attention_mask_a), (record.input_ids_b, record.attention_mask_b)):
            mask = np.asarray(mask, np.int32)
            ids.append(np.asarray(tokens, np.int32))
            attention.append(mask)
            response.append(np.where(np.arange(len(mask)) >= record.prompt_len, mask, 0))
    prefer_a = np.asarray([record.preferred == "a" for record in records])
    first = 2 * np.arange(len(records))
    pairs = np.stack([np.where(prefer_a, first, first + 1), np.where(prefer_a, first + 1, first)], axis=1)
    return Sequences(np.stack(ids), np.stack(response), np.stack(attention)), pairs


# -- metrics --------------------------------------------------------------------------------------


def write_metrics(out_dir: Path, rows: list[dict]) -> None:
    write_jsonl_atomic(Path(out_dir) / METRICS, rows)


# -- checkpoints ----------------------------------------------------------------------------------


class TrackCheckpoints:
    """The orbax checkpoints of one track: after round t, step t holds the adapter, its optimizer
    state and step count, and the track's metrics history up to t (the last two are kept)."""

    def __init__(self, out_dir: Path, track: Track):
        self.manager = ocp.CheckpointManager(
            (Path(out_dir) / "checkpoints" / track.name).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
        )

    def latest_round(self) -> int | None:
        return self.manager.latest_step()

    def save(self, round_: int, state: TrainState, history: list[dict]) -> None:
        self.manager.save(
            round_, args=ocp.args.Composite(state=ocp.args.StandardSave(_as_tree(state)), meta=ocp.args.JsonSave({"history": history}))
        )
        self.manager.wait_until_finished()

    def restore(self, like: TrainState) -> tuple[TrainState, list[dict]]:
        """(state, history) of the latest round; `like` gives the structure (a fresh state)."""
        restored = self.manager.restore(
            self.latest_round(),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(_as_tree(like)), meta=ocp.args.JsonRestore()),
        )
        tree = restored["state"]
        lora = LoRA(params=tree["lora"], rank=like.lora.rank, alpha=like.lora.alpha)
        return TrainState(lora=lora, opt_state=tree["opt_state"], step=int(tree["step"])), restored["meta"]["history"]


def _as_tree(state: TrainState) -> dict:
    return {"lora": state.lora.params, "opt_state": state.opt_state, "step": np.asarray(state.step, np.int64)}


# -- the run folder -------------------------------------------------------------------------------


def prepare_out_dir(config: ExperimentConfig, out_dir: Path, *, resume: bool) -> None:
    """Create `out_dir` for a new run, or check that a resumed run has the same config."""
    saved = Path(out_dir) / CONFIG
    if saved.exists():
        if not resume:
            raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
        before = json.loads(saved.read_text())
        changed = sorted(
            f"{section}.{key}" for section, values in config.to_dict().items() for key, value in values.items()
            if before.get(section, {}).get(key) != value
        )
        if changed:
            raise ValueError(f"{out_dir} was run with another config; these keys differ: {', '.join(changed)}")
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(config.to_dict(), indent=2))
