"""A memory plan before the first round: each stage's compiled program (`memory_analysis()` of the
program XLA would run, per device) against the device's memory, so a run that cannot fit stops at
once with the config key to lower, instead of hours later in an out-of-memory crash.

A stage's need is its program's peak (its arguments — the weights it reads, the chunk — plus its
outputs and temporaries) plus what stays resident meanwhile and is not among its arguments (the
other model of a run with a JAX reward model). Programs are lowered from abstract shapes; nothing
runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxdpo.dpo import train_step
from jaxdpo.errors import UserError
from jaxdpo.experiment.setup import Setup
from jaxdpo.features import gradient_features
from jaxdpo.models import LoRA, init_lora
from jaxdpo.rewards import sequence_logprobs
from jaxdpo.sampling import generate
from jaxdpo.selection import select_batch
from jaxdpo.sequences import Sequences
from jaxdpo.sharding import data_multiple, rows_sharding, shard_params

_log = logging.getLogger("jaxdpo")
ENTROPY_METHODS = ("entropy", "hybrid", "aplp")


class StagePlan(NamedTuple):
    """One stage's program: bytes it needs per device, and the config key that bounds them."""

    stage: str
    key: str
    bytes: int


def device_memory() -> int:
    """Bytes one device may use: the allocator's limit on accelerators, physical RAM on a CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(plan: StagePlan, limit: int) -> None:
    """UserError when `plan` is over `limit`, naming the key to lower."""
    if plan.bytes > limit:
        raise UserError(
            f"{plan.key}: the {plan.stage} stage needs {plan.bytes / 2**30:.3f} GiB per device, more than the "
            f"{limit / 2**30:.3f} GiB available; lower {plan.key} (or split the model over more devices: mesh.model)"
        )


def plan_memory(setup: Setup) -> Iterator[StagePlan]:
    """Every stage of a round of `setup`'s config, at its chunk shapes, lowered and compiled, one
    at a time (a caller can stop at the first that does not fit)."""
    config, mesh = setup.config, setup.mesh
    lora = _adapter(setup)
    prompt_len = setup.train.input_ids.shape[1]
    seq = prompt_len + setup.max_new_tokens
    g = config.generation
    samples = {g.responses_per_prompt, config.eval.samples_per_prompt}
    if any(method in ENTROPY_METHODS for method in config.run.methods):
        samples.add(g.entropy_samples)
    resident = _bytes_of(getattr(setup.oracle, "model", None))  # a JAX reward model stays on the device
    for k in sorted(samples):
        yield StagePlan(f"generation ({k} per prompt)", "generation.chunk_rows", resident + _generation_bytes(setup, lora, k, prompt_len))
    yield StagePlan("features", "features.chunk_size", resident + _features_bytes(setup, lora, seq))
    yield StagePlan("log-probs", "dpo.logprob_chunk", resident + _logprob_bytes(setup, lora, seq))
    yield StagePlan("DPO step", "dpo.batch_size", resident + _dpo_bytes(setup, lora, seq))
    yield StagePlan("selection", "data.prompts_per_round", _selection_bytes(setup))


def _adapter(setup: Setup) -> LoRA:
    c = setup.config.lora
    lora = init_lora(setup.model, rank=c.rank, alpha=c.alpha, targets=c.targets, key=jax.random.key(0))
    return lora if setup.mesh is None else shard_params(lora, setup.mesh)


def _rows(setup: Setup, rows: int, width: int, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
    sharding = None if setup.mesh is None else rows_sharding(setup.mesh, 2)
    return jax.ShapeDtypeStruct((rows, width), dtype, sharding=sharding)


def _program_bytes(fn, *args) -> int:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    return int(max(total, getattr(stats, "peak_memory_in_bytes", 0)))


def _bytes_of(tree) -> int:
    """Bytes of `tree`'s arrays held by one device (its shards)."""
    if tree is None:
        return 0
    leaves = jax.tree.leaves(tree)
    return int(sum(x.addressable_shards[0].data.nbytes if hasattr(x, "addressable_shards") else np.asarray(x).nbytes for x in leaves))


