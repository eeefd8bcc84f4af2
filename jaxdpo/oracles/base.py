"""What every oracle shares: the pair it is asked about, the answer it gives, and the protocols."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np


class PairRequest(NamedTuple):
    """One triplet to label: a stable id (the same whenever the run asks about this pair, e.g.
    "activedpo-seed0-round003-pick017"), where it comes from, the prompt and the two responses."""

    id: str
    track: str
    round: int
    prompt: str
    response_a: str
    response_b: str


Votes = tuple[tuple[str, str], ...]
"""Who answered one pair and how: (annotator, "a" | "b" | "skip") per annotator, by annotator."""


NoPreference = Literal["tie", "skip"]
"""Why an answer holds no preference: the responses were judged equal, or the pair was skipped."""

Side = Literal["a", "b"]


class Preferences(NamedTuple):
    """The answers, one per request: `prefer_a` [n] bool; `valid` [n] bool, False where the oracle
    gave no preference (a tie or a skip; None: every answer is a preference); the scores of score-
    based oracles; the `votes` behind each answer of oracles with several annotators. Oracles that
    show pairs to people also say, per answer, why it has no preference (`no_preference`: "tie" or
    "skip", None where it has one) and which response was shown on the left (`left`: "a" or "b",
    None where unknown)."""

    prefer_a: np.ndarray
    valid: np.ndarray | None = None
    scores_a: np.ndarray | None = None
    scores_b: np.ndarray | None = None
    votes: tuple[Votes, ...] | None = None
    no_preference: tuple[NoPreference | None, ...] | None = None
    left: tuple[Side | None, ...] | None = None


@runtime_checkable
class Oracle(Protocol):
    """Says which response of each pair is preferred. `can_score`: whether `scores` rates single
    responses (reward models do; people compare pairs) — evaluation needs it."""

    can_score: bool

    def label(self, requests: Sequence[PairRequest], *, seed: int) -> Preferences: ...

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class AsyncOracle(Oracle, Protocol):
    """An oracle whose answers come later (people). `label` returns once every request is answered;
    otherwise it queues the unanswered ones and raises `LabelsPending`. After every track of a run
    has gone as far as it can, `submit_pending()` hands all queued requests to the annotators at
    once and returns what to tell the user."""

    def submit_pending(self) -> str: ...


class LabelsPending(RuntimeError):
    """Raised by an asynchronous oracle while answers are outstanding."""


def check_requests(requests: Sequence[PairRequest]) -> None:
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError(f"request ids must be distinct, got {len(ids) - len(set(ids))} repeated")
