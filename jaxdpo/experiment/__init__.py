"""Experiments: Algorithm 1 over every (method, seed) of a config, with durable labels and resume.

- `setup`: what the tracks share (model, tokenizer, prompts, oracle, trainer), from the config.
- `pool`: one round's candidate triplets and the fields its selector requires.
- `evaluation`: held-out reward and win-rate, and the capability guard (reference NLL, KL to π_ref).
- `storage`: the label log and metrics; `checkpoints`: each track's verified checkpoints.
- `folder`: the run folder: what may be one, its lock, its config, how to resume it.
- `loop`: the rounds themselves; `live`: their metrics to TensorBoard or W&B as they come.
"""

from jaxdpo.experiment.loop import run, run_track
from jaxdpo.experiment.folder import CONFIG, prepare_out_dir, resume_command
from jaxdpo.experiment.storage import LABELS, METRICS, LabelRecord, Track, read_labels

__all__ = ["CONFIG", "LABELS", "METRICS", "LabelRecord", "Track", "prepare_out_dir", "read_labels", "resume_command", "run", "run_track"]
