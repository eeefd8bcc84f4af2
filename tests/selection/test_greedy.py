"""select_batch (Eq. 3-4, fast greedy) against a float64 NumPy brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxdpo
from jaxdpo.selection import v_inv_norms
from tests.selection.reference import brute_force_greedy, quad_scores, replay_gaps, v_matrix
from tests.tolerance import assert_close

N, D, B = 48, 12, 6
EPS32 = float(np.finfo(np.float32).eps)
SCORE_ULPS = 64
"""Reported ‖φ‖_{V⁻¹} against float64, at the scale of the batch's first (largest) score: an exact
score's rounding is ε·√cond(V) of the initial scores, not of each later, smaller score."""


def _rng(seed=0):
    return np.random.default_rng(seed)


def assert_greedy(phi, result, reg, prior=None, mask=None, ulps=64):
    """Every pick is an argmax of the exact float64 score up to `ulps` ulp of the largest initial
    score, and every reported score matches the exact one to the same tolerance."""
    s0 = quad_scores(np.asarray(phi, np.float64), v_matrix(phi.shape[1], reg, prior))
    tol = ulps * EPS32 * max(float(np.max(s0)), 1e-30)
    gaps, exact = replay_gaps(phi, result.indices, reg, prior, mask)
    assert np.all(gaps <= tol), (gaps.max(), tol)
    np.testing.assert_allclose(np.asarray(result.scores, np.float64) ** 2, exact, rtol=0, atol=tol)
    assert len(set(np.asarray(result.indices).tolist())) == len(result.indices)


def test_random_features_match_brute_force_exactly():
    phi = _rng(0).normal(size=(N, D)).astype(np.float32)
    result = jaxdpo.select_batch(phi, B, reg=0.5)
    indices, scores = brute_force_greedy(phi, B, 0.5)
    np.testing.assert_array_equal(result.indices, indices)
    assert_close(result.scores, scores, ulps=SCORE_ULPS)
    assert result.indices.dtype == jnp.int32 and result.indices.shape == (B,)
    assert result.scores.shape == (B,)


def test_unit_norm_features():
    phi = _rng(1).normal(size=(N, D))
    phi = (phi / np.linalg.norm(phi, axis=1, keepdims=True)).astype(np.float32)
    result = jaxdpo.select_batch(phi, B, reg=1.0)
    assert_close(result.scores[0], 1.0, ulps=SCORE_ULPS)
    assert_greedy(phi, result, 1.0)


def test_exact_ties_go_to_the_lowest_index():
    phi = np.concatenate([np.eye(D), -np.eye(D)]).astype(np.float32)  # every score exactly 1/reg
    result = jaxdpo.select_batch(phi, D + 2, reg=1.0)
    np.testing.assert_array_equal(result.indices[:D], np.arange(D))  # orthogonal: scores stay tied
    np.testing.assert_array_equal(result.indices[D:], [D, D + 1])  # -e_i after e_i: 1/2 each, tied


@pytest.mark.parametrize("reg", [1e-2, 1e-4, 1e-6])
def test_low_rank_small_reg_stays_accurate_and_non_negative(reg):
    """Rank-3 features in 12 dims: after 3 picks every residual score collapses by orders of
    magnitude; subtractive updates must stay ≥ 0 and within a few ulp of the initial scores."""
    rng = _rng(2)
    phi = (rng.normal(size=(N, 3)) @ rng.normal(size=(3, D))).astype(np.float32)
    result = jaxdpo.select_batch(phi, B, reg=reg)
    assert np.all(np.asarray(result.scores) >= 0)
    assert_greedy(phi, result, reg)
    exact = brute_force_greedy(phi, 3, reg)
    np.testing.assert_array_equal(result.indices[:3], exact[0])


def test_duplicated_rows_are_discounted():
    rng = _rng(3)
    base = rng.normal(size=(10, D)).astype(np.float32)
    phi = np.concatenate([base, base, base])
    result = jaxdpo.select_batch(phi, 12, reg=1.0)
    assert_greedy(phi, result, 1.0)
    # the duplicates of a pick have score s/(1+s); distinct directions come first
    np.testing.assert_array_equal(np.sort(np.asarray(result.indices[:10]) % 10), np.arange(10))


