"""Sampled decoding (paper §3.1: m responses per prompt from the current policy): a jitted prefill
of the left-padded prompts, once per prompt, whose KV cache is then repeated for the prompt's
`num_samples` rows; then one `lax.while_loop` of single-token steps over the decoder's KV cache
(its state a `DecodeState`), stopping when every sequence has emitted an end token or
`max_new_tokens` are written. The weights are read in place on accelerators and from the model's
`DecodeWeights` on CPU (`Decoder.decode_weights`, made once per model).

Greedy steps (temperature 0) take an argmax. Sampled steps draw from softmax(filter(logits / T))
by inverse CDF (`draw_tokens`): two uniforms per row and step pick a block of the vocabulary by
its mass, then a token within it, instead of a Gumbel (or categorical) draw of one random number
per vocabulary entry, which cost more than a fifth of a decode step at a 32,000-token vocabulary
on CPU (`benchmarks/generation.py --profile`). Top-k/top-p filtering looks at each row's
`CANDIDATES` largest logits before it sorts anything.

A row's randomness is its own: row (prompt i, sample j) draws step t's uniforms from
fold_in(fold_in(fold_in(key, prompt_index[i]), j), t) (`row_keys`, `step_uniforms`), so its
tokens are a function of the key, the prompt's identity, the sample's index and the step — not
of the call it is in, its position there, the padding rows beside it or the devices that run it.

The result is `Sequences`, laid out for `sequence_logprobs` / `gradient_features`: the prompt
(left-padded) followed by the generated tokens, `response_mask` 1 on the generated tokens up to
and including the end token, 0 elsewhere; tokens after the end are `pad_token_id` with attention 0.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxdpo import checks
from jaxdpo.models import DecodeWeights, KVCache, LoRA
from jaxdpo.sequences import Sequences
from jaxdpo.sharding import to_host


@struct.dataclass
class DecodeState:
    """The loop state of decoding, one field per thing a step reads or writes.

    step: tokens written so far (the next column of `tokens`).
    done: `[n]` whether each row has emitted an end token (later steps write padding).
    tokens: `[n, max_new_tokens]` generated ids, `pad_id` where nothing was generated.
    live: `[n, max_new_tokens]` whether that token was generated (becomes the response mask).
    logits: `[n, vocab]` the next-token logits of each row.
    cache: the decoder's KV cache (prompt and tokens so far).
    keys: `[n]` each row's PRNG key (`row_keys`)."""

    step: Int[Array, ""]
    done: Bool[Array, " n"]
    tokens: Int[Array, "n new"]
    live: Bool[Array, "n new"]
    logits: Float[Array, "n v"]
    cache: KVCache
    keys: Array


CANDIDATES = 256
"""How many of each row's largest logits `filter_logits` looks at before it sorts the whole row."""


def filter_logits(logits: Float[ArrayLike, "n v"], *, top_p, top_k) -> Float[Array, "n v"]:
    """Top-k then nucleus (top-p) filtering: excluded tokens get −inf.

    Top-k keeps every token whose logit is ≥ the k-th largest (k = 0: no limit). Top-p keeps, in
    descending order, each token whose preceding probability mass is < top_p (so at least one, and
    ties at the cut are kept); top_p = 1 keeps every token top-k keeps. `top_p` and `top_k` may be
    traced scalars.

    The cut is found among the `CANDIDATES` largest logits of each row (`lax.top_k`, one pass
    over the vocabulary); the rows are sorted in full only when the kept set may reach past them
    (top_k > CANDIDATES, or a nucleus wider than CANDIDATES tokens)."""
    vocab = logits.shape[-1]
    width = min(CANDIDATES, vocab)
    cut, known = _cut(jax.lax.top_k(logits, width)[0], logits, top_p, top_k)
    if width < vocab:
        cut = jax.lax.cond(
            jnp.all(known), lambda: cut, lambda: _cut(jnp.sort(logits, axis=-1)[..., ::-1], logits, top_p, top_k)[0]
        )
    return jnp.where(logits >= cut, logits, -jnp.inf)