def _generation_bytes(setup: Setup, lora: LoRA, num_samples: int, prompt_len: int) -> int:
    prompts = data_multiple(min(max(1, setup.config.generation.chunk_rows // num_samples), setup.config.data.prompts_per_round), setup.mesh)
    tokens = _rows(setup, prompts, prompt_len)
    g, tokenizer = setup.config.generation, setup.tokenizer

    def sample(model, lora, ids, mask, key):
        return generate(
            model, ids, mask, lora=lora, max_new_tokens=setup.max_new_tokens, temperature=1.0, top_p=g.top_p, top_k=g.top_k,
            num_samples=num_samples, key=key, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ).input_ids

    return _program_bytes(sample, setup.model, lora, tokens, tokens, jax.random.key(0))


def _features_bytes(setup: Setup, lora: LoRA, seq: int) -> int:
    f, rows = setup.config.features, data_multiple(setup.config.features.chunk_size, setup.mesh)
    tokens = _rows(setup, rows, seq)

    def features(model, lora, ids, response, attention):
        return gradient_features(
            model, lora, ids, response, attention_mask=attention, beta=setup.config.dpo.beta, dim=f.dim, seed=f.seed,
            normalize=f.normalize, method=f.method, chunk_size=rows, projection_batch=f.projection_batch,
        )

    return _program_bytes(features, setup.model, lora, tokens, tokens, tokens)


def _logprob_bytes(setup: Setup, lora: LoRA, seq: int) -> int:
    tokens = _rows(setup, setup.logprob_chunking["chunk_size"], seq)
    return _program_bytes(
        lambda model, lora, ids, response, attention: sequence_logprobs(model, lora, ids, response, attention_mask=attention),
        setup.model, lora, tokens, tokens, tokens,
    )


def _dpo_bytes(setup: Setup, lora: LoRA, seq: int) -> int:
    trainer = setup.trainer
    rows = 2 * trainer.batch_size
    sharding = None if setup.mesh is None else NamedSharding(setup.mesh, PartitionSpec(None, "data"))
    tokens = jax.ShapeDtypeStruct((trainer.grad_accum, rows, seq), jnp.int32, sharding=sharding)
    ref = jax.ShapeDtypeStruct((trainer.grad_accum, rows), jnp.float32, sharding=sharding)
    weights = jax.ShapeDtypeStruct((trainer.grad_accum, trainer.batch_size), jnp.float32)
    state = trainer.init(lora)

    def step(model, lora, opt_state, ids, response, attention, ref, weights):
        return train_step(model, lora, opt_state, Sequences(ids, response, attention), ref, weights, trainer=trainer, window=seq - 1)

    return _program_bytes(step, setup.model, lora, state.opt_state, tokens, tokens, tokens, ref, weights)


def _selection_bytes(setup: Setup) -> int:
    """The ActiveDPO pick on the round's per-response features with the largest prior of the run."""
    c = setup.config
    m = c.generation.responses_per_prompt
    responses = c.data.prompts_per_round * m
    features = jax.ShapeDtypeStruct((responses, c.features.dim), jnp.float32)
    prior = jax.ShapeDtypeStruct((c.run.rounds * c.selection.batch_size, c.features.dim), jnp.float32)
    pairs = jax.ShapeDtypeStruct((c.candidates_per_round, 2), jnp.int32)
    return _program_bytes(lambda g, p, pairs: select_batch(g, c.selection.batch_size, prior=p, pairs=pairs).indices, features, prior, pairs)


def log_plan(plan: StagePlan, limit: int) -> None:
    _log.info("memory plan: %-28s %8.3f GiB of %.1f GiB (bounded by %s)", plan.stage, plan.bytes / 2**30, limit / 2**30, plan.key)
