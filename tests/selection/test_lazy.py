"""select_batch's strategies ("full", "lazy", "auto") pick the same as each other and as a float64
brute force, including adversarial pools; invalid input under jit; scale invariance; half precision."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdpo
from jaxdpo.selection import plan as selection_plan
from tests.selection.reference import brute_force_greedy, replay_gaps
from tests.tolerance import F32_EPS, assert_close

N, D, B = 48, 12, 6
STRATEGIES = ("full", "lazy")
SCORE_ULPS = 64
"""Reported ‖φ‖_{V⁻¹} at the scale of the batch's first (largest) score (see test_greedy)."""
jitted = jax.jit(jaxdpo.select_batch, static_argnames=("batch_size", "strategy"))


def _rng(seed=0):
    return np.random.default_rng(seed)


def _pairs_features(g, pairs):
    return g[pairs[:, 0]] - g[pairs[:, 1]]


def _adversarial(name: str) -> np.ndarray:
    """[N, D] float32 pools where bounds and ties are hardest on a lazy greedy."""
    rng = _rng(7)
    if name == "all_equal":  # ±e_i: every initial score exactly 1, many stay tied after each pick
        return np.concatenate([np.eye(D), -np.eye(D), np.eye(D), -np.eye(D)]).astype(np.float32)
    if name == "duplicates":  # every row four times: a pick drops its copies' scores to almost 0
        return np.repeat(rng.normal(size=(N // 4, D)), 4, axis=0).astype(np.float32)
    if name == "collapse":  # one dominant direction: every score collapses after the first pick
        direction = rng.normal(size=D)
        return (np.outer(rng.uniform(1, 2, N), direction) + 1e-3 * rng.normal(size=(N, D))).astype(np.float32)
    if name == "exact_ties":  # integer rows with many equal norms and equal inner products
        return rng.integers(-1, 2, size=(N, D)).astype(np.float32)
    raise ValueError(name)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("pool", ["all_equal", "duplicates", "collapse", "exact_ties"])
def test_adversarial_pools_match_float64_brute_force(pool, strategy):
    phi = _adversarial(pool)
    result = jaxdpo.select_batch(phi, B, reg=1.0, strategy=strategy)
    indices, scores = brute_force_greedy(phi, B, 1.0)
    np.testing.assert_array_equal(result.indices, indices)
    assert_close(result.scores, scores, ulps=SCORE_ULPS)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_equal_to_the_pool_picks_everyone_in_greedy_order(strategy):
    phi = _rng(3).normal(size=(B, D)).astype(np.float32)
    result = jaxdpo.select_batch(phi, B, reg=0.5, strategy=strategy)
    np.testing.assert_array_equal(result.indices, brute_force_greedy(phi, B, 0.5)[0])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rank=st.integers(1, D),
    log_reg=st.floats(-3, 1),
    p=st.sampled_from([0, 2, 4, 16]),  # 2: products with the prior cached; 4: not; 16 ≥ d
    duplicated=st.booleans(),
)
def test_property_lazy_picks_equal_full_picks(seed, rank, log_reg, p, duplicated):
    rng = _rng(seed)
    phi = rng.normal(size=(N, rank)) @ rng.normal(size=(rank, D))
    if duplicated:
        phi[N // 2 :] = phi[: N // 2]
    phi = phi.astype(np.float32)
    prior = rng.normal(size=(p, D)).astype(np.float32) if p else None
    mask = rng.random(N) < 0.8
    mask[:B] = True
    kwargs = dict(reg=10.0**log_reg, prior=prior, mask=jnp.asarray(mask))
    full = jitted(phi, batch_size=B, strategy="full", **kwargs)
    lazy = jitted(phi, batch_size=B, strategy="lazy", **kwargs)
    np.testing.assert_array_equal(lazy.indices, full.indices)
    assert_close(lazy.scores, full.scores, ulps=SCORE_ULPS)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pairs_mode_equals_materialized_differences(strategy):
    rng = _rng(4)
    g = rng.normal(size=(16, D)).astype(np.float32)
    pairs = rng.integers(0, 16, size=(N, 2)).astype(np.int32)
    phi = _pairs_features(g, pairs)
    mask = np.asarray(pairs[:, 0] != pairs[:, 1])  # a pair of a response with itself has φ = 0
    result = jaxdpo.select_batch(g, B, reg=0.5, pairs=pairs, mask=mask, strategy=strategy)
    indices, scores = brute_force_greedy(phi, B, 0.5, mask=mask)
    np.testing.assert_array_equal(result.indices, indices)
    assert_close(result.scores, scores, ulps=SCORE_ULPS)


@pytest.mark.parametrize("pool", ["normal", "exact_ties"])
def test_pairs_started_from_norm_bounds_pick_the_float64_greedy(pool, monkeypatch):
    """A pool of pairs large enough starts from the bounds (‖g_a‖ + ‖g_b‖)² (no pass over the
    pairs); here any pool does."""
    rng = _rng(6)
    g = rng.integers(-1, 2, size=(16, D)) if pool == "exact_ties" else rng.normal(size=(16, D)) * np.exp(rng.normal(size=(16, 1)))
    g = g.astype(np.float32)
    pairs = rng.integers(0, 16, size=(N, 2)).astype(np.int32)
    mask = np.asarray(pairs[:, 0] != pairs[:, 1])
    monkeypatch.setattr(selection_plan, "PAIR_BOUNDS_FROM", 0)
    assert selection_plan.make_plan("auto", N, 16, D, 0, B, True, "cpu").pair_bounds
    result, stats = jaxdpo.select_batch(g, B, reg=0.5, pairs=pairs, mask=mask, with_stats=True)
    indices, scores = brute_force_greedy(_pairs_features(g, pairs), B, 0.5, mask=mask)
    np.testing.assert_array_equal(result.indices, indices)
    assert_close(result.scores, scores, ulps=SCORE_ULPS)
    assert stats.strategy == "lazy" and int(stats.coordinates) > 0, stats


_lazy_pairs = jax.jit(lambda g, pairs, mask, reg: jaxdpo.select_batch(g, B, reg=reg, pairs=pairs, mask=mask, strategy="lazy"))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(1, D), spread=st.floats(0, 3), log_reg=st.floats(-3, 1))
def test_property_pairs_from_norm_bounds_pick_as_full(seed, rank, spread, log_reg):
    """Rows of g of low rank with log-normal norms (spread: their σ), pairs anywhere among them."""
    rng = _rng(seed)
    g = rng.normal(size=(16, rank)) @ rng.normal(size=(rank, D)) * np.exp(spread * rng.normal(size=(16, 1)))
    g = g.astype(np.float32)
    pairs = rng.integers(0, 16, size=(N, 2)).astype(np.int32)
    mask = jnp.asarray(pairs[:, 0] != pairs[:, 1])
    full = jitted(g, batch_size=B, pairs=pairs, mask=mask, reg=10.0**log_reg, strategy="full")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection_plan, "PAIR_BOUNDS_FROM", 0)
        lazy = _lazy_pairs(g, pairs, mask, 10.0**log_reg)
    np.testing.assert_array_equal(lazy.indices, full.indices)
    assert_close(lazy.scores, full.scores, ulps=SCORE_ULPS)


@pytest.mark.parametrize("case", ["pairs", "pairs_ties", "prior", "dominant", "values", "values_collapse"])
def test_a_search_on_an_active_set_of_highest_bounds_picks_the_float64_greedy(case, monkeypatch):
    """Lazy searches (on bounds: pairs from the norms' bounds, a prior seen through its leading
    directions; on values: dense rows without a prior) first run on the quarter of candidates of
    highest bound (patched: any pool does), until a pick does not beat every bound outside; ties
    across that edge included. "values_collapse": the quarter of largest rows lie in a subspace of
    rank 4 (plus small noise), so after 4 picks their scores collapse and the search must leave
    the active set for the smaller rows outside."""
    monkeypatch.setattr(selection_plan, "PAIR_BOUNDS_FROM", 0)
    monkeypatch.setattr(selection_plan, "ACTIVE_FROM", 0)
    monkeypatch.setattr(selection_plan, "ACTIVE_SHARE", 4)
    rng = _rng(9)
    prior = pairs = mask = None
    strategy = "lazy" if case.startswith("values") else "auto"
    if case.startswith("values"):
        features = rng.normal(size=(4 * N, D)) * np.exp(rng.normal(size=(4 * N, 1)))
        if case == "values_collapse":
            features[:N] = 100 * rng.normal(size=(N, 4)) @ rng.normal(size=(4, D)) + 1e-3 * rng.normal(size=(N, D))
        features = phi = features.astype(np.float32)
    elif case in ("prior", "dominant"):  # d = 64 and 32 labeled rows: more than the bound pass's 16 directions
        features = rng.normal(size=(4 * N, 64)) * np.exp(rng.normal(size=(4 * N, 1)))
        if case == "dominant":  # one row whose score, once picked, still beats every other: picked once only
            features *= 0.01
            features[5] *= 1e3
        features = features.astype(np.float32)
        prior = rng.normal(size=(32, 64)).astype(np.float32)
        phi = features
    else:
        g = rng.integers(-1, 2, size=(24, D)) if case == "pairs_ties" else rng.normal(size=(24, D)) * np.exp(rng.normal(size=(24, 1)))
        features = g.astype(np.float32)
        pairs = rng.integers(0, 24, size=(4 * N, 2)).astype(np.int32)
        mask = np.asarray(pairs[:, 0] != pairs[:, 1])
        phi = _pairs_features(features, pairs)
    prior_rows = 0 if prior is None else 32
    plan = selection_plan.make_plan(strategy, 4 * N, len(features), features.shape[1], prior_rows, 2 * B, pairs is not None, "cpu")
    assert plan.lazy and plan.values == case.startswith("values") and 0 < plan.active < 4 * N, plan
    result = jaxdpo.select_batch(features, 2 * B, reg=0.5, prior=prior, pairs=pairs, mask=mask, strategy=strategy)
    indices, scores = brute_force_greedy(phi, 2 * B, 0.5, prior=prior, mask=mask)
    np.testing.assert_array_equal(result.indices, indices)
    assert_close(result.scores, scores, ulps=SCORE_ULPS)


def test_a_million_pairs_start_from_norm_bounds_unless_full():
    plan = partial(selection_plan.make_plan, count=1_000_000, rows=285_720, dim=2048, prior_rows=0, batch=50, backend="cpu")
    assert plan("auto", pairs=True).pair_bounds and plan("lazy", pairs=True).pair_bounds
    assert not plan("full", pairs=True).pair_bounds and not plan("auto", pairs=False).pair_bounds
    assert not plan("auto", pairs=True, prior_rows=450).pair_bounds


def _planned(n: int, d: int, prior: int = 0, pairs: int | None = None, batch: int = 50) -> str:
    """The strategy "auto" plans for these shapes (traced only: nothing is computed)."""
    rows = n if pairs is None else pairs
    args = [jax.ShapeDtypeStruct((rows, d), jnp.float32), jax.ShapeDtypeStruct((prior, d), jnp.float32)]
    if pairs is not None:
        args.append(jax.ShapeDtypeStruct((n, 2), jnp.int32))
    select = lambda f, p, q=None: jaxdpo.select_batch(f, batch, prior=p, pairs=q, with_stats=True)[1]  # noqa: E731
    return jax.eval_shape(select, *args).strategy


def test_auto_takes_lazy_unless_a_pass_costs_less_than_a_round_of_rescoring():
    assert _planned(N, D, batch=B) == "full"
    assert _planned(3_000, 8192) == "lazy"  # the paper's shape: 1000 prompts x 3 pairs, d = 8192
    assert _planned(3_000, 8192, prior=450) == "lazy"  # ... in round 10 (a prior seen through bounds)
    assert _planned(3_000, 8192, pairs=3_000) == "lazy"
    assert _planned(200_000, 1024) == "lazy"
    phi = _rng(5).normal(size=(N, D)).astype(np.float32)
    np.testing.assert_array_equal(jaxdpo.select_batch(phi, B).indices, jaxdpo.select_batch(phi, B, strategy="full").indices)


def _correlated(n: int, d: int, rank: int, seed: int) -> np.ndarray:
    """Rows in a random rank-`rank` subspace plus 10% noise, norms log-uniform over [0.1, 10]:
    scores collapse once the picks span the subspace (the lazy greedy's hard case)."""
    rng = _rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, rank)))[0].T
    phi = rng.normal(size=(n, rank)) @ basis / np.sqrt(rank) + 0.1 * rng.normal(size=(n, d)) / np.sqrt(d)
    phi *= np.exp(rng.uniform(np.log(0.1), np.log(10.0), (n, 1))) / np.linalg.norm(phi, axis=1, keepdims=True)
    return phi.astype(np.float32)


