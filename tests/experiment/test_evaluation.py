"""The capability guard (issue 23, item 1): the reference-response NLL and the Monte Carlo KL to
π_ref, against transformers (PyTorch, float64) on the same checkpoint, before and after DPO moves
the policy. An untrained embedded decoder stands in for the SFT model: the guard's arithmetic does
not need a trained one, and it saves training it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxdpo import embedded
from jaxdpo.config import config_from_dict
from jaxdpo.dpo import reference_logprobs
from jaxdpo.experiment.evaluation import capability_guard, evaluate, mean_token_nll
from jaxdpo.experiment.setup import build_setup
from jaxdpo.models import Decoder, init_lora, save_pretrained
from tests.tolerance import assert_close

PARITY_ULPS = 512
"""Sums of float32 log-softmax terms against float64 PyTorch: a few dozen roundings of the sum's scale."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("guard")
    save_pretrained(Decoder(embedded.MODEL_CONFIG, rngs=nnx.Rngs(3)), out / "sft-model")
    config = config_from_dict({  # the shapes of tests/test_loop.py's runs: their compiled programs are cached
        "data": {"prompts_per_round": 8}, "eval": {"prompts": 8}, "lora": {"rank": 2, "alpha": 4.0},
        "dpo": {"epochs": 8, "batch_size": 4, "learning_rate": 1e-2},
    })
    return build_setup(config, out), out


def torch_logprobs(folder, sequences) -> np.ndarray:
    """Σ response-token log-probs per row by transformers in float64 (right padding: no position shift)."""
    torch = pytest.importorskip("torch")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).to(torch.float64).eval()
    ids, response, attention = (torch.as_tensor(np.asarray(x), dtype=torch.long) for x in sequences)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(1) - 1).clamp(min=0)).logits
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (token * response[:, 1:]).sum(1).numpy()


@pytest.fixture(scope="module")
def trained(setup):
    """An adapter after a few DPO steps on pairs of the initial model's responses (first one preferred)."""
    setup, out = setup
    c = setup.config
    responses = setup.generate(setup.train.take(np.arange(8)), lora=None, key=jax.random.key(1), num_samples=3, temperature=1.0)
    pairs = np.stack([np.arange(0, 24, 3), np.arange(1, 24, 3)], axis=1)
    state = setup.trainer.init(init_lora(setup.model, rank=c.lora.rank, alpha=c.lora.alpha, key=jax.random.key(2)))
    state, _ = setup.trainer.train(setup.model, state, responses, pairs, reference_logprobs(setup.model, responses), seed=0)
    save_pretrained(setup.model, out / "merged", lora=state.lora)
    return state.lora


def test_at_round_zero_the_nll_is_the_reference_models_and_the_kl_is_zero(setup):
    setup, out = setup
    result = evaluate(setup, None, seed=0, round_=0, baseline=None)
    assert result["kl_to_ref"] == 0.0 and result["kl_to_ref_stderr"] == 0.0
    expected = -torch_logprobs(out / "sft-model", setup.references).sum() / setup.references.response_mask.sum()
    assert_close(result["ref_nll"], expected, ulps=PARITY_ULPS)
    fresh = init_lora(setup.model, rank=2, alpha=4.0, key=jax.random.key(5))  # B = 0: the same policy
    again = evaluate(setup, fresh, seed=0, round_=0, baseline=None)
    assert_close(again["ref_nll"], result["ref_nll"], ulps=16)
    assert_close(again["kl_to_ref"], 0.0, ulps=64, scale=result["ref_nll"] * setup.max_new_tokens)  # roundings of a response's log-prob


def test_both_move_when_training_moves_the_policy_and_match_transformers(setup, trained):
    setup, out = setup
    samples = setup.generate(setup.eval, lora=trained, key=jax.random.key(7), num_samples=1, temperature=1.0)
    guard = capability_guard(setup, trained, samples)
    initial = capability_guard(setup, None, samples)
    expected_nll = -torch_logprobs(out / "merged", setup.references).sum() / setup.references.response_mask.sum()
    assert_close(guard["ref_nll"], expected_nll, ulps=PARITY_ULPS)
    log_ratio = torch_logprobs(out / "merged", samples) - torch_logprobs(out / "sft-model", samples)
    assert_close(guard["kl_to_ref"], log_ratio.mean(), ulps=PARITY_ULPS, scale=np.abs(torch_logprobs(out / "sft-model", samples)).max())
    assert_close(guard["kl_to_ref_stderr"], log_ratio.std(ddof=1) / np.sqrt(len(log_ratio)), ulps=PARITY_ULPS, scale=np.abs(log_ratio).max())
    moved = 10 * PARITY_ULPS * 1.2e-7 * initial["ref_nll"]  # ten times the tolerance of the comparisons above
    assert abs(guard["ref_nll"] - initial["ref_nll"]) > moved and guard["kl_to_ref"] > moved


def test_no_kl_from_tempered_samples_and_no_nll_without_references(setup, trained):
    setup, _ = setup
    samples = setup.generate(setup.eval, lora=trained, key=jax.random.key(7), num_samples=1, temperature=0.5)
    config = dataclasses.replace(setup.config, eval=dataclasses.replace(setup.config.eval, temperature=0.5))
    tempered = dataclasses.replace(setup, config=config, references=None)
    assert capability_guard(tempered, trained, samples) == dict(ref_nll=None, kl_to_ref=None, kl_to_ref_stderr=None)


def test_mean_token_nll_pools_tokens_over_rows():
    assert mean_token_nll(np.asarray([-2.0, -6.0]), np.asarray([[0, 1, 1, 0], [0, 1, 1, 1]])) == pytest.approx(8.0 / 5.0)
