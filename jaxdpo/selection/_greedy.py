"""Exact greedy batch selection: Eq. (3) of ActiveDPO with the within-batch update of Eq. (4).

With V_b = λI + PᵀP + Σ_{k<b} φ_kφ_kᵀ (prior rows P, picks φ_k), Eq. (3) picks the eligible
candidate of largest s_i = φ_iᵀV_b⁻¹φ_i. As log det(V + φφᵀ) = log det V + log(1 + s), this is
greedy log-det; and as V only grows within a batch, every s_i only falls.

Units. Features are scaled by a power of two 2^-e that brings the largest row norm into [½, 1),
ρ = √λ·2^-e, and scores are carried as ŝ = ρ²s ≤ 1 (reported: ‖φ‖_{V⁻¹} = √ŝ/ρ). Nothing
overflows, and the picks depend on λ/2^{2e} only.

Exact scores, sums of squares only. ω(φ) whitens by V₀ = λI + PᵀP (‖ω‖² = ŝ under V₀; the prior
is factored once: QR of Pᵀ when p < d, a d×d triangular factor when p ≥ d). The whitened picks
y_k are folded into Householder reflectors (compact WY form Q = I − VᵀSV, one reflector per
pick), with coordinates Yᵀ = Q[R; 0] and TᵀT = ρ²I + RRᵀ from the QR of [Rᵀ; ρI]. With w = Qᵀω,
ŝ_b = ‖w off the first b coordinates‖² + ‖ρT⁻ᵀw_{<b}‖²: O(b·d) per candidate, with an error of
about ε·√cond(V), the conditioning of the problem itself.

Bounds. Sherman–Morrison, s_i ← s_i − (φ_iᵀũ)², costs one pass over Φ per pick but subtracts
terms as large as the initial scores: its error is ε·s⁰, i.e. ε·cond(V) relative once a batch
spans the features with a tiny λ (float32 picks then drifted from float64 greedy). So its scores,
like stale exact scores, serve only as upper bounds: per pick, the top-`block` candidates by bound
are re-scored exactly, the best is accepted when its exact score beats every remaining bound
(ties: lowest index), and the search widens otherwise.
- "full": one pass per pick (Sherman–Morrison, with a running error bound) keeps all bounds tight.
- "lazy" (Minoux): no pass; stale exact scores are valid bounds because scores only fall. If one
  pick needs more rounds than a pass costs, one pass applies every update so far and the batch
  continues as "full".
Both accept the argmax of the same exact scores, so they make the same picks.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxdpo import checks

_HIGHEST = jax.lax.Precision.HIGHEST
_CHUNK = 1024  # candidate rows whitened at once for the initial scores (and pair differences)
_RHO_EXPONENT = 60  # ρ is clamped to [2^-60, 2^60]: beyond that float32 cannot tell the difference
_MAX_BLOCK = 64  # candidates re-scored exactly per round
_AUTO_LAZY_ROUNDS = 8  # "auto" takes "lazy" when one pass over Φ costs at least this many rounds
_STALLS_BEFORE_FULL = 2  # lazy picks that needed a pass before the batch goes on as "full"
_CATCH_UP_CHUNK = 8  # pending updates applied per pass when a lazy pick stalls
STRATEGIES = ("auto", "full", "lazy")


class SelectionResult(NamedTuple):
    """Picks in order, and the score that decided each one (for greedy: ‖φ‖_{V⁻¹} when picked).

    Positions that could not be filled (invalid input under `jit`, or fewer eligible candidates
    than the batch) hold index −1 and score NaN."""

    indices: Int[Array, " batch"]
    scores: Float[Array, " batch"]


# ---------------------------------------------------------------------------------------------
# Units


class _Scale(NamedTuple):
    """Features are read as φ·2^-exponent; rho = √λ·2^-exponent (clamped)."""

    exponent: Array
    rho: Array
    report_mantissa: Array  # 1/m for √λ = m·2^r
    report_exponent: Array  # exponent − r

    def scaled(self, rows: Array, dtype) -> Array:
        return _times_power_of_two(rows.astype(dtype), -self.exponent)

    def report(self, scaled_score: Array) -> Array:
        """‖φ‖_{V⁻¹} = √ŝ/ρ, computed without leaving the range of the result."""
        return jnp.ldexp(jnp.sqrt(scaled_score) * self.report_mantissa, self.report_exponent)


def _scale(exponent: Array, reg: Array) -> _Scale:
    mantissa, reg_exponent = jnp.frexp(jnp.sqrt(reg))
    rho = jnp.ldexp(mantissa, jnp.clip(reg_exponent - exponent, -_RHO_EXPONENT, _RHO_EXPONENT))
    return _Scale(exponent, rho, 1.0 / mantissa, exponent - reg_exponent)


def _times_power_of_two(x: Array, exponent: Array) -> Array:
    """x·2^exponent, exactly (barring underflow), as two multiplications by exact powers of two
    (`jnp.ldexp` is an elementwise frexp/pow chain: too slow for a pass over Φ)."""
    half = exponent // 2
    one = jnp.ones((), x.dtype)
    return x * jnp.ldexp(one, half) * jnp.ldexp(one, exponent - half)


def _norm_exponent(squared_norm: Array) -> Array:
    """e with √squared_norm in [2^(e−1), 2^e)."""
    return jnp.frexp(jnp.sqrt(squared_norm))[1]


# ---------------------------------------------------------------------------------------------
# V₀ = λI + PᵀP in factored form, as a whitening map ω with ω(a)ᵀω(b) = ρ²aᵀV₀⁻¹b


class _Triangular(NamedTuple):
    """An upper-triangular T with an approximate inverse M ≈ T⁻ᵀ. Solves are x = cM plus one step
    of iterative refinement against T: componentwise backward stable, like a triangular solve,
    yet matmuls only (no LAPACK call, whose latency inside a loop is a pass over Φ at small n)."""

    factor: Array  # T
    inverse: Array  # M ≈ T⁻ᵀ


def _solve_t(tri: _Triangular, rows: Array) -> Array:
    """rows·T⁻¹: each row z solves Tᵀz = c."""
    z = jnp.matmul(rows, tri.inverse.T, precision=_HIGHEST)
    return z + jnp.matmul(rows - jnp.matmul(z, tri.factor, precision=_HIGHEST), tri.inverse.T, precision=_HIGHEST)


def _solve(tri: _Triangular, rows: Array) -> Array:
    """rows·T⁻ᵀ: each row x solves Tx = c."""
    x = jnp.matmul(rows, tri.inverse, precision=_HIGHEST)
    return x + jnp.matmul(rows - jnp.matmul(x, tri.factor.T, precision=_HIGHEST), tri.inverse, precision=_HIGHEST)


def _triangular(factor: Array) -> _Triangular:
    """Pair an upper-triangular factor with its inverse (one LAPACK solve, outside any loop)."""
    return _Triangular(factor, solve_triangular(factor, jnp.eye(factor.shape[0], dtype=factor.dtype), trans="T"))


def _rank_one_update(tri: _Triangular, row: Array) -> _Triangular:
    """T′ᵀT′ = TᵀT + rrᵀ by Givens rotations of [T; rᵀ] (orthogonal, hence stable), applied as
    well to [M; 0]: from [T; rᵀ] = Q̃[T′; 0], T′⁻ᵀ = Q̃[:K, :K]ᵀM. One Newton step then cleans M."""

    def rotate(j, carry):
        factor, inverse, extra_t, extra_m = carry
        radius = jnp.hypot(factor[j, j], extra_t[j])
        c = jnp.where(radius > 0, factor[j, j] / jnp.where(radius > 0, radius, 1.0), 1.0)
        s = jnp.where(radius > 0, extra_t[j] / jnp.where(radius > 0, radius, 1.0), 0.0)
        t_row, m_row = factor[j], inverse[j]
        return (
            factor.at[j].set(c * t_row + s * extra_t),
            inverse.at[j].set(c * m_row + s * extra_m),
            (c * extra_t - s * t_row).at[j].set(0.0),  # eliminated exactly: T′ stays triangular
            c * extra_m - s * m_row,
        )

    carry = (tri.factor, tri.inverse, row, jnp.zeros_like(row))
    factor, inverse, _, _ = jax.lax.fori_loop(0, row.shape[0], rotate, carry)
    newton = jnp.matmul(jnp.matmul(inverse, factor.T, precision=_HIGHEST), inverse, precision=_HIGHEST)
    return _Triangular(factor, 2.0 * inverse - newton)


class _Prior(NamedTuple):
    """kind "none": P empty, ω = φ. kind "low" (p < d): Pᵀ = QR, TᵀT = ρ²I + RRᵀ,
    ω = [(I − QQᵀ)φ; ρT⁻ᵀQᵀφ] (d + p entries). kind "full" (p ≥ d): TᵀT = V₀, ω = ρT⁻ᵀφ."""

    kind: str
    rho: Array
    basis: Array | None  # Q [d, p] for "low"
    tri: _Triangular | None  # [p, p] for "low", [d, d] for "full"


def _stacked_qr_factor(top: Array, rho: Array) -> Array:
    """Upper-triangular F with FᵀF = topᵀtop + ρ²I, from the QR of [top; ρI] (no Gram matrix, so
    its condition number is not squared)."""
    k = top.shape[1]
    return jnp.linalg.qr(jnp.concatenate([top, rho * jnp.eye(k, dtype=top.dtype)]), mode="r")


def _factor_prior(prior: Array | None, rho: Array) -> _Prior:
    """Factor V₀ from the scaled prior rows (once: the only LAPACK calls of a selection)."""
    if prior is None or prior.shape[0] == 0:
        return _Prior("none", rho, None, None)
    if prior.shape[0] < prior.shape[1]:
        basis, r = jnp.linalg.qr(prior.T)
        return _Prior("low", rho, basis, _triangular(_stacked_qr_factor(r.T, rho)))
    return _Prior("full", rho, None, _triangular(_stacked_qr_factor(prior, rho)))


def _whiten(prior: _Prior, rows: Float[Array, "k d"]) -> Float[Array, "k w"]:
    """ω of each row: ‖ω‖² = ρ²φᵀV₀⁻¹φ as a sum of squares (never a difference of large terms)."""
    if prior.kind == "none":
        return rows
    if prior.kind == "low":
        coords = jnp.matmul(rows, prior.basis, precision=_HIGHEST)  # Qᵀφ
        residual = rows - jnp.matmul(coords, prior.basis.T, precision=_HIGHEST)
        return jnp.concatenate([residual, prior.rho * _solve_t(prior.tri, coords)], axis=-1)
    return prior.rho * _solve_t(prior.tri, rows)


def _whiten_adjoint(prior: _Prior, vector: Float[Array, " w"]) -> Float[Array, " d"]:
    """ωᵀv: the u with φᵀu = ω(φ)ᵀv for every φ."""
    if prior.kind == "none":
        return vector
    if prior.kind == "low":
        d = prior.basis.shape[0]
        top, bottom = vector[:d], vector[d:]
        in_span = prior.rho * _solve(prior.tri, bottom[None])[0] - jnp.matmul(top, prior.basis, precision=_HIGHEST)
        return top + jnp.matmul(prior.basis, in_span, precision=_HIGHEST)
    return prior.rho * _solve(prior.tri, vector[None])[0]


def _whitened_width(prior: _Prior, dim: int) -> int:
    return dim + prior.basis.shape[1] if prior.kind == "low" else dim


# ---------------------------------------------------------------------------------------------
# The whitened picks: Householder reflectors (compact WY) and the in-span factor


class _Picks(NamedTuple):
    """Q = I − VᵀSV (V: reflector rows, zero until used; K = min(B, w) of them) holds the span of
    the whitened picks, with R their coordinates in it (Yᵀ = Q[R; 0]), and TᵀT = ρ²I + RRᵀ."""

    reflectors: Float[Array, "K w"]
    wy: Float[Array, "K K"]
    tri: _Triangular


def _no_picks(width: int, batch: int, rho: Array, dtype) -> _Picks:
    k = min(batch, width)
    eye = jnp.eye(k, dtype=dtype)
    return _Picks(jnp.zeros((k, width), dtype), jnp.zeros((k, k), dtype), _Triangular(rho * eye, eye / rho))


def _rotate(picks: _Picks, rows: Float[Array, "k w"]) -> Float[Array, "k w"]:
    """Qᵀω for each row."""
    v = picks.reflectors
    return rows - jnp.matmul(jnp.matmul(jnp.matmul(rows, v.T, precision=_HIGHEST), picks.wy, precision=_HIGHEST), v, precision=_HIGHEST)


def _unrotate(picks: _Picks, vector: Float[Array, " w"]) -> Float[Array, " w"]:
    """Q x."""
    v = picks.reflectors
    return vector - jnp.matmul(jnp.matmul(picks.wy, jnp.matmul(v, vector, precision=_HIGHEST), precision=_HIGHEST), v, precision=_HIGHEST)


def _span(picks: _Picks, count: Array) -> Array:
    """Which of the `width` rotated coordinates lie in the span of the first `count` picks."""
    return jnp.arange(picks.reflectors.shape[1]) < jnp.minimum(count, picks.wy.shape[0])


def _split_scores(picks: _Picks, rho: Array, count: Array, rotated: Float[Array, "k w"]) -> Float[Array, " k"]:
    """ŝ = ρ²ωᵀ(ρ²I + YᵀY)⁻¹ω for rotated rows w = Qᵀω: ‖w off the span‖² + ‖ρT⁻ᵀc‖², c = w in it."""
    in_span = _span(picks, count)
    k = picks.wy.shape[0]
    residual = jnp.sum(jnp.where(in_span, 0.0, rotated * rotated), axis=-1)
    whitened = rho * _solve_t(picks.tri, jnp.where(in_span[:k], rotated[:, :k], 0.0))
    return residual + jnp.sum(whitened * whitened, axis=-1)


def _update_direction(picks: _Picks, rho: Array, count: Array, rotated: Array, score: Array) -> Array:
    """ζ = ρ²(ρ²I + YᵀY)⁻¹y / √(ρ² + ŝ(y)) for the new pick y (rotated: Qᵀy), so that Eq. (4)
    lowers every ŝ(ω) by exactly (ωᵀζ)² (Sherman–Morrison)."""
    in_span = _span(picks, count)
    k = picks.wy.shape[0]
    coords = jnp.where(in_span[:k], rotated[:k], 0.0)
    inner = rho * rho * _solve(picks.tri, _solve_t(picks.tri, coords[None]))[0]  # ρ²T⁻¹T⁻ᵀc
    padded = jnp.zeros_like(rotated).at[:k].set(inner)
    norm = jnp.hypot(rho, jnp.sqrt(jnp.maximum(score, 0.0)))
    direction = _unrotate(picks, jnp.where(in_span, padded, rotated))
    return jnp.where(norm > 0, direction / norm, 0.0)


def _add_pick(picks: _Picks, count: Array, rotated: Array) -> _Picks:
    """Fold pick number `count` (rotated: Qᵀy) in: one more Householder reflector while fewer than
    K exist (compact WY update), then its coordinates r into T (TᵀT += rrᵀ; Eq. 4)."""
    k, width = picks.reflectors.shape
    grows = count < k
    j = jnp.minimum(count, k - 1)
    tail = jnp.where(jnp.arange(width) >= j, rotated, 0.0)
    alpha = jnp.where(rotated[j] < 0, 1.0, -1.0) * jnp.linalg.norm(tail)  # −sign(x_j)‖x‖
    v = tail.at[j].add(-alpha)
    vv = jnp.sum(v * v)
    tau = jnp.where(grows & (vv > 0), 2.0 / jnp.where(vv > 0, vv, 1.0), 0.0)
    wy_column = (-tau * jnp.matmul(picks.wy, jnp.matmul(picks.reflectors, v, precision=_HIGHEST), precision=_HIGHEST)).at[j].set(tau)
    coords = jnp.where(grows, jnp.where(jnp.arange(k) < j, rotated[:k], 0.0).at[j].set(alpha), rotated[:k])
    return _Picks(
        reflectors=jnp.where(grows, picks.reflectors.at[j].set(v), picks.reflectors),
        wy=jnp.where(grows, picks.wy.at[:, j].set(wy_column), picks.wy),
        tri=_rank_one_update(picks.tri, coords),
    )


# ---------------------------------------------------------------------------------------------
# Candidates: φ given densely [n, d], or as per-response features g [r, d] with pairs [n, 2]


class _Candidates(NamedTuple):
    features: Array  # φ [n, d], or g [r, d] when pairs is given; float32/64, or half precision
    pairs: Array | None  # [n, 2] int: φ_i = g[a_i] − g[b_i]
    dtype: object  # the compute dtype (float32 for half-precision features)

    @property
    def count(self) -> int:
        return self.features.shape[0] if self.pairs is None else self.pairs.shape[0]

    def rows(self, indices: Int[Array, " k"]) -> Float[Array, "k d"]:
        """Candidate rows φ (unscaled) in the compute dtype."""
        f = self.features
        if self.pairs is None:
            return f[indices].astype(self.dtype)
        return f[self.pairs[indices, 0]].astype(self.dtype) - f[self.pairs[indices, 1]].astype(self.dtype)

    def squared_norms(self) -> Float[Array, " rows"]:
        """‖row‖² of every stored row (φ, or g in pair mode): one pass."""
        f = self.features.astype(self.dtype)
        return jnp.sum(f * f, axis=1)

    def _stored_dot(self, vectors: Array) -> Array:
        f = self.features
        if f.dtype == self.dtype:
            return jnp.matmul(f, vectors, precision=_HIGHEST)
        if vectors.ndim == 1:  # convert, multiply, reduce: one fused pass, never an upcast copy of Φ
            return jnp.sum(f.astype(self.dtype) * vectors, axis=1)
        return jax.lax.map(lambda row: jnp.matmul(row.astype(self.dtype), vectors, precision=_HIGHEST), f, batch_size=_CHUNK)

    def dot(self, vectors: Array) -> Array:
        """φ_iᵀx for every candidate (x: [d] or [d, m]): one pass over the feature matrix."""
        products = self._stored_dot(vectors)
        if self.pairs is None:
            return products
        return products[self.pairs[:, 0]] - products[self.pairs[:, 1]]

    def map_rows(self, fn) -> Array:
        """fn(rows [k, d]) → [k] over all candidates, `_CHUNK` rows at a time."""
        return jax.lax.map(lambda i: fn(self.rows(i[None]))[0], jnp.arange(self.count), batch_size=min(_CHUNK, self.count))


# ---------------------------------------------------------------------------------------------
# Devices: the candidate axis may be split over a mesh axis (explicit per-device code)


class _Leader(NamedTuple):
    """A candidate (global index) and a score; the better of two has the larger score, then the
    lower index (Eq. 3's argmax with ties to the lowest index)."""

    value: Array
    index: Array


_NOBODY = np.iinfo(np.int32).max


def _better(a: _Leader, b: _Leader) -> Array:
    return (a.value > b.value) | ((a.value == b.value) & (a.index < b.index))


def _best_of(a: _Leader, b: _Leader) -> _Leader:
    first = _better(a, b)
    return _Leader(jnp.where(first, a.value, b.value), jnp.where(first, a.index, b.index))


def _leader(values: Array, indices: Array) -> _Leader:
    """The best (value, index) pair among equally long vectors."""
    top = jnp.max(values)
    return _Leader(top, jnp.min(jnp.where(values == top, indices, _NOBODY)).astype(jnp.int32))


class _Comm(NamedTuple):
    axis: object  # mesh axis name(s) of the candidate blocks, or None on one device

    def sum(self, x):
        return x if self.axis is None else jax.lax.psum(x, self.axis)

    def max(self, x):
        return x if self.axis is None else jax.lax.pmax(x, self.axis)

    def offset(self, block: int) -> Array:
        """Global index of this device's first candidate."""
        return jnp.int32(0) if self.axis is None else jax.lax.axis_index(self.axis).astype(jnp.int32) * block

    def leader(self, local: _Leader) -> _Leader:
        """The best of every device's leader (all devices agree)."""
        if self.axis is None:
            return local
        gather = partial(jax.lax.all_gather, axis_name=self.axis)
        return _leader(gather(local.value), gather(local.index))

    def broadcast(self, row: Array, owned: Array) -> Array:
        return row if self.axis is None else jax.lax.psum(jnp.where(owned, row, 0.0), self.axis)


# ---------------------------------------------------------------------------------------------
# Initial scores


class _Start(NamedTuple):
    scale: _Scale
    prior: _Prior
    scores: Float[Array, " n"]  # ŝ under V₀
    valid: Array  # finite features, prior and scores; reg > 0; pairs in range


def _exponent(candidates: _Candidates, prior: Array | None, comm: _Comm, squared: Array) -> tuple[Array, Array]:
    """(e, whether e came from the rare path): from the largest squared row norm when it is a
    normal float32 number, else (overflow, underflow) from max |entry| and a second pass."""
    largest = comm.max(jnp.max(squared))
    if prior is not None and prior.shape[0]:
        largest = jnp.maximum(largest, jnp.max(jnp.sum(prior * prior, axis=1)))
    rare = ~((largest >= 2.0**-100) & (largest <= 2.0**100))

    def from_entries():
        entries = comm.max(jnp.max(jnp.abs(candidates.features)).astype(candidates.dtype))
        if prior is not None and prior.shape[0]:
            entries = jnp.maximum(entries, jnp.max(jnp.abs(prior)))
        coarse = jnp.frexp(entries)[1]
        f = _times_power_of_two(candidates.features.astype(candidates.dtype), -coarse)
        fine = comm.max(jnp.max(jnp.sum(f * f, axis=1)))
        if prior is not None and prior.shape[0]:
            p = _times_power_of_two(prior, -coarse)
            fine = jnp.maximum(fine, jnp.max(jnp.sum(p * p, axis=1)))
        return coarse + _norm_exponent(fine)

    return jax.lax.cond(rare, from_entries, lambda: _norm_exponent(largest)), rare


def _start(candidates: _Candidates, prior: Array | None, reg: Array, comm: _Comm) -> _Start:
    """Scale, prior factor and ŝ⁰ of every candidate; one pass over Φ without a prior."""
    squared = candidates.squared_norms()
    exponent, rare = _exponent(candidates, prior, comm, squared)
    scale = _scale(exponent, reg)
    factor = _factor_prior(None if prior is None else scale.scaled(prior, candidates.dtype), scale.rho)
    if factor.kind == "none" and candidates.pairs is None:
        scores = jax.lax.cond(
            rare,
            lambda: jnp.sum(scale.scaled(candidates.features, candidates.dtype) ** 2, axis=1),
            lambda: _times_power_of_two(_times_power_of_two(squared, -exponent), -exponent),
        )
    else:
        scores = candidates.map_rows(lambda rows: jnp.sum(_whiten(factor, scale.scaled(rows, candidates.dtype)) ** 2, axis=1))
    valid = jnp.isfinite(reg) & (reg > 0) & (comm.sum(jnp.sum(~jnp.isfinite(scores))) == 0)
    if candidates.pairs is not None:
        rows = candidates.features.shape[0]
        valid &= jnp.all((candidates.pairs >= 0) & (candidates.pairs < rows))
    return _Start(scale, factor, scores, valid)


# ---------------------------------------------------------------------------------------------
# The greedy loop: bounds, exact re-scoring of the contenders, one pick per iteration


class _Plan(NamedTuple):
    """Static sizes: candidates re-scored per round; the rounds that cost about one pass over Φ;
    and the rounds a lazy pick may take before it stalls (catches up on every update so far): a
    quarter of a pass, so nearly tied scores give up lazy picking early and cheaply."""

    block: int
    lazy_rounds: int
    stall_rounds: int


def _plan(count: int, dim: int, width: int, batch: int) -> _Plan:
    block = int(min(max(count // 8, 1), _MAX_BLOCK))
    k = min(batch, width)
    round_cost = block * (3 * k * width + 4 * k * k + 2 * (width - dim) * dim) + count
    lazy_rounds = max(2, math.ceil(count * dim / round_cost))
    return _Plan(block, lazy_rounds, max(1, lazy_rounds // 4))


class _Context(NamedTuple):
    candidates: _Candidates
    prior: _Prior
    scale: _Scale
    comm: _Comm
    plan: _Plan
    slack: float  # relative rounding allowance of an exact score
    drift: float  # relative rounding allowance of one Sherman–Morrison update


class _State(NamedTuple):
    pick: Array  # b: picks made so far
    bounds: Float[Array, " n"]  # upper bounds on every ŝ_i under V_b
    approx: Float[Array, " n"]  # Sherman–Morrison ŝ_i under V_synced (the initial scores at first) …
    error: Float[Array, " n"]  # … and a bound on its rounding error
    synced: Array
    full: Array  # one pass per pick (strategy "full", or "lazy" after repeated stalls)
    stalls: Array  # lazy picks that needed a pass
    eligible: Bool[Array, " n"]
    picks: _Picks
    directions: Float[Array, "B d"]  # ũ_k in unscaled feature space: ŝ_i drops by (φ_iᵀũ_k)²
    indices: Int[Array, " B"]
    scores: Float[Array, " B"]  # ŝ of each pick when picked
    rescored: Array  # statistics: candidates re-scored exactly; passes over Φ after the first
    passes: Array


def _apply_updates(ctx: _Context, state: _State, directions: Float[Array, "k d"], synced: Array) -> _State:
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


def _apply_latest(ctx: _Context, state: _State) -> _State:
    """One pick of strategy "full": apply the previous pick's update (one matrix-vector pass)."""
    return _apply_updates(ctx, state, jax.lax.dynamic_slice_in_dim(state.directions, state.pick - 1, 1), state.pick)


def _catch_up(ctx: _Context, state: _State) -> _State:
    """A lazy pick that stalls: apply every update not yet applied, `_CATCH_UP_CHUNK` per pass (a
    pass with a few updates reads Φ once like a pass with one, with all B it would be B times the
    arithmetic); after `_STALLS_BEFORE_FULL` of them the batch goes on as "full"."""
    width = min(_CATCH_UP_CHUNK, state.directions.shape[0])

    def apply_chunk(state: _State) -> _State:
        k = state.synced + jnp.arange(width)
        rows = state.directions[jnp.minimum(k, state.directions.shape[0] - 1)]
        pending = jnp.where((k < state.pick)[:, None], rows, 0.0)
        return _apply_updates(ctx, state, pending, jnp.minimum(state.synced + width, state.pick))

    state = jax.lax.while_loop(lambda s: s.synced < s.pick, apply_chunk, state)
    return state._replace(stalls=state.stalls + 1, full=state.stalls + 1 >= _STALLS_BEFORE_FULL)


def _exact_scores(ctx: _Context, picks: _Picks, count: Array, rows: Float[Array, "k d"]) -> Float[Array, " k"]:
    whitened = _whiten(ctx.prior, ctx.scale.scaled(rows, ctx.candidates.dtype))
    return _split_scores(picks, ctx.scale.rho, count, _rotate(picks, whitened))


class _Search(NamedTuple):
    """One pick's search: re-scored candidates leave `open`; `best` is the best exact score so far,
    `remaining` the best bound still open (both global)."""

    state: _State
    open: Float[Array, " n"]  # bounds of the eligible candidates not re-scored at this pick, else −inf
    best: _Leader
    remaining: _Leader
    rounds: Array


def _round(ctx: _Context, search: _Search) -> _Search:
    """Re-score exactly the `block` open candidates of highest bound (on each device)."""
    state, open_ = search.state, search.open
    stall = ~state.full & (search.rounds >= ctx.plan.stall_rounds) & (state.synced < state.pick)
    state = jax.lax.cond(stall, partial(_catch_up, ctx), lambda s: s, state)
    open_ = jnp.where(stall & (open_ > -jnp.inf), jnp.minimum(open_, state.bounds), open_)
    n = open_.shape[0]
    # top_k's outputs are used whole: a sliced top_k is lowered to a full sort on CPU
    values, chosen = jax.lax.top_k(open_, ctx.plan.block)
    live = values > -jnp.inf
    exact = jnp.where(live, _exact_scores(ctx, state.picks, state.pick, ctx.candidates.rows(chosen)), -jnp.inf)
    offset = ctx.comm.offset(n)
    # every candidate still open has a bound ≤ the smallest chosen one (at a higher index if equal)
    lowest = jnp.min(values)
    remaining = _Leader(lowest, jnp.max(jnp.where(values == lowest, chosen, -1)).astype(jnp.int32) + offset)
    rebase = live & (state.synced == state.pick)  # approx is current: restart its drift from exact
    state = state._replace(
        bounds=state.bounds.at[chosen].set(jnp.where(live, exact * (1.0 + ctx.slack), state.bounds[chosen])),
        approx=state.approx.at[chosen].set(jnp.where(rebase, exact, state.approx[chosen])),
        error=state.error.at[chosen].set(jnp.where(rebase, ctx.slack * exact, state.error[chosen])),
        rescored=state.rescored + jnp.sum(live, dtype=jnp.int32),
    )
    return _Search(
        state,
        open_.at[chosen].set(-jnp.inf),
        _best_of(search.best, ctx.comm.leader(_leader(exact, chosen + offset))),
        ctx.comm.leader(remaining),
        search.rounds + 1,
    )


def _first_search(ctx: _Context, state: _State) -> _Search:
    """Pick 0 is decided on the initial scores, which are exact under V₀; later picks start with
    every eligible candidate open."""
    n = state.bounds.shape[0]
    offset = ctx.comm.offset(n)
    nobody = _Leader(jnp.asarray(-jnp.inf, state.bounds.dtype), jnp.int32(_NOBODY))
    first = state.pick == 0
    initial = jax.lax.cond(
        first,
        lambda: ctx.comm.leader(_leader(jnp.where(state.eligible, state.approx, -jnp.inf), jnp.arange(n, dtype=jnp.int32) + offset)),
        lambda: nobody,
    )
    return _Search(
        state,
        jnp.where(state.eligible & ~first, state.bounds, -jnp.inf),
        initial,
        _Leader(jnp.where(first, -jnp.inf, jnp.inf).astype(state.bounds.dtype), jnp.int32(_NOBODY)),
        jnp.int32(0),
    )


def _step(ctx: _Context, state: _State) -> _State:
    """One pick: Eq. (3) argmax of the exact scores, then Eq. (4) folded into the factor."""
    state = jax.lax.cond(state.full & (state.pick > 0), partial(_apply_latest, ctx), lambda s: s, state)
    search = jax.lax.while_loop(lambda s: ~_better(s.best, s.remaining), partial(_round, ctx), _first_search(ctx, state))
    state, best = search.state, search.best
    n = state.bounds.shape[0]
    local = best.index - ctx.comm.offset(n)
    owned = (local >= 0) & (local < n)
    local = jnp.clip(local, 0, n - 1)
    b, rho = state.pick, ctx.scale.rho
    row = ctx.comm.broadcast(ctx.candidates.rows(local[None])[0], owned)
    rotated = _rotate(state.picks, _whiten(ctx.prior, ctx.scale.scaled(row[None], ctx.candidates.dtype)))[0]
    direction = _whiten_adjoint(ctx.prior, _update_direction(state.picks, rho, b, rotated, best.value))
    return state._replace(
        pick=b + 1,
        eligible=state.eligible.at[local].set(state.eligible[local] & ~owned),
        picks=_add_pick(state.picks, b, rotated),
        directions=state.directions.at[b].set(ctx.scale.scaled(direction, ctx.candidates.dtype)),
        indices=state.indices.at[b].set(best.index),
        scores=state.scores.at[b].set(best.value),
    )


class _Stats(NamedTuple):
    rescored: Array  # candidates re-scored exactly (all devices)
    passes: Array  # passes over Φ after the initial one


def _select(features, pairs, prior, mask, reg, batch_size: int, lazy: bool, comm: _Comm) -> tuple[SelectionResult, _Stats]:
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    candidates = _Candidates(features, pairs, dtype)
    start = _start(candidates, prior, reg, comm)
    dim = features.shape[1]
    width = _whitened_width(start.prior, dim)
    ctx = _Context(
        candidates, start.prior, start.scale, comm, _plan(candidates.count, dim, width, batch_size),
        slack=64 * float(jnp.finfo(dtype).eps), drift=16 * float(jnp.finfo(dtype).eps),
    )
    scores = jnp.maximum(start.scores, 0.0)
    state = _State(
        pick=jnp.int32(0),
        bounds=scores * (1.0 + ctx.slack),
        approx=scores,
        error=ctx.slack * scores,
        synced=jnp.int32(0),
        full=jnp.bool_(not lazy),
        stalls=jnp.int32(0),
        eligible=mask,
        picks=_no_picks(width, batch_size, start.scale.rho, dtype),
        directions=jnp.zeros((batch_size, dim), dtype),
        indices=jnp.full((batch_size,), -1, jnp.int32),
        scores=jnp.full((batch_size,), jnp.nan, dtype),
        rescored=jnp.int32(0),
        passes=jnp.int32(0),
    )
    stop = jnp.where(start.valid, jnp.minimum(batch_size, comm.sum(jnp.sum(mask, dtype=jnp.int32))), 0)
    state = jax.lax.while_loop(lambda s: s.pick < stop, partial(_step, ctx), state)
    result = SelectionResult(state.indices, start.scale.report(state.scores))
    return result, _Stats(comm.sum(state.rescored), state.passes)


@partial(jax.jit, static_argnames=("batch_size", "lazy"))
def _greedy(features, pairs, prior, mask, reg, batch_size: int, lazy: bool) -> tuple[SelectionResult, _Stats]:
    return _select(features, pairs, prior, mask, reg, batch_size, lazy, _Comm(None))


def _candidate_axis(features) -> tuple[Mesh, object] | None:
    """(mesh, axis) when concrete `features` are split by rows over several devices of a mesh."""
    sharding = getattr(features, "sharding", None)
    if not isinstance(sharding, NamedSharding) or len(sharding.device_set) < 2:
        return None
    spec = tuple(sharding.spec) + (None,) * 2
    if spec[0] is None or spec[1] is not None:
        return None
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    blocks = int(np.prod([sharding.mesh.shape[a] for a in axes]))
    if blocks < 2 or features.shape[0] % blocks:
        return None
    return sharding.mesh, spec[0]


@partial(jax.jit, static_argnames=("batch_size", "lazy", "mesh", "axis"))
def _greedy_sharded(features, prior, mask, reg, batch_size: int, lazy: bool, mesh: Mesh, axis) -> tuple[SelectionResult, _Stats]:
    """The same loop with the candidate axis split over `axis` of `mesh` (explicit per-device code:
    no device ever holds more than its block of Φ; each re-scores its own top candidates)."""
    rows = PartitionSpec(axis)
    return jax.shard_map(
        lambda f, m, p, r: _select(f, None, p, m, r, batch_size, lazy, _Comm(axis)),
        mesh=mesh,
        in_specs=(rows, rows, PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(),
        check_vma=False,
    )(features, mask, prior, reg)


@jax.jit
def _one_shot_norms(features, pairs, prior, reg) -> Array:
    candidates = _Candidates(features, pairs, jnp.promote_types(features.dtype, jnp.float32))
    start = _start(candidates, prior, reg, _Comm(None))
    return jnp.where(start.valid, start.scale.report(jnp.maximum(start.scores, 0.0)), jnp.nan)


# ---------------------------------------------------------------------------------------------
# Public API

_HALF = (jnp.float16, jnp.bfloat16)


def _as_array(name: str, x):
    """Arrays pass through; nested lists and tuples become NumPy arrays (clear error if ragged)."""
    if not isinstance(x, (list, tuple)):
        return x
    try:
        array = np.asarray(x)
    except ValueError:
        raise ValueError(f"{name} must be a rectangular array; got a ragged nested {type(x).__name__}") from None
    checks.require(
        array.dtype.kind in "biuf", f"{name} must hold numbers; got a {type(x).__name__} of {array.dtype.name} values"
    )
    return array


def _validated(features, *, reg, prior, mask, pairs):
    """Check and canonicalize the inputs shared by the ‖φ‖_{V⁻¹} functions. Checks that read every
    value of `features` run only after a result came back invalid (see `_diagnose`)."""
    features, prior, mask, pairs = (_as_array(n, x) for n, x in [("features", features), ("prior", prior), ("mask", mask), ("pairs", pairs)])
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
        pairs = jnp.asarray(pairs, jnp.int32)
    count = rows if pairs is None else pairs.shape[0]
    checks.require(count >= 1, "the candidate pool is empty (no rows in features / pairs)")
    if prior is not None:
        checks.check_ndim("prior", prior, 2, "[p, d]")
        checks.require(
            prior.shape[1] == dim,
            f"prior must have the width of features ({dim}), got shape {tuple(prior.shape)}",
        )
        checks.check_floating("prior", prior)
        checks.check_finite("prior", prior)
        prior = jnp.asarray(prior, dtype)
    if mask is not None:
        checks.check_shape("mask", mask, (count,))
        checks.require(
            jnp.result_type(mask) == jnp.bool_, f"mask must be boolean, got dtype {jnp.result_type(mask)}"
        )
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
    return features, jnp.asarray(reg, dtype), prior, mask, pairs, count


def _diagnose(features, pairs) -> None:
    """An eager call whose result came back invalid: name the bad values (a full read of Φ, paid
    only on this path)."""
    if pairs is None:
        checks.check_finite("features", features)
    else:
        used = np.unique(np.asarray(pairs))
        checks.check_finite("features (rows used by pairs)", np.asarray(features)[used])
    raise ValueError("select_batch produced non-finite scores from finite inputs; please report this")


def _strategy(strategy: str, count: int, dim: int, prior, batch_size: int, shards: int) -> bool:
    """Whether to run lazily. "auto": lazy when one pass over Φ costs at least
    `_AUTO_LAZY_ROUNDS` rounds of exact re-scoring (so lazy picks have room to widen)."""
    checks.require(strategy in STRATEGIES, f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy != "auto":
        return strategy == "lazy"
    p = 0 if prior is None else prior.shape[0]
    width = dim + p if 0 < p < dim else dim
    return _plan(count // shards, dim, width, batch_size).lazy_rounds >= _AUTO_LAZY_ROUNDS


def select_batch(
    features: Float[ArrayLike, "rows d"] | list,
    batch_size: int,
    *,
    reg: float | Float[ArrayLike, ""] = 1.0,
    prior: Float[ArrayLike, "p d"] | list | None = None,
    mask: Bool[ArrayLike, " n"] | None = None,
    pairs: Int[ArrayLike, "n 2"] | None = None,
    strategy: Literal["auto", "full", "lazy"] = "auto",
) -> SelectionResult:
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
        p may be below or above d.
      mask: `[n]` bool, True for eligible candidates (default: all).
      pairs: `[n, 2]` int indices into the rows of `features` (see above).
      strategy: "full" re-scores all n candidates per pick (one pass over Φ, O(n·d)); "lazy"
        (Minoux) re-scores only candidates whose stale score, an upper bound, can still win
        (O(n + T·B·d) per pick); "auto" takes "lazy" where the shapes make a pass much dearer than
        re-scoring. Both return the same picks. Static under `jit`.

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

    Cost: one pass over Φ for the initial scores, then per pick O(n·d) ("full") or about
    O(n + T·B·d) ("lazy"), plus the one-time factorization of V₀ (O(p²d) for p < d, O(d³) for
    p ≥ d); memory O(n·d). Pure; works under
    `jax.jit(select_batch, static_argnames=("batch_size", "strategy"))` and with `features`
    sharded over devices along the candidate axis (each device re-scores its own top candidates).
    """
    checks.require(
        isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool),
        f"batch_size must be a Python int, got {type(batch_size).__name__}",
    )
    features, reg, prior, mask, pairs, count = _validated(features, reg=reg, prior=prior, mask=mask, pairs=pairs)
    checks.require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    checks.require(batch_size <= count, f"batch_size {batch_size} is larger than the pool of {count} candidates")
    if mask is None:
        mask = jnp.ones((count,), bool)
    elif checks.is_concrete(mask):
        eligible = int(np.sum(np.asarray(mask)))
        checks.require(
            batch_size <= eligible,
            f"batch_size {batch_size} is larger than the {eligible} eligible candidates in mask",
        )
    mask = jnp.asarray(mask)
    sharded = _candidate_axis(features) if pairs is None else None
    shards = 1 if sharded is None else int(np.prod([sharded[0].shape[a] for a in np.atleast_1d(sharded[1])]))
    lazy = _strategy(strategy, count, features.shape[1], prior, int(batch_size), shards)
    if sharded is not None:
        mesh, axis = sharded
        mask = jax.device_put(mask, NamedSharding(mesh, PartitionSpec(axis)))
        result, _ = _greedy_sharded(features, prior, mask, reg, int(batch_size), lazy, mesh, axis)
    else:
        result, _ = _greedy(features, pairs, prior, mask, reg, int(batch_size), lazy)
    if checks.is_concrete(result.indices) and int(jnp.min(result.indices)) < 0:
        _diagnose(features, pairs)
    return result


def v_inv_norms(
    features: Float[ArrayLike, "rows d"] | list,
    *,
    reg: float | Float[ArrayLike, ""] = 1.0,
    prior: Float[ArrayLike, "p d"] | list | None = None,
    pairs: Int[ArrayLike, "n 2"] | None = None,
) -> Float[Array, " n"]:
    """‖φ_i‖_{V₀⁻¹} for every candidate with V₀ = reg·I + priorᵀprior (Eq. 3's criterion, no picks).

    Same input rules as `select_batch`; under `jit`, invalid input gives all-NaN norms."""
    features, reg, prior, _, pairs, _ = _validated(features, reg=reg, prior=prior, mask=None, pairs=pairs)
    norms = _one_shot_norms(features, pairs, prior, reg)
    if checks.is_concrete(norms) and not bool(jnp.all(jnp.isfinite(norms))):
        _diagnose(features, pairs)
    return norms
