"""Baseline selectors and the registry, each against a NumPy rendering of its definition."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxdpo.selection import (
    SELECTORS,
    SelectionPool,
    make_selector,
    predictive_entropy,
    select_apo,
    select_certainty,
    select_entropy,
    select_hybrid,
    select_near_tie,
    select_random,
    select_uncertainty,
)
from tests.selection.reference import quad_scores, v_matrix
from tests.tolerance import assert_close

PROMPTS, M = 12, 3
PAIRS = np.array(
    [(p * M + i, p * M + j) for p in range(PROMPTS) for i, j in itertools.combinations(range(M), 2)], np.int32
)
PAIR_PROMPT = np.repeat(np.arange(PROMPTS), 3).astype(np.int32)
N = len(PAIRS)


def stable_top(priority, batch_size, mask=None):
    """Indices of the `batch_size` largest priorities, ties to the lowest index."""
    priority = np.where(np.ones(len(priority), bool) if mask is None else mask, priority, -np.inf)
    return np.argsort(-priority, kind="stable")[:batch_size]


def test_random_is_seeded_distinct_eligible_and_uniform():
    key = jax.random.key(0)
    mask = np.arange(N) % 2 == 0
    first = select_random(key, N, 5, mask=jnp.asarray(mask))
    again = select_random(key, N, 5, mask=jnp.asarray(mask))
    other = select_random(jax.random.key(1), N, 5, mask=jnp.asarray(mask))
    np.testing.assert_array_equal(first.indices, again.indices)
    assert not np.array_equal(first.indices, other.indices)
    assert len(set(first.indices.tolist())) == 5 and mask[np.asarray(first.indices)].all()
    picks = jax.vmap(lambda k: select_random(k, 10, 3).indices)(jax.random.split(key, 4000))
    counts = np.bincount(np.asarray(picks).ravel(), minlength=10)
    expected = 4000 * 3 / 10
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts


@given(st.lists(st.floats(-5, 5).map(lambda x: round(x, 1)), min_size=N, max_size=N), st.integers(1, N))
def test_certainty_and_uncertainty_order_by_absolute_margin(margins, batch_size):
    margins = np.asarray(margins, np.float32)
    certain = select_certainty(margins, batch_size)
    uncertain = select_uncertainty(margins, batch_size)
    np.testing.assert_array_equal(certain.indices, stable_top(np.abs(margins), batch_size))
    np.testing.assert_array_equal(uncertain.indices, stable_top(-np.abs(margins), batch_size))
    np.testing.assert_array_equal(certain.scores, np.abs(margins)[np.asarray(certain.indices)])


def test_predictive_entropy_averages_each_prompts_own_samples():
    rng = np.random.default_rng(0)
    samples = 8
    logprobs = rng.normal(-20, 5, size=PROMPTS * samples).astype(np.float32)
    expected = [-np.mean(logprobs[s * samples : (s + 1) * samples]) for s in range(PROMPTS)]
    assert_close(predictive_entropy(logprobs, samples), expected, ulps=16)
    apl_public_code = [-np.mean(logprobs[s : s + samples]) for s in range(PROMPTS)]  # the known bug
    assert not np.allclose(predictive_entropy(logprobs, samples), apl_public_code)
    with pytest.raises(ValueError, match="multiple of num_samples"):
        predictive_entropy(logprobs[:-1], samples)


def test_entropy_takes_one_pair_from_each_of_the_most_uncertain_prompts():
    rng = np.random.default_rng(1)
    entropy = rng.permutation(PROMPTS).astype(np.float32)
    result = select_entropy(entropy, PAIR_PROMPT, 5, key=jax.random.key(3))
    prompts = PAIR_PROMPT[np.asarray(result.indices)]
    np.testing.assert_array_equal(prompts, np.argsort(-entropy)[:5])
    np.testing.assert_array_equal(result.scores, entropy[prompts])
    # B beyond the number of prompts: every prompt once, then second pairs again by entropy
    full = select_entropy(entropy, PAIR_PROMPT, PROMPTS + 2, key=jax.random.key(3))
    prompts = PAIR_PROMPT[np.asarray(full.indices)]
    np.testing.assert_array_equal(prompts[:PROMPTS], np.argsort(-entropy))
    np.testing.assert_array_equal(prompts[PROMPTS:], np.argsort(-entropy)[:2])
    assert len(set(full.indices.tolist())) == PROMPTS + 2
    # which pair of a prompt is random but seeded
    keys = jax.random.split(jax.random.key(4), 20)
    chosen = {int(select_entropy(entropy, PAIR_PROMPT, 1, key=k).indices[0]) for k in keys}
    assert len(chosen) > 1 and {PAIR_PROMPT[i] for i in chosen} == {int(np.argmax(entropy))}


def test_entropy_respects_mask():
    entropy = np.arange(PROMPTS, dtype=np.float32)
    mask = PAIR_PROMPT != PROMPTS - 1  # the most uncertain prompt has no eligible pair
    result = select_entropy(entropy, PAIR_PROMPT, 3, key=jax.random.key(0), mask=jnp.asarray(mask))
    np.testing.assert_array_equal(PAIR_PROMPT[np.asarray(result.indices)], [10, 9, 8])


@given(seed=st.integers(0, 10_000), batch_size=st.integers(1, 6), ogf=st.integers(1, 3))
def test_hybrid_matches_its_definition(seed, batch_size, ogf):
    rng = np.random.default_rng(seed)
    entropy = rng.normal(size=PROMPTS).astype(np.float32)
    margins = rng.normal(size=N).astype(np.float32)
    mask = rng.random(N) < 0.8
    mask[:batch_size] = True
    result = select_hybrid(entropy, PAIR_PROMPT, margins, batch_size, ogf=ogf, mask=jnp.asarray(mask))
    has_pair = np.array([mask[PAIR_PROMPT == p].any() for p in range(PROMPTS)])
    kept = stable_top(entropy, min(batch_size * ogf, PROMPTS), has_pair)
    eligible = mask & np.isin(PAIR_PROMPT, kept)
    np.testing.assert_array_equal(result.indices, stable_top(np.abs(margins), batch_size, eligible))


def test_apo_is_one_shot_top_norms_with_tiny_reg():
    rng = np.random.default_rng(2)
    phi = rng.normal(size=(N, 6)).astype(np.float32)
    phi[1] = phi[0]  # a duplicate: APO has no in-batch update, so it takes both
    result = select_apo(phi, 4)
    norms = np.sqrt(quad_scores(phi.astype(np.float64), v_matrix(6, 1e-5)))
    np.testing.assert_array_equal(result.indices, stable_top(norms, 4))
    assert_close(result.scores, norms[np.asarray(result.indices)], ulps=64)
    prior = rng.normal(size=(3, 6)).astype(np.float32)
    with_prior = select_apo(phi, 4, prior=prior)
    norms = np.sqrt(quad_scores(phi.astype(np.float64), v_matrix(6, 1e-5, prior)))
    np.testing.assert_array_equal(with_prior.indices, stable_top(norms, 4))


def test_near_tie_prefers_intervals_straddling_zero():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(PROMPTS * M, 5)).astype(np.float32)
    margins = rng.normal(size=N).astype(np.float32)
    phi = g[PAIRS[:, 0]] - g[PAIRS[:, 1]]
    result = select_near_tie(margins, g, 5, nu=0.5, reg=2.0, pairs=PAIRS)
    gap = np.abs(margins) - 0.5 * np.sqrt(quad_scores(phi.astype(np.float64), v_matrix(5, 2.0)))
    np.testing.assert_array_equal(result.indices, stable_top(-gap, 5))
    assert_close(result.scores, gap[np.asarray(result.indices)], ulps=64, scale=float(np.abs(margins).max()))  # a difference: its terms' scale


@pytest.mark.usefixtures("unchecked_shapes")
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: select_certainty(np.array([1.0, np.nan]), 1), "margins contains"),
        (lambda: select_certainty(np.ones((2, 2)), 1), "margins must be 1-D"),
        (lambda: select_certainty(np.ones(3), 4), "larger than the pool"),
        (lambda: select_certainty(np.ones(3), 1, mask=np.ones(2, bool)), "mask must have shape"),
        (lambda: select_random(jax.random.key(0), 0, 1), "empty"),
        (lambda: select_hybrid(np.ones(PROMPTS), PAIR_PROMPT, np.ones(N - 1), 2), "margins must have shape"),
        (lambda: select_hybrid(np.ones(PROMPTS), PAIR_PROMPT, np.ones(N), 2, ogf=0), "ogf"),
        (lambda: select_entropy(np.ones(2), PAIR_PROMPT, 2, key=jax.random.key(0)), "pair_prompt_ids must index"),
        (lambda: select_near_tie(np.ones(N), np.ones((N, 3)), 2, nu=-1.0), "nu must be >= 0"),
    ],
)
def test_bad_baseline_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def full_pool(mask=None):
    rng = np.random.default_rng(5)
    g = rng.normal(size=(PROMPTS * M, 4)).astype(np.float32)
    return SelectionPool(
        num_candidates=N,
        features=g,
        pairs=PAIRS,
        prior=rng.normal(size=(2, 4)).astype(np.float32),
        margins=rng.normal(size=N).astype(np.float32),
        prompt_entropy=rng.normal(size=PROMPTS).astype(np.float32),
        pair_prompt_ids=PAIR_PROMPT,
        apo_features=rng.normal(size=(PROMPTS * M, 3)).astype(np.float32),
        apo_prior=np.zeros((0, 3), np.float32),
        mask=mask,
    )


@pytest.mark.parametrize("name", SELECTORS)
def test_every_registered_selector_runs_on_a_full_pool(name):
    mask = jnp.asarray(np.arange(N) % 3 != 1)
    result = make_selector(name)(full_pool(mask), 4, key=jax.random.key(0))
    indices = np.asarray(result.indices)
    assert indices.shape == (4,) and len(set(indices.tolist())) == 4 and np.asarray(mask)[indices].all()


def test_registry_dispatches_to_the_definitions():
    pool = full_pool()
    key = jax.random.key(0)
    from jaxdpo import select_batch

    np.testing.assert_array_equal(
        make_selector("activedpo", reg=0.5)(pool, 3, key=key).indices,
        select_batch(pool.features, 3, reg=0.5, prior=pool.prior, pairs=pool.pairs).indices,
    )
    np.testing.assert_array_equal(
        make_selector("aplp", ogf=2)(pool, 3, key=key).indices,
        select_hybrid(pool.prompt_entropy, PAIR_PROMPT, pool.margins, 3, ogf=2).indices,
    )
    assert make_selector("aplp").name == "hybrid"


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown selection method 'bald'.*activedpo"):
        make_selector("bald")
    with pytest.raises(ValueError, match="unknown \\['temperature'\\]"):
        make_selector("activedpo", temperature=1.0)
    with pytest.raises(ValueError, match="needs pool fields \\['features'\\]"):  # the prior may be None
        make_selector("activedpo")(SelectionPool(num_candidates=3), 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs pool fields \\['features', 'margins'\\]"):
        make_selector("near_tie")(SelectionPool(num_candidates=3), 1, key=jax.random.key(0))


def test_activedpo_without_any_label_takes_prior_none_as_no_prior():
    pool, key = full_pool(), jax.random.key(0)
    selector = make_selector("activedpo")
    assert "prior" in selector.requires  # the loop still computes it once there are labels
    none = selector(pool._replace(prior=None), 3, key=key)
    empty = selector(pool._replace(prior=np.zeros((0, 4), np.float32)), 3, key=key)
    np.testing.assert_array_equal(none.indices, empty.indices)
    np.testing.assert_array_equal(none.scores, empty.scores)
