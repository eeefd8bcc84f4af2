"""Files written whole or not at all: to a temporary file beside the target, flushed to disk,
then renamed over it, so a run killed at any moment leaves the old file or the new one, never a
half-written one."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """`text` as the whole content of `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    """`rows` as the JSON Lines content of `path` (NaN refused: JSON has none)."""
    write_atomic(path, "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
