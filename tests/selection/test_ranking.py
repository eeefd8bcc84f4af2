"""`ranking`: the two-step top k equals `lax.top_k`, ties (lowest index first) and -inf included,
on vectors long enough to take the two-step path; `highest` gives the largest set of candidates of
highest bound that fits, as a NumPy sort does."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdpo.selection.plan import TWO_STEP_SPREAD, TWO_STEP_TOP_K, WIDE_SPREAD
from jaxdpo.selection.ranking import highest, largest

LENGTHS = (TWO_STEP_TOP_K, TWO_STEP_TOP_K + 37)  # a multiple of both blocks, and one that pads
KS = (1, 4, TWO_STEP_TOP_K // WIDE_SPREAD + 1, TWO_STEP_TOP_K // TWO_STEP_SPREAD)  # 64-entry blocks, then 16


@partial(jax.jit, static_argnums=1)
def _both(values, k):
    return largest(values, k), jax.lax.top_k(values, k)


def test_the_lengths_take_the_two_step_path_with_both_block_sizes():
    assert all(n >= TWO_STEP_SPREAD * k for n in LENGTHS for k in KS)
    assert KS[1] * WIDE_SPREAD <= TWO_STEP_TOP_K < KS[2] * WIDE_SPREAD


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from(LENGTHS), k=st.sampled_from(KS), levels=st.sampled_from([3, 1000, 0]))
def test_two_step_top_k_equals_lax_top_k(seed, n, k, levels):
    """levels: distinct values drawn (few: many ties; 0: continuous), a random share of them -inf."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, levels, n).astype(np.float32) if levels else rng.normal(size=n).astype(np.float32)
    values[rng.random(n) < rng.uniform(0, 1)] = -np.inf
    (top, where), (expected_top, expected_where) = _both(values, k)
    np.testing.assert_array_equal(top, expected_top)
    np.testing.assert_array_equal(where, expected_where)


@pytest.mark.parametrize("k", [1, 40])
def test_a_vector_of_minus_inf_gives_the_lowest_indices(k):
    values = np.full(TWO_STEP_TOP_K + 5, -np.inf, np.float32)
    (top, where), _ = _both(values, k)
    np.testing.assert_array_equal(where, np.arange(k))
    assert np.all(top == -np.inf)


@partial(jax.jit, static_argnums=1)
def _highest(bounds, k):
    return highest(bounds, k)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1, 5, 40, 64, 100]), levels=st.sampled_from([2, 7, 0]))
def test_highest_takes_every_bound_above_the_largest_threshold_that_fits(seed, k, levels):
    rng = np.random.default_rng(seed)
    n = 64
    bounds = rng.integers(0, levels, n).astype(np.float32) if levels else rng.exponential(size=n).astype(np.float32)
    bounds[rng.random(n) < rng.uniform(0, 0.5)] = -np.inf
    chosen, outside = _highest(bounds, k)
    keys = np.where(bounds >= 0, bounds.view(np.int32), -1)
    ordered = np.sort(keys)[::-1]
    threshold = ordered[k] if k < n else -1  # the (k+1)-th key stays out, and every key equal to it
    expected = np.flatnonzero(keys > threshold)
    np.testing.assert_array_equal(np.asarray(chosen), np.concatenate([expected, np.full(k - len(expected), n)]))
    rest = np.delete(bounds, expected)
    assert float(outside) == (rest.max() if len(rest) else -np.inf)
