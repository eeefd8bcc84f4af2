"""Experiments: Algorithm 1 over every (method, seed) of a config, with durable labels and resume.

- `setup`: what the tracks share (model, tokenizer, prompts, oracle, trainer), from the config.
- `pool`: one round's candidate triplets and the fields its selector requires.
- `evaluation`: held-out reward and win-rate, and the capability guard (reference NLL, KL to π_ref).
- `storage`: labels, metrics and the run folder; `checkpoints`: each track's orbax checkpoints.
- `loop`: the rounds themselves; `live`: their metrics to TensorBoard or W&B as they come.
"""

from jaxdpo.experiment.loop import run, run_track
from jaxdpo.experiment.storage import CONFIG, LABELS, METRICS, LabelRecord, Track, prepare_out_dir, read_labels

__all__ = ["CONFIG", "LABELS", "METRICS", "LabelRecord", "Track", "prepare_out_dir", "read_labels", "run", "run_track"]
