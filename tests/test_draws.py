"""The sampler's token choice (`jaxdpo.sampling.draw_tokens`) and its randomness: tokens are the
float64 inverse CDF of their uniforms, their frequencies pass a chi-square test against the
(filtered, tempered) softmax, zero-probability tokens are never drawn, and each row's uniforms are
a function of (key, prompt index, sample, step) alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from jaxdpo.sampling import draw_tokens, filter_logits, row_keys, step_uniforms
from tests.draw_reference import inverse_cdf_reference, softmax64

VOCAB = 300  # blocks of 128: two full, one partial (the clamped window)
DRAWS = 60_000
SIGNIFICANCE = 1e-3  # each chi-square test rejects a correct sampler with this probability (fixed seed: deterministic)

draw = jax.jit(draw_tokens)


def test_tokens_are_the_float64_inverse_cdf_of_their_uniforms():
    logits = 2.0 * jax.random.normal(jax.random.key(0), (256, VOCAB))
    logits = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.3, logits.shape), -jnp.inf, logits)
    uniforms = jax.random.uniform(jax.random.key(2), (256, 2))
    np.testing.assert_array_equal(np.asarray(draw(logits, uniforms)), inverse_cdf_reference(logits, uniforms))


@pytest.fixture(scope="module")
def row_logits():
    """One row of logits over VOCAB tokens, every probability large enough for DRAWS (≥ 5 expected)."""
    return jax.random.uniform(jax.random.key(3), (VOCAB,), minval=-2.0, maxval=2.0)


@jax.jit
def sampled_tokens(filtered):
    """DRAWS tokens of one row of (filtered) logits, each draw with its own key (as `generate`'s rows)."""
    keys = row_keys(jax.random.key(4), jnp.arange(DRAWS), 1)
    return draw_tokens(jnp.broadcast_to(filtered, (DRAWS, VOCAB)), step_uniforms(keys, 0))


def chi_square_p(counts, probs) -> float:
    """Pearson's chi-square p-value of `counts` against `probs` (over the tokens of probability > 0)."""
    kept = probs > 0
    expected = counts.sum() * probs[kept]
    assert expected.min() >= 5, "too few draws for the chi-square approximation"
    return float(stats.chisquare(counts[kept], expected).pvalue)


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 40), (0.8, 0.6, 90)])
def test_frequencies_match_the_filtered_softmax(row_logits, temperature, top_p, top_k):
    """Chi-square goodness of fit at SIGNIFICANCE over DRAWS draws; tokens the filter removes are
    never drawn; and the same counts are rejected against a slightly different distribution (every
    other token's logit 0.1 higher: probabilities off by about 5%), so the test can fail."""
    filtered = np.asarray(filter_logits(row_logits[None] / temperature, top_p=top_p, top_k=top_k)[0])
    counts = np.bincount(np.asarray(sampled_tokens(filtered)), minlength=VOCAB)
    probs = softmax64(filtered)
    assert counts[probs == 0].sum() == 0
    assert chi_square_p(counts, probs) > SIGNIFICANCE
    assert chi_square_p(counts, softmax64(filtered + 0.1 * (np.arange(VOCAB) % 2))) < SIGNIFICANCE


@st.composite
def logit_rows(draw_from, sizes=(1, 7, 129, VOCAB)):
    """A row of logits in [−30, 30] or −inf (at least one finite), of one of a few sizes (one
    compiled shape each)."""
    size = draw_from(st.sampled_from(sizes))
    values = draw_from(st.lists(st.one_of(st.floats(-30, 30), st.just(-np.inf)), min_size=size, max_size=size))
    return np.asarray(values if max(values) > -np.inf else [0.0, *values[1:]], np.float32)


@given(logit_rows(), st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True))
def test_never_draws_a_token_of_probability_zero(logits, u_block, u_token):
    """Whatever the rounding (uniforms at 0 or just below 1, blocks of underflowing mass), the
    token drawn has a finite logit and is in range."""
    uniforms = np.asarray([[u_block, u_token], [0.0, 0.0], [1 - 2**-24, 1 - 2**-24]], np.float32)
    tokens = np.asarray(draw(jnp.broadcast_to(logits, (3, logits.size)), uniforms))
    assert np.all((tokens >= 0) & (tokens < logits.size)) and np.all(np.isfinite(logits[tokens])), tokens


def test_row_uniforms_are_a_function_of_key_prompt_sample_and_step():
    key = jax.random.key(9)
    keys = row_keys(key, jnp.asarray([5, 2]), 3)
    expected = [jax.random.fold_in(jax.random.fold_in(key, i), j) for i in (5, 2) for j in range(3)]
    np.testing.assert_array_equal(jax.random.key_data(keys), np.stack([jax.random.key_data(k) for k in expected]))
    first, again, later = (np.asarray(step_uniforms(keys, t)) for t in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert first.shape == (6, 2) and np.all((first >= 0) & (first < 1))
    assert len(np.unique(np.concatenate([first, later]))) == 24  # every row, step and of the two draws: its own
