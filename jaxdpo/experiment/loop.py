"""ActiveDPO, Algorithm 1, for any selector of the registry, with durable labels and resume.

A run compares `config.run.methods` over `config.run.seeds`; each (method, seed) is a `Track` of
`config.run.rounds` rounds. Round t of a track (`run_round`):

  1. sample `prompts_per_round` prompts and generate m responses each with π_{θ_{t−1}} (or the
     initial model, for methods whose rule says so), form the C(m, 2) triplets;
  2. compute the pool fields the selector requires (`pool.PRODUCERS`) under θ_{t−1};
  3. select B triplets; ask the oracle; append the labels to `labels.jsonl` (fsync) before
     training reads them;
  4. DPO-train the LoRA (`dpo.train_on`: this round's labels, or all so far; `dpo.reset_lora`:
     restart from the SFT model or continue), evaluate, save a checkpoint, rewrite `metrics.jsonl`.

Every random draw is derived from (seed, purpose, round) — the same prompts and evaluation keys
for every method — and a sampled response's also from its prompt's index in its pool and its
sample index, never from the generation call it falls in, so a run is deterministic whatever its
mesh and `generation.chunk_rows`, and a resumed track continues from its last checkpoint: the
interrupted round is recomputed identically, and labels already in `labels.jsonl` are reused
instead of asked again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from jaxdpo import interrupts
from jaxdpo.config import ExperimentConfig
from jaxdpo.dpo import TrainState, reference_logprobs
from jaxdpo.experiment import folder, memory, storage
from jaxdpo.experiment.evaluation import evaluate
from jaxdpo.experiment.live import LiveMetrics
from jaxdpo.experiment.pool import RoundInputs, build_pool
from jaxdpo.experiment.setup import Setup, build_setup, derive_key, start_devices
from jaxdpo.experiment.stages import sampling, triplets
from jaxdpo.errors import UserError
from jaxdpo.experiment.checkpoints import Checkpoint, TrackCheckpoints
from jaxdpo.experiment.folder import RunLock
from jaxdpo.experiment.storage import LabelLog, LabelRecord, Track
from jaxdpo.models import init_lora
from jaxdpo.multihost import broadcast, check_shared_folder, from_writer, held_by_writer
from jaxdpo.oracles import LabelsPending, PairRequest, Preferences
from jaxdpo.selection import Selector, make_selector
from jaxdpo.sequences import Sequences
from jaxdpo.sharding import shard_params

_log = logging.getLogger("jaxdpo")


class Stages:
    """Seconds per stage of a round, and progress reporting (`progress`: a rich Progress or None).
    The start and end of a stage and each of its progress ticks are safe points (`interrupts.check`)."""

    def __init__(self, progress=None):
        self.progress, self.seconds = progress, {}

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None):
        interrupts.check()
        task = self.progress.add_task(f"  {name}", total=total) if self.progress is not None else None
        start = time.perf_counter()

        def advance(steps: int = 1) -> None:
            interrupts.check()
            if task is not None:
                self.progress.advance(task, steps)

        try:
            yield advance
        finally:
            self.seconds[f"{name}_s"] = round(self.seconds.get(f"{name}_s", 0.0) + time.perf_counter() - start, 3)
            if task is not None:
                self.progress.remove_task(task)
        interrupts.check()


@dataclasses.dataclass
class TrackRun:
    """A track in progress: its selector, the state θ and metrics history so far, every label it
    has (a round's labels are reused when the round is recomputed), the win-rate baseline."""

    setup: Setup
    log: LabelLog
    track: Track
    selector: Selector
    fresh: TrainState
    state: TrainState
    history: list[dict]
    labels: list[LabelRecord]
    baseline_scores: np.ndarray | None

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.state, self.history, [r for r in self.labels if r.round < len(self.history)], self.baseline_scores)


