"""SHARP and W-SHARP (Belakaria et al., "Sharpe Ratio-Guided Active Learning for Preference
Optimization in RLHF", arXiv 2503.22137): a candidate's score is the Sharpe ratio, mean over
standard deviation, of the size of the DPO gradient step its label would cause, over the two
labels it may get.

For a candidate (x, y_a, y_b) with implicit-reward margin m = r(x, y_a) − r(x, y_b), the gradient
of the DPO loss (Eq. 2) is −σ(−m)·g under the label y_a ≻ y_b and +σ(m)·g under y_b ≻ y_a, with
g = β ∇_θ[log π_θ(y_a|x) − log π_θ(y_b|x)]: one direction, norms σ(−m)‖g‖ and σ(m)‖g‖.

- SHARP weighs the two labels equally: mean ‖g‖/2, standard deviation |σ(m) − σ(−m)|·‖g‖/2 =
  |tanh(m/2)|·‖g‖/2, ratio 1/|tanh(m/2)|.
- W-SHARP weighs them by the policy's own preference probabilities σ(m) and σ(−m): mean
  2σ(m)σ(−m)·‖g‖, standard deviation √(σ(m)σ(−m))·|tanh(m/2)|·‖g‖, ratio 1/|sinh(m/2)|.

‖g‖ cancels from both ratios: they are functions of the margin alone, so no per-response gradient
(normalized or not) enters them and `margins` is the only pool field they read. Both decrease
strictly in |m|, so both rank candidates as `select_uncertainty` does (smallest |margin| first)
and pick the same batch as it and as each other; the candidates are ranked by |m| itself, which is
the ratios' order without their float32 saturation (1/|tanh| rounds to 1 beyond |m| ≈ 17). m = 0
scores +inf: in the first round, where the adapter is the reference model, every margin is 0 and
the picks are the lowest indices. The authors' code normalizes both norms by the first label's and
writes the ratios through σ(r_b − r_a); `tests/selection/test_sharpe.py` reproduces it step by step.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from jaxdpo.selection.api import SelectionResult, check_batch
from jaxdpo.selection.baselines import as_vector, top_batch


def sharpe_ratio(margins: Float[ArrayLike, " n"], *, weighted: bool = False) -> Float[Array, " n"]:
    """SHARP's 1/|tanh(m/2)| of every margin m, or W-SHARP's 1/|sinh(m/2)| (`weighted`); +inf at m = 0."""
    half = as_vector("margins", margins) / 2
    return 1.0 / jnp.abs(jnp.sinh(half) if weighted else jnp.tanh(half))


def select_sharpe(margins: Float[ArrayLike, " n"], batch_size: int, *, weighted: bool = False, mask=None) -> SelectionResult:
    """The B eligible candidates of highest Sharpe ratio (smallest |margin|; ties to the lowest
    index), in pick order; scores are the ratios (`sharpe_ratio`)."""
    margins = as_vector("margins", margins)
    mask = check_batch(batch_size, margins.shape[0], mask)
    return top_batch(-jnp.abs(margins), sharpe_ratio(margins, weighted=weighted), mask, batch_size)


def sharp_rule(pool, batch_size, key):
    """The registry's "sharp": `select_sharpe` on the pool's margins."""
    return select_sharpe(pool.margins, batch_size, mask=pool.mask)


def w_sharp_rule(pool, batch_size, key):
    """The registry's "w_sharp": `select_sharpe(weighted=True)` on the pool's margins."""
    return select_sharpe(pool.margins, batch_size, weighted=True, mask=pool.mask)
