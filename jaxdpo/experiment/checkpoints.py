"""A track's checkpoints: `checkpoints/<track>/<round>/`, orbax steps that are verified before use.

Each step holds the adapter and its optimizer state, the metrics history, the labels trained on
and the win-rate baseline (`Checkpoint`), plus `checksums.json`: the SHA-256 of every file orbax
wrote, taken once orbax has committed the step. A step whose files differ from their checksums
(flipped bytes, a truncated or missing file) or that orbax cannot restore is damaged: it is moved
to `checkpoints/damaged/` and the step before it is used. A step without `checksums.json` (written
before they existed, or killed between orbax's commit and the checksums) is restored unchecked.

With several JAX processes every process saves and restores each checkpoint together: orbax writes
a sharded array from every process that holds a shard, and its JSON metadata from process 0; the
checksums are written by process 0 once all have saved."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdpo.dpo import TrainState
from jaxdpo.errors import UserError
from jaxdpo.experiment.storage import LabelRecord, Track
from jaxdpo.files import write_atomic
from jaxdpo.models import LoRA
from jaxdpo.multihost import any_process, from_writer

CHECKSUMS = "checksums.json"
_log = logging.getLogger("jaxdpo")


class Checkpoint(NamedTuple):
    """What a track's checkpoint after round t holds: the adapter with its optimizer state, the
    metrics history up to t, every label the track has trained on (a second copy of its part of
    `labels.jsonl`, so a damaged log never makes it train on fewer labels than it paid for), and
    the initial model's held-out scores (the win-rate baseline)."""

    state: TrainState
    history: list[dict]
    labels: list[LabelRecord]
    baseline_scores: np.ndarray | None


class DamagedCheckpoint(ValueError):
    """A step whose files are not what was written."""


