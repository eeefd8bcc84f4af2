"""ActiveDPO, Algorithm 1, for any selector of the registry, with durable labels and resume.

A run compares `config.run.methods` over `config.run.seeds`; each (method, seed) is a *track* of
`config.run.rounds` rounds. Round t of a track:

  1. sample `prompts_per_round` prompts, generate m responses each with π_{θ_{t−1}} (APO: with the
     initial model, as in its paper, which does not regenerate), form the C(m, 2) triplets;
  2. compute what the selector needs under θ_{t−1}: gradient features g (and the prior φ of every
     triplet labeled so far, recomputed under θ_{t−1}), implicit-reward margins, APLP entropies
     (from `generation.entropy_samples` extra samples per prompt),
     APO's frozen-model features;
  3. select B triplets; ask the oracle; append the labels to `labels.jsonl` (fsync) — before
     training uses them;
  4. DPO-train the LoRA (`dpo.train_on`: this round's labels, or all so far; `dpo.reset_lora`:
     restart from the SFT model or continue), evaluate (mean oracle reward of responses to held-out
     prompts, win-rate against the initial model), save an orbax checkpoint, rewrite
     `metrics.jsonl`.

Every random draw is derived from (seed, round) — the same prompts and evaluation keys for every
method — so a run is deterministic, and `resume=True` continues from each track's last checkpoint:
the interrupted round is recomputed identically, and labels already in `labels.jsonl` are reused
instead of asked again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxdpo import embedded
from jaxdpo.config import ExperimentConfig
from jaxdpo.data import load_prompts, tokenize_prompts
from jaxdpo.dpo import DpoTrainer, batched_logprobs, reference_logprobs
from jaxdpo.sequences import Sequences, pad_rows
from jaxdpo.features import gradient_features
from jaxdpo.models import Decoder, LoRA, init_lora, load_pretrained, load_reward_model, save_pretrained
from jaxdpo.oracles import (
    HumanOracle,
    Oracle,
    reward_model_oracle,
    synthetic_oracle,
    torch_reward_model_oracle,
    write_jsonl_atomic,
)
from jaxdpo.sampling import generate
from jaxdpo.selection import SelectionPool, make_selector

LABELS, METRICS, CONFIG = "labels.jsonl", "metrics.jsonl", "config.json"


@dataclasses.dataclass(frozen=True)
class Prompts:
    texts: tuple[str, ...]
    input_ids: np.ndarray
    attention_mask: np.ndarray


@dataclasses.dataclass
class Setup:
    """What every track shares: the initial model, tokenizer, prompt pools, oracle, trainer."""

    config: ExperimentConfig
    model: Decoder
    tokenizer: Any
    train: Prompts
    eval: Prompts
    oracle: Oracle
    trainer: DpoTrainer
    max_new_tokens: int


# -- setup ---------------------------------------------------------------------------------------


def _prompts(tokenizer, texts, max_tokens: int) -> Prompts:
    tokens = tokenize_prompts(tokenizer, texts, max_tokens=max_tokens, truncate=True)
    return Prompts(tuple(texts[i] for i in tokens.kept), tokens.input_ids, tokens.attention_mask)


def _initial_model(config: ExperimentConfig, out_dir: Path):
    """(model, tokenizer): the embedded SFT model (trained once, saved as an HF checkpoint in
    `out_dir/sft-model` and loaded from there on resume) or an HF checkpoint."""
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    if config.model.path == "embedded":
        folder = out_dir / "sft-model"
        if not (folder / "config.json").exists():
            save_pretrained(embedded.train_sft(), folder)
        return load_pretrained(folder, dtype=dtype, remat=config.model.remat), embedded.build_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return load_pretrained(config.model.path, dtype=dtype, remat=config.model.remat), tokenizer


def _prompt_pools(config: ExperimentConfig, tokenizer) -> tuple[Prompts, Prompts]:
    data = config.data
    if data.source == "embedded":
        pool = embedded.sample_prompts(np.random.default_rng(embedded.TASK_SEED), data.max_prompts or 4096)
        held_out = embedded.sample_prompts(np.random.default_rng(embedded.TASK_SEED + 1), config.eval.prompts)
        return _prompts(tokenizer, pool, embedded.PROMPT_TOKENS), _prompts(tokenizer, held_out, embedded.PROMPT_TOKENS)
    texts = load_prompts(data.source, data.path, data.split)
    if data.eval_split is not None:
        held_out = load_prompts(data.source, data.path, data.eval_split)[: config.eval.prompts]
    else:
        texts, held_out = texts[: -config.eval.prompts], texts[-config.eval.prompts :]
    texts = texts[: data.max_prompts] if data.max_prompts else texts
    train, evaluation = _prompts(tokenizer, texts, data.max_prompt_tokens), _prompts(tokenizer, held_out, data.max_prompt_tokens)
    if len(train.texts) < data.prompts_per_round:
        raise ValueError(f"data: only {len(train.texts)} usable prompts, below data.prompts_per_round={data.prompts_per_round}")
    return train, evaluation


def _oracle(config: ExperimentConfig, tokenizer, out_dir: Path) -> Oracle:
    kind, mode = config.oracle.kind, config.oracle.mode
    if kind == "synthetic":
        return synthetic_oracle(embedded.reward, mode=mode)
    if kind == "reward_model":
        from transformers import AutoTokenizer

        return reward_model_oracle(load_reward_model(config.oracle.path), AutoTokenizer.from_pretrained(config.oracle.path), mode=mode)
    if kind == "torch_reward_model":
        return torch_reward_model_oracle(config.oracle.path, mode=mode)
    return HumanOracle(out_dir / "human")


def build_setup(config: ExperimentConfig, out_dir: Path) -> Setup:
    model, tokenizer = _initial_model(config, out_dir)
    train, evaluation = _prompt_pools(config, tokenizer)
    trainer = DpoTrainer.from_config(config.dpo)
    max_new = embedded.MAX_NEW_TOKENS if config.data.source == "embedded" else config.generation.max_new_tokens
    return Setup(config, model, tokenizer, train, evaluation, _oracle(config, tokenizer, out_dir), trainer, max_new)


# -- one round's pool ----------------------------------------------------------------------------


def _key(seed: int, *path: int | str) -> jax.Array:
    key = jax.random.key(seed)
    for part in path:
        key = jax.random.fold_in(key, zlib.crc32(part.encode()) if isinstance(part, str) else part)
    return key


def triplets(num_prompts: int, m: int) -> np.ndarray:
    """`[num_prompts · C(m, 2), 2]` response-row pairs: prompt i's responses are rows i·m … i·m + m − 1."""
    within = np.asarray(list(itertools.combinations(range(m), 2)), np.int32)
    return (np.arange(num_prompts, dtype=np.int32)[:, None, None] * m + within[None]).reshape(-1, 2)


