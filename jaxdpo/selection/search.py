"""The greedy loop (Eq. 3 argmax, Eq. 4 update): upper bounds for every candidate, cheap coordinate
scores that tighten them where it matters, exact scores that decide.

As V only grows within a batch, every score only falls: a score computed at an earlier pick, and
a Sherman–Morrison value s_i − Σ(φ_iᵀũ_k)² with its rounding allowance, are upper bounds.

Each pick runs rounds until the best exact score beats every bound left (ties: lowest index):
- coordinate rounds, while more than `block` candidates could still win: the `chunk` candidates of
  highest bound get the coordinate score (their products with the prior rows and the picks'
  basis, `algebra.coordinate_scores`) with its error bound: their bounds drop to the interval's
  top, and the best interval bottom is a floor below which no candidate can win;
- exact rounds: the `block` candidates of highest bound get the exact score (sums of squares).
"full" applies the last pick's update to every candidate first (one pass over Φ), so that the
values ± error already bound every score; "lazy" (Minoux) makes no pass unless a pick's
coordinate evaluations (spent, and due for the candidates still open after its first round) cost
more than applying the pending updates: then it catches up, and after
`STALLS_BEFORE_FULL` such picks in a row (nearly tied scores) it goes on as "full". A lazy search
over a big pool first runs on its `plan.active` candidates of highest bound (on each device),
while each pick beats every bound outside them: its rounds then read short vectors.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxdpo.selection import algebra as alg
from jaxdpo.selection.candidates import Start
from jaxdpo.selection.comm import NOBODY, Leader, best_of, better, leader
from jaxdpo.selection.plan import COORDINATE_ULPS
from jaxdpo.selection.ranking import highest, largest
from jaxdpo.selection.state import Context, State, apply_latest, catch_up, initial_state, passes_needed, per_candidate


# ---------------------------------------------------------------------------------------------
# Scores of a few candidates


def coordinate_error(eps: float, prior: alg.Prior, norms: Array) -> Array:
    """Rounding allowance of a coordinate score (or the prior's bound) of rows with ‖x‖² = norms."""
    return eps * (COORDINATE_ULPS + prior.condition) * norms


class Search(NamedTuple):
    """One pick's search; `best` is the best exact score so far, `remaining` the best bound of a
    candidate not exactly evaluated at this pick (both global), `floor` a lower bound on the
    winner's score. `held`/`held_row`: this device's best exact candidate and its rotated row
    Qᵀω (the pick needs it)."""

    state: State
    tested: Bool[Array, " n"]  # coordinate-evaluated at this pick
    exacted: Bool[Array, " n"]  # exactly evaluated at this pick
    floor: Array
    best: Leader
    remaining: Leader
    spent: Array  # coordinate evaluations at this pick (all devices)
    held: Leader
    held_row: Float[Array, " w"]


def _scaled_rows(ctx: Context, indices: Array) -> Array:
    return ctx.scale.scaled(ctx.candidates.rows(indices), ctx.candidates.dtype)


def _energies(ctx: Context, state: State, x: Array, chosen: Array, live: Array) -> tuple[Array, Array, State]:
    """(ŝ⁰, an upper bound on ‖x‖², state) of rows x of candidates `chosen`: ŝ⁰ from the state where
    known, else computed (with the prior rows' products) and kept."""
    prior = ctx.prior
    known = state.energy[chosen]
    if prior.kind == "none" and ctx.plan.values:  # ŝ⁰ = ‖x‖², known for every candidate: x is not read for it
        return known, known * (1.0 + x.shape[1] * ctx.eps), state  # (1 + dε): a sum taken in another order
    new = live & jnp.isnan(known)
    if prior.kind == "none":  # ŝ⁰ = ‖x‖², summed only when a live row lacks it (pairs from norm bounds)
        norms = jax.lax.cond(jnp.any(new), lambda: jnp.sum(x * x, axis=-1), lambda: known)
        energy = jnp.where(jnp.isnan(known), norms, known)
    else:
        empty = lambda: jnp.zeros((x.shape[0], prior.rows.shape[0]), x.dtype)  # noqa: E731
        products = jax.lax.cond(jnp.any(new), lambda: alg.prior_products(prior, x), empty) if prior.kind == "low" else None
        energy, norms = jnp.where(jnp.isnan(known), alg.prior_energy(prior, x, products), known), jnp.sum(x * x, axis=-1)
    return energy, norms, state._replace(energy=state.energy.at[chosen].set(jnp.where(live, energy, known)))


def _coordinate_scores(ctx: Context, search: Search, chosen: Array, live: Array) -> tuple[Array, Array, Search]:
    """(coordinate score, its error bound) of candidates `chosen`: products with the picks' basis,
    and with the prior rows for those whose ŝ⁰ is not known yet (with a cache, `_prefetch` has
    already computed and kept them)."""
    x = _scaled_rows(ctx, chosen)
    energy, norms, state = _energies(ctx, search.state, x, chosen, live)
    score = alg.coordinate_scores(ctx.prior, state.picks, ctx.scale.rho, state.pick, energy, x)
    return score, coordinate_error(ctx.eps, ctx.prior, norms) + ctx.slack * jnp.abs(score), search._replace(state=state)


def _exact_scores(ctx: Context, search: Search, chosen: Array, live: Array) -> tuple[Array, Array]:
    """(exact scores, rotated rows Qᵀω) of candidates `chosen`, reusing their cached products with
    the prior rows when every live one has them."""
    prior, state = ctx.prior, search.state
    x = _scaled_rows(ctx, chosen)
    if prior.kind == "low":
        if ctx.plan.cached:
            products = jax.lax.cond(
                jnp.all(state.stored[chosen] | ~live), lambda: state.products[chosen], lambda: alg.prior_products(prior, x)
            )
        else:
            products = alg.prior_products(prior, x)
        whitened = alg.whiten(prior, x, products)
    else:
        whitened = alg.whiten(prior, x)
    rotated = alg.rotate(state.picks, whitened, state.pick)
    return alg.split_scores(state.picks, ctx.scale.rho, state.pick, rotated), rotated


# ---------------------------------------------------------------------------------------------
# One pick


def _positions(ctx: Context, n: int) -> Array:
    """Global index of each candidate of this device (ties go to the lowest)."""
    return jnp.arange(n, dtype=jnp.int32) + ctx.comm.offset(n) if ctx.positions is None else ctx.positions


def _slot(ctx: Context, index: Array, n: int) -> tuple[Array, Array]:
    """(this device's slot of the candidate with global `index`, whether it holds it)."""
    if ctx.positions is None:
        local = index - ctx.comm.offset(n)
        return jnp.clip(local, 0, n - 1), (local >= 0) & (local < n)
    hits = ctx.positions == index
    return jnp.argmax(hits).astype(jnp.int32), jnp.any(hits)


def _open(search: Search) -> Array:
    """Candidates that could still win and have no exact score at this pick."""
    state = search.state
    return state.eligible & ~search.exacted & (state.bounds >= search.floor)


def _remaining(ctx: Context, search: Search) -> Leader:
    open_ = jnp.where(_open(search), search.state.bounds, -jnp.inf)
    return ctx.comm.leader(leader(open_, _positions(ctx, open_.shape[0])))


def _lowest(state: State) -> Array:
    """This device's max(approx − error) over the eligible."""
    return jnp.max(jnp.where(state.eligible, state.approx - state.error, -jnp.inf))


def _value_floor(ctx: Context, state: State, lowest: Array) -> Array:
    """max(approx − error) over the eligible of every device (`lowest`: each device's): a lower
    bound on the winner's score when `approx` holds values synced to this pick, else −∞."""
    return jnp.where(ctx.plan.values & (state.synced == state.pick), jnp.max(lowest), -jnp.inf)


def _coordinates_needed(ctx: Context, search: Search) -> tuple[Array, Array]:
    """(whether more than `block` candidates could still win and some of them lack a coordinate
    score, how many lack one), over all devices in one collective."""
    open_ = _open(search)
    counts = jnp.sum(jnp.stack([open_, open_ & ~search.tested]), axis=1, dtype=jnp.int32)  # one read of the masks
    above, untested = (jnp.sum(x) for x in ctx.comm.gather(counts[0], counts[1]))
    return (above > ctx.plan.block) & (untested > 0), untested


def _lacking(search: Search) -> Array:
    """Open candidates without ŝ⁰ nor cached products (stored: tried once, even if not finite)."""
    return _open(search) & jnp.isnan(search.state.energy) & ~search.state.stored


def _prefetch(ctx: Context, search: Search) -> Search:
    """ŝ⁰ (and the cached prior products) of the `plan.prefetch` open candidates of highest bound
    that lack it: one product with the prior rows reads them once for all, where coordinate rounds
    would read them once per round. ŝ⁰ + its error bounds every later score."""
    state = search.state
    values, chosen = largest(jnp.where(_lacking(search), state.bounds, -jnp.inf), ctx.plan.prefetch)
    live = values > -jnp.inf
    x = _scaled_rows(ctx, chosen)
    products = alg.prior_products(ctx.prior, x)
    energy = alg.prior_energy(ctx.prior, x, products)
    top = energy + coordinate_error(ctx.eps, ctx.prior, jnp.sum(x * x, axis=-1))
    state = state._replace(
        energy=state.energy.at[chosen].set(jnp.where(live, energy, state.energy[chosen])),
        bounds=state.bounds.at[chosen].set(jnp.where(live, jnp.minimum(state.bounds[chosen], top), state.bounds[chosen])),
        products=state.products.at[chosen].set(jnp.where(live[:, None], products, state.products[chosen])),
        stored=state.stored.at[chosen].set(state.stored[chosen] | live),
    )
    return search._replace(state=state)


def _coordinate_round(ctx: Context, search: Search) -> Search:
    """Coordinate scores for the `chunk` untested candidates of highest bound (on each device),
    after a prefetch of ŝ⁰ when some of them lack it and products are cached."""
    untested = lambda s: jnp.where(_open(s) & ~s.tested, s.state.bounds, -jnp.inf)  # noqa: E731

    def lacking(search: Search) -> Array:
        values, chosen = largest(untested(search), ctx.plan.chunk)
        return jnp.any((values > -jnp.inf) & _lacking(search)[chosen])

    if ctx.plan.prefetch:  # a loop, not a branch: XLA copies the cache through a branch
        search = jax.lax.while_loop(lacking, partial(_prefetch, ctx), search)
    values, chosen = largest(untested(search), ctx.plan.chunk)
    live = values > -jnp.inf
    score, error, search = _coordinate_scores(ctx, search, chosen, live)
    state = search.state
    count = jnp.sum(live, dtype=jnp.int32)
    state = state._replace(
        bounds=state.bounds.at[chosen].set(jnp.where(live, jnp.minimum(state.bounds[chosen], score + error), state.bounds[chosen])),
        coordinates=state.coordinates + count,
    )
    lows, counts = ctx.comm.gather(jnp.max(jnp.where(live, score - error, -jnp.inf)), count)
    tested = search.tested.at[chosen].set(search.tested[chosen] | live)
    return search._replace(state=state, tested=tested, floor=jnp.maximum(search.floor, jnp.max(lows)), spent=search.spent + jnp.sum(counts, dtype=jnp.int32))


def _exact_round(ctx: Context, search: Search) -> Search:
    """Exact scores for the `block` candidates of highest bound not yet exactly scored."""
    state = search.state
    values, chosen = largest(jnp.where(_open(search), state.bounds, -jnp.inf), ctx.plan.block)
    live = values > -jnp.inf
    exact, rotated = _exact_scores(ctx, search, chosen, live)
    exact = jnp.where(live, exact, -jnp.inf)
    rebase = live & (state.synced == state.pick)  # approx is current: restart its drift from exact
    state = state._replace(
        bounds=state.bounds.at[chosen].set(jnp.where(live, exact * (1.0 + ctx.slack), state.bounds[chosen])),
        approx=state.approx.at[chosen].set(jnp.where(rebase, exact, state.approx[chosen])),
        error=state.error.at[chosen].set(jnp.where(rebase, ctx.slack * exact, state.error[chosen])),
        rescored=state.rescored + jnp.sum(live, dtype=jnp.int32),
    )
    local = leader(exact, _positions(ctx, state.bounds.shape[0])[chosen])
    keep = better(local, search.held)
    row = rotated[jnp.argmax(jnp.where(exact == local.value, -chosen, -jnp.iinfo(jnp.int32).max))]
    best = best_of(search.best, ctx.comm.leader(local))
    return search._replace(
        state=state, exacted=search.exacted.at[chosen].set(search.exacted[chosen] | live), best=best,
        floor=jnp.maximum(search.floor, best.value * (1.0 - ctx.slack)),
        held=best_of(local, search.held), held_row=jnp.where(keep, row, search.held_row),
    )


def _stalls(ctx: Context, search: Search, untested: Array) -> Array:
    """A lazy pick whose coordinate evaluations, those spent and those of the `untested` candidates
    still open after its first round, cost more than catching up on the pending updates (only when
    the initial scores are values: updated bounds of a prior's bound pass stay loose)."""
    state = search.state
    pending = state.pick - state.synced
    passes = (pending + ctx.plan.catch_up - 1) // ctx.plan.catch_up
    costly = (search.spent > 0) & (search.spent + untested >= ctx.plan.stall_reads * passes)
    return ctx.plan.values & ~state.full & (pending > 0) & costly


def _search(ctx: Context, search: Search) -> Search:
    """Coordinate rounds while more than `block` candidates could win (a lazy pick that stalls
    catches up once, then goes on), then exact rounds until the best exact score beats every bound
    left. (Exact rounds only raise the floor and tested candidates stay tested: once the
    coordinate rounds are done they are not needed again. Loops without branches inside keep
    XLA from copying the n-long vectors every round.)"""

    def caught_up(search: Search) -> Search:
        state = catch_up(ctx, search.state)
        floor = _value_floor(ctx, state, ctx.comm.gather(_lowest(state))[0])
        return search._replace(state=state, floor=jnp.maximum(search.floor, floor))

    def exact_round(search: Search) -> Search:
        search = _exact_round(ctx, search)
        return search._replace(remaining=_remaining(ctx, search))

    def unstalled(search: Search) -> Array:
        needed, untested = _coordinates_needed(ctx, search)
        return needed & ~_stalls(ctx, search, untested)

    coordinates = partial(_coordinate_round, ctx)
    if ctx.plan.values and ctx.positions is None:  # else no pick stalls (`_on_active_set`)
        search = jax.lax.while_loop(unstalled, coordinates, search)
        search = jax.lax.cond(_stalls(ctx, search, _coordinates_needed(ctx, search)[1]), caught_up, lambda s: s, search)
    search = jax.lax.while_loop(lambda s: _coordinates_needed(ctx, s)[0], coordinates, search)
    search = search._replace(remaining=_remaining(ctx, search))
    return jax.lax.while_loop(lambda s: ~better(s.best, s.remaining) & (s.remaining.value > -jnp.inf), exact_round, search)


def _first_search(ctx: Context, state: State, exact_start: bool) -> Search:
    """Pick 0 is decided on exact initial scores when there are; otherwise every eligible
    candidate is open. (The floor and the initial leader travel in one collective.)"""
    n = state.bounds.shape[0]
    dtype = state.bounds.dtype
    nobody = Leader(jnp.asarray(-jnp.inf, dtype), jnp.int32(NOBODY))
    none = jnp.zeros((n,), bool)
    initial = leader(jnp.where(state.eligible, state.approx, -jnp.inf), _positions(ctx, n)) if exact_start else ()
    lowest, *values_indices = ctx.comm.gather(_lowest(state), *initial)
    floor = _value_floor(ctx, state, lowest)
    search = Search(state, none, none, floor, nobody, nobody, jnp.int32(0), nobody, jnp.zeros((ctx.plan.width,), dtype))
    if not exact_start:
        return search
    first = state.pick == 0  # decided: nothing can win above an infinite floor
    return search._replace(
        best=jax.tree.map(lambda a, b: jnp.where(first, a, b), leader(*values_indices), nobody),
        floor=jnp.where(first, jnp.inf, floor),
    )


def _picked_row(ctx: Context, search: Search, local: Array, owned: Array) -> Array:
    """Qᵀω of the pick: held by the device that scored it exactly, else (a pick decided on exact
    initial scores) whitened and rotated from its row."""
    held = search.held.index == search.best.index

    def whitened() -> Array:
        row = ctx.comm.broadcast(ctx.candidates.rows(local[None])[0], owned)
        omega = alg.whiten(ctx.prior, ctx.scale.scaled(row[None], ctx.candidates.dtype))
        return alg.rotate(search.state.picks, omega, search.state.pick)[0]

    return jax.lax.cond(ctx.comm.max(held), lambda: ctx.comm.broadcast(search.held_row, held), whitened)


def _step(ctx: Context, exact_start: bool, state: State) -> State:
    """One pick: Eq. (3) argmax of the exact scores, then Eq. (4) folded into the factor."""
    if passes_needed(ctx.plan) and ctx.positions is None:  # else never "full" (`_on_active_set`: lazy, no catch-up)
        state = jax.lax.cond(state.full & (state.pick > 0), partial(apply_latest, ctx), lambda s: s, state)
    stalls = state.stalls
    search = _search(ctx, _first_search(ctx, state, exact_start))
    state, best = search.state, search.best
    local, owned = _slot(ctx, best.index, state.bounds.shape[0])
    b = state.pick
    rotated = _picked_row(ctx, search, local, owned)
    if passes_needed(ctx.plan):
        direction = alg.whiten_adjoint(ctx.prior, alg.update_direction(state.picks, ctx.scale.rho, b, rotated, best.value))
        state = state._replace(directions=state.directions.at[b].set(ctx.scale.scaled(direction, ctx.candidates.dtype)))
    found = best.index != NOBODY
    return state._replace(
        pick=b + 1,
        stalls=jnp.where(state.full | (state.stalls > stalls), state.stalls, 0),
        eligible=state.eligible.at[local].set(state.eligible[local] & ~owned),
        picks=alg.add_pick(state.picks, b, rotated),
        indices=state.indices.at[b].set(jnp.where(found, best.index, -1)),
        scores=state.scores.at[b].set(jnp.where(found, best.value, jnp.nan)),
    )


PADDING = NOBODY - 1  # the global index of an active set's padding slots: no candidate's, and not NOBODY
_COMMITTED = ("pick", "stalls", "eligible", "picks", "directions", "indices", "scores")  # what a pick changes


def _on_active_set(ctx: Context, exact_start: bool, stop: Array, state: State) -> State:
    """Picks among the `plan.active` candidates of highest bound (on each device) while each beats
    every bound left outside them (strictly: a tie could go to a lower index outside); the first
    that does not is left to the search over all candidates, with the bounds this one tightened.
    No pick catches up here: a pass would sync the values of the active candidates alone."""
    n = state.bounds.shape[0]
    chosen, outside = highest(jnp.where(state.eligible, state.bounds, -jnp.inf), ctx.plan.active)
    outside = ctx.comm.max(jnp.where(stop > 0, outside, -jnp.inf))  # after the collective `stop` comes from
    fields = per_candidate(ctx.plan)
    positions = jnp.where(chosen < n, _positions(ctx, n)[jnp.minimum(chosen, n - 1)], PADDING)
    active = ctx._replace(candidates=ctx.candidates.restricted(chosen), positions=positions)

    def step(carry: tuple[State, Array]) -> tuple[State, Array]:
        before = carry[0]
        after = _step(active, exact_start, before)
        won = after.scores[before.pick] > outside
        kept = {f: jax.tree.map(lambda a, b: jnp.where(won, a, b), getattr(after, f), getattr(before, f)) for f in _COMMITTED}
        return after._replace(**kept), ~won

    start = state._replace(**{f: getattr(state, f)[chosen] for f in fields})
    start = start._replace(eligible=start.eligible & (chosen < n))  # the padding slots
    done, _ = jax.lax.while_loop(lambda c: (c[0].pick < stop) & ~c[1], step, (start, jnp.bool_(False)))
    return done._replace(**{f: getattr(state, f).at[chosen].set(getattr(done, f), mode="drop") for f in fields})


def _on_active_sets(ctx: Context, exact_start: bool, stop: Array, state: State) -> State:
    """Picks on active sets (`_on_active_set`), each pick one did not win made over all candidates,
    then a new active set of the highest bounds so far; until an active set wins no pick. (Nor
    once the batch goes on as "full", whose passes must follow every pick: with active picks,
    which never stall, between them, that takes STALLS_BEFORE_FULL = 1.)"""

    def phase(carry: tuple[State, Array]) -> tuple[State, Array]:
        before = carry[0]
        state = _on_active_set(ctx, exact_start, stop, before)
        after_active = state.pick
        state = jax.lax.while_loop(lambda s: s.pick < jnp.minimum(stop, after_active + 1), partial(_step, ctx, exact_start), state)
        return state, after_active > before.pick

    go_on = lambda c: (c[0].pick < stop) & c[1] & ~c[0].full  # noqa: E731
    return jax.lax.while_loop(go_on, phase, (state, jnp.bool_(True)))[0]


class Stats(NamedTuple):
    rescored: Array  # exact evaluations (all devices)
    coordinates: Array  # coordinate evaluations (all devices)
    passes: Array  # passes over Φ after the initial one(s)
    full_from: Array  # the first pick made as "full" (B: none)


def run(ctx: Context, start: Start, mask: Array, lazy: bool) -> tuple[Array, Array, Stats]:
    """(indices, ŝ of each pick, statistics) of the greedy batch."""
    state = initial_state(ctx, start, mask, lazy)
    eligible = ctx.comm.sum(jnp.where(start.valid, jnp.sum(mask, dtype=jnp.int32), 0))  # after start's collectives
    stop = jnp.minimum(ctx.plan.batch, eligible)
    if ctx.plan.active:
        state = _on_active_sets(ctx, start.exact, stop, state)
    state = jax.lax.while_loop(lambda s: s.pick < stop, partial(_step, ctx, start.exact), state)
    rescored, coordinates = ctx.comm.gather(state.rescored, state.coordinates)
    stats = Stats(jnp.sum(rescored, dtype=jnp.int32), jnp.sum(coordinates, dtype=jnp.int32), state.passes, state.full_from)
    return state.indices, state.scores, stats
