"""The greedy's programs: on one device, and with the candidates split over every device of a mesh
(explicit per-device code: each device holds a block of Φ, or whole prompts of g with their pairs,
re-scores its own candidates and passes over its own block; per round only leaders (score,
global index) and, per pick, the picked row φ* travel between devices; Φ and g are never gathered).

`place_pairs` lays pairs-mode inputs out for a mesh: contiguous runs of pairs and of the rows they
read, one run per device, padded to equal sizes (padding pairs are ineligible).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdpo import checks
from jaxdpo.selection.candidates import Candidates, start
from jaxdpo.selection.comm import Comm
from jaxdpo.selection.plan import DRIFT, SLACK, Plan
from jaxdpo.selection.search import Stats, coordinate_error, run
from jaxdpo.selection.state import Context
from jaxdpo.sharding import place, to_host


def greedy(features, pairs, prior, mask, reg, plan: Plan, comm: Comm) -> tuple[jax.Array, jax.Array, Stats]:
    """(indices, ‖φ‖_{V⁻¹} of each pick, statistics) on the candidates of this device."""
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    candidates = Candidates(features, pairs, dtype)
    eps = float(jnp.finfo(dtype).eps)
    slack, drift = SLACK * eps, DRIFT * eps
    first = start(candidates, prior, reg, comm, plan.bound_rank, slack, partial(coordinate_error, eps), plan.pair_bounds)
    ctx = Context(candidates, first.prior, first.scale, comm, plan, slack, drift, eps)
    indices, scores, stats = run(ctx, first, mask, plan.lazy)
    return indices, first.scale.report(scores), stats


@partial(jax.jit, static_argnames="plan")
def greedy_program(features, pairs, prior, mask, reg, plan: Plan):
    return greedy(features, pairs, prior, mask, reg, plan, Comm(None))


@partial(jax.jit, static_argnames=("plan", "mesh", "axis"))
def sharded_program(features, pairs, prior, mask, reg, plan: Plan, mesh: Mesh, axis):
    """`greedy` with the candidates (dense: rows of Φ; pairs mode: rows of g and the pairs reading
    them, global row indices) split over `axis` of `mesh`."""
    rows = PartitionSpec(axis)
    shards = blocks(mesh, axis)

    def body(f, p, m, prior, r):
        if p is not None:
            p = p - jax.lax.axis_index(axis).astype(p.dtype) * (features.shape[0] // shards)
        return greedy(f, p, prior, m, r, plan, Comm(axis))

    specs = (rows, None if pairs is None else rows, rows, None if prior is None else PartitionSpec(), PartitionSpec())
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(), check_vma=False)(features, pairs, mask, prior, reg)


def blocks(mesh: Mesh, axis) -> int:
    axes = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def row_axis(x) -> tuple[Mesh, object] | None:
    """(mesh, axis) when concrete `x` is split by rows, evenly, over several devices of a mesh."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding) or len(sharding.device_set) < 2:
        return None
    spec = tuple(sharding.spec) + (None,) * 2
    if spec[0] is None or spec[1] is not None:
        return None
    if blocks(sharding.mesh, spec[0]) < 2 or x.shape[0] % blocks(sharding.mesh, spec[0]):
        return None
    return sharding.mesh, spec[0]


def mesh_axes(mesh: Mesh) -> tuple:
    """Every axis of `mesh`: candidates are split over all its devices."""
    return tuple(mesh.axis_names)


# ---------------------------------------------------------------------------------------------
# Pairs mode on a mesh: whole prompts per device


class PlacedPairs(NamedTuple):
    """Pairs-mode inputs laid out for a mesh: device k holds rows [k·R, (k+1)·R) of `features` and
    pairs [k·N, (k+1)·N), which read only those rows. `positions[j]` is the caller's index of slot
    j's pair (−1: padding, never eligible); the order of the caller's pairs is kept."""

    features: jax.Array
    pairs: jax.Array
    mask: jax.Array
    positions: np.ndarray

    def restore(self, indices) -> np.ndarray:
        """Picks in this layout → the caller's pair indices (−1 stays −1)."""
        indices = to_host(indices)
        return np.where(indices >= 0, self.positions[np.maximum(indices, 0)], -1).astype(np.int32)


def _cuts(pairs: np.ndarray, parts: int) -> list[int]:
    """Pair positions splitting the pair sequence into `parts` runs (possibly empty) that read
    separate, increasing row ranges, each cut as close as possible to an equal share of pairs."""
    low, high = pairs.min(axis=1), pairs.max(axis=1)
    before = np.maximum.accumulate(high)[:-1]  # highest row read by pairs [0, i)
    after = np.minimum.accumulate(low[::-1])[::-1][1:]  # lowest row read by pairs [i, n)
    feasible = np.concatenate([np.flatnonzero(before < after) + 1, [len(pairs)]])
    cuts = [0]
    for k in range(1, parts):
        allowed = feasible[feasible >= cuts[-1]]
        cuts.append(int(allowed[np.argmin(np.abs(allowed - k * len(pairs) / parts))]))
    return cuts[1:]