def _in_buckets(fn, sequences: Sequences, bucket: int) -> np.ndarray:
    """`fn(rows)` over rows padded to a multiple of `bucket` and run `bucket` at a time (one
    compiled shape, whatever the number of rows)."""
    n = sequences.input_ids.shape[0]
    total = math.ceil(n / bucket) * bucket
    padded = Sequences(*(pad_rows(np.asarray(x), total) for x in sequences))
    out = [np.asarray(fn(Sequences(*(x[i : i + bucket] for x in padded)))) for i in range(0, total, bucket)]
    return np.concatenate(out)[:n]


def _features(setup: Setup, lora: LoRA, sequences: Sequences, bucket: int) -> np.ndarray:
    f = setup.config.features
    return _in_buckets(
        lambda rows: gradient_features(
            setup.model, lora, rows.input_ids, rows.response_mask, attention_mask=rows.attention_mask,
            beta=setup.config.dpo.beta, dim=f.dim, seed=f.seed, normalize=f.normalize, method=f.method, chunk_size=f.chunk_size,
            projection_batch=f.projection_batch,
        ),
        sequences,
        bucket,
    )


@jax.jit
def _last_hidden(model, ids, attention):
    hidden = model.hidden_states(ids, attention_mask=attention)
    last = jnp.argmax(jnp.arange(ids.shape[1]) * (attention > 0), axis=1)
    return hidden[jnp.arange(ids.shape[0]), last].astype(jnp.float32)


