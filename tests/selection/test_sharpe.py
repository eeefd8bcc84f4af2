"""SHARP and W-SHARP against the authors' released code, re-done step by step in float64 NumPy.

Source (read, not copied): github.com/belakaria/sharpe-ratio-active-llm-alignment-dpo at commit
c0437be6cb3ac1ec473cc60e91e8537511e44d85.
- utils.py lines 328–345 (`concatenated_forward`): each response's log-prob is the sum over its
  tokens (`_get_batch_logps(..., average_log_prob=False)`), in float64, for the policy and for the
  reference model — the same sequence log-probs as `jaxdpo.rewards.sequence_logprobs`.
- data_selection.py lines 319–374 (`select_sharpe_elements`), per candidate pair (chosen = the
  pair's first response, rejected = its second):
  - l. 344: chosen_rewards = beta * (policy_chosen_logps − reference_chosen_logps)
  - l. 345–347: rejected_rewards = beta * (policy_rejected_logps − reference_rejected_logps)
  - l. 348: reward_diff = rejected_rewards − chosen_rewards
  - l. 349: pref_p2 = sigmoid(reward_diff)
  - l. 350: pref_p_flip_norm = |1 − 1 / pref_p2|
  - l. 351–352 ("sharpe"): ratio = (1 + pref_p_flip_norm) / |1 − pref_p_flip_norm|
  - l. 353–360 ("wsharpe"): pref_p1 = 1 − pref_p2; means = pref_p1 + pref_p2 · pref_p_flip_norm;
    variances = pref_p1 · (1 − means)² + pref_p2 · (pref_p_flip_norm − means)²; ratio = means / √variances
  - l. 362–363: the ratios of every micro-batch concatenated, then `torch.topk(ratios, num_to_select,
    sorted=False)`: the B largest ratios.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdpo.selection import SelectionPool, make_selector, select_sharpe, select_uncertainty, sharpe_ratio
from tests.tolerance import assert_close

BETA = 0.1
# log-probs of 8 candidate pairs, multiples of 1/8 so that every difference below is exact in float32;
# margins r_a − r_b = 0.1, 0.025, 0, −0.25, 0.0125, 0.55, −0.4, 1.5
POLICY_A = np.asarray([-12.5, -30.0, -8.25, -21.0, -15.5, -9.0, -40.0, -18.375])
POLICY_B = np.asarray([-14.0, -29.5, -8.25, -11.0, -15.625, -19.5, -41.0, -18.0])
REFERENCE_A = np.asarray([-13.0, -29.0, -9.0, -20.0, -15.5, -12.0, -39.75, -18.5])
REFERENCE_B = np.asarray([-13.5, -28.25, -9.0, -12.5, -15.5, -17.0, -44.75, -3.125])


def authors_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected, strategy: str) -> np.ndarray:
    """data_selection.py lines 344–360, in float64 (their `concatenated_forward` casts logits to float64)."""
    chosen_rewards = BETA * (policy_chosen - reference_chosen)
    rejected_rewards = BETA * (policy_rejected - reference_rejected)
    reward_diff = rejected_rewards - chosen_rewards
    pref_p2 = 1.0 / (1.0 + np.exp(-reward_diff))
    pref_p_flip_norm = np.abs(1 - 1 / pref_p2)
    with np.errstate(divide="ignore", invalid="ignore"):
        if strategy == "sharpe":
            return (1 + pref_p_flip_norm) / np.abs(1 - pref_p_flip_norm)
        pref_p1 = 1 - pref_p2
        means = pref_p1 + pref_p2 * pref_p_flip_norm
        variances = pref_p1 * (1 - means) ** 2 + pref_p2 * (pref_p_flip_norm - means) ** 2
        return means / np.sqrt(variances)


def jaxdpo_margins(policy_a, policy_b, reference_a, reference_b) -> np.ndarray:
    """What `jaxdpo.experiment.pool` hands the selector: r(x, y_a) − r(x, y_b), r = β(log π − log π_ref), float32."""
    f32 = np.float32
    rewards_a = f32(BETA) * (policy_a.astype(f32) - reference_a.astype(f32))
    rewards_b = f32(BETA) * (policy_b.astype(f32) - reference_b.astype(f32))
    return rewards_a - rewards_b


def assert_each_close(actual, expected, ulps: float) -> None:
    """Element by element, each at its own scale: a ratio is one function of one margin, not a sum."""
    for got, want in zip(np.asarray(actual, np.float64), expected):
        if np.isinf(want):
            assert got == want
        else:
            assert_close(got, want, ulps=ulps)


@pytest.mark.parametrize("strategy, weighted", [("sharpe", False), ("wsharpe", True)])
def test_scores_and_ranking_reproduce_the_authors_code(strategy, weighted):
    margins = jaxdpo_margins(POLICY_A, POLICY_B, REFERENCE_A, REFERENCE_B)
    assert margins[2] == 0.0  # a pair the policy cannot tell apart: ratio +inf in both codes
    expected = authors_ratios(POLICY_A, POLICY_B, REFERENCE_A, REFERENCE_B, strategy)
    assert_each_close(sharpe_ratio(margins, weighted=weighted), expected, ulps=16)
    # their top-B set for every B, and our pick order: descending ratio (the margins are distinct in |m| here)
    picked = select_sharpe(margins, len(margins), weighted=weighted)
    np.testing.assert_array_equal(picked.indices, np.argsort(-expected, kind="stable"))
    assert_each_close(picked.scores, expected[np.asarray(picked.indices)], ulps=16)
    for batch in (1, 3, 5):
        assert set(np.asarray(select_sharpe(margins, batch, weighted=weighted).indices)) == set(np.argpartition(-expected, batch - 1)[:batch])
    # a label-free score: the pair read the other way round (y_b as "chosen") scores the same
    swapped = authors_ratios(POLICY_B, POLICY_A, REFERENCE_B, REFERENCE_A, strategy)
    assert_each_close(sharpe_ratio(-margins, weighted=weighted), swapped, ulps=16)


@settings(max_examples=30)
@given(st.lists(st.floats(-15.0, 15.0, width=32).filter(lambda m: m == 0 or abs(m) >= 1e-4), min_size=24, max_size=24, unique=True))  # one shape: one compilation
def test_both_rank_as_uncertainty_and_match_the_authors_formula(margins):
    """The closed forms 1/|tanh(m/2)| and 1/|sinh(m/2)| against the authors' arithmetic on the same
    margins, their ranking, and the batch of `select_uncertainty` (smallest |margin| first). Below
    |m| ≈ 1e-8 the authors' float64 arithmetic itself loses the ratio (|1 − 1/p| cancels), hence
    |m| ≥ 1e-4 or 0."""
    margins = np.asarray(margins, np.float32)
    zeros = np.zeros_like(margins, np.float64)
    for strategy, weighted in (("sharpe", False), ("wsharpe", True)):
        expected = authors_ratios(zeros, zeros, zeros, margins.astype(np.float64) / BETA, strategy)  # r_chosen − r_rejected = m
        assert_each_close(sharpe_ratio(margins, weighted=weighted), expected, ulps=64)
        picks = np.asarray(select_sharpe(margins, len(margins), weighted=weighted).indices)
        ordered = expected[picks]
        assert np.all(ordered[1:] <= ordered[:-1] * (1 + 1e-8))  # descending in the authors' ratio (m and −m: 1e-10 apart there)
        batch = len(margins) // 2
        np.testing.assert_array_equal(select_sharpe(margins, batch, weighted=weighted).indices, select_uncertainty(margins, batch).indices)


def test_registered_methods_read_only_the_margins_and_respect_the_mask():
    margins = jnp.asarray([0.3, -0.1, 2.0, 0.05, -0.7], jnp.float32)
    mask = jnp.asarray([True, True, True, False, True])
    for name, weighted in (("sharp", False), ("w_sharp", True)):
        selector = make_selector(name)
        assert selector.requires == frozenset({"margins"}) and selector.policy == "current"
        got = selector(SelectionPool(num_candidates=5, margins=margins, mask=mask), 2, key=jax.random.key(0))
        np.testing.assert_array_equal(got.indices, [1, 0])  # |m| ascending, the masked 0.05 left out
        assert_each_close(got.scores, np.asarray(sharpe_ratio(margins, weighted=weighted))[[1, 0]], ulps=0)
    with pytest.raises(ValueError, match="margins"):
        select_sharpe(jnp.asarray([0.1, jnp.nan]), 1)