def _row_runs(pairs: np.ndarray, runs: list[tuple[int, int]], rows: int) -> list[tuple[int, int]]:
    """The rows each run of pairs owns: from the end of the previous run's rows to its highest row."""
    ends, end = [], 0
    for p0, p1 in runs[:-1]:
        end = max(end, int(pairs[p0:p1].max()) + 1) if p1 > p0 else end
        ends.append(end)
    starts = [0, *ends]
    return list(zip(starts, [*ends, rows]))


class PairsLayout(NamedTuple):
    """Where each row and pair goes on `parts` devices: device k holds rows [k·R, (k+1)·R) and
    pairs [k·N, (k+1)·N) of the placed arrays. `rows[j]`: the caller's row in slot j (−1: a zero
    row); `pairs`: the placed pairs (indices into the placed rows; padding reads one zero row
    twice); `positions[j]`: the caller's index of slot j's pair (−1: padding); `mask`: eligible."""

    rows: np.ndarray
    pairs: np.ndarray
    positions: np.ndarray
    mask: np.ndarray


def layout_pairs(pairs, parts: int, *, rows: int, mask=None) -> PairsLayout:
    """The layout `place_pairs` uses, from host arrays alone (e.g. for the shapes a memory plan
    lowers): runs of consecutive pairs cut between prompts, each with the rows it reads, padded
    to the longest run. Pairs whose rows interleave stay together (on one device, if need be)."""
    pairs = np.asarray(pairs)
    checks.check_ndim("pairs", pairs, 2, "[n, 2]")
    checks.check_shape("pairs", pairs, (None, 2))
    checks.check_integer("pairs", pairs)
    checks.check_index_range("pairs", pairs, rows, "the rows of features")
    n = len(pairs)
    checks.require(n >= 1, "pairs is empty")
    mask = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    checks.check_shape("mask", mask, (n,))
    bounds = [0, *(_cuts(pairs, parts) if parts > 1 else []), n]
    runs = [(bounds[k], bounds[k + 1]) for k in range(parts)]
    row_runs = _row_runs(pairs, runs, rows)
    per_rows = max(max(stop - start_ for start_, stop in row_runs), 1)
    per_pairs = max(max(stop - start_ for start_, stop in runs), 1)
    layout = PairsLayout(
        np.full(parts * per_rows, -1, np.int64), np.zeros((parts * per_pairs, 2), np.int32),
        np.full(parts * per_pairs, -1, np.int32), np.zeros(parts * per_pairs, bool),
    )
    for k, ((p0, p1), (r0, r1)) in enumerate(zip(runs, row_runs)):
        layout.rows[k * per_rows : k * per_rows + r1 - r0] = np.arange(r0, r1)
        slots = slice(k * per_pairs, k * per_pairs + p1 - p0)
        layout.pairs[slots] = pairs[p0:p1] - r0 + k * per_rows
        layout.pairs[k * per_pairs + p1 - p0 : (k + 1) * per_pairs] = k * per_rows  # padding: φ = g_r − g_r = 0
        layout.positions[slots] = np.arange(p0, p1)
        layout.mask[slots] = mask[p0:p1]
    return layout


def place_pairs(features, pairs, mesh: Mesh, *, mask=None) -> PlacedPairs:
    """Lay out per-response features g `[r, d]` and `pairs` `[n, 2]` over every device of `mesh`,
    each device holding whole prompts (the rows its pairs read), padded to equal blocks
    (`layout_pairs`; g already spread over several devices is laid out by them, never through
    the host); then `select_batch(placed.features, B, pairs=placed.pairs, mask=placed.mask,
    ...)` runs on every device without moving g, and `placed.restore(result.indices)` gives the
    caller's indices."""
    layout = layout_pairs(pairs, mesh.size, rows=np.shape(features)[0], mask=mask)
    axis = mesh_axes(mesh)
    rows = NamedSharding(mesh, PartitionSpec(axis, None))
    identity = np.array_equal(layout.rows, np.arange(np.shape(features)[0]))
    split = row_axis(features) if isinstance(features, jax.Array) else None
    if split is not None and split[0] == mesh and not identity:  # laid out by the devices, blocks to neighbours
        features = moved_rows(features, layout.rows, mesh, split[1])
    elif isinstance(features, jax.Array) and len(features.sharding.device_set) > 1:  # laid out by the devices
        features = _resharded(features, rows) if identity else _taken_rows(features, layout.rows.astype(np.int32), rows)
    else:  # every process holds g; each copies out its own devices' blocks
        features = np.asarray(features)
        if not identity:
            features = np.where((layout.rows >= 0)[:, None], features[np.maximum(layout.rows, 0)], np.zeros((), features.dtype))
        features = place(features, rows)
    return PlacedPairs(
        features,
        place(layout.pairs, rows),
        place(layout.mask, NamedSharding(mesh, PartitionSpec(axis))),
        layout.positions,
    )


