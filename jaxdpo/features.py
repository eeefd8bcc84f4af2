"""Per-response gradient features g(x, y) = P · ∇r(x, y) over the LoRA parameters (paper §3.3).

A triplet's φ(x, y1, y2) = g(x, y1) − g(x, y2), which `select_batch` takes directly through its
`pairs` option. Two methods:

* "dense": per-example LoRA gradients (vmapped, `chunk_size` examples at a time), scaled to unit
  L2 norm when `normalize` (paper §3.3, before projection), then `projection.dense_project`, for
  `projection_batch` examples at once: every projection pass generates the whole on-the-fly
  matrix, which costs about as much as projecting tens of examples, so the passes are amortized
  over `projection_batch` gradients (memory: that many flattened LoRA gradients).
* "factored": LoGra-style. Zero probes E are inserted into every LoRA factor as W + P_lᵀ E P_r
  (through the decoder's `lora_fn` hook), so ∂(β log π)/∂E = P_l G P_rᵀ is computed from the
  projected activations and output gradients; no per-example gradient is ever formed. With
  `normalize`, the projected vector is scaled to unit norm: the gradient's own norm is never
  formed either, and ‖Pg‖ = ‖g‖ up to the JL error O(1/√dim). The probes being zero, their
  products are skipped in the forward pass (`_zero_probe`).

Both run the LM head, log-softmax and the last layer's queries and MLP only on the positions that
predict response tokens (`sequence_logprobs` on `response_window`). Everything else runs at every
position, prompt included: the LoRA gradient reaches the response through the prompt's keys and
values in every layer, so a prompt's m responses cannot share its backward pass.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxdpo import checks
from jaxdpo.models import LoRA
from jaxdpo.projection import FactoredPlan, project_leaves, as_key, plan_factored
from jaxdpo.rewards import per_example_grads, sequence_logprobs
from jaxdpo.sequences import check_sequences, pad_rows, response_window

METHODS = ("dense", "factored")


def _unit(x: Array, squared_norm: Array) -> Array:
    norm = jnp.sqrt(squared_norm)
    return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1.0), 0.0)


def _tree_unit(tree):
    squared = sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree))
    return jax.tree.map(lambda leaf: _unit(leaf, squared), tree)


def _targets(lora: LoRA) -> tuple[str, ...]:
    """Targets in a canonical order (sorted, as JAX flattens dicts), so the seed → projection map
    does not depend on how the adapter dict was built or whether it went through `jit`."""
    return tuple(sorted(lora.params))


def factored_plan(lora: LoRA, dim: int) -> FactoredPlan:
    """The Kronecker plan for this adapter: blocks "target.a" [in, r] and "target.b" [r, out]."""
    shapes = []
    for target in _targets(lora):
        p = lora.params[target]
        num_layers, fan_in, rank = p["a"].shape
        shapes += [(f"{target}.a", fan_in, rank, 1), (f"{target}.b", rank, p["b"].shape[2], 0)]
    return plan_factored(shapes, num_layers=num_layers, dim=dim)


@jax.custom_vjp
def _zero_probe(projected: Array, probe: Array, right: Array) -> Array:
    """`projected @ probe @ right` for a probe that is zero, so the product is skipped: its value
    is zero, and so is the gradient it passes to `projected`. The probe's gradient
    `projectedᵀ (g rightᵀ)` is what the factored features read."""
    return jnp.zeros((*projected.shape[:-1], right.shape[-1]), jnp.result_type(projected, probe))


def _zero_probe_fwd(projected, probe, right):
    return _zero_probe(projected, probe, right), (projected, probe, right)


def _zero_probe_bwd(residuals, g):
    projected, probe, right = residuals
    rows = projected.reshape(-1, projected.shape[-1])
    grad = jnp.matmul(rows.T, (g @ right.T).reshape(rows.shape[0], -1).astype(rows.dtype), preferred_element_type=probe.dtype)
    return None, grad, None


_zero_probe.defvjp(_zero_probe_fwd, _zero_probe_bwd)


def _probed_lora_fn(plan: FactoredPlan, key: Array, targets: tuple[str, ...]):
    """A `lora_fn` computing the adapter through W + P_lᵀ E P_r for the zero probes E in params."""

    def lora_fn(x, params, scale, layer, target):
        block = 2 * targets.index(target)
        left_a, right_a = (m.astype(x.dtype) for m in plan.factors(key, block, layer))
        left_b, right_b = (m.astype(x.dtype) for m in plan.factors(key, block + 1, layer))
        z = x @ params["a"] + _zero_probe(x @ left_a.T, params["e_a"], right_a)
        return scale * (z @ params["b"] + _zero_probe(z @ left_b.T, params["e_b"], right_b))

    return lora_fn


def _zero_probes(lora: LoRA, plan: FactoredPlan) -> dict[str, dict[str, Array]]:
    probes = {}
    for i, target in enumerate(_targets(lora)):
        a, b = plan.blocks[2 * i], plan.blocks[2 * i + 1]
        probes[target] = {
            "e_a": jnp.zeros((plan.num_layers, a.k_left, a.k_right), jnp.float32),
            "e_b": jnp.zeros((plan.num_layers, b.k_left, b.k_right), jnp.float32),
        }
    return probes


def _in_groups(fn, batch, size: int) -> Array:
    """`fn` over consecutive groups of `size` examples (the last padded by `pad_rows`),
    concatenated, `[n, ...]` (inside `jit`)."""
    n = batch[0].shape[0]
    groups = -(-n // size)
    padded = [pad_rows(x, groups * size) for x in batch]
    out = jax.lax.map(fn, tuple(x.reshape(groups, size, *x.shape[1:]) for x in padded))
    return out.reshape(groups * size, *out.shape[2:])[:n]


@partial(jax.jit, static_argnames=("dim", "normalize", "method", "chunk_size", "projection_batch", "window"))
def features_program(model, lora, batch, beta, key, *, dim, normalize, method, chunk_size, projection_batch, window):
    """The jitted program behind `gradient_features` (inputs already checked); public so that memory
    plans and benchmarks lower exactly what a run executes."""
    def logprob(lora, example, lora_fn=None):
        ids, response, attention = (x[None] for x in example)
        return beta * sequence_logprobs(model, lora, ids, response, attention_mask=attention, lora_fn=lora_fn, window=window)[0]

    if method == "dense":

        def project_group(examples):
            grads = per_example_grads(logprob, lora, examples, chunk_size)
            grads = jax.vmap(_tree_unit)(grads) if normalize else grads
            return project_leaves(jax.tree.leaves(grads), key, dim)

        return _in_groups(project_group, batch, projection_batch)

    plan = factored_plan(lora, dim)
    lora_fn = _probed_lora_fn(plan, key, _targets(lora))

    def probe_logprob(probes, example):
        params = {t: {**lora.params[t], **probes[t]} for t in lora.params}
        return logprob(LoRA(params=params, rank=lora.rank, alpha=lora.alpha), example, lora_fn)

    probe_grads = per_example_grads(probe_logprob, _zero_probes(lora, plan), batch, chunk_size)
    blocks = [probe_grads[t][side] for t in _targets(lora) for side in ("e_a", "e_b")]
    features = plan.select(blocks)
    return _unit(features, jnp.sum(features**2, axis=1, keepdims=True)) if normalize else features


def gradient_features(
    model,
    lora: LoRA,
    input_ids,
    response_mask,
    *,
    beta: float,
    dim: int,
    seed,
    normalize: bool = True,
    method: Literal["dense", "factored"] = "dense",
    attention_mask=None,
    chunk_size: int = 8,
    projection_batch: int = 64,
) -> Float[Array, "n dim"]:
    """Features g = P ∇_θ r(x, y) `[n, dim]` (float32) of every (prompt + response) row.

    ∇r = β ∇ log π_θ(y|x) over the LoRA parameters; `seed` (int or key) fixes P, so features of
    different rounds and devices live in the same space. `normalize` scales each gradient to unit
    L2 norm (paper §3.3; see the module docstring for the factored method). `chunk_size` examples
    share one vmapped backward pass; `projection_batch` (dense only) examples one projection pass."""
    checks.require(method in METHODS, f"method must be one of {list(METHODS)}, got {method!r}")
    checks.require(isinstance(dim, (int, np.integer)) and dim >= 1, f"dim must be a positive int, got {dim!r}")
    checks.require(beta > 0, f"beta must be > 0, got {beta}")
    checks.require(isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size!r}")
    checks.require(
        isinstance(projection_batch, (int, np.integer)) and projection_batch >= 1,
        f"projection_batch must be >= 1, got {projection_batch!r}",
    )
    check_sequences(input_ids, response_mask, attention_mask)
    n = np.shape(input_ids)[0]
    if attention_mask is None:
        attention_mask = jnp.ones(np.shape(input_ids), jnp.int32)
    batch = (jnp.asarray(input_ids), jnp.asarray(response_mask), jnp.asarray(attention_mask))
    return features_program(
        model, lora, batch, jnp.float32(beta), as_key(seed),
        dim=int(dim), normalize=bool(normalize), method=method, chunk_size=int(min(chunk_size, n)),
        projection_batch=int(min(projection_batch, n)), window=response_window(response_mask),
    )
