"""A track's orbax checkpoints in the run folder, `checkpoints/<track>/<round>/`: the adapter and
its optimizer state, the metrics history, the labels trained on (`Checkpoint`, `TrackCheckpoints`).

With several JAX processes every process saves and restores each checkpoint together: orbax writes
a sharded array from every process that holds a shard, and its JSON metadata from process 0."""

from __future__ import annotations

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
from jaxdpo.models import LoRA
from jaxdpo.multihost import any_process, from_writer

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


class TrackCheckpoints:
    """The orbax checkpoints of one track, step t = round t; the last two are kept. A step that
    cannot be restored is moved to `checkpoints/damaged/` and the one before it is used.
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
        had (read-only checkpoints); `alpha` is the run's `lora.alpha`."""
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

    def restore(self, like: TrainState) -> Checkpoint:
        """The latest checkpoint that restores (`like`: a fresh state, for the structure). With
        several processes, a step that fails on any of them is set aside (by process 0) for all."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            error = None
            try:
                restored = self._restore(step, like)
            except Exception as failure:  # noqa: BLE001 - orbax raises many kinds; the step is set aside, not lost
                error = failure
            if not any_process(error is not None):
                return restored
            aside = from_writer(self._set_aside, step)
            self.manager.reload()
            reason = "it failed on another process" if error is None else f"{type(error).__name__}: {error}"
            _log.warning("checkpoint %s/%d cannot be restored (%s); moved it to %s and fell back to the step before it",
                         self.folder.name, step, reason, aside)
        raise UserError(f"{self.folder}: no checkpoint of this track can be restored (see the messages above); move the folder aside to restart the track")

    def _restore(self, step: int, like: TrainState) -> Checkpoint:
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