@partial(jax.jit, static_argnames="sharding")
def _resharded(features: jax.Array, sharding: NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(features, sharding)


@partial(jax.jit, static_argnames="sharding")
def _taken_rows(features: jax.Array, rows: jax.Array, sharding: NamedSharding) -> jax.Array:
    """Rows `rows` of `features` (−1: a zero row), split by `sharding`."""
    taken = jnp.where((rows >= 0)[:, None], features[jnp.maximum(rows, 0)], jnp.zeros((), features.dtype))
    return jax.lax.with_sharding_constraint(taken, sharding)


# ---------------------------------------------------------------------------------------------
# g split by rows over the devices (as the features stage leaves it) moved to a padded layout


class Moves(NamedTuple):
    """How rows split in equal source blocks reach a layout's devices: in round k, device `dst`
    receives the whole source block of device `src` for each (src, dst) of `rounds[k]`; then each
    device takes its rows from what it received (`take[t, j]`: k·P + row within the block, or
    K·P for a zero row)."""

    rounds: tuple[tuple[tuple[int, int], ...], ...]
    take: np.ndarray


def plan_moves(layout_rows: np.ndarray, block_of_device: np.ndarray, per_block: int) -> Moves:
    """Rounds (first fit, greedily) in which every device receives each source block its rows of
    `layout_rows` (one equal slice per device, −1: a zero row) lie in, each device sending and
    receiving at most one block per round (a permutation: one `ppermute`); a device holding a
    block it needs sends it to itself. `block_of_device[t]`: the source block device t holds."""
    devices = len(block_of_device)
    wanted = layout_rows.reshape(devices, -1)
    holders = {int(b): np.flatnonzero(block_of_device == b) for b in np.unique(block_of_device)}
    rounds: list[dict[int, int]] = []  # per round: dst -> src
    sending: list[set[int]] = []
    received = np.zeros((devices, len(holders)), np.int64)  # round in which dst got block b (+1)
    for dst in range(devices):
        for block in np.unique(wanted[dst][wanted[dst] >= 0] // per_block):
            for k in range(len(rounds) + 1):
                if k == len(rounds):
                    rounds.append({})
                    sending.append(set())
                free = [int(h) for h in holders[int(block)] if int(h) not in sending[k]]
                if dst not in rounds[k] and free:
                    src = dst if dst in free else free[0]
                    rounds[k][dst] = src
                    sending[k].add(src)
                    received[dst, block] = k + 1
                    break
    rows = np.maximum(wanted, 0)
    take = (received[np.arange(devices)[:, None], rows // per_block] - 1) * per_block + rows % per_block
    take = np.where(wanted >= 0, take, len(rounds) * per_block).astype(np.int32)
    return Moves(tuple(tuple(sorted((src, dst) for dst, src in r.items())) for r in rounds), take)


def moved_rows(features: jax.Array, layout_rows: np.ndarray, mesh: Mesh, axis) -> jax.Array:
    """Rows `layout_rows` of `features` (split by rows over `axis` of `mesh`; −1: a zero row), split
    over every device of `mesh`: each device receives only the source blocks its rows lie in from
    the devices holding them (neighbours, for layouts of consecutive rows), never all of g."""
    axes = mesh_axes(mesh)
    source = axis if isinstance(axis, tuple) else (axis,)
    coords = np.indices(mesh.devices.shape).reshape(len(axes), -1)  # device t's coordinates, t in mesh order
    sizes = [mesh.shape[a] for a in source]
    block_of_device = np.ravel_multi_index(tuple(coords[axes.index(a)] for a in source), sizes)
    moves = plan_moves(np.asarray(layout_rows), block_of_device, features.shape[0] // int(np.prod(sizes)))
    take = place(moves.take, NamedSharding(mesh, PartitionSpec(axes, None)))
    return _moved(features, take, mesh=mesh, source=PartitionSpec(axis, None), rounds=moves.rounds)


@partial(jax.jit, static_argnames=("mesh", "source", "rounds"))
def _moved(features, take, *, mesh: Mesh, source: PartitionSpec, rounds):
    axes = mesh_axes(mesh)

    def body(block, take):
        received = [jax.lax.ppermute(block, axes, perm=list(moves)) for moves in rounds]
        return jnp.concatenate([*received, jnp.zeros((1, block.shape[1]), block.dtype)])[take[0]]

    specs = (source, PartitionSpec(axes, None))
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(axes, None), check_vma=False)(features, take)