class TrackCheckpoints:
    """The orbax checkpoints of one track, step t = round t; the last two are kept. A damaged step
    is moved to `checkpoints/damaged/` and the one before it is used (see the module docstring).
    `read_only`: for readers beside the run (exports), which never write or create anything."""

    def __init__(self, out_dir: Path, track: Track, *, read_only: bool = False):
        self.folder = (Path(out_dir) / "checkpoints" / track.name).absolute()
        if read_only:  # the state read as a plain tree: `restore_lora` needs no trainer and no devices like the run's
            self.manager = ocp.CheckpointManager(
                self.folder, options=ocp.CheckpointManagerOptions(read_only=True), item_handlers={"state": ocp.PyTreeCheckpointHandler()}
            )
        else:
            self.manager = ocp.CheckpointManager(
                self.folder, options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
            )

    def latest_round(self) -> int | None:
        return self.manager.latest_step()

    def rounds(self) -> list[int]:
        """The rounds whose checkpoints are kept, in order."""
        return sorted(self.manager.all_steps())

    def restore_lora(self, round_: int, *, alpha: float) -> LoRA:
        """The adapter after round `round_` as host arrays, whatever devices and sharding the run
        had (read-only checkpoints); `alpha` is the run's `lora.alpha`. A damaged step raises
        UserError saying why."""
        try:
            verify_checksums(self.folder / str(round_))
        except DamagedCheckpoint as error:
            raise UserError(f"checkpoint {self.folder.name}/{round_} is damaged ({error}); choose another round") from None
        on_host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), self.manager.item_metadata(round_)["state"].tree)
        restored = self.manager.restore(round_, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=on_host)))
        params = restored["state"]["lora"]
        return LoRA(params=params, rank=int(next(iter(params.values()))["a"].shape[-1]), alpha=float(alpha))

    def save(self, round_: int, checkpoint: Checkpoint) -> None:
        meta = {
            "history": checkpoint.history,
            "labels": [record.to_json() for record in checkpoint.labels],
            "baseline_scores": None if checkpoint.baseline_scores is None else np.asarray(checkpoint.baseline_scores).tolist(),
        }
        self.manager.save(round_, args=ocp.args.Composite(state=ocp.args.StandardSave(_as_tree(checkpoint.state)), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()
        from_writer(write_checksums, self.folder / str(round_))  # orbax has committed every process's files

    def restore(self, like: TrainState) -> Checkpoint:
        """The latest checkpoint that verifies and restores (`like`: a fresh state, for the
        structure). With several processes, a step that fails on any of them is set aside (by
        process 0) for all."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            error = None
            try:
                restored = self._restore(step, like)
            except Exception as failure:  # noqa: BLE001 - orbax raises many kinds; the step is set aside, not lost
                error = failure
            if not any_process(error is not None):
                for bad, reason, aside in damaged:
                    _log.warning("checkpoint %s/%d is damaged (%s); moved it to %s and continued from step %d", self.folder.name, bad, reason, aside, step)
                return restored
            aside = from_writer(self._set_aside, step)
            self.manager.reload()
            damaged.append((step, "it failed on another process" if error is None else _reason(error), aside))
        steps = "; ".join(f"step {step}: {reason}" for step, reason, _ in damaged)
        raise UserError(
            f"{self.folder}: no checkpoint of this track can be restored ({steps}); they are in {self.folder.parent / 'damaged'}. "
            "Run again with --resume to restart the track from round 0 (labels in labels.jsonl are reused, not asked again)"
        )

    def _restore(self, step: int, like: TrainState) -> Checkpoint:
        verify_checksums(self.folder / str(step))
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_as_tree(like)), meta=ocp.args.JsonRestore())
        )
        tree, meta = restored["state"], restored["meta"]
        lora = LoRA(params=tree["lora"], rank=like.lora.rank, alpha=like.lora.alpha)
        state = TrainState(lora=lora, opt_state=tree["opt_state"], step=int(tree["step"]))
        baseline = None if meta["baseline_scores"] is None else np.asarray(meta["baseline_scores"], np.float64)
        return Checkpoint(state, meta["history"], [LabelRecord.from_json(row) for row in meta["labels"]], baseline)

    def _set_aside(self, step: int) -> Path:
        aside = self.folder.parent / "damaged" / f"{self.folder.name}-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.folder / str(step)), aside)
        return aside


def _as_tree(state: TrainState) -> dict:
    return {"lora": state.lora.params, "opt_state": state.opt_state, "step": np.asarray(state.step, np.int64)}


def _reason(error: Exception) -> str:
    """Why a step cannot be used, in one short line (orbax's and TensorStore's messages can carry
    a whole spec dump)."""
    if isinstance(error, DamagedCheckpoint):
        return str(error)
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:160]}{'…' if len(first) > 160 else ''}" if first else type(error).__name__


# -- checksums ------------------------------------------------------------------------------------


def write_checksums(step_dir: Path) -> None:
    """`step_dir/checksums.json`: the SHA-256 of each file under `step_dir`, written atomically."""
    sums = {str(file.relative_to(step_dir)): _sha256(file) for file in _files(step_dir)}
    write_atomic(step_dir / CHECKSUMS, json.dumps(sums, indent=1, sort_keys=True))


def verify_checksums(step_dir: Path) -> None:
    """Raise `DamagedCheckpoint` naming the first file under `step_dir` that is missing or differs
    from its checksum, or when the checksums cannot be read (none at all: nothing to check)."""
    try:
        sums = json.loads((step_dir / CHECKSUMS).read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(f"{CHECKSUMS} cannot be read: {error}") from None
    for name, expected in sorted(sums.items()):
        file = step_dir / name
        if not file.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if _sha256(file) != expected:
            raise DamagedCheckpoint(f"{name} differs from what was written (SHA-256 mismatch)")


def _files(step_dir: Path) -> list[Path]:
    return sorted(path for path in step_dir.rglob("*") if path.is_file() and path.name not in (CHECKSUMS, CHECKSUMS + ".tmp"))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
