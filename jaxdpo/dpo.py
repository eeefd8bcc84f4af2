"""DPO (paper Eq. 2) on the LoRA parameters only, with optax.

The data of a round are sequences (prompt + response, as `generate` lays them out) and `pairs`
`[n, 2]` of (chosen, rejected) row indices. Reference log-probs come from the same model with
`lora=None`; they are computed once per round (`reference_logprobs`) and passed to `train`.

One jitted optimizer step per trainer: every micro-batch has the same shape (the last one is
padded with zero-weight pairs), gradient accumulation is a `lax.scan` inside the step, and the
learning rate is an optimizer hyperparameter set from Python each step (`optax.inject_hyperparams`),
so nothing recompiles between rounds or when the schedule or the number of labels changes.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, Int

from jaxdpo import checks
from jaxdpo.models import LoRA
from jaxdpo.rewards import sequence_logprobs
from jaxdpo.sequences import Sequences, map_in_chunks, response_window
from jaxdpo.sharding import put_rows


def dpo_loss(
    policy_chosen: Float[ArrayLike, " n"],
    policy_rejected: Float[ArrayLike, " n"],
    ref_chosen: Float[ArrayLike, " n"],
    ref_rejected: Float[ArrayLike, " n"],
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Float[Array, " n"]:
    """Per-pair DPO loss (Eq. 2): −log σ(h) with h = β[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)].

    `label_smoothing` ε assumes labels flip with probability ε (conservative DPO):
    −(1 − ε) log σ(h) − ε log σ(−h)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin) - label_smoothing * jax.nn.log_sigmoid(-margin)


@struct.dataclass
class TrainState:
    """The adapter being trained, its optimizer state and the number of optimizer steps taken."""

    lora: LoRA
    opt_state: optax.OptState
    step: int = 0


@partial(jax.jit, static_argnames="window")
def chunk_logprobs(model, lora, rows: Sequences, window: int) -> Float[Array, " r"]:
    """The jitted program behind `batched_logprobs`: `sequence_logprobs` of one chunk of rows,
    reading `window` positions per row."""
    return sequence_logprobs(model, lora, rows.input_ids, rows.response_mask, attention_mask=rows.attention_mask, window=window)


def batched_logprobs(model, lora: LoRA | None, sequences: Sequences, *, chunk_size: int = 16, mesh: Mesh | None = None) -> np.ndarray:
    """`sequence_logprobs` of every row, one call per `chunk_size` rows (the last chunk padded), so
    memory is bounded by a chunk and one compiled program serves every pool size; with a `mesh`,
    each chunk's rows are split over its "data" axis (`chunk_size` must divide by it)."""
    sequences.check()
    host = sequences.to_host()
    window = response_window(host.response_mask)
    return map_in_chunks(lambda rows: chunk_logprobs(model, lora, put_rows(rows, mesh), window), host, chunk_size)


