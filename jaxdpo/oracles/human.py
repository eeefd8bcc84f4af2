"""People label pairs through files: one request file per batch, one answer file next to it.

A run that needs labels writes `human/batch-NNN.requests.jsonl` — every pair that every waiting
track needs at that point, one JSON object per line (`PairRequest` fields: "id", "track",
"round", "prompt", "response_a", "response_b") — and stops (exit code 3). Annotators (by hand, with
`jaxdpo annotate`, or any tool) write `human/batch-NNN.labels.jsonl`, one answer per line:

    {"id": "...", "preferred": "a" | "b" | "tie" | "skip"}     (optional: "left", "annotator", "time")
    {"id": "...", "undo": true}                               (withdraws the id's answer)

("left": the response, "a" or "b", that the annotator saw on the left; it is kept with the label.)

An id's answer is its last line; "tie" and "skip" are answers without a preference (the pair is
not asked again and is not trained on). `--resume` reads every answer file, continues each track
whose pairs are all answered, and asks for the rest in a new batch if anything new is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdpo.errors import UserError
from jaxdpo.files import write_jsonl_atomic
from jaxdpo.oracles.base import LabelsPending, PairRequest, Preferences, check_requests

ANSWERS = ("a", "b", "tie", "skip")
REQUESTS_SUFFIX, LABELS_SUFFIX = ".requests.jsonl", ".labels.jsonl"


def human_folder(out_dir: str | os.PathLike) -> Path:
    """Where a run (`--out DIR`) keeps its request and answer files: DIR/human."""
    return Path(out_dir) / "human"


class LabelFileError(UserError):
    """An annotators' file that cannot be read as answers; the message lists every bad line."""


def read_requests(path: Path) -> list[PairRequest]:
    return [PairRequest(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def read_answers(path: Path, expected_ids: Sequence[str]) -> dict[str, dict]:
    """{id: its current answer line} of an answer file, in the order of those lines; ids without an
    answer (or withdrawn) are absent. A last line without its newline is still being written and is
    ignored. Every other problem is reported at once, with line numbers (LabelFileError); the file
    is never modified."""
    expected = set(expected_ids)
    text = Path(path).read_text() if Path(path).exists() else ""
    lines = text.split("\n")[:-1]  # the part after the last newline is an unfinished write
    problems, current = [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: not valid JSON ({error.msg})")
            continue
        problem = _answer_problem(row, expected)
        if problem:
            problems.append(f"line {number}: {problem}")
        else:
            current.pop(row["id"], None)
            if row.get("undo") is not True:
                current[row["id"]] = row
    if problems:
        raise LabelFileError(f"{path}: {len(problems)} problem(s) in the label file:\n  " + "\n  ".join(problems))
    return current


def _answer_problem(row, expected: set[str]) -> str | None:
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        return 'needs an object with a string "id"'
    if row["id"] not in expected:
        return f"unknown id {row['id']!r} (not in the batch's request file)"
    if row.get("undo") is True:
        return None
    if row.get("preferred") not in ANSWERS:
        return f'"preferred" must be one of {list(ANSWERS)}, got {row.get("preferred")!r}'
    if row.get("left") not in (None, "a", "b"):
        return f'"left" (the response shown on the left) must be "a" or "b", got {row.get("left")!r}'
    return None


def append_answer(path: Path, row: dict) -> None:
    """Append one answer line and fsync (the annotators' tools call this on every choice)."""
    with Path(path).open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


class HumanOracle:
    """People, through request and answer files in `directory` (see the module docstring)."""

    can_score = False

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.queued: list[PairRequest] = []

    def scores(self, prompts, responses) -> np.ndarray:
        raise NotImplementedError("people compare pairs; they do not score single responses")

    def batches(self) -> list[tuple[Path, Path]]:
        """(requests, answers) file pairs in batch order."""
        requests = sorted(self.directory.glob(f"*{REQUESTS_SUFFIX}"))
        return [(r, r.with_name(r.name.removesuffix(REQUESTS_SUFFIX) + LABELS_SUFFIX)) for r in requests]

    def answers(self) -> tuple[dict[str, dict], set[str]]:
        """(answers by id, ids already requested) over every batch."""
        answers, requested = {}, set()
        for requests, labels in self.batches():
            ids = [r.id for r in read_requests(requests)]
            requested.update(ids)
            answers.update(read_answers(labels, ids))
        return answers, requested

    def label(self, requests: Sequence[PairRequest], *, seed: int = 0) -> Preferences:
        check_requests(requests)
        answers, requested = self.answers()
        if all(r.id in answers for r in requests):
            chosen = [answers[r.id]["preferred"] for r in requests]
            return Preferences(
                np.array([c == "a" for c in chosen]), valid=np.array([c in ("a", "b") for c in chosen]),
                no_preference=tuple(c if c in ("tie", "skip") else None for c in chosen),
                left=tuple(answers[r.id].get("left") for r in requests),
            )
        self.queued += [r for r in requests if r.id not in requested and r.id not in {q.id for q in self.queued}]
        raise LabelsPending(f"{sum(r.id not in answers for r in requests)} pairs of {requests[0].track} await labels")

    def submit_pending(self) -> str:
        """Write the queued requests as the next batch; say which files await answers."""
        if self.queued:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"batch-{len(self.batches()) + 1:03d}{REQUESTS_SUFFIX}"
            write_jsonl_atomic(path, [r._asdict() for r in self.queued])
            self.queued = []
        answers, _ = self.answers()
        waiting = []
        for requests, labels in self.batches():
            missing = sum(r.id not in answers for r in read_requests(requests))
            if missing:
                waiting.append(f"{missing} pairs in {requests} (answers go to {labels.name})")
        return (
            "labels needed: " + "; ".join(waiting) + '. One line per pair: {"id": ..., "preferred": "a" | "b" | "tie" | "skip"}; '
            "or label in a browser with: jaxdpo annotate " + str(self.directory.parent) + ". Then run again with --resume"
        )
