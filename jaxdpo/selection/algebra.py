"""The factored linear algebra of the greedy (Eq. 3-4): V⁻¹ is never formed.

Units. Features are read scaled by a power of two 2^-e that brings the largest row norm into
[½, 1), ρ = √λ·2^-e, and scores are carried as ŝ = ρ²φᵀV⁻¹φ ≤ 1 (reported: ‖φ‖_{V⁻¹} = √ŝ/ρ).
Nothing overflows, and the picks depend on λ/2^{2e} only.

Prior. ω(x) whitens by V₀ = ρ²I + PᵀP (ω(a)ᵀω(b) = ρ²aᵀV₀⁻¹b). For p < d it is the ridge
residual ω = [x − Pᵀz; ρz] with z = G⁻¹Px, G = ρ²I + PPᵀ = UᵀU: ‖ω‖² = min_z ‖x − Pᵀz‖² + ρ²‖z‖²,
a sum of squares whose Gram matrix is exact to second order in the error of G⁻¹ (a symmetric
error's first-order terms cancel). U comes from the Cholesky factor of G (one GEMM) when G is well
conditioned, else from QR of Pᵀ and of [R; ρI] (slower, never squares the condition number). For
p ≥ d, ω = ρT⁻ᵀx with TᵀT = V₀ from the QR of [P; ρI].

Picks. The whitened picks y_k are folded into Householder reflectors (compact WY form
Q = I − VᵀSV), with coordinates Yᵀ = Q[R; 0] and TᵀT = ρ²I + RRᵀ. With w = Qᵀω the exact score is
ŝ_b = ‖w off the first b coordinates‖² + ‖ρT⁻ᵀw_{<b}‖² (sums of squares, error ≈ ε·√cond(V)). The
explicit basis q_j = Qe_j (fixed once pick j is made) gives the cheaper "coordinate" score
ŝ⁰ − ‖c‖² + ‖ρT⁻ᵀc‖², c_j = q_jᵀω: a difference, used only with its error bound.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from jaxtyping import Array, Float

HIGHEST = jax.lax.Precision.HIGHEST
RHO_EXPONENT = 60  # ρ is clamped to [2^-60, 2^60]: beyond that float32 cannot tell the difference
GRAM_CONDITION = 2.0**-3  # largest ε·cond(G) (Gershgorin bound) factored through the Gram matrix
POWER_STEPS = 16  # power iterations estimating λ_max(G) for the error model
CHOLESKY_BLOCK = 32  # blocks of the Gram matrix's Cholesky factored a column at a time
SLAB = 16  # basis vectors multiplied at once by a coordinate score (slabs past the picks so far are skipped)


def matmul(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=HIGHEST)


# ---------------------------------------------------------------------------------------------
# Units


class Scale(NamedTuple):
    """Features are read as φ·2^-exponent; rho = √λ·2^-exponent (clamped)."""

    exponent: Array
    rho: Array
    report_mantissa: Array  # 1/m for √λ = m·2^r
    report_exponent: Array  # exponent − r

    def scaled(self, rows: Array, dtype) -> Array:
        return times_power_of_two(rows.astype(dtype), -self.exponent)

    def report(self, scaled_score: Array) -> Array:
        """‖φ‖_{V⁻¹} = √ŝ/ρ, computed without leaving the range of the result."""
        return jnp.ldexp(jnp.sqrt(scaled_score) * self.report_mantissa, self.report_exponent)


def scale(exponent: Array, reg: Array) -> Scale:
    mantissa, reg_exponent = jnp.frexp(jnp.sqrt(reg))
    rho = jnp.ldexp(mantissa, jnp.clip(reg_exponent - exponent, -RHO_EXPONENT, RHO_EXPONENT))
    return Scale(exponent, rho, 1.0 / mantissa, exponent - reg_exponent)


def times_power_of_two(x: Array, exponent: Array) -> Array:
    """x·2^exponent, exactly (barring underflow), as two multiplications by exact powers of two
    (`jnp.ldexp` is an elementwise frexp/pow chain: too slow for a pass over Φ)."""
    half = exponent // 2
    one = jnp.ones((), x.dtype)
    return x * jnp.ldexp(one, half) * jnp.ldexp(one, exponent - half)


def norm_exponent(squared_norm: Array) -> Array:
    """e with √squared_norm in [2^(e−1), 2^e)."""
    return jnp.frexp(jnp.sqrt(squared_norm))[1]


# ---------------------------------------------------------------------------------------------
# Triangular factors with an approximate inverse


class Triangular(NamedTuple):
    """An upper-triangular T with an approximate inverse M ≈ T⁻ᵀ. Solves are x = cM plus one step
    of iterative refinement against T: componentwise backward stable, like a triangular solve,
    yet matmuls only (no LAPACK call, whose latency inside a loop is a pass over Φ at small n)."""

    factor: Array  # T
    inverse: Array  # M ≈ T⁻ᵀ


def solve_t(tri: Triangular, rows: Array) -> Array:
    """rows·T⁻¹: each row z solves Tᵀz = c."""
    z = matmul(rows, tri.inverse.T)
    return z + matmul(rows - matmul(z, tri.factor), tri.inverse.T)


def solve(tri: Triangular, rows: Array) -> Array:
    """rows·T⁻ᵀ: each row x solves Tx = c."""
    x = matmul(rows, tri.inverse)
    return x + matmul(rows - matmul(x, tri.factor.T), tri.inverse)


def triangular(factor: Array) -> Triangular:
    """Pair an upper-triangular factor with its inverse (one LAPACK solve, outside any loop)."""
    return Triangular(factor, solve_triangular(factor, jnp.eye(factor.shape[0], dtype=factor.dtype), trans="T"))


def cholesky(gram: Array) -> Triangular:
    """U (upper, UᵀU = gram) with U⁻ᵀ, by blocks of `CHOLESKY_BLOCK` in XLA's own operations:
    LAPACK's threads beside XLA's made the same 450 × 450 factor take 4 ms or 150 ms on 2 cores."""
    lower, inverse = _cholesky_lower(gram)
    return Triangular(lower.T, inverse)


def _cholesky_lower(a: Array) -> tuple[Array, Array]:
    """(L, L⁻¹) with LLᵀ = a: halves recursively; the off-diagonal block A₂₁L₁₁⁻ᵀ gets one step of
    refinement against L₁₁ (backward error of a plain solve, not cond(L₁₁) times it)."""
    n = a.shape[0]
    if n <= CHOLESKY_BLOCK:
        return _small_cholesky(a)
    k = n // 2
    l11, i11 = _cholesky_lower(a[:k, :k])
    l21 = matmul(a[k:, :k], i11.T)
    l21 = l21 + matmul(a[k:, :k] - matmul(l21, l11.T), i11.T)
    l22, i22 = _cholesky_lower(a[k:, k:] - matmul(l21, l21.T))
    zeros = jnp.zeros((k, n - k), a.dtype)
    return jnp.block([[l11, zeros], [l21, l22]]), jnp.block([[i11, zeros], [-matmul(i22, matmul(l21, i11)), i22]])


def _small_cholesky(a: Array) -> tuple[Array, Array]:
    """(L, L⁻¹) of a small matrix: a column at a time, then L⁻¹ a row at a time (forward substitution)."""
    n = a.shape[0]
    index = jnp.arange(n)

    def column(j, a):
        pivot = jnp.sqrt(a[j, j])
        below = index > j
        col = jnp.where(below, a[:, j] / pivot, 0.0).at[j].set(pivot)
        return (a - jnp.where(below[:, None] & below[None, :], jnp.outer(col, col), 0.0)).at[:, j].set(col)

    lower = jnp.tril(jax.lax.fori_loop(0, n, column, a))
    eye = jnp.eye(n, dtype=a.dtype)

    def row(i, inverse):
        return inverse.at[i].set((eye[i] - matmul(jnp.where(index < i, lower[i], 0.0), inverse)) / lower[i, i])

    return lower, jax.lax.fori_loop(0, n, row, jnp.zeros_like(a))


def rank_one_update(tri: Triangular, row: Array, used: Array | int) -> Triangular:
    """T′ᵀT′ = TᵀT + rrᵀ by Givens rotations of [T; rᵀ] (orthogonal, hence stable), applied as
    well to [M; 0]: from [T; rᵀ] = Q̃[T′; 0], T′⁻ᵀ = Q̃[:K, :K]ᵀM. One Newton step then cleans M.
    Only the first `used` rotations run: past them r is zero and T is ρI (ρ > 0), where each
    rotation would be the identity exactly (c = 1, s = 0)."""

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
    factor, inverse, _, _ = jax.lax.fori_loop(0, used, rotate, carry)
    return Triangular(factor, 2.0 * inverse - matmul(matmul(inverse, factor.T), inverse))


def stacked_qr_factor(top: Array, rho: Array) -> Array:
    """Upper-triangular F with FᵀF = topᵀtop + ρ²I, from the QR of [top; ρI] (no Gram matrix, so
    its condition number is not squared)."""
    k = top.shape[1]
    return jnp.linalg.qr(jnp.concatenate([top, rho * jnp.eye(k, dtype=top.dtype)]), mode="r")


# ---------------------------------------------------------------------------------------------
# V₀ = ρ²I + PᵀP in factored form


class Prior(NamedTuple):
    """kind "none": ω = x. "low" (p < d): rows P, UᵀU = ρ²I + PPᵀ, ω = [x − Pᵀz; ρz] (d + p
    entries). "full" (p ≥ d): TᵀT = V₀, ω = ρT⁻ᵀx. `condition` bounds cond(U) (error models)."""

    kind: str
    rho: Array
    rows: Array | None  # P [p, d] (scaled) for "low"
    tri: Triangular | None  # U [p, p] for "low", T [d, d] for "full"
    condition: Array


def gram_is_safe(gram: Array, rho: Array) -> Array:
    """Whether ε·cond(G) ≤ GRAM_CONDITION, by Gershgorin (λ_max ≤ max row sum of |G|, λ_min ≥ ρ²):
    then the Cholesky factor of G, though its backward error is ε·cond(G) relative, whitens with
    a Gram matrix exact to second order (measured: as accurate as the QR path up to cond 5e6)."""
    eps = jnp.finfo(gram.dtype).eps
    return eps * jnp.max(jnp.sum(jnp.abs(gram), axis=1)) <= GRAM_CONDITION * rho * rho


def largest_eigenvalue(gram: Array) -> Array:
    """λ_max of a PSD matrix by power iteration, doubled (an estimate from below, made safe)."""
    v = jnp.ones((gram.shape[0],), gram.dtype)
    v = jax.lax.fori_loop(0, POWER_STEPS, lambda _, v: (w := matmul(gram, v)) / jnp.linalg.norm(w), v)
    return 2.0 * jnp.vdot(v, matmul(gram, v))


def factor_prior(prior: Array | None, rho: Array) -> Prior:
    """Factor V₀ from the scaled prior rows (once; LAPACK only for an ill-conditioned or a p ≥ d prior)."""
    one = jnp.ones((), rho.dtype)
    if prior is None or prior.shape[0] == 0:
        return Prior("none", rho, None, None, one)
    if prior.shape[0] < prior.shape[1]:
        p = prior.shape[0]
        gram = matmul(prior, prior.T) + rho * rho * jnp.eye(p, dtype=prior.dtype)
        tri = jax.lax.cond(
            gram_is_safe(gram, rho),
            lambda: cholesky(gram),
            lambda: triangular(stacked_qr_factor(jnp.linalg.qr(prior.T, mode="r"), rho)),
        )
        return Prior("low", rho, prior, tri, jnp.sqrt(largest_eigenvalue(gram)) / rho)
    return Prior("full", rho, None, triangular(stacked_qr_factor(prior, rho)), one)


def whiten(prior: Prior, rows: Float[Array, "k d"], products: Array | None = None) -> Float[Array, "k w"]:
    """ω of each row: ‖ω‖² = ρ²xᵀV₀⁻¹x as a sum of squares (never a difference of large terms);
    `products`: rows·Pᵀ when already known ("low")."""
    if prior.kind == "none":
        return rows
    if prior.kind == "low":
        products = prior_products(prior, rows) if products is None else products
        z = solve(prior.tri, solve_t(prior.tri, products))  # z = G⁻¹Px
        return jnp.concatenate([rows - matmul(z, prior.rows), prior.rho * z], axis=-1)
    return prior.rho * solve_t(prior.tri, rows)


def prior_products(prior: Prior, rows: Float[Array, "k d"]) -> Float[Array, "k p"]:
    """rows·Pᵀ ("low")."""
    return matmul(rows, prior.rows.T)  # contracted as stored (a transposed copy is slower on CPU)


def whiten_adjoint(prior: Prior, vector: Float[Array, " w"]) -> Float[Array, " d"]:
    """ωᵀv: the u with xᵀu = ω(x)ᵀv for every x."""
    if prior.kind == "none":
        return vector
    if prior.kind == "low":
        d = prior.rows.shape[1]
        top, bottom = vector[:d], vector[d:]
        inner = prior.rho * bottom - matmul(prior.rows, top)
        return top + matmul(solve(prior.tri, solve_t(prior.tri, inner[None]))[0], prior.rows)
    return prior.rho * solve(prior.tri, vector[None])[0]


def whitened_width(prior: Prior, dim: int) -> int:
    return dim + prior.rows.shape[0] if prior.kind == "low" else dim


def prior_energy(prior: Prior, rows: Array, products: Array | None) -> Array:
    """ρ²xᵀV₀⁻¹x per row as a difference ‖x‖² − ‖U⁻ᵀPx‖² ("low", `products` = rows·Pᵀ), or from
    ω ("full"): the coordinate score's first term."""
    norms = jnp.sum(rows * rows, axis=-1)
    if prior.kind == "none":
        return norms
    if prior.kind == "low":
        return norms - jnp.sum(solve_t(prior.tri, products) ** 2, axis=-1)
    return jnp.sum(whiten(prior, rows) ** 2, axis=-1)