def test_zero_rows_score_zero_and_come_last():
    phi = _rng(4).normal(size=(N, D)).astype(np.float32)
    phi[[3, 7, 9]] = 0.0
    result = jaxdpo.select_batch(phi, N, reg=1.0)  # select all
    assert sorted(np.asarray(result.indices).tolist()) == list(range(N))
    np.testing.assert_array_equal(result.indices[-3:], [3, 7, 9])  # ties to the lowest index
    np.testing.assert_array_equal(result.scores[-3:], 0.0)
    assert_greedy(phi, result, 1.0)


def test_mask_restricts_picks():
    phi = _rng(5).normal(size=(N, D)).astype(np.float32)
    mask = np.zeros(N, bool)
    mask[::3] = True
    result = jaxdpo.select_batch(phi, B, reg=1.0, mask=jnp.asarray(mask))
    assert np.all(mask[np.asarray(result.indices)])
    np.testing.assert_array_equal(result.indices, brute_force_greedy(phi, B, 1.0, mask=mask)[0])


@pytest.mark.parametrize("p", [0, 5, 12, 30])
def test_prior_below_and_above_dim(p):
    rng = _rng(6)
    phi = rng.normal(size=(N, D)).astype(np.float32)
    prior = rng.normal(size=(p, D)).astype(np.float32)
    result = jaxdpo.select_batch(phi, B, reg=0.3, prior=prior)
    indices, scores = brute_force_greedy(phi, B, 0.3, prior)
    np.testing.assert_array_equal(result.indices, indices)
    assert_close(result.scores, scores, ulps=SCORE_ULPS)


def test_prior_containing_candidates_with_small_reg():
    """Candidates in the span of the labeled set: their scores must not be lost to cancellation."""
    rng = _rng(7)
    prior = rng.normal(size=(4, D)).astype(np.float32)
    inside = (rng.normal(size=(N - 8, 4)) @ prior).astype(np.float32)
    outside = rng.normal(size=(8, D)).astype(np.float32) * 1e-2
    phi = np.concatenate([inside, outside])
    reg = 1e-5
    norms = np.asarray(v_inv_norms(phi, reg=reg, prior=prior), np.float64)
    exact = np.sqrt(quad_scores(phi.astype(np.float64), v_matrix(D, reg, prior)))
    np.testing.assert_allclose(norms, exact, rtol=1e-3)
    assert_greedy(phi, jaxdpo.select_batch(phi, B, reg=reg, prior=prior), reg, prior)


def test_select_all_is_a_permutation():
    phi = _rng(8).normal(size=(N, D)).astype(np.float32)
    result = jaxdpo.select_batch(phi, N, reg=1.0)
    assert sorted(np.asarray(result.indices).tolist()) == list(range(N))
    assert_greedy(phi, result, 1.0)


def test_pairs_equal_materialized_differences():
    rng = _rng(9)
    g = rng.normal(size=(30, D)).astype(np.float32)
    pairs = np.array([(3 * k + i, 3 * k + j) for k in range(10) for i, j in [(0, 1), (0, 2), (1, 2)]], np.int32)
    phi = g[pairs[:, 0]] - g[pairs[:, 1]]
    prior = rng.normal(size=(4, D)).astype(np.float32)
    mask = np.arange(len(pairs)) % 4 != 0
    by_pairs = jaxdpo.select_batch(g, B, reg=0.7, prior=prior, pairs=pairs, mask=jnp.asarray(mask))
    dense = jaxdpo.select_batch(phi, B, reg=0.7, prior=prior, mask=jnp.asarray(mask))
    np.testing.assert_array_equal(by_pairs.indices, dense.indices)
    assert_close(by_pairs.scores, dense.scores, ulps=SCORE_ULPS)
    assert_close(v_inv_norms(g, reg=0.7, prior=prior, pairs=pairs), v_inv_norms(phi, reg=0.7, prior=prior), ulps=SCORE_ULPS)


def test_identical_responses_give_zero_score():
    g = _rng(10).normal(size=(6, D)).astype(np.float32)
    g[1] = g[0]
    pairs = np.array([[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]])
    norms = np.asarray(v_inv_norms(g, pairs=pairs))
    assert norms[0] == 0.0 and np.all(norms[1:] > 0)