def _apo_features(setup: Setup, sequences: Sequences, bucket: int) -> np.ndarray:
    """APO's frozen-model features: the initial model's last-token hidden state of each response."""
    return _in_buckets(lambda rows: _last_hidden(setup.model, rows.input_ids, rows.attention_mask), sequences, bucket)


def _sequences(generation: Sequences) -> Sequences:
    return generation.to_host()


def _response_texts(tokenizer, sequences: Sequences) -> list[str]:
    return [tokenizer.decode(ids[mask == 1]) for ids, mask in zip(sequences.input_ids, sequences.response_mask)]


# -- durable state -------------------------------------------------------------------------------


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append and fsync: the rows are on disk when this returns."""
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_labels(path: Path) -> list[dict]:
    """Rows of `labels.jsonl`; a torn last line (a kill mid-write) is ignored, other bad lines raise."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
    return rows


def _labeled_sequences(rows: list[dict]) -> tuple[Sequences, np.ndarray]:
    """(sequences [2L, s], pairs [L, 2] of (chosen, rejected) rows) from label rows."""
    ids, attention, response = [], [], []
    for row in rows:
        for side in ("a", "b"):
            a = np.asarray(row[f"attention_mask_{side}"], np.int32)
            ids.append(np.asarray(row[f"input_ids_{side}"], np.int32))
            attention.append(a)
            response.append(np.where(np.arange(len(a)) >= row["prompt_len"], a, 0))
    prefer_a = np.asarray([row["preferred"] == "a" for row in rows])
    first = 2 * np.arange(len(rows))
    pairs = np.stack([np.where(prefer_a, first, first + 1), np.where(prefer_a, first + 1, first)], axis=1)
    return Sequences(np.stack(ids), np.stack(response), np.stack(attention)), pairs


@dataclasses.dataclass
class Track:
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"


def _checkpoints(out_dir: Path, track: Track) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (out_dir / "checkpoints" / track.name).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )


# -- the loop ------------------------------------------------------------------------------------


class Stages:
    """Seconds per stage of a round, and progress reporting (`progress`: a rich Progress or None)."""

    def __init__(self, progress=None):
        self.progress, self.seconds = progress, {}

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None):
        task = self.progress.add_task(f"  {name}", total=total) if self.progress is not None else None
        start = time.perf_counter()
        try:
            yield (lambda advance=1: self.progress.advance(task, advance)) if task is not None else (lambda advance=1: None)
        finally:
            self.seconds[f"{name}_s"] = round(self.seconds.get(f"{name}_s", 0.0) + time.perf_counter() - start, 3)
            if task is not None:
                self.progress.remove_task(task)


def _evaluate(setup: Setup, lora: LoRA | None, seed: int, round_: int, initial_scores: np.ndarray | None) -> dict:
    """Mean oracle reward (± standard error) of responses to the held-out prompts, and the
    win-rate against the initial model's responses to the same prompts (ties count half)."""
    e = setup.config.eval
    generation = generate(
        setup.model, setup.eval.input_ids, setup.eval.attention_mask, lora=lora, max_new_tokens=setup.max_new_tokens,
        temperature=e.temperature, num_samples=e.samples_per_prompt, key=_key(seed, "eval", round_),
        eos_token_id=setup.tokenizer.eos_token_id, pad_token_id=setup.tokenizer.pad_token_id,
    )
    if not hasattr(setup.oracle, "scores"):  # people label pairs; they do not score held-out answers
        return dict(eval_reward=math.nan, eval_reward_stderr=math.nan, win_rate=math.nan, scores=None)
    prompts = [p for p in setup.eval.texts for _ in range(e.samples_per_prompt)]
    scores = setup.oracle.scores(prompts, _response_texts(setup.tokenizer, _sequences(generation)))
    baseline = scores if initial_scores is None else initial_scores
    win = float(np.mean((scores > baseline) + 0.5 * (scores == baseline)))
    return dict(
        eval_reward=float(scores.mean()), eval_reward_stderr=float(scores.std(ddof=1) / math.sqrt(len(scores))),
        win_rate=win, scores=scores,
    )


