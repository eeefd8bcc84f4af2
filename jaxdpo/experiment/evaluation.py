"""Evaluation (paper §4): the mean oracle reward of the policy's responses to held-out prompts, and
the win-rate against the initial model's responses to the same prompts."""

from __future__ import annotations

import math

import numpy as np

from jaxdpo.experiment.setup import Setup, derive_key
from jaxdpo.models import LoRA


def evaluate(setup: Setup, lora: LoRA | None, seed: int, round_: int, baseline: np.ndarray | None) -> dict:
    """{eval_reward, eval_reward_stderr, win_rate, scores}: reward mean ± standard error over the
    held-out responses, and the win-rate against `baseline` (the initial model's scores; ties
    count half; against itself when None). None where undefined: all of them when the oracle
    cannot score responses, the standard error with a single response."""
    if not setup.oracle.can_score:
        return dict(eval_reward=None, eval_reward_stderr=None, win_rate=None, scores=None)
    e = setup.config.eval
    responses = setup.generate(
        setup.eval, lora=lora, key=derive_key(seed, "eval", round_), num_samples=e.samples_per_prompt, temperature=e.temperature
    )
    prompts = [p for p in setup.eval.texts for _ in range(e.samples_per_prompt)]
    scores = setup.oracle.scores(prompts, setup.response_texts(responses))
    baseline = scores if baseline is None else baseline
    win = float(np.mean((scores > baseline) + 0.5 * (scores == baseline)))
    stderr = float(scores.std(ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else None
    return dict(eval_reward=float(scores.mean()), eval_reward_stderr=stderr, win_rate=win, scores=scores)
