"""The greedy's state between picks, and its passes over Φ: Sherman–Morrison updates (Eq. 4) of
every candidate's score, one matrix product per pass ("full" after every pick, a lazy search when
it stalls)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxdpo.selection import algebra as alg
from jaxdpo.selection.candidates import Candidates, Start
from jaxdpo.selection.comm import Comm
from jaxdpo.selection.plan import STALLS_BEFORE_FULL, Plan


class Context(NamedTuple):
    candidates: Candidates
    prior: alg.Prior
    scale: alg.Scale
    comm: Comm
    plan: Plan
    slack: float  # relative rounding allowance of an exact score
    drift: float  # relative rounding allowance of one Sherman–Morrison update
    eps: float  # the compute dtype's machine epsilon
    positions: Array | None = None  # global index of each candidate of `candidates` (None: its block's)


class State(NamedTuple):
    pick: Array  # b: picks made so far
    bounds: Float[Array, " n"]  # upper bounds on every ŝ_i under V_b
    approx: Float[Array, " n"]  # Sherman–Morrison ŝ_i under V_synced (the initial scores at first) …
    error: Float[Array, " n"]  # … and a bound on its rounding error
    energy: Float[Array, " n"]  # ŝ⁰_i = ‖ω_i‖² where known (NaN: not yet; a prior's bound pass)
    synced: Array
    full: Array  # one pass per pick (strategy "full", or "lazy" after repeated stalls)
    stalls: Array  # consecutive lazy picks that caught up
    eligible: Bool[Array, " n"]
    picks: alg.Picks
    directions: Float[Array, "B d"]  # ũ_k in unscaled feature space: ŝ_i drops by (φ_iᵀũ_k)²
    indices: Int[Array, " B"]
    scores: Float[Array, " B"]  # ŝ of each pick when picked
    rescored: Array  # statistics: exact evaluations, coordinate evaluations, passes over Φ,
    coordinates: Array  # and the first pick made as "full" (B: none)
    passes: Array
    full_from: Array
    products: Float[Array, "c p"]  # rows·Pᵀ of candidate i in row i, once computed (c = n if `plan.cached`, else 0)
    stored: Bool[Array, " c"]


def per_candidate(plan: Plan) -> tuple[str, ...]:
    """The fields of `State` with one entry per candidate (the prior products' cache when kept)."""
    return ("bounds", "approx", "error", "energy", "eligible") + (("products", "stored") if plan.cached else ())


def initial_state(ctx: Context, start: Start, mask: Array, lazy: bool) -> State:
    plan = ctx.plan
    dtype = start.scores.dtype
    return State(
        pick=jnp.int32(0),
        bounds=start.scores + start.error,
        approx=start.scores,
        error=start.error,
        energy=start.scores if start.values else jnp.full_like(start.scores, jnp.nan),
        synced=jnp.int32(0),
        full=jnp.bool_(not lazy),
        stalls=jnp.int32(0),
        eligible=mask,
        picks=alg.no_picks(plan.width, plan.batch, start.scale.rho, dtype),
        directions=jnp.zeros((plan.batch, plan.dim), dtype),
        indices=jnp.full((plan.batch,), -1, jnp.int32),
        scores=jnp.full((plan.batch,), jnp.nan, dtype),
        rescored=jnp.int32(0),
        coordinates=jnp.int32(0),
        passes=jnp.int32(0),
        full_from=jnp.int32(0 if not lazy else plan.batch),
        products=jnp.zeros((plan.count if plan.cached else 0, plan.prior_rows if plan.cached else 0), dtype),
        stored=jnp.zeros((plan.count if plan.cached else 0,), bool),
    )


def passes_needed(plan: Plan) -> bool:
    """Whether Sherman–Morrison passes can happen ("full", or lazy catch-ups on values), so each
    pick's update direction must be kept."""
    return not plan.lazy or plan.values


# ---------------------------------------------------------------------------------------------
# Passes over Φ: Sherman–Morrison updates of every candidate


def apply_updates(ctx: Context, state: State, directions: Float[Array, "k d"], synced: Array) -> State:
    """One pass over Φ lowering `approx` by the updates `directions` (zero rows: none), after which
    the updates of picks before `synced` are applied."""
    if directions.shape[0] == 1:
        drop = ctx.candidates.dot(directions[0]) ** 2
    else:
        drop = jnp.sum(ctx.candidates.dot(directions.T) ** 2, axis=1)
    count = jnp.sum(jnp.any(directions != 0, axis=1))
    approx = state.approx - drop
    error = state.error + ctx.drift * count * (state.approx + drop)
    return state._replace(
        approx=approx, error=error, bounds=jnp.minimum(state.bounds, approx + error), synced=synced, passes=state.passes + 1
    )


def apply_latest(ctx: Context, state: State) -> State:
    """One pick of strategy "full": apply the previous pick's update (one matrix-vector pass)."""
    return apply_updates(ctx, state, jax.lax.dynamic_slice_in_dim(state.directions, state.pick - 1, 1), state.pick)


def catch_up(ctx: Context, state: State) -> State:
    """A lazy pick that stalls: apply every update not yet applied, `plan.catch_up` per pass (a
    pass with a few updates reads Φ once like a pass with one); after `STALLS_BEFORE_FULL` such
    picks in a row the batch goes on as "full"."""
    width = ctx.plan.catch_up

    def apply_chunk(state: State) -> State:
        k = state.synced + jnp.arange(width)
        rows = state.directions[jnp.minimum(k, state.directions.shape[0] - 1)]
        pending = jnp.where((k < state.pick)[:, None], rows, 0.0)
        return apply_updates(ctx, state, pending, jnp.minimum(state.synced + width, state.pick))

    state = jax.lax.while_loop(lambda s: s.synced < s.pick, apply_chunk, state)
    full = state.stalls + 1 >= STALLS_BEFORE_FULL
    return state._replace(stalls=state.stalls + 1, full=full, full_from=jnp.where(full, state.pick + 1, state.full_from))
