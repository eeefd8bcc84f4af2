"""What a run keeps in its folder, each format next to its reader and writer.

- `labels.jsonl`: one checksummed `LabelRecord` per line, appended and fsynced before training
  reads it (`LabelLog`).
- `metrics.jsonl`: one row per method, seed and round, rewritten atomically after every round.
- `checkpoints/<track>/<round>/`: orbax checkpoints (`jaxdpo.experiment.checkpoints`).
- `.processes`: with several JAX processes, the check that all of them see this folder
  (`multihost.check_shared_folder`).
- `config.json`, `.lock`: the config the run was started with and the lock of the process running
  in the folder (`jaxdpo.experiment.folder`).

With several processes, process 0 writes everything but the checkpoints, which orbax writes from
every process holding a shard (`jaxdpo.multihost`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxdpo.errors import UserError
from jaxdpo.files import write_jsonl_atomic
from jaxdpo.oracles import NoPreference, Side, Votes
from jaxdpo.sequences import Sequences

LABELS, METRICS = "labels.jsonl", "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class Track:
    """One (method, seed) of a run: `config.run.rounds` rounds of Algorithm 1."""

    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"

    @classmethod
    def from_name(cls, name: str) -> Track:
        """The track called `name` ("activedpo-seed0"); ValueError when it is not METHOD-seedS."""
        method, separator, seed = name.rpartition("-seed")
        if not (method and separator and seed.isdigit()):
            raise ValueError(f"a track is named METHOD-seedS (e.g. activedpo-seed0), got {name!r}")
        return cls(method, int(seed))

    def request_id(self, round_: int, pick: int) -> str:
        """The id a pick is asked under (`PairRequest.id`), e.g. "activedpo-seed0-round003-pick017"."""
        return f"{self.name}-round{round_:03d}-pick{pick:03d}"


# -- labels ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelRecord:
    """One labeled triplet (x, y_a, y_b): where it came from (track, round, pick order, candidate
    index in the round's pool), the texts the oracle saw, the token rows DPO trains on (prompt
    left-padded to `prompt_len`, then the response), and the preference (None: the oracle gave
    none — a tie or a skip, said by `no_preference` where the oracle told (labels of older runs do
    not); the pair was paid for but is not trained on), with the oracle's scores when it has them
    and, from oracles that collect them, the annotators' votes behind the preference (`Votes`;
    "votes" in JSON: {annotator: "a" | "b" | "skip"}) and which response they saw on the `left`."""

    method: str
    seed: int
    round: int
    pick: int
    candidate: int
    prompt: str
    response_a: str
    response_b: str
    prompt_len: int
    input_ids_a: tuple[int, ...]
    attention_mask_a: tuple[int, ...]
    input_ids_b: tuple[int, ...]
    attention_mask_b: tuple[int, ...]
    preferred: Side | None
    score_a: float | None = None
    score_b: float | None = None
    votes: Votes | None = None
    no_preference: NoPreference | None = None
    left: Side | None = None

    def __post_init__(self):
        if self.no_preference is not None and self.preferred is not None:
            raise ValueError(f"a label with a preference ({self.preferred!r}) cannot also be a {self.no_preference!r}")

    @property
    def track(self) -> Track:
        return Track(self.method, self.seed)

    @property
    def request_id(self) -> str:
        return self.track.request_id(self.round, self.pick)

    def to_json(self) -> dict:
        row = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        row.update({key: list(row[key]) for key in _TOKEN_FIELDS})
        if self.votes is not None:
            row["votes"] = dict(self.votes)
        return {key: value for key, value in row.items() if not (key in _OPTIONAL_FIELDS and value is None)}

    @classmethod
    def from_json(cls, row: dict) -> LabelRecord:
        """Parse one line's object; a missing field or a wrong type raises ValueError naming it."""
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        values = {}
        for field in dataclasses.fields(cls):
            if field.name not in row:
                if field.default is dataclasses.MISSING:
                    raise ValueError(f"missing field {field.name!r}")
                continue
            values[field.name] = _parse_field(field.name, row[field.name])
        return cls(**values)


_TOKEN_FIELDS = ("input_ids_a", "attention_mask_a", "input_ids_b", "attention_mask_b")
_INT_FIELDS = ("seed", "round", "pick", "candidate", "prompt_len")
_OPTIONAL_FIELDS = ("score_a", "score_b", "votes", "no_preference", "left")  # left out of the JSON when None
_CHOICES = {"preferred": ("a", "b"), "left": ("a", "b"), "no_preference": ("tie", "skip")}  # or null


