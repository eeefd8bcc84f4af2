"""Each stage of a round as one program: the function the run calls on one chunk, how many rows a
call takes (from the config and the mesh), and the chunk's abstract inputs. The run calls these
functions; the memory plan before a run (`memory`), `jaxdpo plan` (`plan`) and the rehearsal lower
the same functions at the same shapes, so a plan measures the program the run executes.

| stage | program | rows per call | the run times it under |
|---|---|---|---|
| generation: responses, entropy samples, evaluation | `sample` (`sampling.generate`) | `prompts_per_call` × samples | generation, entropy, eval |
| log-probs | `dpo.chunk_logprobs` | `logprob_rows` | rewards, entropy, training, eval |
| features | `features` (`features.gradient_features`) | `feature_rows` | features |
| frozen features (APO) | `frozen_features` | `feature_rows` | features |
| DPO step | `dpo.train_step` | `dpo.grad_accum` × 2 `dpo.batch_size` | training |
| selection | the method's `Selector` | the round's pool | selection |
| reward model (a JAX oracle) | `oracles.scores.reward_scores` | `reward_rows` | oracle, eval |

A plan lowers log-probs, features and the DPO step at their widest response window (every
position), the bound of what a run compiles for its responses.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdpo.config import ExperimentConfig
from jaxdpo.dpo import chunk_logprobs, train_step
from jaxdpo.errors import UserError
from jaxdpo.experiment import placement
from jaxdpo.features import gradient_features
from jaxdpo.models import last_token_states
from jaxdpo.oracles.scores import reward_scores
from jaxdpo.sampling import generate
from jaxdpo.selection import SelectionPool, make_selector
from jaxdpo.sequences import Sequences
from jaxdpo.sharding import DATA, data_multiple

BASE_FIELDS = frozenset({"num_candidates", "pairs", "pair_prompt_ids", "mesh"})
"""Pool fields every round has, whatever its selector requires."""


def triplets(num_prompts: int, m: int) -> np.ndarray:
    """A round's candidate pairs `[num_prompts · C(m, 2), 2]` (rows of its responses): prompt i's
    responses are rows i·m … i·m + m − 1."""
    within = np.asarray(list(itertools.combinations(range(m), 2)), np.int32)
    return (np.arange(num_prompts, dtype=np.int32)[:, None, None] * m + within[None]).reshape(-1, 2)


# -- rows per call ---------------------------------------------------------------------------------


def prompts_per_call(config: ExperimentConfig, num_samples: int, num_prompts: int, mesh: Mesh | None) -> int:
    """Prompts per generation call: about `generation.chunk_rows` rows of `num_samples` each (fewer
    for fewer prompts), a multiple of the mesh's data axis."""
    return data_multiple(min(max(1, config.generation.chunk_rows // num_samples), num_prompts), mesh)


def feature_rows(config: ExperimentConfig, mesh: Mesh | None) -> int:
    """Responses per feature call (`features.chunk_size`, a multiple of the mesh's data axis)."""
    return data_multiple(config.features.chunk_size, mesh)


def logprob_rows(config: ExperimentConfig, mesh: Mesh | None) -> int:
    """Rows per log-prob call outside training (`dpo.logprob_chunk`, a multiple of the data axis)."""
    return data_multiple(config.dpo.logprob_chunk, mesh)


def reward_rows(config: ExperimentConfig, mesh: Mesh | None) -> int:
    """Texts per call of a JAX reward model (`oracle.batch_size`, a multiple of the data axis)."""
    return data_multiple(config.oracle.batch_size, mesh)


def check_splits(config: ExperimentConfig, mesh: Mesh) -> None:
    """A DPO micro-batch (chosen and rejected rows) must split evenly over the data devices."""
    data = mesh.shape[DATA]
    if (2 * config.dpo.batch_size) % data:
        raise UserError(f"dpo.batch_size: its 2 × {config.dpo.batch_size} rows per micro-batch must split over mesh.data = {data} devices")


# -- the programs the run calls, one chunk at a time -----------------------------------------------


class Sampling(NamedTuple):
    """How one purpose samples: responses per prompt, temperature and filters."""

    num_samples: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0


def sampling(config: ExperimentConfig, purpose: str) -> Sampling:
    """The sampling of "responses" (the candidates), "entropy samples" (APLP's temperature-1
    samples) or "evaluation"."""
    g, e = config.generation, config.eval
    return {
        "responses": Sampling(g.responses_per_prompt, g.temperature, g.top_p, g.top_k),
        "entropy samples": Sampling(g.entropy_samples, 1.0),
        "evaluation": Sampling(e.samples_per_prompt, e.temperature),
    }[purpose]


def prompts_of(config: ExperimentConfig, purpose: str) -> int:
    """The prompts a round generates for `purpose`: the round's pool, or the held-out evaluation set."""
    return config.eval.prompts if purpose == "evaluation" else config.data.prompts_per_round


def sample(
    model, lora, prompt_ids, prompt_mask, prompt_index, key, *, sampling: Sampling, max_new_tokens: int, eos_token_id, pad_token_id: int,
) -> Sequences:
    """One generation call: `sampling.num_samples` responses to each of a chunk of prompts, prompt
    i's sample j drawn from (`key`, `prompt_index[i]`, j) alone."""
    return generate(
        model, prompt_ids, prompt_mask, lora=lora, key=key, prompt_index=prompt_index, max_new_tokens=max_new_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k, num_samples=sampling.num_samples, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


def features(model, lora, rows: Sequences, *, config: ExperimentConfig):
    """One feature call: g = P∇r under the adapter `lora` (paper §3.3) of a chunk of responses."""
    f = config.features
    return gradient_features(
        model, lora, rows.input_ids, rows.response_mask, attention_mask=rows.attention_mask, beta=config.dpo.beta, dim=f.dim,
        seed=f.seed, normalize=f.normalize, method=f.method, chunk_size=rows.num_rows, projection_batch=f.projection_batch,
    )


@jax.jit
def frozen_features(model, input_ids, attention_mask):
    """APO's features: the initial model's last-token hidden state of each response (float32)."""
    return last_token_states(model.hidden_states(input_ids, attention_mask=attention_mask), attention_mask).astype(jnp.float32)


# -- a round's stages at their shapes --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoundShape:
    """What fixes a round's programs: the config, the policy (its arrays, or abstract ones for a
    plan), the mesh (None: one device), the prompt and response lengths, the special tokens, and
    the oracle's JAX reward model (None without one)."""

    config: ExperimentConfig
    model: Any
    mesh: Mesh | None
    prompt_len: int
    max_new_tokens: int
    eos_token_id: Any
    pad_token_id: int
    reward_model: Any = None

    @property
    def seq(self) -> int:
        return self.prompt_len + self.max_new_tokens


@dataclasses.dataclass(frozen=True)
class Stage:
    """One program of a round. `program(*args)` is what the run calls per chunk (`args` abstract
    and sharded as the run places them); `key` the config key that bounds its memory; `holds` the
    long-lived state among its arguments ("policy", "adapter", "optimizer", "reward model");
    `timed_as` the run's stage timings it runs under; `calls` per method of the config, how many
    calls each of its rounds makes (the last one has the most labels); `loop_trips` the
    iterations its data-dependent loop runs at most (decoding: max_new_tokens); `state_reads`
    the bytes per device a call reads at least from state it builds itself (decoding: the KV
    cache, see `decode_cache_reads`)."""

    name: str
    key: str
    program: Callable
    args: tuple
    holds: frozenset[str]
    timed_as: tuple[str, ...]
    calls: Mapping[str, tuple[int, ...]]
    loop_trips: int = 1
    state_reads: int = 0

    def resident(self, long_lived: Mapping[str, int]) -> int:
        """Bytes per device that stay on the device meanwhile and are not among its arguments:
        the policy, the reward model, and two train states (a track's current one and its fresh
        one, adapter and optimizer state each) less the one it reads."""
        held = {name: bytes_ * (2 if name in ("adapter", "optimizer") else 1) for name, bytes_ in long_lived.items()}
        return sum(held.values()) - sum(long_lived[name] for name in self.holds if name in long_lived)


def long_lived(shape: RoundShape) -> dict[str, int]:
    """Bytes per device of what a run keeps on its devices throughout."""
    lora = placement.abstract_adapter(shape)
    state = dict(policy=placement.device_bytes(shape.model), adapter=placement.device_bytes(lora), optimizer=placement.device_bytes(placement.abstract_optimizer(shape, lora)))
    return state | ({"reward model": placement.device_bytes(shape.reward_model)} if shape.reward_model is not None else {})


def round_stages(shape: RoundShape) -> list[Stage]:
    """Every program of a round of `shape.config` at its chunk shapes, each once (a program two
    stages share, like log-probs, counts the calls of both)."""
    config, mesh = shape.config, shape.mesh
    model, lora = placement.abstract(shape.model), placement.abstract_adapter(shape)
    uses = {method: make_selector(method).requires for method in config.run.methods}
    calls = _Calls(shape, uses)
    key = placement.replicated(shape, jax.eval_shape(lambda: jax.random.key(0)))
    stages = []
    for purpose, timed in (("responses", "generation"), ("entropy samples", "entropy"), ("evaluation", "eval")):
        counts = calls.generation(purpose)
        if any(map(any, counts.values())):
            s = sampling(config, purpose)
            prompts = prompts_per_call(config, s.num_samples, prompts_of(config, purpose), mesh)
            tokens, index = placement.rows(shape, (prompts, shape.prompt_len)), placement.rows(shape, (prompts,))
            program = partial(sample, sampling=s, max_new_tokens=shape.max_new_tokens, eos_token_id=shape.eos_token_id, pad_token_id=shape.pad_token_id)
            stages.append(Stage(
                f"generation: {purpose} ({s.num_samples} per prompt)", "generation.chunk_rows", program, (model, lora, tokens, tokens, index, key),
                frozenset({"policy", "adapter"}), (timed,), counts, loop_trips=shape.max_new_tokens,
                state_reads=decode_cache_reads(shape, prompts * s.num_samples),
            ))
    window = shape.seq - 1
    rows = placement.sequences(shape, (logprob_rows(config, mesh), shape.seq))
    stages.append(Stage(
        "log-probs", "dpo.logprob_chunk", partial(chunk_logprobs, window=window), (model, lora, rows), frozenset({"policy", "adapter"}),
        ("rewards", "entropy", "training", "eval"), calls.logprobs(),
    ))
    rows = placement.sequences(shape, (feature_rows(config, mesh), shape.seq))
    for fields, name, program, args in (
        ({"features", "prior"}, "features", partial(features, config=config), (model, lora, rows)),
        ({"apo_features", "apo_prior"}, "frozen features", frozen_features, (model, rows.input_ids, rows.attention_mask)),
    ):
        counts = calls.features(fields)
        if any(map(any, counts.values())):
            holds = frozenset({"policy", "adapter"} if name == "features" else {"policy"})
            stages.append(Stage(name, "features.chunk_size", program, args, holds, ("features",), counts))
    stages.append(_dpo_stage(shape, model, lora, calls))
    stages += [_selection_stage(shape, method, calls.selection(method)) for method in config.run.methods]
    if shape.reward_model is not None:
        tokens = placement.rows(shape, (reward_rows(config, mesh), config.oracle.max_length))
        stages.append(Stage(
            "reward model", "oracle.batch_size", reward_scores, (placement.abstract(shape.reward_model), tokens, tokens), frozenset({"reward model"}),
            ("oracle", "eval"), calls.reward_model(),
        ))
    return stages


def decode_cache_reads(shape: RoundShape, rows: int) -> int:
    """The bytes per device a generation call of `rows` sequences reads from its KV cache at least:
    each decode step after the prefill attends over every slot of every layer's cache (the mask
    hides the empty ones), so however the cache is placed, the busiest of the mesh's n devices
    reads at least 1/n of it."""

    def keys_and_values():
        cache = shape.model.init_cache(rows, shape.seq)
        return cache.k + cache.v

    step = placement.device_bytes(jax.eval_shape(keys_and_values))  # unplaced: the whole cache
    return (shape.max_new_tokens - 1) * step // (shape.mesh.size if shape.mesh is not None else 1)


def _dpo_stage(shape: RoundShape, model, lora, calls: _Calls) -> Stage:
    trainer = shape.config.dpo.trainer()
    accum, rows = trainer.grad_accum, 2 * trainer.batch_size
    batch = placement.sequences(shape, (accum, rows, shape.seq), axis=1)
    ref = placement.rows(shape, (accum, rows), jnp.float32, axis=1)
    weights = placement.replicated(shape, jax.ShapeDtypeStruct((accum, trainer.batch_size), jnp.float32))
    program = partial(train_step, trainer=trainer, window=shape.seq - 1)
    args = (model, lora, placement.abstract_optimizer(shape, lora), batch, ref, weights)
    return Stage("DPO step", "dpo.batch_size", program, args, frozenset({"policy", "adapter", "optimizer"}), ("training",), calls.dpo_steps())


def _selection_stage(shape: RoundShape, method: str, calls: Mapping[str, tuple[int, ...]]) -> Stage:
    """The method's pick from the last round's pool (the largest prior). On a mesh of several
    devices a method that splits its candidates (ActiveDPO) runs on all of them with the pool laid
    out as the run lays it out (`place_pairs`: whole prompts per device); others run on one device
    with the pool's fields gathered there."""
    config = shape.config
    selector = make_selector(method, **config.selection.options.get(method, {}))
    batch = config.selection.batch_size
    specs = {name: spec for name, spec in _pool_fields(shape).items() if name in selector.requires | BASE_FIELDS}
    if selector.placed is not None and shape.mesh is not None and shape.mesh.size > 1:
        pairs = triplets(config.data.prompts_per_round, config.generation.responses_per_prompt)
        fields, select, mesh = placement.placed_pool(shape, specs, pairs), selector.on_placed, shape.mesh
    else:
        fields, select, mesh = {name: placement.pooled(shape, spec) for name, spec in specs.items()}, selector, None

    def program(fields, key):
        return select(SelectionPool(num_candidates=fields["pairs"].shape[0], mesh=mesh, **fields), batch, key=key).indices

    key = placement.pooled(shape, jax.eval_shape(lambda: jax.random.key(0)))
    return Stage(
        f"selection: {method}", "data.prompts_per_round", program, (fields, key), frozenset(), ("selection",), calls
    )


def _pool_fields(shape: RoundShape) -> dict[str, jax.ShapeDtypeStruct]:
    c = shape.config
    responses, n = c.data.prompts_per_round * c.generation.responses_per_prompt, c.candidates_per_round
    labeled = (c.run.rounds - 1) * c.selection.batch_size
    dim, hidden = c.features.dim, shape.model.config.hidden_size
    f32, i32 = jnp.float32, jnp.int32
    return {
        "features": jax.ShapeDtypeStruct((responses, dim), f32), "prior": jax.ShapeDtypeStruct((labeled, dim), f32),
        "pairs": jax.ShapeDtypeStruct((n, 2), i32), "pair_prompt_ids": jax.ShapeDtypeStruct((n,), i32),
        "margins": jax.ShapeDtypeStruct((n,), f32), "prompt_entropy": jax.ShapeDtypeStruct((c.data.prompts_per_round,), f32),
        "apo_features": jax.ShapeDtypeStruct((responses, hidden), f32), "apo_prior": jax.ShapeDtypeStruct((labeled, hidden), f32),
    }


class _Calls:
    """Calls of each stage per method, in each round t = 1 … run.rounds ((t − 1)·B labeled pairs
    before it; every label a preference)."""

    def __init__(self, shape: RoundShape, uses: Mapping[str, frozenset[str]]):
        c = self.config = shape.config
        self.uses, self.mesh = uses, shape.mesh
        self.prompts, self.m, self.batch = c.data.prompts_per_round, c.generation.responses_per_prompt, c.selection.batch_size

    def _per_method(self, count: Callable[[frozenset[str], int], int]) -> dict[str, tuple[int, ...]]:
        rounds = range(1, self.config.run.rounds + 1)
        return {method: tuple(count(fields, t) for t in rounds) for method, fields in self.uses.items()}

    def _trained(self, t: int) -> int:
        """Pairs the DPO of round t trains on (`dpo.train_on`: this round's or every one so far)."""
        return self.batch * (t if self.config.dpo.train_on == "all" else 1)

    def generation(self, purpose: str) -> dict[str, tuple[int, ...]]:
        prompts = prompts_of(self.config, purpose)
        calls = math.ceil(prompts / prompts_per_call(self.config, sampling(self.config, purpose).num_samples, prompts, self.mesh))
        return self._per_method(lambda fields, t: 0 if purpose == "entropy samples" and "prompt_entropy" not in fields else calls)

    def logprobs(self) -> dict[str, tuple[int, ...]]:
        """Margins (policy and reference), entropy samples, training's reference log-probs, and the
        evaluation's capability guard: the held-out references (at most one per held-out prompt),
        and the samples under policy and reference when they are drawn at temperature 1."""
        rows, e = logprob_rows(self.config, self.mesh), self.config.eval
        entropy = self.prompts * self.config.generation.entropy_samples
        guard = math.ceil(e.prompts / rows) + (2 * math.ceil(e.prompts * e.samples_per_prompt / rows) if e.temperature == 1.0 else 0)

        def count(fields, t):
            margins = 2 * math.ceil(self.prompts * self.m / rows) if "margins" in fields else 0
            samples = math.ceil(entropy / rows) if "prompt_entropy" in fields else 0
            return margins + samples + math.ceil(2 * self._trained(t) / rows) + guard

        return self._per_method(count)

    def features(self, fields_of_stage: set[str]) -> dict[str, tuple[int, ...]]:
        rows = feature_rows(self.config, self.mesh)
        return self._per_method(
            lambda fields, t: math.ceil(self.prompts * self.m / rows) + math.ceil(2 * (t - 1) * self.batch / rows) if fields & fields_of_stage else 0
        )

    def dpo_steps(self) -> dict[str, tuple[int, ...]]:
        trainer = self.config.dpo.trainer()
        return self._per_method(lambda fields, t: trainer.epochs * trainer.steps_per_epoch(self._trained(t)))

    def reward_model(self) -> dict[str, tuple[int, ...]]:
        rows = reward_rows(self.config, self.mesh)
        texts = self.config.eval.prompts * self.config.eval.samples_per_prompt
        return self._per_method(lambda fields, t: math.ceil(texts / rows) + math.ceil(2 * self.batch / rows))

    def selection(self, method: str) -> dict[str, tuple[int, ...]]:
        return {m: (int(m == method),) * self.config.run.rounds for m in self.uses}
