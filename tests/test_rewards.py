"""Masked sequence log-probs, implicit rewards and per-example reward gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo import implicit_reward, init_lora, reward_gradients, sequence_logprobs
from tests.tiny import sequences, tiny_model, trained_lora
from tests.tolerance import assert_close, assert_trees_close


LOGPROB_ULPS = 64
"""A log-prob sums a few dozen log-softmax terms over a 64-token vocabulary: observed within 8
float32 roundings of the largest |log-prob| here."""
GRADIENT_ULPS = 4096
"""Gradients are sums over positions and layers whose order the compiler picks (window vs whole
sequence, vmapped vs single), with cancellation: the leaf's largest |entry| understates the terms
summed. Observed up to 100 roundings of it (window vs whole sequence); 4096 (5e-4 of the leaf's
scale) leaves room for another CPU's order and still fails any real difference."""


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    return model, trained_lora(model), sequences()


def brute_force_logprobs(model, lora, ids, response, attention):
    """Row by row in float64 NumPy: log-softmax of the logits before each response token."""
    totals = []
    for row_ids, row_response, row_attention in zip(ids, response, attention):
        logits = np.asarray(model(jnp.asarray(row_ids[None]), attention_mask=jnp.asarray(row_attention[None]), lora=lora), np.float64)[0]
        total = 0.0
        for t in np.flatnonzero(row_response):
            before = logits[t - 1]
            total += before[row_ids[t]] - before.max() - np.log(np.sum(np.exp(before - before.max())))
        totals.append(total)
    return np.array(totals)


def test_sequence_logprobs_equal_token_by_token_brute_force(setup):
    model, lora, (ids, response, attention) = setup
    got = sequence_logprobs(model, lora, ids, response, attention_mask=attention)
    assert_close(got, brute_force_logprobs(model, lora, ids, response, attention), ulps=LOGPROB_ULPS)


def shifted_responses():
    """Rows whose responses start at different columns, one ending at the last position."""
    ids, _, attention = sequences()
    response = np.zeros_like(ids)
    for row, (first, end) in enumerate([(6, 10), (3, 6), (4, 8), (7, 9)]):
        response[row, first:end] = 1
    return ids, response, attention


@pytest.mark.parametrize("window", [4, 6, 9])  # 9: every position
def test_logprobs_on_a_response_window_equal_brute_force(setup, window):
    model, lora, _ = setup
    ids, response, attention = shifted_responses()
    got = sequence_logprobs(model, lora, ids, response, attention_mask=attention, window=window)
    assert_close(got, brute_force_logprobs(model, lora, ids, response, attention), ulps=LOGPROB_ULPS)


def test_window_shorter_than_a_response_is_refused(setup):
    model, lora, _ = setup
    ids, response, attention = shifted_responses()
    with pytest.raises(ValueError, match="window 3 is shorter than a response span of 4"):
        sequence_logprobs(model, lora, ids, response, attention_mask=attention, window=3)


def test_gradients_through_the_response_window_equal_full_sequence_gradients(setup):
    """Prompt 32, response ≤ 8 tokens: `reward_gradients` picks a 16-position window."""
    model, lora, _ = setup
    ids, response, attention = sequences(n=2, length=40, prompt=32)
    got = reward_gradients(model, lora, ids, response, beta=1.0, attention_mask=attention, chunk_size=2)
    def every_position(lora, ids, response, attention):
        return sequence_logprobs(model, lora, ids, response, attention_mask=attention, window=39)[0]

    full_window = jax.jit(jax.grad(every_position))
    for i in range(2):
        full = full_window(lora, ids[i : i + 1], response[i : i + 1], attention[i : i + 1])
        assert_trees_close(jax.tree.map(lambda g: g[i], got), full, ulps=GRADIENT_ULPS)