def run(
    config: ExperimentConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress=None, plan: bool | None = None,
    config_file: str | os.PathLike | None = None,
) -> list[dict]:
    """Run (or resume) every track of `config`; returns all metrics rows (also in `metrics.jsonl`).

    Holds the folder's lock throughout (`folder`: what may be a run folder, what may be resumed).
    Before the first round, `plan` (default: on accelerators) checks every stage's memory against
    the device (`memory.plan_memory`; written to `memory-plan.json`). `config_file`, the file
    `config` was read from, is recorded for the resume command. With an asynchronous oracle
    (people), each track goes as far as its labels allow; then every request still open is handed
    over at once and `LabelsPending` is raised with what to do."""
    out_dir = Path(out_dir)
    start_devices(config)
    from_writer(folder.make_out_dir, out_dir, resume=resume)
    with held_by_writer(lambda: RunLock(out_dir)):
        check_shared_folder(out_dir)
        write_config = from_writer(folder.prepare_out_dir, config, out_dir, resume=resume, config_file=config_file)
        setup = build_setup(config, out_dir)
        if plan if plan is not None else jax.default_backend() != "cpu":
            _plan_memory(setup, out_dir)
        if write_config or config_file is not None:
            from_writer(folder.save_config, config, out_dir, config_file)
        log = LabelLog(out_dir / storage.LABELS)
        if from_writer(log.repair):
            _log.warning("%s ended in a line cut short by an interruption; removed it (its label is asked again)", log.path)
        return _run_tracks(setup, log, out_dir, progress)


def _plan_memory(setup: Setup, out_dir: Path) -> None:
    """The memory plan, stage by stage, into `memory-plan.json`; stops at the first that does not fit."""
    limit, plans = memory.device_memory(), []
    for plan in memory.plan_memory(setup):
        memory.log_plan(plan, limit)
        plans.append(plan._asdict())
        from_writer((out_dir / "memory-plan.json").write_text, json.dumps({"limit_bytes": limit, "stages": plans}, indent=2))
        memory.check_memory(plan, limit)


def _run_tracks(setup: Setup, log: LabelLog, out_dir: Path, progress) -> list[dict]:
    config, labels = setup.config, from_writer(log.read)
    histories: dict[str, list[dict]] = {}
    tracks = [Track(method, seed) for method in config.run.methods for seed in config.run.seeds]
    overall = progress.add_task("rounds", total=len(tracks) * (config.run.rounds + 1)) if progress is not None else None

    def on_round(track: Track, history: list[dict]) -> None:
        histories[track.name] = list(history)
        from_writer(storage.write_metrics, out_dir, [row for rows in histories.values() for row in rows])
        from_writer(live.report, track, history)
        if progress is not None:
            progress.update(overall, completed=sum(len(h) for h in histories.values()))

    waiting = False
    with LiveMetrics(config, out_dir) as live:
        for track in tracks:
            if progress is not None:
                progress.update(overall, description=track.name)
            try:
                run_track(setup, track, log, labels=labels, progress=progress, on_round=on_round)
            except LabelsPending:
                waiting = True
    if waiting:
        raise LabelsPending(setup.oracle.submit_pending())
    return [row for rows in histories.values() for row in rows]


def run_track(setup: Setup, track: Track, log: LabelLog, *, labels: list[LabelRecord], progress=None, on_round=None) -> list[dict]:
    """All rounds of one track, from its last checkpoint if there is one. Returns its metrics rows."""
    checkpoints = TrackCheckpoints(log.path.parent, track)
    current = start_track(setup, track, log, checkpoints, labels, progress)
    if on_round:
        on_round(track, current.history)
    for round_ in range(len(current.history), setup.config.run.rounds + 1):
        run_round(current, round_, Stages(progress))
        with interrupts.deferred():
            checkpoints.save(round_, current.checkpoint())
        if on_round:
            on_round(track, current.history)
    return current.history


def start_track(
    setup: Setup, track: Track, log: LabelLog, checkpoints: TrackCheckpoints, labels: list[LabelRecord], progress
) -> TrackRun:
    """A fresh track (round 0: the initial model, evaluated once; its scores are the win-rate
    baseline) or the track at its last checkpoint, with its labels cross-checked (`_reconcile`)."""
    config = setup.config
    lora = init_lora(setup.model, rank=config.lora.rank, alpha=config.lora.alpha, targets=config.lora.targets, key=derive_key(track.seed, "lora"))
    fresh = setup.trainer.init(lora if setup.mesh is None else shard_params(lora, setup.mesh))
    if setup.mesh is not None:  # the optimizer's scalars too: orbax saves only arrays of the mesh across processes
        fresh = fresh.replace(opt_state=shard_params(fresh.opt_state, setup.mesh))
    selector = make_selector(track.method, **config.selection.options.get(track.method, {}))
    mine = [record for record in labels if record.track == track]
    if checkpoints.latest_round() is not None:
        saved = checkpoints.restore(fresh)
        mine = _reconcile(track, log, saved, mine)
        return TrackRun(setup, log, track, selector, fresh, saved.state, saved.history, mine, saved.baseline_scores)
    stages = Stages(progress)
    with stages.stage("eval"):
        initial = evaluate(setup, None, track.seed, 0, None)
    current = TrackRun(setup, log, track, selector, fresh, fresh, [_metrics_row(track, 0, 0, initial, stages)], mine, initial["scores"])
    with interrupts.deferred():
        checkpoints.save(0, current.checkpoint())
    return current


