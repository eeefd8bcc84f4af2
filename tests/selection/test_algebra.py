"""The prior's Cholesky factor in XLA's own operations against float64 NumPy: backward error at the
scale of the Gram matrix, and its inverse within the condition number's reach; the span factor's
block structure after a few picks, and its solve read by slabs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo.selection import algebra as alg
from jaxdpo.selection.algebra import CHOLESKY_BLOCK, cholesky
from tests.tolerance import F32_EPS, assert_close

factor = jax.jit(cholesky)


def _spd(n: int, condition: float, seed: int) -> np.ndarray:
    """A symmetric positive definite [n, n] matrix with eigenvalues geometric over [1, condition]."""
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))[0]
    g = (q * np.geomspace(1.0, condition, n)) @ q.T
    return (g + g.T) / 2


@pytest.mark.parametrize("n", [1, 7, CHOLESKY_BLOCK, CHOLESKY_BLOCK + 1, 100])
@pytest.mark.parametrize("condition", [1.0, 1e4])
def test_cholesky_is_backward_stable_with_an_inverse_good_to_its_condition(n, condition):
    g = _spd(n, condition, seed=n)
    tri = factor(jnp.asarray(g, jnp.float32))
    u, m = np.asarray(tri.factor, np.float64), np.asarray(tri.inverse, np.float64)
    assert np.all(np.tril(u, -1) == 0) and np.all(np.triu(m, 1) == 0)  # U upper, M = U⁻ᵀ lower
    # the rounding of g to float32 alone is ε/2 of ‖g‖; a backward-stable factor adds a few ε
    assert np.linalg.norm(u.T @ u - g) <= 8 * F32_EPS * np.linalg.norm(g)
    reference = np.linalg.cholesky(g).T
    assert np.linalg.norm(m @ u.T - np.eye(n)) <= 64 * F32_EPS * np.sqrt(n) * np.linalg.cond(reference)


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 33, 50])
def test_span_part_reads_only_the_slabs_of_the_picks_so_far(count):
    """After `count` picks T = diag(T₁₁, ρI) and M = diag(M₁₁, ·) exactly, which is what lets
    `span_part` multiply by the leading slabs alone; its ‖ρT⁻ᵀc‖² then matches a float64 solve
    with the same T within the solve's reach (2·K·cond(T) roundings of the largest value)."""
    rng = np.random.default_rng(count)
    width, batch, rho = 64, 50, np.float32(0.3)
    picks = alg.no_picks(width, batch, jnp.float32(rho), jnp.float32)
    for b in range(count):
        picks = alg.add_pick(picks, jnp.int32(b), jnp.asarray(rng.normal(size=width), jnp.float32))
    t, m = np.asarray(picks.tri.factor, np.float64), np.asarray(picks.tri.inverse)
    assert not (t[:count, count:].any() or t[count:, :count].any() or m[:count, count:].any() or m[count:, :count].any())
    np.testing.assert_array_equal(t[count:, count:], np.float32(rho) * np.eye(batch - count))
    coords = np.zeros((5, batch), np.float32)
    coords[:, :count] = rng.normal(size=(5, count))
    got = jax.jit(alg.span_part)(picks, jnp.float32(rho), jnp.asarray(coords), jnp.int32(count))
    want = np.sum((float(rho) * np.linalg.solve(t.T, coords.T.astype(np.float64))) ** 2, axis=0)  # z: Tᵀz = c
    assert_close(got, want, ulps=2 * batch * np.linalg.cond(t))
