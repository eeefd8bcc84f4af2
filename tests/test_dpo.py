import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxdpo
from jaxdpo.sequences import Sequences
from jaxdpo.dpo import DpoTrainer, train_step, batched_logprobs, dpo_loss, reference_logprobs
from tests.tiny import sequences, tiny_model, trained_lora
from tests.tolerance import assert_close


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


@pytest.fixture(scope="module")
def data():
    ids, response, attention = sequences(n=8, length=10, prompt=5, seed=2)
    return Sequences(ids, response, attention)


PAIRS = np.array([[0, 1], [2, 3], [4, 5], [6, 7], [1, 2]])
LOSS_ULPS = 64
"""A DPO loss is a difference of sequence log-probs computed by two programs (training's and the
reference pass): its rounding is that of the log-probs, in ulps of the largest |log-prob| (observed
under 0.1 here)."""


@given(
    st.lists(st.floats(-30, 0), min_size=4, max_size=4),
    st.floats(0.01, 2.0),
    st.floats(0.0, 0.49),
)
def test_loss_equals_formula(logps, beta, smoothing):
    pc, pr, rc, rr = logps
    h = beta * ((pc - rc) - (pr - rr))
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    expected = -(1 - smoothing) * log_sigmoid(h) - smoothing * log_sigmoid(-h)
    with jax.enable_x64(True):
        got = dpo_loss(*(jnp.asarray([v], jnp.float64) for v in logps), beta=beta, label_smoothing=smoothing)
        np.testing.assert_allclose(np.asarray(got)[0], expected, rtol=1e-12, atol=1e-12)


def test_batched_logprobs_match_sequence_logprobs(model, data):
    lora = jaxdpo.init_lora(model, rank=2, alpha=4.0, key=jax.random.key(0))
    expected = jaxdpo.sequence_logprobs(model, None, data.input_ids, data.response_mask, attention_mask=data.attention_mask)
    assert_close(reference_logprobs(model, data, chunk_size=3), expected, ulps=64)
    assert_close(batched_logprobs(model, lora, data, chunk_size=3), expected, ulps=64)


@pytest.fixture(scope="module")
def trained(model, data):
    trainer = DpoTrainer(beta=1.0, learning_rate=1e-2, epochs=15, batch_size=2, grad_accum=2, warmup_steps=1)
    lora = jaxdpo.init_lora(model, rank=4, alpha=8.0, key=jax.random.key(0))
    base = jax.tree.map(np.array, nnx.state(model))
    ref = reference_logprobs(model, data, chunk_size=4)
    state, losses = trainer.train(model, trainer.init(lora), data, PAIRS, ref, seed=0)
    return trainer, lora, base, ref, state, losses


def test_nll_weight_adds_the_chosen_per_token_nll(model, data):
    """RPO: the step's loss is the mean over pairs of DPO + λ · (−log π(chosen) / chosen tokens)."""
    trainer = DpoTrainer(beta=0.5, learning_rate=1e-3, epochs=1, batch_size=len(PAIRS), nll_weight=0.7)
    lora = trained_lora(model, rank=4, alpha=8.0)
    ref = reference_logprobs(model, data, chunk_size=4)
    _, losses = trainer.train(model, trainer.init(lora), data, PAIRS, ref, seed=0)
    policy = np.asarray(batched_logprobs(model, lora, data, chunk_size=4), np.float64)
    chosen, rejected = PAIRS[:, 0], PAIRS[:, 1]
    h = 0.5 * ((policy[chosen] - ref[chosen]) - (policy[rejected] - ref[rejected]))
    nll = -policy[chosen] / data.response_mask[chosen].sum(axis=1)
    expected = np.mean(np.logaddexp(0.0, -h) + 0.7 * nll)
    assert_close(losses[0], expected, ulps=LOSS_ULPS, scale=np.abs(policy).max())  # the loss is a difference of log-probs


def test_loss_falls_and_policy_prefers_chosen(model, data, trained):
    trainer, _, _, ref, state, losses = trained
    assert len(losses) == trainer.epochs * trainer.steps_per_epoch(len(PAIRS)) == 30
    assert_close(losses[0], np.log(2), ulps=LOSS_ULPS, scale=np.abs(ref).max())  # B = 0: policy = reference, up to their rounding
    policy = batched_logprobs(model, state.lora, data, chunk_size=4)
    final = dpo_loss(policy[PAIRS[:, 0]], policy[PAIRS[:, 1]], ref[PAIRS[:, 0]], ref[PAIRS[:, 1]], beta=trainer.beta)
    assert float(final.mean()) < 0.6 * np.log(2)
    assert (np.asarray(final) < np.log(2)).sum() >= 4  # chosen gained on rejected in (nearly) every pair


def test_base_weights_never_change(model, trained):
    _, _, base, _, _, _ = trained
    after = jax.tree.map(np.array, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, base, after)


def test_step_does_not_recompile_across_rounds(model, data, trained):
    trainer, lora, _, ref, state, _ = trained
    size = train_step._cache_size()
    more = Sequences(*(np.concatenate([x, x[:3]]) for x in data))  # the labeled set grows between rounds
    for round_ in range(2):  # a new round: other pairs, fewer of them, a reset adapter
        fresh = trainer.init(jax.tree.map(lambda x: x * (round_ + 1), lora))
        trainer.train(model, fresh, data, PAIRS[: 3 - round_], ref, seed=round_)
        trainer.train(model, state, more, PAIRS + 3, np.r_[ref, ref[:3]], seed=round_)
    assert train_step._cache_size() == size


def test_learning_rate_schedule():
    trainer = DpoTrainer(learning_rate=1.0, warmup_steps=3, schedule="linear")
    assert [trainer.learning_rate_at(s, 13) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert trainer.learning_rate_at(3, 13) == pytest.approx(1.0)
    assert trainer.learning_rate_at(8, 13) == pytest.approx(0.5)
    assert DpoTrainer(learning_rate=2.0, schedule="cosine").learning_rate_at(5, 10) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=0.0), "beta"),
        (dict(batch_size=0), "batch_size"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(schedule="step"), "schedule"),
        (dict(nll_weight=-0.1), "nll_weight"),
    ],
)
def test_bad_trainer_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DpoTrainer(**kwargs)


def test_bad_training_input(model, data, trained):
    trainer, lora, _, ref, _, _ = trained
    state = trainer.init(lora)
    with pytest.raises(ValueError, match="pairs"):
        trainer.train(model, state, data, np.array([[0, 99]]), ref, seed=0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        trainer.train(model, state, data, PAIRS, ref[:3], seed=0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        trainer.train(model, state, data, PAIRS, np.full_like(ref, np.nan), seed=0)