def _reconcile(track: Track, log: LabelLog, saved: Checkpoint, logged: list[LabelRecord]) -> list[LabelRecord]:
    """The track's labels: those its checkpoint trained on (written back to the log where the log
    lost them; a log that disagrees with them is refused), then the log's labels of later rounds."""
    done = len(saved.history)
    by_pick = {(r.round, r.pick): r for r in logged}
    differ = [r for r in saved.labels if (r.round, r.pick) in by_pick and by_pick[(r.round, r.pick)] != r]
    if differ:
        raise UserError(
            f"{log.path} holds labels of {track.name} (round {differ[0].round}, pick {differ[0].pick} and {len(differ) - 1} more) "
            "that differ from the ones its checkpoint trained on; was the file edited? Restore it from a backup"
        )
    lost = [r for r in saved.labels if (r.round, r.pick) not in by_pick]
    if lost:
        from_writer(log.append, lost)
        _log.warning("%s: %d labels of %s were missing; wrote them back from its round-%d checkpoint", log.path, len(lost), track.name, done - 1)
    return saved.labels + [r for r in logged if r.round >= done]


def run_round(current: TrackRun, round_: int, stages: Stages) -> None:
    """Round `round_` of Algorithm 1: generate, build the pool, select, label, train, evaluate."""
    setup, track, config = current.setup, current.track, current.setup.config
    m = config.generation.responses_per_prompt
    previous = [record for record in current.labels if record.round < round_ and record.preferred is not None]
    chosen = np.random.default_rng([track.seed, round_]).choice(len(setup.train.texts), config.data.prompts_per_round, replace=False)
    prompts = setup.train.take(chosen)
    with stages.stage("generation"):
        responses = setup.generate(
            prompts, lora=None if current.selector.policy == "initial" else current.state.lora,
            key=derive_key(track.seed, "generate", round_), **sampling(config, "responses")._asdict(),
        )
    pairs = triplets(config.data.prompts_per_round, m)
    labeled, labeled_pairs = storage.training_data(previous) if previous else (None, np.zeros((0, 2), np.int32))
    inputs = RoundInputs(setup, current.state.lora, prompts, responses, pairs, labeled, labeled_pairs, derive_key(track.seed, "entropy", round_))
    pool = build_pool(current.selector, inputs, stages)
    with stages.stage("selection"):
        picks = np.asarray(current.selector(pool, config.selection.batch_size, key=derive_key(track.seed, "select", round_)).indices)
    picks = broadcast(picks)  # process 0's picks are the run's (every process computed them from the same values)
    labeled_now = [r for r in _label(current, round_, picks, prompts.texts, responses, pairs, stages) if r.preferred is not None]
    losses = _train(current, labeled_now if config.dpo.train_on == "new" else previous + labeled_now, round_, stages)
    with stages.stage("eval"):
        result = evaluate(setup, current.state.lora, track.seed, round_, current.baseline_scores)
    loss = None if losses is None else float(losses[-1])
    current.history.append(_metrics_row(track, round_, len(previous) + len(labeled_now), result, stages, train_loss=loss))