def test_float64_inputs_compute_in_float64():
    with jax.enable_x64(True):
        phi = _rng(11).normal(size=(N, D))
        result = jaxdpo.select_batch(jnp.asarray(phi), B, reg=1e-3)
        assert result.scores.dtype == jnp.float64
        np.testing.assert_allclose(result.scores, brute_force_greedy(phi, B, 1e-3)[1], rtol=1e-10)


def test_jit_and_purity():
    phi = jnp.asarray(_rng(12).normal(size=(N, D)), jnp.float32)
    prior = jnp.asarray(_rng(13).normal(size=(3, D)), jnp.float32)
    before = np.asarray(phi).copy()
    jitted = jax.jit(jaxdpo.select_batch, static_argnames="batch_size")
    eager = jaxdpo.select_batch(phi, batch_size=B, prior=prior)
    traced = jitted(phi, batch_size=B, prior=prior)
    again = jitted(phi, batch_size=B, prior=prior)
    np.testing.assert_array_equal(eager.indices, traced.indices)
    np.testing.assert_array_equal(traced.indices, again.indices)
    np.testing.assert_array_equal(traced.scores, again.scores)
    np.testing.assert_array_equal(np.asarray(phi), before)


@pytest.mark.usefixtures("unchecked_shapes")
def test_shape_checks_apply_under_jit():
    phi = jnp.asarray(_rng(12).normal(size=(N, D)), jnp.float32)
    with pytest.raises(ValueError, match="2-D"):
        jax.jit(jaxdpo.select_batch, static_argnames="batch_size")(phi[0], batch_size=B)


@given(
    seed=st.integers(0, 2**31 - 1),
    rank=st.integers(1, D),
    log_reg=st.floats(-4, 1),
    p=st.sampled_from([0, 4, 16]),
    scale=st.floats(-2, 2),
)
def test_property_greedy_picks_are_exact_argmaxes(seed, rank, log_reg, p, scale):
    rng = _rng(seed)
    phi = (rng.normal(size=(N, rank)) @ rng.normal(size=(rank, D)) * 10.0**scale).astype(np.float32)
    prior = (rng.normal(size=(p, D)) * 10.0**scale).astype(np.float32) if p else None
    mask = rng.random(N) < 0.8
    mask[:B] = True
    reg = 10.0**log_reg
    result = jaxdpo.select_batch(phi, B, reg=reg, prior=prior, mask=jnp.asarray(mask))
    assert np.all(np.asarray(result.scores) >= 0)
    assert np.all(mask[np.asarray(result.indices)])
    assert_greedy(phi, result, reg, prior, mask)


@pytest.mark.usefixtures("unchecked_shapes")
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features=np.ones(D, np.float32)), "2-D"),
        (dict(features=np.ones((N, D), np.int32)), "floating"),
        (dict(features=np.full((N, D), np.nan, np.float32)), "NaN"),
        (dict(features=np.full((N, D), np.inf, np.float32)), "inf"),
        (dict(features=np.ones((0, D), np.float32)), "empty"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(batch_size=N + 1), "larger than the pool"),
        (dict(batch_size=2.0), "Python int"),
        (dict(prior=np.ones((3, D + 1), np.float32)), "width"),
        (dict(prior=np.ones(D, np.float32)), "prior must be 2-D"),
        (dict(prior=np.full((3, D), np.nan, np.float32)), "prior contains"),
        (dict(reg=0.0), "reg must be > 0"),
        (dict(reg=-1.0), "reg must be > 0"),
        (dict(reg=float("nan")), "reg must be > 0"),
        (dict(mask=np.ones(N + 1, bool)), "mask must have shape"),
        (dict(mask=np.ones(N, np.int32)), "boolean"),
        (dict(mask=np.arange(N) < 2), "eligible"),
        (dict(pairs=np.zeros((5, 3), np.int32)), "pairs must have shape"),
        (dict(pairs=np.full((5, 2), N, np.int32)), "pairs must index"),
        (dict(pairs=np.zeros((5, 2), np.float32)), "integer"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(kwargs, match):
    args = dict(features=np.ones((N, D), np.float32), batch_size=3)
    args.update(kwargs)
    features, batch_size = args.pop("features"), args.pop("batch_size")
    with pytest.raises(ValueError, match=match):
        jaxdpo.select_batch(features, batch_size, **args)