def test_correlated_features_auto_picks_the_float64_greedy_with_few_passes():
    """The scores collapse past pick 4: that pick catches up in one pass after its first round."""
    phi = _correlated(3000, 24, 4, seed=14)
    result, stats = jax.jit(jaxdpo.select_batch, static_argnames=("batch_size", "with_stats"))(phi, batch_size=30, with_stats=True)
    indices, scores = brute_force_greedy(phi, 30, 1.0)
    np.testing.assert_array_equal(result.indices, indices)
    assert_close(result.scores, scores, ulps=SCORE_ULPS)
    assert stats.strategy == "lazy" and 1 <= int(stats.passes) <= 6, stats  # "full" would make 29


@pytest.mark.parametrize(("catch_up", "passes"), [(32, 2), (4, 3)])
def test_a_collapse_after_six_picks_catches_up_in_passes_of_plan_catch_up_updates(catch_up, passes, monkeypatch):
    """Six orthogonal rows are picked first; then every other row (along their mean, plus noise)
    has collapsed: pick 7 catches up on 6 pending updates (with 4 per pass: in two passes), and
    pick 8, stalling again, on the 7th (one more pass)."""
    monkeypatch.setattr(selection_plan, "CATCH_UP", catch_up)
    lead = 10.0 * np.eye(D)[:6]
    along = np.concatenate([np.full((N - 6, 6), 5.0 / np.sqrt(6)), np.zeros((N - 6, D - 6))], axis=1)
    phi = np.concatenate([lead, along + 1e-2 * _rng(3).normal(size=(N - 6, D))]).astype(np.float32)
    result, stats = jaxdpo.select_batch(phi, 8, strategy="lazy", with_stats=True)
    indices, scores = brute_force_greedy(phi, 8, 1.0)
    np.testing.assert_array_equal(result.indices, indices)
    assert_close(result.scores, scores, ulps=SCORE_ULPS)
    assert int(stats.passes) == passes, stats