def _label(current: TrackRun, round_: int, picks: np.ndarray, prompt_texts, responses: Sequences, pairs: np.ndarray, stages: Stages) -> list[LabelRecord]:
    """The picked triplets' labels, in pick order: those of this round already in the log (an
    interrupted round, recomputed identically; checked to be the same triplets) are reused, the
    others are asked of the oracle and appended to the log (fsync) before anything trains on them."""
    setup, track = current.setup, current.track
    m = setup.config.generation.responses_per_prompt
    texts = setup.response_texts(responses)
    prompt_len = int(responses.input_ids.shape[1] - setup.max_new_tokens)
    unlabeled = []
    for pick, candidate in enumerate(picks):
        a, b = (int(i) for i in pairs[candidate])
        unlabeled.append(dict(
            method=track.method, seed=track.seed, round=round_, pick=pick, candidate=int(candidate), prompt=prompt_texts[a // m],
            response_a=texts[a], response_b=texts[b], prompt_len=prompt_len,
            input_ids_a=tuple(responses.input_ids[a].tolist()), attention_mask_a=tuple(responses.attention_mask[a].tolist()),
            input_ids_b=tuple(responses.input_ids[b].tolist()), attention_mask_b=tuple(responses.attention_mask[b].tolist()),
        ))
    logged = {r.pick: r for r in current.labels if r.round == round_}
    for pick, row in enumerate(unlabeled):
        if pick in logged and (logged[pick].candidate, logged[pick].response_a, logged[pick].response_b) != (row["candidate"], row["response_a"], row["response_b"]):
            raise RuntimeError(
                f"{storage.LABELS} holds a label of {track.name} round {round_} pick {pick} for another triplet than the resumed "
                "run selects; the run is not deterministic on this machine (different hardware or library versions?)"
            )
    ask = [row for pick, row in enumerate(unlabeled) if pick not in logged]
    if ask:
        with stages.stage("oracle"):
            requests = [
                PairRequest(track.request_id(round_, row["pick"]), track.name, round_, row["prompt"], row["response_a"], row["response_b"])
                for row in ask
            ]
            prefs = setup.oracle.label(requests, seed=zlib.crc32(f"{track.name}/{round_}".encode()))
        answered = [
            LabelRecord(**row, preferred=_preferred(prefs, i), score_a=_score(prefs.scores_a, i), score_b=_score(prefs.scores_b, i),
                        votes=_at(prefs.votes, i), no_preference=_at(prefs.no_preference, i), left=_at(prefs.left, i))
            for i, row in enumerate(ask)
        ]
        with interrupts.deferred():  # paid for: never a line cut short by Ctrl-C
            from_writer(current.log.append, answered)
        current.labels.extend(answered)
        logged.update({r.pick: r for r in answered})
    return [logged[pick] for pick in range(len(unlabeled))]


def _preferred(prefs: Preferences, i: int) -> str | None:
    if prefs.valid is not None and not prefs.valid[i]:
        return None
    return "a" if prefs.prefer_a[i] else "b"


def _score(scores: np.ndarray | None, i: int) -> float | None:
    return None if scores is None else float(scores[i])


def _at(values: tuple | None, i: int):
    """Answer i's entry of an optional per-answer field of `Preferences`."""
    return None if values is None else values[i]


def _train(current: TrackRun, records: list[LabelRecord], round_: int, stages: Stages) -> np.ndarray | None:
    """DPO (Eq. 2) on `records`, from θ_{t−1} (or the initial adapter with `dpo.reset_lora`), with a
    fresh optimizer state; updates `current.state` and returns the loss of every step (None, and
    θ unchanged, when no record has a preference: every pair of the round was a tie or skipped)."""
    if not records:
        return None
    setup, config = current.setup, current.setup.config
    data, pairs = storage.training_data(records)
    start = current.fresh if config.dpo.reset_lora else dataclasses.replace(current.state, opt_state=current.fresh.opt_state, step=0)
    steps = setup.trainer.epochs * setup.trainer.steps_per_epoch(len(pairs))
    with stages.stage("training", total=steps) as advance:
        reference = reference_logprobs(setup.model, data, **setup.logprob_chunking)
        current.state, losses = setup.trainer.train(
            setup.model, start, data, pairs, reference, seed=zlib.crc32(f"{current.track.name}/train/{round_}".encode()),
            callback=lambda step, loss: advance(), mesh=setup.mesh,
        )
    return losses


def _metrics_row(track: Track, round_: int, labels: int, result: dict, stages: Stages, **extra) -> dict:
    row = dict(method=track.method, seed=track.seed, round=round_, labels=labels)
    row.update({key: value for key, value in result.items() if key != "scores"}, **extra, **stages.seconds)
    return row