# ---------------------------------------------------------------------------------------------
# The whitened picks: Householder reflectors (compact WY), their explicit basis, the span factor


class Picks(NamedTuple):
    """Q = I − VᵀSV (V: reflector rows, zero until used; K = min(B, w) of them) holds the span of
    the whitened picks, with R their coordinates in it (Yᵀ = Q[R; 0]) and TᵀT = ρ²I + RRᵀ.
    `basis` holds q_j = Qe_j: c_j = q_jᵀω(x) (see `coordinates`)."""

    reflectors: Float[Array, "K w"]
    wy: Float[Array, "K K"]
    tri: Triangular
    basis: Float[Array, "K w"]


def no_picks(width: int, batch: int, rho: Array, dtype) -> Picks:
    k = min(batch, width)
    eye = jnp.eye(k, dtype=dtype)
    zeros = jnp.zeros((k, width), dtype)
    return Picks(zeros, jnp.zeros((k, k), dtype), Triangular(rho * eye, eye / rho), zeros)


def rotate(picks: Picks, rows: Float[Array, "k w"], count: Array) -> Float[Array, "k w"]:
    """Qᵀω for each row, reading only the slabs of V that hold any of the first `count`
    reflectors (the rest are zero, as are their rows and columns of S)."""
    v, k = picks.reflectors, picks.reflectors.shape[0]
    starts = range(0, k, SLAB)
    products = matmul(jnp.concatenate([_slab_products(rows, v[j : j + SLAB], count - j) for j in starts], axis=1), picks.wy)
    back = [_slab_products(products[:, j : j + SLAB], v[j : j + SLAB].T, count - j) for j in starts]
    return rows - functools.reduce(jnp.add, back)


