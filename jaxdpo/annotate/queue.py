"""The pairs a run waits for, kept only in its files (`jaxdpo.oracles.human`): nothing lives in
memory between two calls, so a reload, a restarted server or a second tab sees exactly what is on
disk.

Every call locks `DIR/human` (an exclusive `flock`, which also serializes threads and other
servers), re-reads the request and answer files, and — for a choice or an undo — appends one
fsynced line before the lock is released. A choice names its pair and is refused while that pair
has an answer, so no pair is ever answered twice; undo withdraws the newest answer still current,
whoever gave it — unless a resumed run has already collected it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from jaxdpo.errors import UserError
from jaxdpo.experiment.folder import resume_command
from jaxdpo.experiment.storage import LABELS, read_labels
from jaxdpo.oracles import PairRequest
from jaxdpo.oracles.human import HumanOracle, append_answer, human_folder, read_answers, read_requests

CHOICES = ("left", "right", "tie", "skip")


class Conflict(Exception):
    """A choice or undo that the files no longer allow (answered meanwhile, nothing to undo)."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """One request file: its pairs in order, its answer file, the current answers (in line order)."""

    requests: list[PairRequest]
    labels: Path
    answers: dict[str, dict]

    @property
    def pending(self) -> list[PairRequest]:
        return [r for r in self.requests if r.id not in self.answers]


def left_response(pair_id: str) -> str:
    """Which response, "a" or "b", is shown on the left: a fair coin drawn from the pair id, so every
    tab and every reload shows a pair the same way, and position bias does not follow a or b."""
    return "ab"[hashlib.sha256(pair_id.encode()).digest()[0] % 2]


def preferred(choice: str, left: str) -> str:
    """A choice of side ("left", "right", "tie", "skip") as an answer in the request's a/b terms."""
    if choice not in CHOICES:
        raise ValueError(f"a choice is one of {list(CHOICES)}, got {choice!r}")
    if choice in ("tie", "skip"):
        return choice
    return left if choice == "left" else _other(left)


def answer_line(pair_id: str, choice: str) -> dict:
    left = left_response(pair_id)
    return {"id": pair_id, "preferred": preferred(choice, left), "left": left, "time": _now()}


def read_batches(folder: Path) -> list[Batch]:
    batches = []
    for requests_path, labels_path in HumanOracle(folder).batches():
        requests = read_requests(requests_path)
        batches.append(Batch(requests, labels_path, read_answers(labels_path, [r.id for r in requests])))
    return batches


def progress(batches: list[Batch]) -> tuple[int, int]:
    """(answered, total) over the batches with a pair still pending (the last batch once all are done)."""
    current = [b for b in batches if b.pending] or batches[-1:]
    total = sum(len(b.requests) for b in current)
    return total - sum(len(b.pending) for b in current), total


def newest_answer(batches: list[Batch]) -> tuple[Batch, str] | None:
    """The batch and id of the newest answer still current: answers are given in batch order (the
    page always shows the first pending pair), so the last line of the last batch that has one."""
    answered = [b for b in batches if b.answers]
    return (answered[-1], list(answered[-1].answers)[-1]) if answered else None


def shown(request: PairRequest) -> dict:
    """A pair as the page shows it: the prompt, and the responses placed left and right."""
    responses = {"a": request.response_a, "b": request.response_b}
    left = left_response(request.id)
    return {"id": request.id, "track": request.track, "round": request.round, "prompt": request.prompt,
            "left": responses[left], "right": responses[_other(left)]}


class LabelQueue:
    """The labeling state of the run in `out_dir` (its `--out` folder), read from its files on every call."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.folder = human_folder(self.out_dir)
        if not self.folder.is_dir() or not HumanOracle(self.folder).batches():
            raise UserError(
                f"{self.out_dir} holds no label requests ({self.folder}/*.requests.jsonl); pass the --out folder of a run "
                'with [oracle] kind = "human" that stopped waiting for labels'
            )

    def state(self) -> dict:
        """{done, total, pair (the first pending pair as shown; None when all are answered), resume
        (the command that continues the run)}."""
        with self._locked() as batches:
            return self._state(batches)

    def choose(self, pair_id: str, choice: str) -> dict:
        """Record `choice` for a pending pair (appended and fsynced); returns the new state."""
        line = answer_line(pair_id, choice)
        with self._locked() as batches:
            batch = next((b for b in batches if any(r.id == pair_id for r in b.requests)), None)
            if batch is None:
                raise Conflict(f"this run asks for no pair {pair_id!r}")
            if pair_id in batch.answers:
                raise Conflict("that pair was labeled meanwhile (in another tab?); here is the next one")
            append_answer(batch.labels, line)
            return self._state(read_batches(self.folder))

    def undo(self) -> tuple[str, dict]:
        """Withdraw the newest answer still current; returns its pair id and the new state."""
        with self._locked() as batches:
            newest = newest_answer(batches)
            if newest is None:
                raise Conflict("there is no choice to undo")
            batch, pair_id = newest
            if pair_id in collected_ids(self.out_dir):
                raise Conflict(f"the run has already collected the answer to {pair_id} into {LABELS}; it can no longer be undone")
            append_answer(batch.labels, {"id": pair_id, "undo": True, "time": _now()})
            return pair_id, self._state(read_batches(self.folder))

    def _state(self, batches: list[Batch]) -> dict:
        done, total = progress(batches)
        pending = next((r for b in batches for r in b.pending), None)
        return {"done": done, "total": total, "pair": None if pending is None else shown(pending), "resume": resume_command(self.out_dir)}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[Batch]]:
        """The batches as on disk, read and used under an exclusive lock on the folder."""
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield read_batches(self.folder)
        finally:
            os.close(fd)  # releases the lock


def collected_ids(out_dir: Path) -> set[str]:
    """The pairs whose answers a resumed run has already taken into its `labels.jsonl` (and trained on)."""
    return {record.request_id for record in read_labels(out_dir / LABELS)}


def _other(response: str) -> str:
    return {"a": "b", "b": "a"}[response]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
