"""Masked sequence log-probs, the DPO implicit reward and its per-example gradients (paper §2 and §3.3).

r_θ(x, y) = β · (log π_θ(y|x) − log π_ref(y|x)), log-probs summed over the response tokens only;
π_θ is the model with the LoRA adapter, π_ref the same model with `lora=None`. The reference term
has no gradient, so ∇_θ r = β ∇_θ log π_θ(y|x) over the LoRA parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from jaxdpo import checks
from jaxdpo.models import LoRA, LoraFn
from jaxdpo.sequences import check_sequences, response_span, response_window


def _window_positions(response_mask: Int[ArrayLike, "n s"], width: int) -> Int[Array, "n w"]:
    """The `width` positions of each row whose hidden states predict its response tokens: from the
    one before its first response token, moved left where the window would pass the end."""
    seq = response_mask.shape[1]
    first = jnp.argmax(jnp.asarray(response_mask) != 0, axis=1)
    start = jnp.clip(first - 1, 0, seq - 1 - width)
    return start[:, None] + jnp.arange(width)


def _window_width(response_mask, window: int | None) -> int:
    """`window`, checked against the rows' response spans when the mask is concrete; by default
    `response_window` of a concrete mask, or every position of a traced one."""
    seq = np.shape(response_mask)[1]
    if window is None:
        return response_window(response_mask)
    checks.require(
        isinstance(window, (int, np.integer)) and 1 <= window <= seq - 1, f"window must be an int in [1, {seq - 1}], got {window!r}"
    )
    if checks.is_concrete(response_mask):
        span = response_span(response_mask)
        checks.require(window >= span, f"window {window} is shorter than a response span of {span} positions")
    return int(window)


def sequence_logprobs(
    model,
    lora: LoRA | None,
    input_ids: Int[ArrayLike, "n s"],
    response_mask: Int[ArrayLike, "n s"],
    *,
    attention_mask: Int[ArrayLike, "n s"] | None = None,
    lora_fn: LoraFn | None = None,
    window: int | None = None,
) -> Float[Array, " n"]:
    """Σ_t response_mask[i, t] · log p(input_ids[i, t] | input_ids[i, :t]) for every row.

    `response_mask` is 1 on response tokens, 0 on prompt and padding; `attention_mask` (default:
    all ones) is 0 on padding so left-padded prompts are exact. `lora_fn` replaces the adapter's
    delta (gradient-feature probes). Checks shapes always, values when they are concrete, so it is
    the same function inside `jit`, `vmap` and `grad`.

    The last layer's queries, attention output and MLP, the LM head and the log-softmax run on
    `window` positions per row only, the ones that predict its response: a static int ≥ every
    row's response span. By default `response_window` of the mask when it is concrete; under
    `jit` pass it (or every position is used)."""
    check_sequences(input_ids, response_mask, attention_mask)
    width = _window_width(response_mask, window)
    positions = _window_positions(response_mask, width)
    every_position = width == np.shape(input_ids)[1] - 1  # nothing to skip: one scan over all layers
    rows = None if every_position else positions
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask, lora=lora, lora_fn=lora_fn, rows=rows)
    logits = model.logits(hidden[:, :-1] if every_position else hidden)
    targets = jnp.take_along_axis(jnp.asarray(input_ids), positions + 1, axis=1)
    weights = jnp.take_along_axis(jnp.asarray(response_mask), positions + 1, axis=1).astype(logits.dtype)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((chosen - jax.nn.logsumexp(logits, axis=-1)) * weights, axis=1)


def implicit_reward(model, lora: LoRA, input_ids, response_mask, *, beta: float, attention_mask=None) -> Float[Array, " n"]:
    """r(x, y) = β (log π_lora(y|x) − log π_ref(y|x)), π_ref being the model without the adapter."""
    checks.require(beta > 0, f"beta must be > 0, got {beta}")
    policy = sequence_logprobs(model, lora, input_ids, response_mask, attention_mask=attention_mask)
    reference = sequence_logprobs(model, None, input_ids, response_mask, attention_mask=attention_mask)
    return beta * (policy - reference)


def per_example_grads(fn, lora, batch, chunk_size: int):
    """`jax.grad(fn)(lora, example)` for every example of `batch` (a pytree with a leading n axis),
    vmapped over chunks of `chunk_size` examples inside `lax.map`, so memory stays bounded."""
    grad = jax.grad(fn)
    n = jax.tree.leaves(batch)[0].shape[0]
    return jax.lax.map(lambda example: grad(lora, example), batch, batch_size=min(chunk_size, n))


def reward_gradients(
    model, lora: LoRA, input_ids, response_mask, *, beta: float, attention_mask=None, chunk_size: int = 8
) -> LoRA:
    """Per-example ∇_θ r(x, y) = β ∇_θ log π_θ(y|x) over the LoRA parameters: a LoRA whose leaves
    have a leading n axis."""
    checks.require(beta > 0, f"beta must be > 0, got {beta}")
    checks.require(chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
    check_sequences(input_ids, response_mask, attention_mask)
    if attention_mask is None:
        attention_mask = jnp.ones(np.shape(input_ids), jnp.int32)
    window = _window_width(response_mask, None)

    def scaled_logprob(lora, example):
        ids, response, attention = (x[None] for x in example)
        return beta * sequence_logprobs(model, lora, ids, response, attention_mask=attention, window=window)[0]

    return per_example_grads(scaled_logprob, lora, (input_ids, response_mask, attention_mask), chunk_size)