def _cut(ordered: Float[Array, "n w"], logits: Float[Array, "n v"], top_p, top_k) -> tuple[Array, Bool[Array, " n"]]:
    """The smallest kept logit of each row `[n, 1]`, from `ordered`, the row's w largest logits in
    descending order, and whether `ordered` was wide enough to decide it."""
    vocab, width = logits.shape[-1], ordered.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, jnp.broadcast_to(jnp.minimum(k, width) - 1, logits.shape[:-1])[..., None], axis=-1)
    kth = jnp.where(k < vocab, kth, -jnp.inf)  # the top-k threshold (none when k covers the vocabulary)
    in_top_k = ordered >= kth
    normalizer = jax.nn.logsumexp(jnp.where(logits >= kth, logits, -jnp.inf), axis=-1, keepdims=True)
    probs = jnp.where(in_top_k, jnp.exp(ordered - normalizer), 0.0)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & (mass_before < top_p)
    cut = jnp.where(top_p < 1, jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True), kth)
    # decided when `ordered` holds the top-k threshold and the kept prefix ends inside it (past it
    # there are only ties of the k-th logit, which `logits >= cut` keeps)
    kth_known = (k <= width) | (k == vocab)
    ends_inside = (k <= width) | (top_p >= 1) | ~keep[..., -1]
    known = kth_known & ends_inside
    return cut, known


def row_keys(key: Array, prompt_index: Int[Array, " b"], num_samples: int) -> Array:
    """`[b · num_samples]` keys: row i·num_samples + j (prompt i's sample j) gets
    fold_in(fold_in(key, prompt_index[i]), j)."""
    fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
    samples = jnp.arange(num_samples, dtype=jnp.uint32)
    return jax.vmap(fold, in_axes=(0, None))(fold(key, prompt_index), samples).reshape(-1)


def step_uniforms(keys: Array, step: Int[ArrayLike, ""]) -> Float[Array, "n 2"]:
    """Each row's two uniforms in [0, 1) of decode step `step`, from fold_in(its key, step)."""
    return jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, step), (2,)))(keys)