def _parse_field(name: str, value):
    if name in _TOKEN_FIELDS:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"field {name!r} must be a list of integers")
        return tuple(value)
    if name in _INT_FIELDS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"field {name!r} must be an integer, got {value!r}")
        return value
    if name in _CHOICES:
        if value is not None and value not in _CHOICES[name]:
            raise ValueError(f"field {name!r} must be {', '.join(map(json.dumps, _CHOICES[name]))} or null, got {value!r}")
        return value
    if name == "votes":
        if value is not None and not (isinstance(value, dict) and all(isinstance(k, str) and v in ("a", "b", "skip") for k, v in value.items())):
            raise ValueError(f'field \'votes\' must map annotators to "a", "b" or "skip", got {value!r}')
        return None if value is None else tuple(sorted(value.items()))  # one order, whatever the JSON writer kept
    if name.startswith("score_"):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"field {name!r} must be a number, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {value!r}")
    return value


class LabelLog:
    """`labels.jsonl` as an append-only log: one `LabelRecord` per line with the CRC-32 of its
    content (key "crc32"), appended and fsynced before training reads it.

    A kill mid-write leaves a torn last line: `repair()` truncates the file to its last whole, valid
    line before anything is appended. Damage anywhere else (a bad checksum, a line that is not a
    record) is a paid-for label that cannot be trusted: reading raises `UserError` naming the line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[LabelRecord]:
        records, _ = self._scan()
        return records

    def repair(self) -> int:
        """Truncate a torn tail; returns the number of bytes cut (0 when the file is whole)."""
        _, whole = self._scan()
        size = self.path.stat().st_size if self.path.exists() else 0
        if whole < size:
            with self.path.open("r+b") as f:
                f.truncate(whole)
                f.flush()
                os.fsync(f.fileno())
        return size - whole

    def append(self, records: Iterable[LabelRecord]) -> None:
        """Append and fsync: the records are on disk when this returns."""
        with self.path.open("a") as f:
            for record in records:
                f.write(_signed_line(record.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _scan(self) -> tuple[list[LabelRecord], int]:
        """(records, byte length of the whole lines); a line without its newline ends the scan, a
        whole line that is not a valid record raises."""
        if not self.path.exists():
            return [], 0
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        records, offset = [], 0
        for number, line in enumerate(lines, start=1):
            last = number == len(lines)
            if last and not line:
                break
            if last:
                break  # no newline: a write cut short (a torn tail, cut by repair())
            try:
                records.append(LabelRecord.from_json(_verified(line)))
            except ValueError as error:
                raise UserError(
                    f"{self.path}: line {number} is damaged ({error}); it holds a label already paid for. Restore the file "
                    "from a backup, or delete that line and run with --resume: labels that a checkpoint trained on are "
                    "written back from it, the others are asked again"
                ) from error
            offset += len(line) + 1
        return records, offset


def _signed_line(row: dict) -> str:
    return json.dumps({**row, "crc32": zlib.crc32(json.dumps(row, sort_keys=True).encode())})


def _verified(line: bytes) -> dict:
    """The record object of a signed line; ValueError when it is not JSON or its checksum is wrong."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"not valid JSON: {error}") from error
    if not isinstance(row, dict) or "crc32" not in row:
        raise ValueError("no crc32 checksum")
    crc = row.pop("crc32")
    if crc != zlib.crc32(json.dumps(row, sort_keys=True).encode()):
        raise ValueError("the checksum does not match the content")
    return row


def read_labels(path: Path) -> list[LabelRecord]:
    """The records of a `labels.jsonl` (see `LabelLog`)."""
    return LabelLog(path).read()


def training_data(records: list[LabelRecord]) -> tuple[Sequences, np.ndarray]:
    """(sequences [2L, s], pairs [L, 2] of (chosen, rejected) rows): rows 2i and 2i + 1 are record
    i's responses a and b. Every record must have a preference."""
    if any(record.preferred is None for record in records):
        raise ValueError("training_data needs records with a preference; leave out ties and skips")
    ids, attention, response = [], [], []
    for record in records:
        for tokens, mask in ((record.input_ids_a, record.attention_mask_a), (record.input_ids_b, record.attention_mask_b)):
            mask = np.asarray(mask, np.int32)
            ids.append(np.asarray(tokens, np.int32))
            attention.append(mask)
            response.append(np.where(np.arange(len(mask)) >= record.prompt_len, mask, 0))
    prefer_a = np.asarray([record.preferred == "a" for record in records])
    first = 2 * np.arange(len(records))
    pairs = np.stack([np.where(prefer_a, first, first + 1), np.where(prefer_a, first + 1, first)], axis=1)
    return Sequences(np.stack(ids), np.stack(response), np.stack(attention)), pairs


# -- metrics --------------------------------------------------------------------------------------


def write_metrics(out_dir: Path, rows: list[dict]) -> None:
    """Rewrite `metrics.jsonl` atomically; a value that is not a finite number is written as null
    (strict JSON: no NaN tokens)."""
    finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()} for row in rows]
    write_jsonl_atomic(Path(out_dir) / METRICS, finite)
