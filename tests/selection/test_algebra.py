"""The prior's Cholesky factor in XLA's own operations against float64 NumPy: backward error at the
scale of the Gram matrix, and its inverse within the condition number's reach."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo.selection.algebra import CHOLESKY_BLOCK, cholesky
from tests.tolerance import F32_EPS

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