def test_a_cached_prior_over_a_pool_larger_than_one_prefetch_keeps_float64_greedy_picks():
    """1200 candidates, 17 prior rows of width 80: the prior is seen through 16 leading directions
    at first (bounds, not values) and products with it are cached (4·n·p ≤ n·d), fetched `PREFETCH`
    candidates at a time as the picks' scores collapse."""
    phi = _correlated(1200, 80, 4, seed=16)
    prior = _correlated(17, 80, 4, seed=17)
    result = jitted(phi, batch_size=20, prior=prior, strategy="lazy")
    indices, scores = brute_force_greedy(phi, 20, 1.0, prior=prior)
    np.testing.assert_array_equal(result.indices, indices)
    assert_close(result.scores, scores, ulps=SCORE_ULPS)


def test_nearly_tied_unit_features_keep_greedy_picks():
    phi = _rng(15).normal(size=(3000, 24))
    phi = (phi / np.linalg.norm(phi, axis=1, keepdims=True)).astype(np.float32)
    result, stats = jax.jit(jaxdpo.select_batch, static_argnames=("batch_size", "with_stats"))(phi, batch_size=30, with_stats=True)
    gaps, _ = replay_gaps(phi, result.indices, 1.0)  # ties within rounding: any of them is the greedy's
    assert np.all(gaps <= SCORE_ULPS * F32_EPS), gaps.max()
    assert stats.strategy == "lazy" and int(stats.rescored) < 30 * 8, stats  # the coordinate rounds leave few contenders


