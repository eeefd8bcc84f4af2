"""`jaxdpo plan --cache FILE`: each stage's compiled analysis kept as it finishes, so a plan that is
stopped (a 7B model's stages take hours to compile on a small CPU) goes on where it stopped.

FILE holds one JSON line per analysed stage: the stage's key and its `compiled.Analysis`. The key
is a digest of what the analysis depends on besides jaxdpo's code: the stage's name, its abstract
arguments (shape, dtype and sharding of every leaf), its loop trips, the target, the mesh, whether
costs are counted, and the versions of jax and jaxlib. A stage whose key is in FILE is not compiled
again; after changing jaxdpo's code, start from a new FILE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from jaxdpo.errors import UserError
from jaxdpo.experiment.compiled import Analysis


def stage_key(stage, target: str, mesh: dict[str, int], costs: bool) -> str:
    """A digest of what `stage`'s analysis on `target` depends on (see the module docstring)."""
    import jax
    import jaxlib

    leaves = [
        (getattr(leaf, "shape", None), str(getattr(leaf, "dtype", type(leaf))), str(getattr(leaf, "sharding", None)))
        for leaf in jax.tree.leaves(stage.args)
    ]
    text = repr((stage.name, leaves, stage.loop_trips, target, sorted(mesh.items()), costs, jax.__version__, jaxlib.__version__))
    return hashlib.sha256(text.encode()).hexdigest()


def read(path: Path) -> dict[str, Analysis]:
    """The analyses kept in `path` by key ({} when it does not exist yet). A last line cut short
    (a plan killed while writing it) is dropped from the file; any other line that is not an entry
    is an error."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    kept = {}
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            kept[entry["key"]] = Analysis(**entry["analysis"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            if number == len(lines) and not line.endswith("}"):
                path.write_text("".join(f"{kept_line}\n" for kept_line in lines[:-1]))
                break
            raise UserError(f"--cache {path}: line {number} is not a stage's analysis ({error}); start from a new file") from error
    return kept


def append(path: Path, key: str, stage_name: str, analysis: Analysis) -> None:
    """Add one stage's analysis to `path`, flushed before the next stage starts."""
    with path.open("a") as file:
        file.write(json.dumps({"key": key, "stage": stage_name, "analysis": dataclasses.asdict(analysis)}) + "\n")
