"""Evaluation (paper §4): the mean oracle reward of the policy's responses to held-out prompts and
the win-rate against the initial model's responses to the same prompts; and a capability guard,
because a reward can rise while general capability falls (Oh et al., "Random Is Hard to Beat"):

- `ref_nll`: the policy's mean per-token negative log-likelihood of the held-out prompts' reference
  responses (`Setup.references`: the embedded task's reference generator, a dataset's chosen
  responses), −Σ log π_θ(token) / Σ tokens over every reference token (the end token included).
- `kl_to_ref`: a Monte Carlo estimate of the sequence-level KL(π_θ ‖ π_ref) from the evaluation
  samples y ~ π_θ(·|x): the mean over samples of Σ_t [log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)]
  over the response tokens, an unbiased estimate of E_x KL(π_θ(·|x) ‖ π_ref(·|x)) for responses cut
  at the generation length (each term can be negative; their mean cannot be, in expectation), with
  its standard error `kl_to_ref_stderr`. Only samples drawn from π_θ itself estimate it: with
  `eval.temperature` ≠ 1 both fields are null.

At round 0 the policy is π_ref, so `kl_to_ref` is 0 and `ref_nll` is the initial model's.
"""

from __future__ import annotations

import math

import numpy as np

from jaxdpo.dpo import batched_logprobs, reference_logprobs
from jaxdpo.experiment.setup import Setup, derive_key
from jaxdpo.experiment.stages import sampling
from jaxdpo.models import LoRA
from jaxdpo.sequences import Sequences


def evaluate(setup: Setup, lora: LoRA | None, seed: int, round_: int, baseline: np.ndarray | None) -> dict:
    """{eval_reward, eval_reward_stderr, win_rate, scores, ref_nll, kl_to_ref, kl_to_ref_stderr} of
    the policy (`lora`; None: the initial model): reward mean ± standard error over the held-out
    responses, the win-rate against `baseline` (the initial model's scores; ties count half;
    against itself when None), and the capability guard (`capability_guard`). None where
    undefined: the reward fields when the oracle cannot score responses (people), a standard
    error of a single value."""
    samples = setup.generate(setup.eval, lora=lora, key=derive_key(seed, "eval", round_), **sampling(setup.config, "evaluation")._asdict())
    return {**_rewards(setup, samples, baseline), **capability_guard(setup, lora, samples)}


def _rewards(setup: Setup, samples: Sequences, baseline: np.ndarray | None) -> dict:
    if not setup.oracle.can_score:
        return dict(eval_reward=None, eval_reward_stderr=None, win_rate=None, scores=None)
    prompts = [p for p in setup.eval.texts for _ in range(setup.config.eval.samples_per_prompt)]
    scores = setup.oracle.scores(prompts, setup.response_texts(samples))
    baseline = scores if baseline is None else baseline
    win = float(np.mean((scores > baseline) + 0.5 * (scores == baseline)))
    mean, stderr = mean_stderr(scores)
    return dict(eval_reward=mean, eval_reward_stderr=stderr, win_rate=win, scores=scores)


def capability_guard(setup: Setup, lora: LoRA | None, samples: Sequences) -> dict:
    """{ref_nll, kl_to_ref, kl_to_ref_stderr} of the policy `lora` (see the module docstring);
    `samples`: its responses to the held-out prompts. `ref_nll` is None without references."""
    chunking = setup.logprob_chunking
    nll = None
    if setup.references is not None:
        nll = mean_token_nll(batched_logprobs(setup.model, lora, setup.references, **chunking), setup.references.response_mask)
    if setup.config.eval.temperature != 1.0:
        return dict(ref_nll=nll, kl_to_ref=None, kl_to_ref_stderr=None)
    log_ratio = batched_logprobs(setup.model, lora, samples, **chunking) - reference_logprobs(setup.model, samples, **chunking)
    kl, stderr = mean_stderr(log_ratio)
    return dict(ref_nll=nll, kl_to_ref=kl, kl_to_ref_stderr=stderr)


def mean_token_nll(logprobs: np.ndarray, response_mask: np.ndarray) -> float:
    """−Σ rows' response log-probs / Σ response tokens: the mean NLL per token over all rows."""
    return float(-np.sum(np.asarray(logprobs, np.float64)) / np.sum(np.asarray(response_mask) != 0))


def mean_stderr(values: np.ndarray) -> tuple[float, float | None]:
    """Mean and standard error (sample s.d. / √n; None for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