def test_float32_with_tiny_reg_keeps_float64_greedy_picks_once_the_batch_spans_the_features():
    """The case where float32 running score updates drifted from pick 32 on (score gap 27%)."""
    rng = _rng(11)
    phi = rng.normal(size=(2000, 32)).astype(np.float32)
    indices, scores = brute_force_greedy(phi, 120, 1e-5)
    for strategy in STRATEGIES:
        result = jitted(phi, batch_size=120, reg=1e-5, strategy=strategy)
        np.testing.assert_array_equal(result.indices, indices)
        assert_close(result.scores, scores, ulps=SCORE_ULPS)


@pytest.mark.parametrize("exponent", [-60, 40])
def test_scaling_features_by_a_power_of_two_and_reg_by_its_square_changes_nothing(exponent):
    rng = _rng(6)
    phi = rng.normal(size=(N, D)).astype(np.float32)
    prior = rng.normal(size=(3, D)).astype(np.float32)
    base = jitted(phi, batch_size=B, reg=0.25, prior=prior, strategy="lazy")
    alpha = np.float32(2.0**exponent)
    scaled = jitted(phi * alpha, batch_size=B, reg=0.25 * float(alpha) ** 2, prior=prior * alpha, strategy="lazy")
    np.testing.assert_array_equal(scaled.indices, base.indices)
    np.testing.assert_array_equal(scaled.scores, base.scores)  # ‖φ‖_{V⁻¹} is invariant