def _prompt_entropy(setup: Setup, lora: LoRA, prompts: tuple[np.ndarray, np.ndarray], key: jax.Array) -> np.ndarray:
    """APLP's predictive entropy of each prompt: the mean of −log π(y|x) over
    `generation.entropy_samples` samples y drawn at temperature 1 (Muldrew et al., §4.1)."""
    n = setup.config.generation.entropy_samples
    samples = generate(
        setup.model, *prompts, lora=lora, max_new_tokens=setup.max_new_tokens, temperature=1.0, num_samples=n, key=key,
        eos_token_id=setup.tokenizer.eos_token_id, pad_token_id=setup.tokenizer.pad_token_id,
    )
    return -batched_logprobs(setup.model, lora, _sequences(samples)).reshape(-1, n).mean(axis=1)


def _pool(setup: Setup, selector, lora: LoRA, sequences: Sequences, pairs: np.ndarray, labeled: list[dict], stages: Stages, *, prompts, key):
    """The SelectionPool with exactly the fields `selector` requires (`prompts`: the round's
    (input_ids, attention_mask); `key` draws APLP's entropy samples)."""
    config, m = setup.config, setup.config.generation.responses_per_prompt
    bucket = sequences.input_ids.shape[0]
    fields: dict[str, Any] = dict(num_candidates=len(pairs), pairs=jnp.asarray(pairs))
    if {"features", "prior"} & selector.requires:
        with stages.stage("features"):
            fields["features"] = jnp.asarray(_features(setup, lora, sequences, bucket))
            if labeled:
                prev, prev_pairs = _labeled_sequences(labeled)
                g = _features(setup, lora, prev, bucket)
                fields["prior"] = jnp.asarray(g[prev_pairs[:, 0]] - g[prev_pairs[:, 1]])
    if "margins" in selector.requires:
        with stages.stage("rewards"):
            policy = batched_logprobs(setup.model, lora, sequences)
            reward = config.dpo.beta * (policy - reference_logprobs(setup.model, sequences))
            fields["margins"] = jnp.asarray(reward[pairs[:, 0]] - reward[pairs[:, 1]])
    if "prompt_entropy" in selector.requires:
        with stages.stage("entropy"):
            fields["prompt_entropy"] = jnp.asarray(_prompt_entropy(setup, lora, prompts, key))
            fields["pair_prompt_ids"] = jnp.asarray(pairs[:, 0] // m)
    if "apo_features" in selector.requires:
        with stages.stage("features"):
            fields["apo_features"] = jnp.asarray(_apo_features(setup, sequences, bucket))
            if labeled:
                prev, prev_pairs = _labeled_sequences(labeled)
                h = _apo_features(setup, prev, bucket)
                fields["apo_prior"] = jnp.asarray(h[prev_pairs[:, 0]] - h[prev_pairs[:, 1]])
    return SelectionPool(**fields)


def _label_rows(setup: Setup, track: Track, round_: int, picks, sequences: Sequences, pairs, prompt_texts, stages: Stages, reuse: list[dict]):
    """Label rows of the picked triplets: reused from `labels.jsonl` if this round was labeled
    before an interruption (checked to be the same triplets), else asked of the oracle."""
    m = setup.config.generation.responses_per_prompt
    texts = _response_texts(setup.tokenizer, sequences)
    rows = []
    for pick, candidate in enumerate(picks):
        a, b = (int(i) for i in pairs[candidate])
        rows.append(dict(
            method=track.method, seed=track.seed, round=round_, pick=pick, candidate=int(candidate),
            prompt=prompt_texts[a // m], response_a=texts[a], response_b=texts[b],
            prompt_len=int(sequences.input_ids.shape[1] - setup.max_new_tokens),
            input_ids_a=sequences.input_ids[a].tolist(), attention_mask_a=sequences.attention_mask[a].tolist(),
            input_ids_b=sequences.input_ids[b].tolist(), attention_mask_b=sequences.attention_mask[b].tolist(),
        ))
    if reuse:
        same = [(r["candidate"], r["response_a"], r["response_b"]) for r in reuse] == [
            (r["candidate"], r["response_a"], r["response_b"]) for r in rows
        ]
        if not same:
            raise RuntimeError(
                f"{LABELS} holds labels of {track.name} round {round_} for other triplets than the resumed run selects; "
                "the run is not deterministic on this machine (different hardware or library versions?)"
            )
        return reuse
    with stages.stage("oracle"):
        prefs = setup.oracle.label(
            [r["prompt"] for r in rows], [r["response_a"] for r in rows], [r["response_b"] for r in rows],
            seed=zlib.crc32(f"{track.name}/{round_}".encode()), request_id=f"{track.name}-round{round_:03d}",
        )
    for i, row in enumerate(rows):
        row["preferred"] = "a" if prefs.prefer_a[i] else "b"
        if prefs.scores_a is not None:
            row["score_a"], row["score_b"] = float(prefs.scores_a[i]), float(prefs.scores_b[i])
    return rows


def run_track(setup: Setup, track: Track, out_dir: Path, *, labels: list[dict], stages_factory=Stages, on_round=None) -> list[dict]:
    """All rounds of one (method, seed), from its last checkpoint if there is one. Returns its metrics rows."""
    config = setup.config
    selector = make_selector(track.method, **config.selection.options.get(track.method, {}))
    initial_lora = init_lora(setup.model, rank=config.lora.rank, alpha=config.lora.alpha, targets=config.lora.targets, key=_key(track.seed, "lora"))
    manager = _checkpoints(out_dir, track)
    fresh = setup.trainer.init(initial_lora)
    stages = stages_factory()
    with stages.stage("eval"):
        initial = _evaluate(setup, None, track.seed, 0, None)  # round 0: the initial model, and the win-rate baseline
    initial_scores = initial["scores"]
    if manager.latest_step() is None:
        history = [_metrics_row(track, 0, 0, initial, stages)]
        state = fresh
        _save(manager, 0, state, history)
    else:
        restored = manager.restore(
            manager.latest_step(),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(_as_tree(fresh)), meta=ocp.args.JsonRestore()),
        )
        state = dataclasses.replace(fresh, **_from_tree(restored["state"], initial_lora))
        history = restored["meta"]["history"]
    if on_round:
        on_round(track, history)
    mine = [r for r in labels if r["method"] == track.method and r["seed"] == track.seed]
    m, prompts_per_round = config.generation.responses_per_prompt, config.data.prompts_per_round
    for round_ in range(len(history), config.run.rounds + 1):
        stages = stages_factory()
        previous = [r for r in mine if r["round"] < round_]
        chosen_prompts = np.random.default_rng([track.seed, round_]).choice(len(setup.train.texts), prompts_per_round, replace=False)
        round_prompts = (setup.train.input_ids[chosen_prompts], setup.train.attention_mask[chosen_prompts])
        with stages.stage("generation"):
            generation = generate(
                setup.model, *round_prompts,
                lora=None if selector.name == "apo" else state.lora, max_new_tokens=setup.max_new_tokens,
                temperature=config.generation.temperature, top_p=config.generation.top_p, top_k=config.generation.top_k,
                num_samples=m, key=_key(track.seed, "generate", round_),
                eos_token_id=setup.tokenizer.eos_token_id, pad_token_id=setup.tokenizer.pad_token_id,
            )
            sequences = _sequences(generation)
        pairs = triplets(prompts_per_round, m)
        pool = _pool(setup, selector, state.lora, sequences, pairs, previous, stages, prompts=round_prompts, key=_key(track.seed, "entropy", round_))
        with stages.stage("selection"):
            picks = np.asarray(selector(pool, config.selection.batch_size, key=_key(track.seed, "select", round_)).indices)
        reuse = [r for r in mine if r["round"] == round_]
        rows = _label_rows(setup, track, round_, picks, sequences, pairs, [setup.train.texts[i] for i in chosen_prompts], stages, reuse)
        if not reuse:
            append_jsonl(out_dir / LABELS, rows)  # durable before training uses them
            mine.extend(rows)
        train_rows = rows if config.dpo.train_on == "new" else previous + rows
        data, train_pairs = _labeled_sequences(train_rows)
        start = fresh if config.dpo.reset_lora else dataclasses.replace(state, opt_state=fresh.opt_state, step=0)
        steps = setup.trainer.epochs * setup.trainer.steps_per_epoch(len(train_pairs))
        with stages.stage("training", total=steps) as advance:
            ref = reference_logprobs(setup.model, data)
            state, losses = setup.trainer.train(
                setup.model, start, data, train_pairs, ref, seed=zlib.crc32(f"{track.name}/train/{round_}".encode()),
                callback=lambda step, loss: advance(),
            )
        with stages.stage("eval"):
            result = _evaluate(setup, state.lora, track.seed, round_, initial_scores)
        history.append(_metrics_row(track, round_, len(previous) + len(rows), result, stages, train_loss=float(losses[-1])))
        _save(manager, round_, state, history)
        if on_round:
            on_round(track, history)
    return history


def _metrics_row(track: Track, round_: int, labels: int, result: dict, stages: Stages, **extra) -> dict:
    row = dict(method=track.method, seed=track.seed, round=round_, labels=labels)
    row.update({k: v for k, v in result.items() if k != "scores"}, **extra, **stages.seconds)
    return row


def _as_tree(state) -> dict:
    return {"lora": state.lora.params, "opt_state": state.opt_state, "step": np.asarray(state.step, np.int64)}


def _from_tree(tree: dict, like: LoRA) -> dict:
    lora = LoRA(params=tree["lora"], rank=like.rank, alpha=like.alpha)
    return dict(lora=lora, opt_state=tree["opt_state"], step=int(tree["step"]))


def _save(manager: ocp.CheckpointManager, round_: int, state, history: list[dict]) -> None:
    manager.save(round_, args=ocp.args.Composite(state=ocp.args.StandardSave(_as_tree(state)), meta=ocp.args.JsonSave({"history": history})))
    manager.wait_until_finished()


def prepare_out_dir(config: ExperimentConfig, out_dir: Path, *, resume: bool) -> None:
    """Create `out_dir` for a new run, or check that a resumed run has the same config."""
    saved = out_dir / CONFIG
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
    out_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(config.to_dict(), indent=2))


