"""Experiments: Algorithm 1 over every (method, seed) of a config, with durable labels and resume.

- `setup`: what the tracks share (model, tokenizer, prompts, oracle, trainer), from the config.
- `stages`: each stage's program, its rows per call and its abstract inputs, shared by the run,
  the memory plan (`memory`), `jaxdpo plan` (`plan`, with `abstract`, `compiled`, `targets`) and
  the rehearsal.
- `pool`: one round's candidate triplets and the fields its selector requires.
- `evaluation`: held-out reward and win-rate, and the capability guard (reference NLL, KL to π_ref).
- `storage`: the label log and metrics; `checkpoints`: each track's verified checkpoints.
- `folder`: the run folder: what may be one, its lock, its config, how to resume it.
- `loop`: the rounds themselves; `live`: their metrics to TensorBoard or W&B as they come.

The names below are imported on first use (`jaxdpo.lazy`), so the command line can read
`targets` without loading JAX.
"""

from typing import TYPE_CHECKING

from jaxdpo.lazy import lazy_exports

_EXPORTS = {
    "jaxdpo.experiment.loop": ("run", "run_track"),
    "jaxdpo.experiment.folder": ("CONFIG", "prepare_out_dir", "resume_command"),
    "jaxdpo.experiment.storage": ("LABELS", "METRICS", "LabelRecord", "Track", "read_labels"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what type checkers and editors see: the same names, imported eagerly
    from jaxdpo.experiment.folder import CONFIG, prepare_out_dir, resume_command
    from jaxdpo.experiment.loop import run, run_track
    from jaxdpo.experiment.storage import LABELS, METRICS, LabelRecord, Track, read_labels
