"""A run's metrics rows: read back from `metrics.jsonl` (checked), and arranged per method, seed and
round (`Tracks`) for the statistics."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from jaxdpo.experiment.storage import METRICS

REWARD, TRAIN_LOSS, REF_NLL, KL_TO_REF = "eval_reward", "train_loss", "ref_nll", "kl_to_ref"
NUMERIC_FIELDS = (REWARD, "win_rate", TRAIN_LOSS, REF_NLL, KL_TO_REF)
"""Fields the report reads: each a number or null."""

Tracks = dict[int, dict[int, tuple[int, float]]]
"""One method's values: {seed: {round: (labels collected, value)}}."""


def read_run(folder: str | Path) -> list[dict]:
    """The metrics rows of the run in `folder`."""
    return read_metrics(Path(folder) / METRICS)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a `metrics.jsonl`; NaN and Infinity tokens (older runs wrote them for unscored
    rounds) read as null. A missing file, a malformed line or a repeated (method, seed, round)
    raises ValueError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror}); is {path.parent} a run folder?") from error
    rows, first_seen = [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = _checked_row(json.loads(line, parse_constant=lambda _: None))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
        except ValueError as error:
            raise ValueError(f"{path}: line {number}: {error}") from error
        key = (row["method"], row["seed"], row["round"])
        if key in first_seen:
            raise ValueError(f"{path}: line {number} repeats method {key[0]!r} seed {key[1]} round {key[2]} of line {first_seen[key]}")
        first_seen[key] = number
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _checked_row(row) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for name, valid, kind in (
        ("method", lambda v: isinstance(v, str) and v, "a non-empty string"),
        ("seed", _is_int, "an integer"),
        ("round", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        ("labels", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ):
        if name not in row:
            raise ValueError(f"missing field {name!r}")
        if not valid(row[name]):
            raise ValueError(f"field {name!r} must be {kind}, got {row[name]!r}")
    for name in NUMERIC_FIELDS:
        value = row.get(name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ValueError(f"field {name!r} must be a number or null, got {value!r}")
    return row


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def points(rows: list[dict], key: str = REWARD) -> dict[str, Tracks]:
    """{method: {seed: {round: (labels, value)}}} of the rows whose `key` is a finite number."""
    out: dict[str, Tracks] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.setdefault(row["method"], {}).setdefault(row["seed"], {})[row["round"]] = (row["labels"], float(value))
    return out


def rounds_of(tracks: Tracks) -> list[int]:
    return sorted(set(itertools.chain.from_iterable(tracks.values())))


def at_round(tracks: Tracks, round_: int) -> dict[int, float]:
    """{seed: value} at one round."""
    return {seed: by_round[round_][1] for seed, by_round in tracks.items() if round_ in by_round}


def labels_at(tracks: Tracks, round_: int) -> int:
    """Labels collected by `round_` (the most of any seed; normally all seeds agree)."""
    return max(by_round[round_][0] for by_round in tracks.values() if round_ in by_round)


def values_by_round(tracks: Tracks) -> list[tuple[int, int, list[float]]]:
    """(round, labels, values over seeds) per round."""
    return [(round_, labels_at(tracks, round_), list(at_round(tracks, round_).values())) for round_ in rounds_of(tracks)]