def unrotate(picks: Picks, vector: Float[Array, " w"]) -> Float[Array, " w"]:
    """Q x."""
    v = picks.reflectors
    return vector - matmul(matmul(picks.wy, matmul(v, vector)), v)


def span(picks: Picks, count: Array) -> Array:
    """Which of the `width` rotated coordinates lie in the span of the first `count` picks."""
    return jnp.arange(picks.reflectors.shape[1]) < jnp.minimum(count, picks.wy.shape[0])


def span_part(picks: Picks, rho: Array, coords: Float[Array, "k K"], count: Array) -> Float[Array, " k"]:
    """‖ρT⁻ᵀc‖² of each row of in-span coordinates c (zero past the first `count`), from the
    leading slabs of T and M that hold those picks: T = diag(T₁₁, ρI) and M = diag(M₁₁, M₂₂)
    exactly (`rank_one_update` never rotates their rest), so the rest only adds zeros."""
    k = coords.shape[1]
    sizes = sorted({min(size, k) for size in range(SLAB, k + SLAB, SLAB)})

    def part(size: int) -> Array:
        tri = Triangular(picks.tri.factor[:size, :size], picks.tri.inverse[:size, :size])
        whitened = rho * solve_t(tri, coords[:, :size])
        return jnp.sum(whitened * whitened, axis=-1)

    slabs = jnp.clip((count + SLAB - 1) // SLAB, 1, len(sizes))
    return jax.lax.switch(slabs - 1, [functools.partial(part, size) for size in sizes])


def split_scores(picks: Picks, rho: Array, count: Array, rotated: Float[Array, "k w"]) -> Float[Array, " k"]:
    """ŝ = ρ²ωᵀ(ρ²I + YᵀY)⁻¹ω for rotated rows w = Qᵀω: ‖w off the span‖² + ‖ρT⁻ᵀc‖², c = w in it."""
    in_span = span(picks, count)
    k = picks.wy.shape[0]
    residual = jnp.sum(jnp.where(in_span, 0.0, rotated * rotated), axis=-1)
    return residual + span_part(picks, rho, jnp.where(in_span[:k], rotated[:, :k], 0.0), count)


def coordinate_scores(prior: Prior, picks: Picks, rho: Array, count: Array, energy: Array, rows: Float[Array, "k d"]) -> Float[Array, " k"]:
    """ŝ⁰ − ‖c‖² + ‖ρT⁻ᵀc‖² of scaled rows from their coordinates c_j = q_jᵀω(x), j < count, and
    ŝ⁰ = ‖ω‖² (`energy`): a difference, used with its error bound. For p < d without forming ω:
    q_j lies in the span of the whitened picks, on which P·top = ρ·bottom, so whiten_adjoint(q_j)
    is its top part up to the whitening's rounding (measured ≤ 5 ulps of ‖x‖ per coordinate)."""
    x = whiten(prior, rows) if prior.kind == "full" else rows
    x = jnp.pad(x, ((0, 0), (0, picks.basis.shape[1] - x.shape[1])))  # zeros against q_j's bottom: no copy of a slice of it
    c = jnp.concatenate([_slab_products(x, picks.basis[j : j + SLAB], count - j) for j in range(0, picks.basis.shape[0], SLAB)], axis=1)
    c = jnp.where(jnp.arange(c.shape[1]) < count, c, 0.0)
    return energy - jnp.sum(c * c, axis=-1) + span_part(picks, rho, c, count)


def _slab_products(x: Array, slab: Float[Array, "s w"], used: Array) -> Float[Array, "k s"]:
    """x·slabᵀ when the slab holds any of the `used` basis vectors, else zeros (skipped)."""
    return jax.lax.cond(used > 0, lambda: matmul(x, slab.T), lambda: jnp.zeros((x.shape[0], slab.shape[0]), x.dtype))


def update_direction(picks: Picks, rho: Array, count: Array, rotated: Array, score: Array) -> Array:
    """ζ = ρ²(ρ²I + YᵀY)⁻¹y / √(ρ² + ŝ(y)) for the new pick y (rotated: Qᵀy), so that Eq. (4)
    lowers every ŝ(ω) by exactly (ωᵀζ)² (Sherman–Morrison)."""
    in_span = span(picks, count)
    k = picks.wy.shape[0]
    coords = jnp.where(in_span[:k], rotated[:k], 0.0)
    inner = rho * rho * solve(picks.tri, solve_t(picks.tri, coords[None]))[0]  # ρ²T⁻¹T⁻ᵀc
    padded = jnp.zeros_like(rotated).at[:k].set(inner)
    norm = jnp.hypot(rho, jnp.sqrt(jnp.maximum(score, 0.0)))
    direction = unrotate(picks, jnp.where(in_span, padded, rotated))
    return jnp.where(norm > 0, direction / norm, 0.0)


def add_pick(picks: Picks, count: Array, rotated: Array) -> Picks:
    """Fold pick number `count` (rotated: Qᵀy) in: one more Householder reflector while fewer than
    K exist (compact WY update) with its basis vector q = Qe_count, then its coordinates r into T
    (TᵀT += rrᵀ; Eq. 4)."""
    k, width = picks.reflectors.shape
    grows = count < k
    j = jnp.minimum(count, k - 1)
    tail = jnp.where(jnp.arange(width) >= j, rotated, 0.0)
    alpha = jnp.where(rotated[j] < 0, 1.0, -1.0) * jnp.linalg.norm(tail)  # −sign(x_j)‖x‖
    v = tail.at[j].add(-alpha)
    vv = jnp.sum(v * v)
    tau = jnp.where(grows & (vv > 0), 2.0 / jnp.where(vv > 0, vv, 1.0), 0.0)
    wy_column = (-tau * matmul(picks.wy, matmul(picks.reflectors, v))).at[j].set(tau)
    coords = jnp.where(grows, jnp.where(jnp.arange(k) < j, rotated[:k], 0.0).at[j].set(alpha), rotated[:k])
    grown = picks._replace(
        reflectors=picks.reflectors.at[j].set(jnp.where(grows, v, picks.reflectors[j])),  # in place: no copy of V
        wy=picks.wy.at[:, j].set(jnp.where(grows, wy_column, picks.wy[:, j])),
    )
    q = unrotate(grown, jnp.zeros((width,), rotated.dtype).at[j].set(1.0))
    return grown._replace(
        tri=rank_one_update(picks.tri, coords, jnp.where(grows, j + 1, k)),  # T is ρI past the picks so far
        basis=picks.basis.at[j].set(jnp.where(grows, q, picks.basis[j])),
    )