def reference_logprobs(model, sequences: Sequences, *, chunk_size: int = 16, mesh: Mesh | None = None) -> np.ndarray:
    """log π_ref of every row: the model without an adapter. Compute once per round and cache."""
    return batched_logprobs(model, None, sequences, chunk_size=chunk_size, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class DpoTrainer:
    """DPO over LoRA parameters: `init(lora)` → `TrainState`, `train(state, ...)` → (state, losses).

    `schedule`: "constant", "linear" (decay to 0 over the round's steps) or "cosine", after
    `warmup_steps` of linear warm-up. `batch_size` pairs per micro-batch, `grad_accum` micro-batches
    per optimizer step. `nll_weight` λ > 0 adds λ times the chosen response's per-token negative
    log-likelihood to each pair's loss (RPO, Pang et al. 2024): it keeps probability mass on
    responses like the chosen ones, where plain DPO (λ = 0, the paper's) can push it onto tokens no
    labeled response contains. The NLL is averaged over each pair's own chosen tokens, then over
    pairs; TRL's `rpo_alpha` instead averages over all chosen tokens of the batch, which weights
    long responses more — the two agree when the chosen responses have equal lengths."""

    beta: float = 0.1
    learning_rate: float = 1e-4
    epochs: int = 4
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    schedule: str = "constant"
    nll_weight: float = 0.0

    def __post_init__(self):
        checks.require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        checks.require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            checks.require(isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
        checks.require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        checks.require(self.nll_weight >= 0, f"nll_weight must be >= 0, got {self.nll_weight}")
        checks.require(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        checks.require(
            self.schedule in ("constant", "linear", "cosine"),
            f"schedule must be 'constant', 'linear' or 'cosine', got {self.schedule!r}",
        )

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return optax.inject_hyperparams(optax.adamw)(learning_rate=self.learning_rate, weight_decay=self.weight_decay)

    def init(self, lora: LoRA) -> TrainState:
        return TrainState(lora=lora, opt_state=self.optimizer.init(lora), step=0)

    def learning_rate_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimizer step `step` (0-based) of a round of `total_steps`."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return self.learning_rate
        progress = (step - self.warmup_steps) / max(total_steps - self.warmup_steps, 1)
        if self.schedule == "linear":
            return self.learning_rate * (1.0 - progress)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))

    def steps_per_epoch(self, num_pairs: int) -> int:
        return math.ceil(num_pairs / (self.batch_size * self.grad_accum))

    def train(
        self,
        model,
        state: TrainState,
        sequences: Sequences,
        pairs: Int[ArrayLike, "n 2"],
        ref_logprobs: Float[ArrayLike, " r"],
        *,
        seed: int,
        callback=None,
        mesh: Mesh | None = None,
    ) -> tuple[TrainState, np.ndarray]:
        """`epochs` passes over the (chosen, rejected) `pairs`, shuffled per epoch from `seed`.

        Returns the new state and the mean loss of every optimizer step; `callback(step, loss)`
        is called after each (progress bars). With a `mesh`, each micro-batch's 2·batch_size rows
        are split over its "data" axis (and the adapter may be split over "model")."""
        sequences.check()
        pairs = np.asarray(pairs)
        checks.check_ndim("pairs", pairs, 2, "[n, 2] (chosen, rejected)")
        checks.require(pairs.shape[1] == 2 and len(pairs) >= 1, f"pairs must be [n >= 1, 2], got {pairs.shape}")
        checks.check_index_range("pairs", pairs, sequences.input_ids.shape[0], "sequences")
        checks.check_shape("ref_logprobs", ref_logprobs, (sequences.input_ids.shape[0],))
        checks.check_finite("ref_logprobs", ref_logprobs)
        rng = np.random.default_rng(seed)
        per_step = self.batch_size * self.grad_accum
        total = self.epochs * self.steps_per_epoch(len(pairs))
        host = Sequences(*(np.asarray(x) for x in sequences))
        window = response_window(host.response_mask)
        ref = np.asarray(ref_logprobs, np.float32)
        losses = []
        for _ in range(self.epochs):
            order = rng.permutation(len(pairs))
            for start in range(0, len(order), per_step):
                rows = order[start : start + per_step]
                weights = np.zeros(per_step, np.float32)
                weights[: len(rows)] = 1.0
                # gather this step's pairs on the host: [accum, 2·batch, s], chosen then rejected, padded with
                # real pairs of weight 0, so the step's shapes never depend on how many labels there are
                picked = pairs[np.resize(rows, per_step)].reshape(self.grad_accum, self.batch_size, 2).transpose(0, 2, 1)
                picked = picked.reshape(self.grad_accum, 2 * self.batch_size)
                opt_state = _set_learning_rate(state.opt_state, self.learning_rate_at(state.step, total))
                lora, opt_state, loss = train_step(
                    model, state.lora, opt_state, put_rows(Sequences(*(x[picked] for x in host)), mesh, axis=1), put_rows(ref[picked], mesh, axis=1),
                    weights.reshape(self.grad_accum, self.batch_size), trainer=self, window=window,
                )
                state = TrainState(lora=lora, opt_state=opt_state, step=state.step + 1)
                losses.append(float(loss))
                if callback is not None:
                    callback(state.step, losses[-1])
        return state, np.asarray(losses)


def _set_learning_rate(opt_state, value: float):
    hyperparams = dict(opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(value, hyperparams["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hyperparams)


@partial(jax.jit, static_argnames=("trainer", "window"))
def train_step(model, lora, opt_state, batch: Sequences, ref, weights, *, trainer: DpoTrainer, window: int):
    """One optimizer step over `grad_accum` micro-batches: `batch` rows `[accum, 2·batch_size, s]`
    hold the chosen responses then the rejected ones, `ref` their reference log-probs; the loss is
    the `weights`-weighted mean over pairs. Log-probs read `window` positions per row
    (`sequence_logprobs`)."""
    total_weight = jnp.maximum(weights.sum(), 1.0)
    k = trainer.batch_size

    def micro_loss(lora, micro):
        rows, ref, w = micro
        policy = sequence_logprobs(model, lora, rows.input_ids, rows.response_mask, attention_mask=rows.attention_mask, window=window)
        losses = dpo_loss(policy[:k], policy[k:], ref[:k], ref[k:], beta=trainer.beta, label_smoothing=trainer.label_smoothing)
        if trainer.nll_weight:  # RPO: + λ · per-token NLL of the chosen response
            losses = losses - trainer.nll_weight * policy[:k] / jnp.sum(rows.response_mask[:k], axis=1)
        return jnp.sum(losses * w) / total_weight

    def accumulate(carry, micro):
        loss, grads = carry
        value, g = jax.value_and_grad(micro_loss)(lora, micro)
        return (loss + value, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, lora)
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros(()), zeros), (batch, ref, weights))
    updates, opt_state = trainer.optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss
