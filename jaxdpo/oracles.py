"""Preference oracles: given prompts and two responses each, say which response is preferred.

Every oracle implements `Oracle.label(prompts, responses_a, responses_b, *, seed, request_id)` →
`Preferences` (`prefer_a` bool `[n]`, and the scores when the oracle has them), and
`Oracle.scores(prompts, responses)` → one reward per response, or None for oracles that only
compare (people): evaluation needs scores. Score-based
oracles label deterministically (the higher score wins, a tie goes to a) or by Bradley–Terry
sampling, a ~ Bernoulli(σ(r_a − r_b)) (paper §4).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpo.models import RewardModel

Mode = Literal["bradley_terry", "deterministic"]


class Preferences(NamedTuple):
    prefer_a: np.ndarray
    scores_a: np.ndarray | None = None
    scores_b: np.ndarray | None = None


class Oracle(Protocol):
    def label(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], *, seed: int, request_id: str
    ) -> Preferences: ...

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray | None: ...


def preferences_from_scores(scores_a, scores_b, *, mode: Mode, seed: int) -> Preferences:
    """Deterministic (higher score wins; ties go to a) or Bradley–Terry sampled labels."""
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if mode == "deterministic":
        prefer_a = scores_a >= scores_b
    elif mode == "bradley_terry":
        p_a = 1.0 / (1.0 + np.exp(-(scores_a - scores_b)))
        prefer_a = np.random.default_rng(seed).random(len(scores_a)) < p_a
    else:
        raise ValueError(f"unknown oracle mode {mode!r}; use 'bradley_terry' or 'deterministic'")
    return Preferences(prefer_a, scores_a, scores_b)


def _check_triplets(prompts, responses_a, responses_b) -> None:
    if not (len(prompts) == len(responses_a) == len(responses_b)):
        raise ValueError(
            f"prompts, responses_a and responses_b must have the same length, got {len(prompts)}, {len(responses_a)}, {len(responses_b)}"
        )


class ScoreOracle:
    """Any oracle that scores one (prompt, response) at a time: `score_fn(prompts, responses) → [n]`."""

    def __init__(self, score_fn: Callable[[Sequence[str], Sequence[str]], np.ndarray], *, mode: Mode = "bradley_terry"):
        self.score_fn = score_fn
        self.mode = mode
        preferences_from_scores([0.0], [0.0], mode=mode, seed=0)  # validates the mode

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.asarray(self.score_fn(list(prompts), list(responses)), np.float64)

    def label(self, prompts, responses_a, responses_b, *, seed: int, request_id: str = "") -> Preferences:
        _check_triplets(prompts, responses_a, responses_b)
        scores = self.scores([*prompts, *prompts], [*responses_a, *responses_b])
        return preferences_from_scores(scores[: len(prompts)], scores[len(prompts) :], mode=self.mode, seed=seed)


def synthetic_oracle(reward: Callable[[str, str], float], *, mode: Mode = "bradley_terry") -> ScoreOracle:
    """A programmatic reward `reward(prompt, response) → float` (the embedded task, tests)."""
    return ScoreOracle(lambda prompts, responses: [reward(p, r) for p, r in zip(prompts, responses)], mode=mode)


def reward_model_oracle(
    model: RewardModel, tokenizer, *, mode: Mode = "bradley_terry", max_length: int = 512, batch_size: int = 16
) -> ScoreOracle:
    """An HF *ForSequenceClassification reward model run through the jaxdpo decoder: the text
    `prompt + response` is tokenized, left-padded and scored at its last token."""
    score = jax.jit(lambda model, ids, mask: model(ids, attention_mask=mask))

    def score_fn(prompts, responses):
        out = []
        for start in range(0, len(prompts), batch_size):
            texts = [p + r for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])]
            texts += [texts[-1]] * (batch_size - len(texts))  # one shape per length bucket
            enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np", padding_side="left")
            values = score(model, jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(enc["attention_mask"], jnp.int32))
            out.append(np.asarray(values)[: min(batch_size, len(prompts) - start)])
        return np.concatenate(out)

    return ScoreOracle(score_fn, mode=mode)


def torch_reward_model_oracle(path: str, *, mode: Mode = "bradley_terry", max_length: int = 512, batch_size: int = 16) -> ScoreOracle:
    """Any transformers PyTorch sequence-classification reward model (e.g. OpenAssistant's DeBERTa
    reward models, which score the (question, answer) text pair). Needs torch (`pip install torch`)."""
    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the torch reward-model oracle needs torch: pip install torch") from error
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def score_fn(prompts, responses):
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(
                    prompts[start : start + batch_size], responses[start : start + batch_size],
                    padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                )
                out.append(model(**enc).logits[:, 0].float().numpy())
        return np.concatenate(out)

    return ScoreOracle(score_fn, mode=mode)


class LabelsPending(RuntimeError):
    """Raised by the human oracle when a round's label file is not there yet."""


class HumanOracle:
    """Label files for annotators, one pair per JSONL line.

    `label(...)` writes `<request_id>.requests.jsonl` (`{"id", "prompt", "response_a",
    "response_b"}`) and raises `LabelsPending` until `<request_id>.labels.jsonl` exists with one
    `{"id": ..., "preferred": "a" | "b"}` per requested id. Then it returns the labels. A bad label
    file raises `ValueError` listing every offending line; the file itself is never modified."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def scores(self, prompts, responses) -> None:
        """People compare pairs; they do not score single responses."""
        return None

    def paths(self, request_id: str) -> tuple[Path, Path]:
        return self.directory / f"{request_id}.requests.jsonl", self.directory / f"{request_id}.labels.jsonl"

    def label(self, prompts, responses_a, responses_b, *, seed: int = 0, request_id: str) -> Preferences:
        _check_triplets(prompts, responses_a, responses_b)
        requests, labels = self.paths(request_id)
        ids = [f"{request_id}-{i:05d}" for i in range(len(prompts))]
        if not labels.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            rows = [dict(id=i, prompt=p, response_a=a, response_b=b) for i, p, a, b in zip(ids, prompts, responses_a, responses_b)]
            write_jsonl_atomic(requests, rows)
            raise LabelsPending(
                f"{len(ids)} pairs to label in {requests}; write {labels} with lines "
                '{"id": ..., "preferred": "a" or "b"} and run again with --resume'
            )
        chosen = read_human_labels(labels, ids)
        return Preferences(np.array([chosen[i] == "a" for i in ids]))


def read_human_labels(path: Path, expected_ids: Sequence[str]) -> dict[str, str]:
    """{id: "a" | "b"} from an annotators' JSONL file; every problem is reported, with line numbers."""
    expected = set(expected_ids)
    problems, found = [], {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: not valid JSON ({error.msg})")
            continue
        if not isinstance(row, dict) or "id" not in row or "preferred" not in row:
            problems.append(f'line {number}: needs an object with "id" and "preferred"')
        elif row["id"] not in expected:
            problems.append(f"line {number}: unknown id {row['id']!r}")
        elif row["id"] in found:
            problems.append(f"line {number}: duplicate label for id {row['id']!r}")
        elif row["preferred"] not in ("a", "b"):
            problems.append(f"line {number}: preferred must be \"a\" or \"b\", got {row['preferred']!r}")
        else:
            found[row["id"]] = row["preferred"]
    missing = [i for i in expected_ids if i not in found]
    if missing:
        problems.append(f"missing labels for {len(missing)} ids: {', '.join(missing[:10])}{' …' if len(missing) > 10 else ''}")
    if problems:
        raise ValueError(f"{path}: {len(problems)} problem(s) in the label file:\n  " + "\n  ".join(problems))
    return found


def write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    """Write all rows to a temporary file, fsync, then rename over `path` (never half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
