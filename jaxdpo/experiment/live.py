"""Live metrics (`[log]`): each metrics row, as the run writes it, as TensorBoard scalars and/or in
a Weights & Biases run; one run per track, step = labels collected.

Every numeric field of a row is logged, whatever fields the stages add (`scalars`): the seconds of
a stage ("generation_s") as "seconds/generation", the others under their own name ("eval_reward",
"win_rate", "labels", …); `seed` names the run and is not logged.

A process reports each track's history as restored from its checkpoint first, then one row per
round. What a resumed run writes again:

- TensorBoard: the track's run is rewritten from that history (its old event files replaced by one
  written with `purge_step=0`, so a TensorBoard already showing them drops them too). The history
  the run continues from is the checkpoint's, so a round logged by a process killed before its
  checkpoint, or whose checkpoint was damaged, is recomputed and shows once.
- W&B: the run is resumed under the same id (kept in DIR/wandb/run-ids.json) and a row goes out
  only if its round (the W&B step) is past the run's last step; "labels" is the x-axis of every
  chart. Offline (WANDB_MODE=offline), W&B cannot know the last step, so each process's offline
  folder holds the track's whole history so far: syncing the latest folder of each track sends
  every point once.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

from jaxdpo.config import ExperimentConfig
from jaxdpo.errors import UserError
from jaxdpo.experiment.storage import Track
from jaxdpo.files import write_atomic

NOT_LOGGED = ("seed",)


def scalars(row: dict) -> dict[str, float]:
    """The finite numeric fields of a metrics row, by tag."""
    tags = {}
    for key, value in row.items():
        if key in NOT_LOGGED or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        tags[f"seconds/{key.removesuffix('_s')}" if key.endswith("_s") else key] = float(value)
    return tags


class TensorBoardLog:
    """`DIR/tensorboard/<track>/`: one tensorboardX event file per track and process."""

    def __init__(self, folder: Path):
        self.folder, self.writers, self.written = Path(folder), {}, {}

    def report(self, track: Track, history: list[dict]) -> None:
        from tensorboardX import SummaryWriter

        if track.name not in self.writers:  # the first report of this process: rewrite the track's run
            folder = self.folder / track.name
            for stale in folder.glob("events.out.tfevents.*"):
                stale.unlink()
            self.writers[track.name], self.written[track.name] = SummaryWriter(str(folder), purge_step=0), 0
        writer = self.writers[track.name]
        for row in history[self.written[track.name] :]:
            for tag, value in scalars(row).items():
                writer.add_scalar(tag, value, global_step=row["labels"])
        self.written[track.name] = len(history)
        writer.flush()  # on disk before the next round: a killed run keeps every point it reported

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class WandbLog:
    """One W&B run per track in `project`, grouped by `run.name`, files under `DIR/wandb/`."""

    def __init__(self, project: str, config: ExperimentConfig, out_dir: Path):
        self.project, self.config, self.out_dir, self.runs = project, config, Path(out_dir), {}

    def report(self, track: Track, history: list[dict]) -> None:
        run = self.runs.get(track.name) or self._start(track)
        for row in history:
            if row["round"] >= run.step:
                run.log(scalars(row), step=row["round"], commit=True)

    def _start(self, track: Track):
        import wandb

        try:
            run = wandb.init(
                project=self.project, group=self.config.run.name, name=track.name, id=self._run_id(track),
                resume="allow", dir=str(self.out_dir), config=self.config.to_dict(), reinit="create_new",
            )
        except wandb.errors.Error as error:
            raise UserError(f"log.wandb_project: cannot start the W&B run of {track.name} ({error}); `wandb login`, or set WANDB_MODE=offline") from error
        run.define_metric("labels")
        run.define_metric("*", step_metric="labels")
        self.runs[track.name] = run
        return run

    def _run_id(self, track: Track) -> str:
        """The track's W&B run id: the one it got when the run started, so a resume continues it."""
        path = self.out_dir / "wandb" / "run-ids.json"
        ids = json.loads(path.read_text()) if path.exists() else {}
        if track.name not in ids:
            ids[track.name] = secrets.token_hex(6)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(ids, indent=2))
        return ids[track.name]

    def close(self) -> None:
        for run in self.runs.values():
            run.finish()


class LiveMetrics:
    """The `[log]` destinations of a run (none by default); `report(track, history)` after every
    round, `close()` (or leave the `with` block) when the process stops running tracks."""

    def __init__(self, config: ExperimentConfig, out_dir: Path):
        self.sinks = []
        if config.log.tensorboard:
            self.sinks.append(TensorBoardLog(Path(out_dir) / "tensorboard"))
        if config.log.wandb_project is not None:
            self.sinks.append(WandbLog(config.log.wandb_project, config, out_dir))

    def report(self, track: Track, history: list[dict]) -> None:
        for sink in self.sinks:
            sink.report(track, history)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> LiveMetrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
