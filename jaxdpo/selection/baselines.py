"""Baseline selectors (the methods the paper compares against, §4), pure functions returning a `SelectionResult`.

- `select_random`: uniform without replacement, seeded.
- APLP (Muldrew et al., 2024): `select_certainty` (largest |implicit-reward margin| first),
  `select_uncertainty` (smallest first), `select_entropy` (highest predictive entropy of the
  prompt first) and `select_hybrid` (keep the top B·ogf prompts by entropy, then the top B pairs
  by certainty). `predictive_entropy` turns sampled-response log-probs into per-prompt entropies.
- `select_apo` (Das et al., 2024): one-shot top-B by ‖φ‖_{V⁻¹}, V₀ = 1e-5·I, no in-batch update.
- `select_near_tie` (after Zhao & Jun): pairs whose reward-difference confidence interval
  straddles zero first, i.e. ascending |margin| − ν‖φ‖_{V⁻¹}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxdpo import checks
from jaxdpo.selection.api import SelectionResult, check_batch, v_inv_norms


def as_vector(name: str, x, length: int | None = None) -> Array:
    """`x` checked as a finite float vector (of `length`, if given), in at least float32."""
    checks.check_ndim(name, x, 1, "[n]")
    checks.check_floating(name, x)
    checks.check_finite(name, x)
    if length is not None:
        checks.check_shape(name, x, (length,))
    return jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))


def top_batch(priority: Array, scores: Array, mask: Array, batch_size: int) -> SelectionResult:
    """The B eligible candidates of highest priority (ties to the lowest index), with their scores."""
    _, indices = jax.lax.top_k(jnp.where(mask, priority, -jnp.inf), batch_size)
    return SelectionResult(indices.astype(jnp.int32), scores[indices])


def select_random(key: Array, num_candidates: int, batch_size: int, *, mask: Bool[ArrayLike, " n"] | None = None) -> SelectionResult:
    """B distinct eligible candidates uniformly at random; scores are the random priorities."""
    mask = check_batch(batch_size, num_candidates, mask)
    priority = jax.random.uniform(key, (num_candidates,))
    return top_batch(priority, priority, mask, batch_size)


def select_certainty(margins: Float[ArrayLike, " n"], batch_size: int, *, mask=None) -> SelectionResult:
    """APLP preference certainty: largest |r(x, y1) − r(x, y2)| first; scores are |margin|."""
    margins = as_vector("margins", margins)
    mask = check_batch(batch_size, margins.shape[0], mask)
    return top_batch(jnp.abs(margins), jnp.abs(margins), mask, batch_size)


def select_uncertainty(margins: Float[ArrayLike, " n"], batch_size: int, *, mask=None) -> SelectionResult:
    """Smallest |r(x, y1) − r(x, y2)| first (the pairs the implicit reward cannot tell apart)."""
    margins = as_vector("margins", margins)
    mask = check_batch(batch_size, margins.shape[0], mask)
    return top_batch(-jnp.abs(margins), jnp.abs(margins), mask, batch_size)


def predictive_entropy(logprobs: Float[ArrayLike, " samples"], num_samples: int) -> Float[Array, " prompts"]:
    """APLP predictive entropy: H(x) ≈ −(1/N) Σ_s log π(y_s|x), y_s ~ π(·|x) at temperature 1.

    `logprobs` holds the sequence log-probs of N samples per prompt, prompt-major: the samples of
    prompt i are rows i·N … (i+1)·N − 1 (APLP's public code averages rows i … i+N−1 instead)."""
    logprobs = as_vector("logprobs", logprobs)
    checks.require(num_samples >= 1, f"num_samples must be >= 1, got {num_samples}")
    checks.require(
        logprobs.shape[0] % num_samples == 0 and logprobs.shape[0] > 0,
        f"logprobs has {logprobs.shape[0]} rows, not a positive multiple of num_samples={num_samples}",
    )
    return -jnp.mean(logprobs.reshape(-1, num_samples), axis=1)


def _prompt_inputs(prompt_entropy, pair_prompt_ids) -> tuple[Array, Array]:
    prompt_entropy = as_vector("prompt_entropy", prompt_entropy)
    checks.check_ndim("pair_prompt_ids", pair_prompt_ids, 1, "[n]")
    checks.check_integer("pair_prompt_ids", pair_prompt_ids)
    checks.check_index_range("pair_prompt_ids", pair_prompt_ids, prompt_entropy.shape[0], "the prompts")
    return prompt_entropy, jnp.asarray(pair_prompt_ids, jnp.int32)


def select_entropy(
    prompt_entropy: Float[ArrayLike, " prompts"],
    pair_prompt_ids: Int[ArrayLike, " n"],
    batch_size: int,
    *,
    key: Array,
    mask=None,
) -> SelectionResult:
    """APLP entropy: prompts by descending predictive entropy, one random pair per prompt, then
    (only when B exceeds the eligible prompts) a second pair per prompt, and so on."""
    prompt_entropy, pair_prompt_ids = _prompt_inputs(prompt_entropy, pair_prompt_ids)
    count = pair_prompt_ids.shape[0]
    mask = check_batch(batch_size, count, mask)
    shuffle = jnp.where(mask, jax.random.uniform(key, (count,)), jnp.inf)
    by_prompt = jnp.lexsort((shuffle, pair_prompt_ids))  # group by prompt, random order inside
    grouped = pair_prompt_ids[by_prompt]
    position = jnp.arange(count)
    starts = jnp.concatenate([jnp.ones((1,), bool), grouped[1:] != grouped[:-1]])
    rank_sorted = position - jax.lax.cummax(jnp.where(starts, position, 0))
    rank = jnp.zeros((count,), jnp.int32).at[by_prompt].set(rank_sorted.astype(jnp.int32))
    rank = jnp.where(mask, rank, count)  # ineligible pairs last
    entropy = prompt_entropy[pair_prompt_ids]
    order = jnp.lexsort((position, -entropy, rank))
    indices = order[:batch_size].astype(jnp.int32)
    return SelectionResult(indices, entropy[indices])


def select_hybrid(
    prompt_entropy: Float[ArrayLike, " prompts"],
    pair_prompt_ids: Int[ArrayLike, " n"],
    margins: Float[ArrayLike, " n"],
    batch_size: int,
    *,
    ogf: int = 16,
    mask=None,
) -> SelectionResult:
    """APLP hybrid: keep the top B·ogf prompts by predictive entropy (among prompts with an eligible
    pair), then the top B of their pairs by certainty |margin|. Scores are |margin|."""
    prompt_entropy, pair_prompt_ids = _prompt_inputs(prompt_entropy, pair_prompt_ids)
    margins = as_vector("margins", margins, pair_prompt_ids.shape[0])
    checks.require(ogf >= 1, f"ogf (over-generation factor) must be >= 1, got {ogf}")
    mask = check_batch(batch_size, pair_prompt_ids.shape[0], mask)
    num_prompts = prompt_entropy.shape[0]
    prompt_has_pair = jax.ops.segment_max(mask.astype(jnp.int32), pair_prompt_ids, num_prompts) > 0
    keep = min(batch_size * ogf, num_prompts)
    _, kept_prompts = jax.lax.top_k(jnp.where(prompt_has_pair, prompt_entropy, -jnp.inf), keep)
    kept = jnp.zeros((num_prompts,), bool).at[kept_prompts].set(True) & prompt_has_pair
    return top_batch(jnp.abs(margins), jnp.abs(margins), mask & kept[pair_prompt_ids], batch_size)


def select_apo(
    features: Float[ArrayLike, "n d"],
    batch_size: int,
    *,
    reg: float = 1e-5,
    prior=None,
    pairs=None,
    mask=None,
) -> SelectionResult:
    """APO: the top B by ‖φ‖_{V₀⁻¹}, V₀ = reg·I + priorᵀprior, in one shot (no Eq. 4 update)."""
    norms = v_inv_norms(features, reg=reg, prior=prior, pairs=pairs)
    mask = check_batch(batch_size, norms.shape[0], mask)
    return top_batch(norms, norms, mask, batch_size)


def select_near_tie(
    margins: Float[ArrayLike, " n"],
    features: Float[ArrayLike, "n d"],
    batch_size: int,
    *,
    nu: float = 1.0,
    reg: float = 1.0,
    prior=None,
    pairs=None,
    mask=None,
) -> SelectionResult:
    """Near-tie uncertainty sampling: ascending |r1 − r2| − ν‖φ‖_{V₀⁻¹}, i.e. first the pairs whose
    confidence interval for the reward difference straddles zero by the widest margin."""
    norms = v_inv_norms(features, reg=reg, prior=prior, pairs=pairs)
    margins = as_vector("margins", margins, norms.shape[0])
    checks.require(nu >= 0, f"nu must be >= 0, got {nu}")
    mask = check_batch(batch_size, norms.shape[0], mask)
    gap = jnp.abs(margins) - nu * norms
    return top_batch(-gap, gap, mask, batch_size)