def _residual_greedy(phi, batch_size: int):
    """Eq. 3-4 in the limit reg/|φ|² → 0 (float64, no V to invert: its condition number would be
    1e40): pick the largest norm of φ's component outside the span of the picks so far; φᵀV⁻¹φ is
    then |φ_⊥|²/reg up to a relative 1e-40."""
    phi = np.asarray(phi, np.float64)
    basis, indices, residuals = np.zeros((0, phi.shape[1])), [], []
    for _ in range(batch_size):
        outside = phi - (phi @ basis.T) @ basis
        norms = np.where(np.isin(np.arange(len(phi)), indices), -1.0, np.linalg.norm(outside, axis=1))
        i = int(np.argmax(norms))
        indices.append(i)
        residuals.append(norms[i])
        basis = np.vstack([basis, outside[i] / norms[i]])
    return np.array(indices), np.array(residuals)


def test_huge_features_and_huge_reg_pick_as_float64_and_stay_finite():
    phi = _rng(8).normal(size=(N, D)).astype(np.float32)
    huge = jaxdpo.select_batch(phi * np.float32(1e20), B, reg=1.0)  # float32 squares overflow at 1e38
    indices, residuals = _residual_greedy(phi, B)
    np.testing.assert_array_equal(huge.indices, indices)
    assert_close(huge.scores, 1e20 * residuals, ulps=SCORE_ULPS)
    big_reg = jaxdpo.select_batch(phi, B, reg=1e30)  # scores ~1e-15: picks still by exact ratios
    np.testing.assert_array_equal(big_reg.indices, brute_force_greedy(phi, B, 1e30)[0])
    assert np.all(np.asarray(big_reg.scores) > 0)


@pytest.mark.usefixtures("unchecked_shapes")
def test_a_reg_that_overflows_the_features_precision_is_named():
    with pytest.raises(ValueError, match="overflows float32"):
        jaxdpo.select_batch(np.ones((N, D), np.float32), B, reg=1e40)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_features_pick_the_exact_greedy_of_the_rounded_features(dtype):
    phi = _rng(9).normal(size=(N, D)).astype(np.float32)
    rounded = jnp.asarray(phi, dtype)
    result = jaxdpo.select_batch(rounded, B, reg=1.0)
    indices, scores = brute_force_greedy(np.asarray(rounded, np.float32), B, 1.0)
    np.testing.assert_array_equal(result.indices, indices)
    assert result.scores.dtype == jnp.float32
    assert_close(result.scores, scores, ulps=SCORE_ULPS)


def test_lists_are_accepted():
    phi = _rng(10).normal(size=(N, D))
    prior = _rng(11).normal(size=(2, D))
    result = jaxdpo.select_batch(phi.tolist(), B, prior=prior.tolist())
    np.testing.assert_array_equal(result.indices, brute_force_greedy(phi, B, 1.0, prior=prior)[0])


def _invalid_under_jit(name: str) -> dict:
    phi = _rng(12).normal(size=(N, D)).astype(np.float32)
    g = phi[:16]
    if name == "nan_features":
        phi[5, 3] = np.nan
        return dict(features=phi)
    if name == "inf_prior":
        return dict(features=phi, prior=np.full((2, D), np.inf, np.float32))
    if name == "negative_reg":
        return dict(features=phi, reg=jnp.float32(-1.0))
    if name == "no_eligible":
        return dict(features=phi, mask=np.zeros(N, bool))
    if name == "pairs_out_of_range":
        pairs = np.stack([np.arange(N) % 16, (np.arange(N) + 1) % 16], axis=1).astype(np.int32)
        pairs[7, 1] = 16
        return dict(features=g, pairs=pairs)
    raise ValueError(name)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", ["nan_features", "inf_prior", "negative_reg", "no_eligible", "pairs_out_of_range"])
def test_invalid_input_under_jit_gives_minus_one_and_nan_never_a_valid_looking_pick(case, strategy):
    args = _invalid_under_jit(case)
    features = args.pop("features")
    result = jax.jit(
        lambda f, reg, **kw: jaxdpo.select_batch(f, B, reg=reg, strategy=strategy, **kw)
    )(features, args.pop("reg", jnp.float32(1.0)), **args)
    np.testing.assert_array_equal(result.indices, np.full(B, -1))
    assert np.all(np.isnan(np.asarray(result.scores)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fewer_eligible_than_the_batch_under_jit_fills_the_rest_with_minus_one(strategy):
    phi = _rng(13).normal(size=(N, D)).astype(np.float32)
    mask = np.zeros(N, bool)
    mask[[4, 30]] = True
    result = jitted(phi, batch_size=5, mask=mask, strategy=strategy)
    indices = np.asarray(result.indices)
    assert sorted(indices[:2].tolist()) == [4, 30]
    np.testing.assert_array_equal(indices[2:], [-1, -1, -1])
    assert np.all(np.isfinite(np.asarray(result.scores)[:2])) and np.all(np.isnan(np.asarray(result.scores)[2:]))
