"""Score-based oracles: a reward per (prompt, response), turned into preferences deterministically
(the higher score wins, a tie goes to a) or by Bradley–Terry sampling (paper §4)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdpo.models import RewardModel
from jaxdpo.errors import UserError
from jaxdpo.oracles.base import PairRequest, Preferences, check_requests
from jaxdpo.sequences import map_in_chunks
from jaxdpo.sharding import put_rows

Mode = Literal["bradley_terry", "deterministic"]


def preferences_from_scores(scores_a, scores_b, *, mode: Mode, seed: int, ids: Sequence[str]) -> Preferences:
    """Deterministic (higher score wins; ties go to a) or Bradley–Terry sampled labels, a ~
    Bernoulli(σ(r_a − r_b)), each pair's draw seeded by (seed, its id): a pair gets the same label
    whichever other pairs are asked with it (a resumed run re-asks only what it lost)."""
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if mode == "deterministic":
        prefer_a = scores_a >= scores_b
    elif mode == "bradley_terry":
        p_a = 1.0 / (1.0 + np.exp(-(scores_a - scores_b)))
        draws = np.asarray([np.random.default_rng([seed, zlib.crc32(i.encode())]).random() for i in ids])
        prefer_a = draws < p_a
    else:
        raise ValueError(f"unknown oracle mode {mode!r}; use 'bradley_terry' or 'deterministic'")
    return Preferences(prefer_a, scores_a=scores_a, scores_b=scores_b)


class ScoreOracle:
    """Any oracle that scores one (prompt, response) at a time: `score_fn(prompts, responses) → [n]`.
    `model`: the JAX model behind the scores, if any (it stays on the devices: memory plans count it)."""

    can_score = True

    def __init__(self, score_fn: Callable[[Sequence[str], Sequence[str]], np.ndarray], *, mode: Mode = "bradley_terry", model=None):
        self.score_fn = score_fn
        self.mode = mode
        self.model = model
        preferences_from_scores([0.0], [0.0], mode=mode, seed=0, ids=["check"])  # validates the mode

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.asarray(self.score_fn(list(prompts), list(responses)), np.float64)

    def label(self, requests: Sequence[PairRequest], *, seed: int) -> Preferences:
        check_requests(requests)
        prompts = [r.prompt for r in requests]
        scores = self.scores([*prompts, *prompts], [*(r.response_a for r in requests), *(r.response_b for r in requests)])
        n = len(requests)
        return preferences_from_scores(scores[:n], scores[n:], mode=self.mode, seed=seed, ids=[r.id for r in requests])


def synthetic_oracle(reward: Callable[[str, str], float], *, mode: Mode = "bradley_terry") -> ScoreOracle:
    """A programmatic reward `reward(prompt, response) → float` (the embedded task, tests)."""
    return ScoreOracle(lambda prompts, responses: [reward(p, r) for p, r in zip(prompts, responses)], mode=mode)


@jax.jit
def reward_scores(model: RewardModel, input_ids, attention_mask):
    """One scoring call of a JAX reward model: the reward of each left-padded text `[b]`."""
    return model(input_ids, attention_mask=attention_mask)


def reward_model_oracle(
    model: RewardModel, tokenizer, *, mode: Mode = "bradley_terry", max_length: int = 512, batch_size: int = 16, mesh: Mesh | None = None
) -> ScoreOracle:
    """An HF *ForSequenceClassification reward model run through the jaxdpo decoder: the text
    `prompt + response` is tokenized, left-padded and scored at its last token, `batch_size` texts
    per call (split over the "data" axis of `mesh`, when given)."""
    def score_fn(prompts, responses):
        texts = [p + r for p, r in zip(prompts, responses)]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np", padding_side="left")
        tokens = (enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32))
        return map_in_chunks(lambda rows: reward_scores(model, *put_rows(rows, mesh)), tokens, batch_size)

    return ScoreOracle(score_fn, mode=mode, model=model)


def torch_reward_model_oracle(
    path: str, *, mode: Mode = "bradley_terry", max_length: int = 512, batch_size: int = 16, device: str = "auto"
) -> ScoreOracle:
    """Any transformers PyTorch sequence-classification reward model (e.g. OpenAssistant's DeBERTa
    reward models, which score the (question, answer) text pair), on `device` ("auto": CUDA when
    torch sees a GPU, else the CPU). Needs torch (`pip install torch`)."""
    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise UserError(f"oracle.kind = 'torch_reward_model' needs torch, which does not import here ({error}): pip install torch") from error
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval().to(device)

    def score_fn(prompts, responses):
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(
                    prompts[start : start + batch_size], responses[start : start + batch_size],
                    padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                ).to(device)
                out.append(model(**enc).logits[:, 0].float().cpu().numpy())
        return np.concatenate(out)

    return ScoreOracle(score_fn, mode=mode)
