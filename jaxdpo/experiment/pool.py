"""One round's candidate pool (Algorithm 1, lines 3–5): the C(m, 2) triplets of each prompt's m
responses, and the fields a selector reads about them.

`PRODUCERS` maps each pool field a selector may require (`Selector.requires`) to the stage it is
timed under and the function that computes it from the round's `RoundInputs`, so a round
computes exactly what its selector reads. A new selection method is a `Rule` in
`jaxdpo.selection`'s registry; only a pool field no method read before needs a producer here.
The pool carries the run's mesh: the ActiveDPO selector splits its pairs over it (whole prompts
per device, `jaxdpo.selection.place_pairs`), reading g where the features stage left it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpo.dpo import batched_logprobs, reference_logprobs
from jaxdpo.experiment import stages
from jaxdpo.experiment.setup import Prompts, Setup
from jaxdpo.experiment.stages import BASE_FIELDS
from jaxdpo.models import LoRA
from jaxdpo.selection import SelectionPool, Selector, predictive_entropy
from jaxdpo.sequences import Sequences, map_in_chunks, map_on_devices
from jaxdpo.sharding import put_rows


@dataclasses.dataclass(frozen=True)
class RoundInputs:
    """What the producers read: the policy θ_{t−1} (`lora`), the round's prompts and responses,
    its candidate `pairs` (rows of `responses`), the triplets labeled so far (`labeled` rows and
    their (chosen, rejected) `labeled_pairs`), and the key of the entropy samples."""

    setup: Setup
    lora: LoRA
    prompts: Prompts
    responses: Sequences
    pairs: np.ndarray
    labeled: Sequences | None
    labeled_pairs: np.ndarray
    entropy_key: jax.Array

    @property
    def chunk(self) -> int:
        """Rows per feature call (`stages.feature_rows`)."""
        return stages.feature_rows(self.setup.config, self.setup.mesh)

    def of_responses(self, features: Callable[[RoundInputs, Sequences], jax.Array], *, on_devices: bool = False):
        """`features` of every response, on the host (NumPy) or left on the devices (`map_on_devices`)."""
        apply = map_on_devices if on_devices else map_in_chunks
        return apply(lambda rows: features(self, rows), self.responses, self.chunk)

    def of_labeled(self, features: Callable[[RoundInputs, Sequences], np.ndarray], width: int) -> np.ndarray:
        """φ = f(chosen) − f(rejected) of every labeled triplet `[p, width]` (p = 0 before the first label)."""
        if self.labeled is None:
            return np.zeros((0, width), np.float32)
        f = map_in_chunks(lambda rows: features(self, rows), self.labeled, self.chunk)
        return f[self.labeled_pairs[:, 0]] - f[self.labeled_pairs[:, 1]]


def _gradient_features(inputs: RoundInputs, rows: Sequences) -> jax.Array:
    """g = P∇r under θ_{t−1} (paper §3.3)."""
    setup = inputs.setup
    return stages.features(setup.model, inputs.lora, put_rows(rows, setup.mesh), config=setup.config)


def _frozen_features(inputs: RoundInputs, rows: Sequences) -> jax.Array:
    """APO's features: the initial model's last-token hidden state of each response."""
    return stages.frozen_features(inputs.setup.model, *put_rows((rows.input_ids, rows.attention_mask), inputs.setup.mesh))


def _margins(inputs: RoundInputs) -> np.ndarray:
    """Implicit-reward margins r(x, y_a) − r(x, y_b) under θ_{t−1} (APLP's certainty)."""
    setup = inputs.setup
    policy = batched_logprobs(setup.model, inputs.lora, inputs.responses, **setup.logprob_chunking)
    reward = setup.config.dpo.beta * (policy - reference_logprobs(setup.model, inputs.responses, **setup.logprob_chunking))
    return reward[inputs.pairs[:, 0]] - reward[inputs.pairs[:, 1]]


def _prompt_entropy(inputs: RoundInputs) -> jax.Array:
    """APLP's predictive entropy of each prompt, from `generation.entropy_samples` samples drawn
    at temperature 1 (Muldrew et al., §4.1)."""
    setup, draws = inputs.setup, stages.sampling(inputs.setup.config, "entropy samples")
    samples = setup.generate(inputs.prompts, lora=inputs.lora, key=inputs.entropy_key, **draws._asdict())
    return predictive_entropy(batched_logprobs(setup.model, inputs.lora, samples, **setup.logprob_chunking), draws.num_samples)


def _hidden_size(inputs: RoundInputs) -> int:
    return inputs.setup.model.config.hidden_size


PRODUCERS: dict[str, tuple[str, Callable[[RoundInputs], np.ndarray]]] = {
    "features": ("features", lambda r: r.of_responses(_gradient_features)),
    "prior": ("features", lambda r: r.of_labeled(_gradient_features, r.setup.config.features.dim)),
    "margins": ("rewards", _margins),
    "prompt_entropy": ("entropy", _prompt_entropy),
    "apo_features": ("features", lambda r: r.of_responses(_frozen_features)),
    "apo_prior": ("features", lambda r: r.of_labeled(_frozen_features, _hidden_size(r))),
}


ON_DEVICES: dict[str, Callable[[RoundInputs], jax.Array]] = {  # for a selector that splits over the mesh
    "features": lambda r: r.of_responses(_gradient_features, on_devices=True),
}


def build_pool(selector: Selector, inputs: RoundInputs, stages) -> SelectionPool:
    """The SelectionPool with the base fields and exactly the fields `selector` requires, each
    computed under its stage (`stages.stage(name)` times it). A selector that splits its
    candidates over the mesh (`Selector.placed`) gets g on the devices, so `place_pairs` lays it
    out there and g never visits the host (`ON_DEVICES`); every other field comes from the host."""
    m = inputs.setup.config.generation.responses_per_prompt
    fields = dict(
        num_candidates=len(inputs.pairs), pairs=jnp.asarray(inputs.pairs), pair_prompt_ids=jnp.asarray(inputs.pairs[:, 0] // m),
        mesh=inputs.setup.mesh,
    )
    for name in sorted(selector.requires - BASE_FIELDS):
        stage, produce = PRODUCERS[name]
        if selector.placed is not None:
            produce = ON_DEVICES.get(name, produce)
        with stages.stage(stage):
            fields[name] = jax.block_until_ready(jnp.asarray(produce(inputs)))
    return SelectionPool(**fields)