def write_metrics(out_dir: Path, histories: dict[str, list[dict]]) -> None:
    write_jsonl_atomic(out_dir / METRICS, [row for history in histories.values() for row in history])


def run(config: ExperimentConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress=None) -> list[dict]:
    """Run (or resume) every track of `config`; returns all metrics rows (also in `metrics.jsonl`)."""
    out_dir = Path(out_dir)
    prepare_out_dir(config, out_dir, resume=resume)
    setup = build_setup(config, out_dir)
    labels = read_labels(out_dir / LABELS)
    histories: dict[str, list[dict]] = {}

    def on_round(track, history):
        histories[track.name] = list(history)
        write_metrics(out_dir, histories)

    tracks = [Track(method, seed) for method in config.run.methods for seed in config.run.seeds]
    overall = progress.add_task("rounds", total=len(tracks) * (config.run.rounds + 1)) if progress is not None else None
    for track in tracks:
        if progress is not None:
            progress.update(overall, description=f"{track.name}")

        def report(track, history, _overall=overall):
            on_round(track, history)
            if progress is not None:
                progress.update(_overall, completed=sum(len(h) for h in histories.values()))

        run_track(setup, track, out_dir, labels=labels, stages_factory=lambda: Stages(progress), on_round=report)
    return [row for history in histories.values() for row in history]