def draw_tokens(logits: Float[ArrayLike, "n v"], uniforms: Float[ArrayLike, "n 2"]) -> Int[Array, " n"]:
    """One token per row from softmax(logits) (−inf: excluded), by inverse CDF in two levels: a
    block of `block_width(v)` consecutive ids drawn with `uniforms[:, 0]` in proportion to its
    probability mass, then a token of that block with `uniforms[:, 1]` in proportion to its
    probability. One pass over the vocabulary (max, exp, block sums) and a search over a block.

    The distribution is the softmax up to float32 rounding: of each block's share of the row's
    mass, and of each token's share of its block's (a rare token is resolved against its block,
    not the whole row). Tokens of probability 0 are never drawn."""
    logits, uniforms = jnp.asarray(logits), jnp.asarray(uniforms)
    rows, vocab = logits.shape
    width = block_width(vocab)
    blocks = -(-vocab // width)
    top = jnp.max(logits, axis=-1, keepdims=True)
    padded = jnp.pad(logits, ((0, 0), (0, blocks * width - vocab)), constant_values=-jnp.inf)
    mass = jnp.sum(jnp.exp(padded - top).reshape(rows, blocks, width), axis=-1)
    block = _inverse_cdf(mass, uniforms[:, 0])
    first = block * width
    start = jnp.minimum(first, vocab - width)  # the last block, when partial, is read as the last `width` ids
    window = jax.vmap(lambda row, at: jax.lax.dynamic_slice_in_dim(row, at, width))(logits, start)
    ids = start[:, None] + jnp.arange(width)
    probs = jnp.where(ids >= first[:, None], jnp.exp(window - top), 0.0)
    return (start + _inverse_cdf(probs, uniforms[:, 1])).astype(jnp.int32)


def block_width(vocab: int) -> int:
    """The block size of `draw_tokens`: about √vocab (a multiple of 128), at most the vocabulary."""
    return min(vocab, 128 * max(1, math.ceil(math.sqrt(vocab) / 128)))


def _inverse_cdf(weights: Float[Array, "n w"], u: Float[Array, " n"]) -> Int[Array, " n"]:
    """Per row the first index i of positive weight whose cumulative weight exceeds u · total (the
    last positive weight when rounding leaves none)."""
    cumulative = jnp.cumsum(weights, axis=-1)
    past = (cumulative > u[:, None] * cumulative[:, -1:]) & (weights > 0)
    last_positive = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
    return jnp.where(jnp.any(past, axis=-1), jnp.argmax(past, axis=-1), last_positive)


def greedy_tokens(logits: Float[Array, "n v"]) -> Int[Array, " n"]:
    """argmax per row, the lowest index on ties."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _next_tokens(logits, keys, step, temperature, top_p, top_k, filtered: bool) -> Int[Array, " n"]:
    """Sample from `softmax(filter(logits / T))`; T = 0 is greedy (argmax, lowest index on ties).
    Only the branch T selects runs: greedy decoding draws no random numbers."""

    def sample(logits):
        scaled = logits / temperature
        if filtered:
            scaled = filter_logits(scaled, top_p=top_p, top_k=top_k)
        return draw_tokens(scaled, step_uniforms(keys, step))

    return jax.lax.cond(temperature > 0, sample, greedy_tokens, logits)


@partial(jax.jit, static_argnames=("num_samples", "max_new_tokens", "eos_ids", "pad_id", "filtered"))
def generation_program(
    model, weights: DecodeWeights | None, lora: LoRA | None, prompt_ids, prompt_mask, prompt_index, key, temperature, top_p, top_k,
    *, num_samples: int, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, filtered: bool,
) -> Sequences:
    """The generation program `generate` runs (one compiled program per shape and static option
    set), unchecked, for callers that lower or compile it from abstract inputs. `weights`:
    `model.decode_weights()` (None: the model's weights in place); `prompt_index` `[b]` int32;
    `temperature`, `top_p` float32 and `top_k` int32 scalars; `filtered`: whether top-k/top-p
    can cut anything (False skips the filter)."""
    b, prompt_len = prompt_ids.shape
    n = b * num_samples
    cache = model.init_cache(b, prompt_len + max_new_tokens)
    logits, cache = model.forward_cached(prompt_ids, cache, attention_mask=prompt_mask, lora=lora, weights=weights, last_only=True)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def write_next(state: DecodeState) -> DecodeState:
        """Each row's next token (padding after its end) at column `step`."""
        token = jnp.where(state.done, pad_id, _next_tokens(state.logits, state.keys, state.step, temperature, top_p, top_k, filtered))
        return state.replace(
            step=state.step + 1,
            done=state.done | jnp.isin(token, eos),
            tokens=state.tokens.at[:, state.step].set(token),
            live=state.live.at[:, state.step].set(~state.done),
        )

    def decode_step(state: DecodeState) -> DecodeState:
        state = write_next(state)
        column = state.step - 1
        logits, cache = model.forward_cached(
            state.tokens[:, column, None], state.cache, attention_mask=state.live[:, column, None], lora=lora, weights=weights
        )
        return state.replace(logits=logits[:, -1], cache=cache)

    def more_steps(state: DecodeState):  # the last token needs no forward pass after it
        return (state.step < max_new_tokens - 1) & ~jnp.all(state.done)

    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        done=jnp.zeros((n,), bool),
        tokens=jnp.full((n, max_new_tokens), pad_id, jnp.int32),
        live=jnp.zeros((n, max_new_tokens), bool),
        logits=jnp.repeat(logits[:, -1], num_samples, axis=0),
        cache=cache.repeat_rows(num_samples),
        keys=row_keys(key, prompt_index, num_samples),
    )
    final = write_next(jax.lax.while_loop(more_steps, decode_step, state))
    tokens, live = final.tokens, final.live.astype(jnp.int32)
    prompt_mask = jnp.repeat(prompt_mask, num_samples, axis=0)
    return Sequences(
        input_ids=jnp.concatenate([jnp.repeat(prompt_ids, num_samples, axis=0), tokens], axis=1),
        response_mask=jnp.concatenate([jnp.zeros_like(prompt_mask), live], axis=1),
        attention_mask=jnp.concatenate([prompt_mask, live], axis=1),
    )


def _eos_tuple(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    ids = (eos_token_id,) if np.ndim(eos_token_id) == 0 else tuple(np.ravel(eos_token_id))
    checks.require(all(float(i) == int(i) and int(i) >= 0 for i in ids), f"eos_token_id must be non-negative ints, got {eos_token_id!r}")
    return tuple(sorted({int(i) for i in ids}))


def generate(
    model,
    prompt_ids: Int[ArrayLike, "b p"],
    prompt_mask: Int[ArrayLike, "b p"],
    *,
    lora: LoRA | None = None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    num_samples: int = 1,
    key: Array,
    prompt_index: Int[ArrayLike, " b"] | None = None,
    pad_token_id: int = 0,
) -> Sequences:
    """Sample `num_samples` responses of up to `max_new_tokens` tokens to each left-padded prompt.

    temperature 0 is greedy decoding; `top_k` 0 and `top_p` 1 disable those filters; a sequence
    stops after any token of `eos_token_id` (one id or several). Compiles once per shape and
    option set: new LoRA weights, keys, temperatures and top-p/top-k values reuse the compiled loop.
    Each prompt is prefilled once for its `num_samples` rows.

    `prompt_index` `[b]`: each prompt's identity (non-negative ints, e.g. its index in the
    caller's prompt pool; default its row 0 … b − 1). Prompt i's sample j draws its tokens from
    (`key`, prompt_index[i], j) alone (see the module doc), so the same prompt with the same index
    gets the same samples in any call, in any position, beside any other prompts.

    Returns `Sequences` `[batch·num_samples, prompt_len + max_new_tokens]`; rows
    `i·num_samples … (i+1)·num_samples − 1` answer prompt i."""
    checks.check_ndim("prompt_ids", prompt_ids, 2, "[batch, prompt_len]")
    checks.check_integer("prompt_ids", prompt_ids)
    batch = np.shape(prompt_ids)[0]
    checks.check_shape("prompt_mask", prompt_mask, np.shape(prompt_ids))
    checks.require(batch >= 1, "prompt_ids has no rows (empty batch)")
    for name, value in [("max_new_tokens", max_new_tokens), ("num_samples", num_samples)]:
        checks.require(isinstance(value, (int, np.integer)) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
    checks.require(temperature >= 0, f"temperature must be >= 0, got {temperature}")
    checks.require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    checks.require(isinstance(top_k, (int, np.integer)) and top_k >= 0, f"top_k must be an int >= 0, got {top_k!r}")
    if prompt_index is None:
        prompt_index = np.arange(batch)
    checks.check_shape("prompt_index", prompt_index, (batch,))
    checks.check_integer("prompt_index", prompt_index)
    if checks.is_concrete(prompt_index):
        checks.require(bool(np.all(to_host(prompt_index) >= 0)), "prompt_index must be non-negative")
    if checks.is_concrete(prompt_mask):
        mask = to_host(prompt_mask)
        empty = np.flatnonzero(~mask.astype(bool).any(axis=1))
        checks.require(empty.size == 0, f"prompt_mask is all padding in rows {empty[:10].tolist()} (empty prompt)")
        right_padded = np.flatnonzero(mask[:, -1] == 0)
        checks.require(right_padded.size == 0, f"prompts must be left-padded; rows {right_padded[:10].tolist()} end in padding")
    return generation_program(
        model,
        model.decode_weights(),
        lora,
        jnp.asarray(prompt_ids, jnp.int32),
        jnp.asarray(prompt_mask, jnp.int32),
        jnp.asarray(prompt_index, jnp.int32),
        key,
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.int32(top_k),
        num_samples=int(num_samples),
        max_new_tokens=int(max_new_tokens),
        eos_ids=_eos_tuple(eos_token_id),
        pad_id=int(pad_token_id),
        filtered=bool(top_p < 1 or top_k > 0),
    )