def test_implicit_reward_is_beta_times_log_ratio_and_zero_at_init(setup):
    model, lora, (ids, response, attention) = setup
    reward = implicit_reward(model, lora, ids, response, beta=0.1, attention_mask=attention)
    policy = sequence_logprobs(model, lora, ids, response, attention_mask=attention)
    reference = sequence_logprobs(model, None, ids, response, attention_mask=attention)
    # a difference of two log-probs: its rounding is that of the log-probs, not of the difference
    assert_close(reward, 0.1 * (policy - reference), ulps=LOGPROB_ULPS, scale=0.1 * float(np.abs(policy).max()))
    fresh = init_lora(model, rank=2, alpha=4.0, key=jax.random.key(5))
    np.testing.assert_array_equal(implicit_reward(model, fresh, ids, response, beta=0.1, attention_mask=attention), 0.0)


@pytest.fixture(scope="module")
def grads(setup):
    model, lora, (ids, response, attention) = setup
    return reward_gradients(model, lora, ids, response, beta=0.5, attention_mask=attention, chunk_size=2)


def test_per_example_gradients_equal_single_example_grad(setup, grads):
    model, lora, (ids, response, attention) = setup
    for i in (0, 3):
        single = jax.grad(
            lambda l: 0.5 * sequence_logprobs(model, l, ids[i : i + 1], response[i : i + 1], attention_mask=attention[i : i + 1])[0]
        )(lora)
        assert_trees_close(jax.tree.map(lambda g: g[i], grads), single, ulps=GRADIENT_ULPS)
    assert type(grads) is type(lora)
    assert grads.params["q"]["a"].shape == (4, *lora.params["q"]["a"].shape)


def test_gradients_agree_with_finite_differences():
    """In float64 (model and adapter), so central differences are accurate."""
    from flax import nnx

    from jaxdpo.models import Decoder
    from tests.tiny import CONFIG

    with jax.enable_x64(True):
        model = Decoder(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float64)
        lora = jax.tree.map(lambda x: x.astype(jnp.float64), trained_lora(model))
        ids, response, attention = sequences(n=2)
        g = reward_gradients(model, lora, ids, response, beta=1.0, attention_mask=attention, chunk_size=2)
        direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape, jnp.float64), lora)
        eps = 1e-5

        def at(t):
            shifted = jax.tree.map(lambda p, d: p + t * d, lora, direction)
            return np.asarray(sequence_logprobs(model, shifted, ids, response, attention_mask=attention))

        numeric = (at(eps) - at(-eps)) / (2 * eps)
        analytic = sum(
            np.asarray(gl).reshape(2, -1) @ np.asarray(dl).reshape(-1) for gl, dl in zip(jax.tree.leaves(g), jax.tree.leaves(direction))
        )
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_chunk_size_does_not_change_the_result(setup, grads):
    model, lora, (ids, response, attention) = setup
    one_by_one = reward_gradients(model, lora, ids, response, beta=0.5, attention_mask=attention, chunk_size=1)
    assert_trees_close(one_by_one, grads, ulps=GRADIENT_ULPS)  # float32 sums reassociate with the batch shape


@pytest.mark.usefixtures("unchecked_shapes")
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda ids, r, a: (ids, r[:, :-1], a), "response_mask must have shape"),
        (lambda ids, r, a: (ids, np.where(np.arange(4)[:, None] == 2, 0, r), a), r"no response token in rows \[2\]"),
        (lambda ids, r, a: (ids.astype(np.float32), r, a), "input_ids must be an integer array"),
        (lambda ids, r, a: (ids, np.ones_like(r), None), "marks position 0"),
        (lambda ids, r, a: (ids, r, np.zeros_like(a)), "marks padding"),
        (lambda ids, r, a: (ids[0], r, a), "input_ids must be 2-D"),
    ],
)
def test_bad_input(setup, mutate, match):
    model, lora, (ids, response, attention) = setup
    ids, response, attention = mutate(ids, response, attention)
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(model, lora, ids, response, attention_mask=attention)
    with pytest.raises(ValueError, match=match):
        reward_gradients(model, lora, ids, response, beta=1.0, attention_mask=attention)


def test_beta_must_be_positive(setup):
    model, lora, (ids, response, attention) = setup
    with pytest.raises(ValueError, match="beta must be > 0"):
        implicit_reward(model, lora, ids, response, beta=0.0, attention_mask=attention)
