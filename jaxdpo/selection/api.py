"""The public greedy: `select_batch` (Eq. 3-4), `select_on_mesh`, `v_inv_norms`, and the input
checks every selector shares (`check_batch`)."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxdpo import checks
from jaxdpo.selection.candidates import Candidates, start
from jaxdpo.selection.plan import STRATEGIES, Plan, make_plan
from jaxdpo.selection.sharded import (
    Comm,
    blocks,
    greedy_program,
    mesh_axes,
    row_axis,
    sharded_program,
)
from jaxdpo.sharding import place, to_host


class SelectionResult(NamedTuple):
    """Picks in order, and the score that decided each one (for greedy: ‖φ‖_{V⁻¹} when picked).

    Positions that could not be filled (invalid input under `jit`, or fewer eligible candidates
    than the batch) hold index −1 and score NaN."""

    indices: Int[Array, " batch"]
    scores: Float[Array, " batch"]


@struct.dataclass
class SelectionStats:
    """What a greedy selection did: `strategy` planned ("full" or "lazy"); `full_from`, the first
    pick made with a pass over Φ per pick (B: none, 0: "full" throughout); `passes` over Φ after
    the initial one(s); candidates scored exactly (`rescored`) and by coordinates (`coordinates`).
    (A pytree: int32 scalars, or placeholders while JAX traces it, hence no array type.)"""

    rescored: Any
    coordinates: Any
    passes: Any
    full_from: Any
    strategy: str = struct.field(pytree_node=False)


def check_batch(batch_size, count: int, mask=None) -> Array:
    """Validate `batch_size` against a pool of `count` candidates and its `mask` (`[n]` bool, or
    None: all eligible); returns the mask as an array."""
    checks.require(
        isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool),
        f"batch_size must be a Python int, got {type(batch_size).__name__}",
    )
    checks.require(count >= 1, "the candidate pool is empty (no rows in features / pairs)")
    checks.require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    checks.require(batch_size <= count, f"batch_size {batch_size} is larger than the pool of {count} candidates")
    if mask is None:
        return jnp.ones((count,), bool)
    checks.check_shape("mask", mask, (count,))
    checks.require(jnp.result_type(mask) == jnp.bool_, f"mask must be boolean, got dtype {jnp.result_type(mask)}")
    if checks.is_concrete(mask):
        eligible = int(np.sum(to_host(mask)))
        checks.require(batch_size <= eligible, f"batch_size {batch_size} is larger than the {eligible} eligible candidates in mask")
    return jnp.asarray(mask)


def _as_array(name: str, x):
    """Arrays pass through; nested lists and tuples become NumPy arrays (clear error if ragged)."""
    if not isinstance(x, (list, tuple)):
        return x
    try:
        array = np.asarray(x)
    except ValueError:
        raise ValueError(f"{name} must be a rectangular array; got a ragged nested {type(x).__name__}") from None
    checks.require(array.dtype.kind in "biuf", f"{name} must hold numbers; got a {type(x).__name__} of {array.dtype.name} values")
    return array


def _validated(features, *, reg, prior, pairs):
    """Check and canonicalize the inputs shared by the ‖φ‖_{V⁻¹} functions. Checks that read every
    value of `features` run only after a result came back invalid (see `_diagnose`)."""
    features, prior, pairs = (_as_array(n, x) for n, x in [("features", features), ("prior", prior), ("pairs", pairs)])
    checks.check_ndim("features", features, 2, "[n, d]" if pairs is None else "[responses, d]")
    checks.check_floating("features", features)
    checks.check_fits_device("features", features)
    features = jnp.asarray(features)
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    rows, dim = features.shape
    checks.require(dim >= 1, f"features must have at least one column, got shape {features.shape}")
    if pairs is not None:
        checks.check_ndim("pairs", pairs, 2, "[n, 2]")
        checks.check_shape("pairs", pairs, (None, 2))
        checks.check_integer("pairs", pairs)
        checks.check_index_range("pairs", pairs, rows, "the rows of features")
        pairs = pairs if isinstance(pairs, jax.Array) and pairs.dtype == jnp.int32 else jnp.asarray(pairs, jnp.int32)
    if prior is not None:
        checks.check_ndim("prior", prior, 2, "[p, d]")
        checks.require(prior.shape[1] == dim, f"prior must have the width of features ({dim}), got shape {tuple(prior.shape)}")
        checks.check_floating("prior", prior)
        checks.check_finite("prior", prior)
        prior = jnp.asarray(prior, dtype)
    checks.require(np.ndim(reg) == 0, f"reg must be a scalar, got shape {np.shape(reg)}")
    if checks.is_concrete(reg):
        checks.require(bool(np.isfinite(reg)) and float(reg) > 0, f"reg must be > 0 and finite, got {reg}")
        with np.errstate(over="ignore"):
            representable = bool(np.isfinite(np.asarray(reg, dtype)))
        checks.require(
            representable,
            f"reg = {reg} overflows {np.dtype(dtype).name}, the precision of the features; scale reg and features down together "
            "(the picks only depend on reg / |features|^2)",
        )
    return features, jnp.asarray(reg, dtype), prior, pairs


def _diagnose(features, pairs) -> None:
    """An eager call whose result came back invalid: name the bad values (a full read of Φ, paid
    only on this path)."""
    if pairs is None:
        checks.check_finite("features", features)
    else:
        used = np.unique(np.asarray(pairs))
        checks.check_finite("features (rows used by pairs)", np.asarray(features)[used])
    raise ValueError("select_batch produced non-finite scores from finite inputs; please report this")


def _plan(strategy, features, pairs, prior, batch_size: int, shards: int, backend: str) -> Plan:
    checks.require(strategy in STRATEGIES, f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    count = features.shape[0] if pairs is None else pairs.shape[0]
    prior_rows = 0 if prior is None else prior.shape[0]
    return make_plan(
        strategy, count // shards, features.shape[0] // shards, features.shape[1], prior_rows, batch_size, pairs is not None, backend
    )


def _split(features, pairs, mesh: Mesh | None) -> tuple[Mesh, object] | None:
    """(mesh, axis) the candidates are split over: `mesh`'s every device when given, else the
    row split of concrete `features` (pairs mode: with pairs reading only their device's rows)."""
    count = features.shape[0] if pairs is None else pairs.shape[0]
    if mesh is not None:
        axis, parts = mesh_axes(mesh), mesh.size
        checks.require(
            features.shape[0] % parts == 0 and count % parts == 0,
            f"{features.shape[0]} rows and {count} candidates must split evenly over the mesh's {parts} devices "
            "(pairs mode: lay them out with place_pairs)",
        )
        return (mesh, axis) if parts > 1 else None
    split = row_axis(features)
    if split is None or pairs is None or count % blocks(*split):
        return None if pairs is not None else split
    if checks.is_concrete(pairs):
        parts = blocks(*split)
        owner = np.repeat(np.arange(parts), count // parts)[:, None]
        checks.require(
            bool(np.all(to_host(pairs) // (features.shape[0] // parts) == owner)),
            f"features are split over {parts} devices but some pairs read rows of another device; "
            "lay pairs-mode inputs out with jaxdpo.selection.place_pairs",
        )
    return split


def _select(features, batch_size, *, reg, prior, mask, pairs, strategy, mesh=None) -> tuple[SelectionResult, SelectionStats]:
    features, reg, prior, pairs = _validated(features, reg=reg, prior=prior, pairs=pairs)
    mask = check_batch(batch_size, features.shape[0] if pairs is None else pairs.shape[0], mask)
    split = _split(features, pairs, mesh)
    if split is None:
        plan = _plan(strategy, features, pairs, prior, int(batch_size), 1, jax.default_backend())
        indices, scores, stats = greedy_program(features, pairs, prior, mask, reg, plan)
    else:
        mesh, axis = split
        plan = _plan(strategy, features, pairs, prior, int(batch_size), blocks(mesh, axis), mesh.devices.flat[0].platform)
        if checks.is_concrete(mask):
            mask = place(mask, NamedSharding(mesh, PartitionSpec(axis)))
        if prior is not None and checks.is_concrete(prior):  # replicated: on several processes each copies its own
            prior = place(prior if prior.is_fully_addressable else to_host(prior), NamedSharding(mesh, PartitionSpec()))
        indices, scores, stats = sharded_program(features, pairs, prior, mask, reg, plan, mesh, axis)
    if checks.is_concrete(indices) and int(np.min(to_host(indices))) < 0:  # no program on a global array here
        _diagnose(features, pairs)
    return SelectionResult(indices, scores), SelectionStats(*stats, strategy="lazy" if plan.lazy else "full")


def select_batch(
    features: Float[ArrayLike, "rows d"] | list,
    batch_size: int,
    *,
    reg: float | Float[ArrayLike, ""] = 1.0,
    prior: Float[ArrayLike, "p d"] | list | None = None,
    mask: Bool[ArrayLike, " n"] | None = None,
    pairs: Int[ArrayLike, "n 2"] | None = None,
    strategy: Literal["auto", "full", "lazy"] = "auto",
    with_stats: bool = False,
) -> SelectionResult | tuple[SelectionResult, SelectionStats]:
    """Greedy ActiveDPO batch: Eq. (3) argmax of ‖φ‖_{V⁻¹}, with V ← V + φ*φ*ᵀ after each pick (Eq. 4).

    Args:
      features: φ of each candidate triplet `[n, d]`; or, with `pairs`, the per-response features
        g `[r, d]` so that φ_i = g[pairs[i, 0]] − g[pairs[i, 1]] is never materialized. float32 or
        float64; bfloat16/float16 halve the bytes read per pass and are accumulated in float32
        (worth it when Φ is large and the selection is bandwidth-bound; the picks are then the
        exact greedy picks of the rounded features).
      batch_size: B, the number of picks (static under `jit`).
      reg: λ > 0 in V₀ = λI + priorᵀprior.
      prior: φ of the already-labeled triplets `[p, d]` (recomputed under the current model);
        p may be below or above d; None or `[0, d]`: no prior.
      mask: `[n]` bool, True for eligible candidates (default: all).
      pairs: `[n, 2]` int indices into the rows of `features` (see above).
      strategy: "full" applies each pick's update to all n candidates (one pass over Φ per pick);
        "lazy" (Minoux) re-scores only candidates whose stale score, an upper bound, can still
        win, and passes over Φ only when that would cost more; "auto" takes "lazy" unless the pool
        is so small that a pass costs less than a round of re-scoring. Same picks. Static under `jit`.
      with_stats: also return a `SelectionStats` (strategy planned, passes, candidates re-scored).

    Returns:
      `SelectionResult(indices int32 [B], scores [B])`, in pick order; each score is ‖φ‖_{V⁻¹}
      = √(φᵀV⁻¹φ) of the pick at the moment it was picked. Ties go to the lowest index. Scores are
      exact re-derivations (sums of squares), not running differences, so float32 keeps greedy
      picks even when λ is tiny and the batch spans the features.

    Scale: picks and scores are unchanged when features and prior are multiplied by α and reg by
    α² (bit for bit when α is a power of two): features are read scaled by a power of two and
    scores are carried in units of λ, so no finite input overflows. Beyond a ratio λ/‖φ‖²_max of
    2^±200 the picks are those of the ratio clamped there (float32 cannot tell the difference).

    Invalid input: eagerly, a `ValueError` naming the problem (NaN/inf features or prior,
    reg ≤ 0, pairs out of range, fewer eligible candidates than B, ...). Under `jax.jit`, where
    values are unknown at trace time, an invalid input yields indices −1 and scores NaN for the
    whole batch, and fewer than B eligible candidates fill the remaining positions with −1/NaN —
    never a valid-looking pick.

    Devices: `features` split by rows over several devices of a mesh (dense: `put_candidates`;
    pairs mode: `place_pairs`, whole prompts per device) select on every device, moving only
    per-round leaders and the picked row; same picks as on one device.

    Cost: one pass over Φ for the initial scores (plus, with a prior of p < d rows, its Gram
    matrix O(p²d) and a pass of a few products), then per pick O(n·d) ("full") or the re-scoring
    of the candidates that can still win ("lazy"); memory O(n·d). Pure; works under
    `jax.jit(select_batch, static_argnames=("batch_size", "strategy", "with_stats"))`.
    """
    result, stats = _select(features, batch_size, reg=reg, prior=prior, mask=mask, pairs=pairs, strategy=strategy)
    return (result, stats) if with_stats else result


def select_on_mesh(
    features: Float[ArrayLike, "rows d"],
    batch_size: int,
    *,
    mesh: Mesh,
    reg: float | Float[ArrayLike, ""] = 1.0,
    prior: Float[ArrayLike, "p d"] | None = None,
    mask: Bool[ArrayLike, " n"] | None = None,
    pairs: Int[ArrayLike, "n 2"] | None = None,
    strategy: Literal["auto", "full", "lazy"] = "auto",
) -> tuple[SelectionResult, SelectionStats]:
    """`select_batch(..., with_stats=True)` with the candidates split over every device of `mesh`,
    whatever the inputs' placement: the program a memory plan lowers with `ShapeDtypeStruct`s.
    Rows and candidates must split evenly; in pairs mode device k's pairs must read only its rows
    (the layout of `place_pairs`)."""
    return _select(features, batch_size, reg=reg, prior=prior, mask=mask, pairs=pairs, strategy=strategy, mesh=mesh)


@jax.jit
def _norms_program(features, pairs, prior, reg) -> Array:
    candidates = Candidates(features, pairs, jnp.promote_types(features.dtype, jnp.float32))
    first = start(candidates, prior, reg, Comm(None), None, 0.0, None)
    return jnp.where(first.valid, first.scale.report(first.scores), jnp.nan)


def v_inv_norms(
    features: Float[ArrayLike, "rows d"] | list,
    *,
    reg: float | Float[ArrayLike, ""] = 1.0,
    prior: Float[ArrayLike, "p d"] | list | None = None,
    pairs: Int[ArrayLike, "n 2"] | None = None,
) -> Float[Array, " n"]:
    """‖φ_i‖_{V₀⁻¹} for every candidate with V₀ = reg·I + priorᵀprior (Eq. 3's criterion, no picks).

    Same input rules as `select_batch`; under `jit`, invalid input gives all-NaN norms."""
    features, reg, prior, pairs = _validated(features, reg=reg, prior=prior, pairs=pairs)
    norms = _norms_program(features, pairs, prior, reg)
    if checks.is_concrete(norms) and not bool(np.all(np.isfinite(to_host(norms)))):
        _diagnose(features, pairs)
    return norms
