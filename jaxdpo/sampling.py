"""Sampled decoding (paper §3.1: m responses per prompt from the current policy): a jitted prefill
of the left-padded prompts, once per prompt, whose KV cache is then repeated for the prompt's
`num_samples` rows; then one `lax.while_loop` of single-token steps over the decoder's KV cache
(its state a `DecodeState`, the weights laid out once as `DecodeWeights`), stopping when every
sequence has emitted an end token or `max_new_tokens` are written. Greedy steps (temperature 0)
take an argmax; sampled steps one `jax.random.categorical` over all rows, after top-k/top-p
filtering that looks at each row's `CANDIDATES` largest logits before it sorts anything.

The result is `Sequences`, laid out for `sequence_logprobs` / `gradient_features`: the prompt
(left-padded) followed by the generated tokens, `response_mask` 1 on the generated tokens up to
and including the end token, 0 elsewhere; tokens after the end are `pad_token_id` with attention 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxdpo import checks
from jaxdpo.models import KVCache, LoRA
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
    key: the PRNG key of the next draw."""

    step: Int[Array, ""]
    done: Bool[Array, " n"]
    tokens: Int[Array, "n new"]
    live: Bool[Array, "n new"]
    logits: Float[Array, "n v"]
    cache: KVCache
    key: Array


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


def _next_tokens(logits, key, temperature, top_p, top_k, filtered: bool) -> Int[Array, " n"]:
    """Sample from `softmax(filter(logits / T))`; T = 0 is greedy (argmax, lowest index on ties).
    Only the branch T selects runs: greedy decoding draws no random numbers."""

    def sample(logits):
        scaled = logits / temperature
        if filtered:
            scaled = filter_logits(scaled, top_p=top_p, top_k=top_k)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, logits)


@partial(jax.jit, static_argnames=("num_samples", "max_new_tokens", "eos_ids", "pad_id", "filtered"))
def _generate(
    model, lora, prompt_ids, prompt_mask, key, temperature, top_p, top_k, *, num_samples, max_new_tokens, eos_ids, pad_id, filtered
):
    b, prompt_len = prompt_ids.shape
    n = b * num_samples
    weights = model.decode_weights()
    cache = model.init_cache(b, prompt_len + max_new_tokens)
    logits, cache = model.forward_cached(prompt_ids, cache, attention_mask=prompt_mask, lora=lora, weights=weights)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def not_finished(state: DecodeState):
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    def decode_step(state: DecodeState) -> DecodeState:
        key, draw = jax.random.split(state.key)
        token = jnp.where(state.done, pad_id, _next_tokens(state.logits, draw, temperature, top_p, top_k, filtered))
        logits, cache = model.forward_cached(
            token[:, None], state.cache, attention_mask=(~state.done)[:, None], lora=lora, weights=weights
        )
        return DecodeState(
            step=state.step + 1,
            done=state.done | jnp.isin(token, eos),
            tokens=state.tokens.at[:, state.step].set(token),
            live=state.live.at[:, state.step].set(~state.done),
            logits=logits[:, -1],
            cache=cache,
            key=key,
        )

    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        done=jnp.zeros((n,), bool),
        tokens=jnp.full((n, max_new_tokens), pad_id, jnp.int32),
        live=jnp.zeros((n, max_new_tokens), bool),
        logits=jnp.repeat(logits[:, -1], num_samples, axis=0),
        cache=cache.repeat_rows(num_samples),
        key=key,
    )
    final = jax.lax.while_loop(not_finished, decode_step, state)
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
    pad_token_id: int = 0,
) -> Sequences:
    """Sample `num_samples` responses of up to `max_new_tokens` tokens to each left-padded prompt.

    temperature 0 is greedy decoding; `top_k` 0 and `top_p` 1 disable those filters; a sequence
    stops after any token of `eos_token_id` (one id or several). Compiles once per shape and
    option set: new LoRA weights, keys, temperatures and top-p/top-k values reuse the compiled loop.
    Each prompt is prefilled once for its `num_samples` rows; they draw the tokens that decoding
    the prompt repeated `num_samples` times would draw for the same key.

    Returns `Sequences` `[batch·num_samples, prompt_len + max_new_tokens]`; rows
    `i·num_samples … (i+1)·num_samples − 1` answer prompt i."""
    checks.check_ndim("prompt_ids", prompt_ids, 2, "[batch, prompt_len]")
    checks.check_integer("prompt_ids", prompt_ids)
    checks.check_shape("prompt_mask", prompt_mask, np.shape(prompt_ids))
    checks.require(np.shape(prompt_ids)[0] >= 1, "prompt_ids has no rows (empty batch)")
    for name, value in [("max_new_tokens", max_new_tokens), ("num_samples", num_samples)]:
        checks.require(isinstance(value, (int, np.integer)) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
    checks.require(temperature >= 0, f"temperature must be >= 0, got {temperature}")
    checks.require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    checks.require(isinstance(top_k, (int, np.integer)) and top_k >= 0, f"top_k must be an int >= 0, got {top_k!r}")
    if checks.is_concrete(prompt_mask):
        mask = to_host(prompt_mask)
        empty = np.flatnonzero(~mask.astype(bool).any(axis=1))
        checks.require(empty.size == 0, f"prompt_mask is all padding in rows {empty[:10].tolist()} (empty prompt)")
        right_padded = np.flatnonzero(mask[:, -1] == 0)
        checks.require(right_padded.size == 0, f"prompts must be left-padded; rows {right_padded[:10].tolist()} end in padding")
    return _generate(
        model,
        lora,
        jnp.asarray(prompt_ids, jnp.int32),
        jnp.asarray(prompt_mask, jnp.int32),
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
