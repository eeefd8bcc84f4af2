"""The oracle of a run of several JAX processes (`jaxdpo.multihost`): asked once, by process 0,
and every process gets the same answers, so each trains on the same labels and no person,
server or file is asked twice."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from jaxdpo.multihost import broadcast, from_writer
from jaxdpo.oracles.base import Oracle, PairRequest, Preferences


class SharedOracle:
    """The oracle `build()` makes, for every process of a job.

    A `collective` oracle (a JAX reward model on the run's mesh: one SPMD program) is built and
    called by every process together, and process 0's answer is the one kept. Any other (a
    programmatic reward, a PyTorch reward model, people through files or Label Studio) exists on
    process 0 only: it builds, answers and hands over requests there, and the other processes
    receive what it said, errors and `LabelsPending` included."""

    def __init__(self, build: Callable[[], Oracle], *, collective: bool):
        self.collective, self.inner = collective, None
        if collective:
            self.inner = build()
            self.can_score = self.inner.can_score
        else:
            self.can_score = from_writer(self._build_here, build)

    def _build_here(self, build: Callable[[], Oracle]) -> bool:
        self.inner = build()
        return self.inner.can_score

    @property
    def model(self):
        """The JAX reward model of a collective oracle (it stays on the devices: memory plans
        count it), else None."""
        return getattr(self.inner, "model", None) if self.collective else None

    def label(self, requests: Sequence[PairRequest], *, seed: int) -> Preferences:
        if self.collective:
            return broadcast(self.inner.label(requests, seed=seed))
        return from_writer(lambda: self.inner.label(requests, seed=seed))

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if self.collective:
            return broadcast(self.inner.scores(prompts, responses))
        return from_writer(lambda: self.inner.scores(prompts, responses))

    def submit_pending(self) -> str:
        """Only oracles that wait for people raise `LabelsPending`, and they live on process 0."""
        return from_writer(lambda: self.inner.submit_pending())
