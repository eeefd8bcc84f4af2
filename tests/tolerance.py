"""Tolerances from the scale of what is compared, so a test that passes here passes on any CPU.

Two float32 computations of the same quantity (another summation order, another CPU's vector
width, a chunked vs a whole-batch call) differ by a few roundings of the *largest terms they sum*,
not of each result element: an element that is a small difference of large terms carries an
absolute error of the size of those terms. So an element-wise relative tolerance (rtol) is the
wrong test for such results, and a fixed absolute one (atol=1e-6) is right only for one scale.

`assert_close` compares against `ulps` float32 roundings of the array's own scale (its largest
|expected| entry, or `scale` when the caller knows a better one): |actual − expected| ≤
ulps · ε₃₂ · scale, element by element. `ulps` says how many roundings the computation may
accumulate; the callers state it with the reason.
"""

from __future__ import annotations

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


def assert_close(actual, expected, *, ulps: float, scale: float | None = None, err_msg: str = "") -> None:
    """|actual − expected| ≤ ulps · ε₃₂ · scale for every element; `scale` defaults to max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    tolerance = ulps * F32_EPS * max(scale, np.finfo(np.float32).tiny)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance, err_msg=f"{err_msg} (scale {scale:.3g}, {ulps} float32 ulps)")


def assert_trees_close(actual, expected, *, ulps: float) -> None:
    """`assert_close` leaf by leaf, each leaf at its own scale (gradients of different parameters
    differ in size by orders of magnitude)."""
    import jax

    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, want), got in zip(paths, jax.tree.leaves(actual), strict=True):
        assert_close(got, want, ulps=ulps, err_msg=jax.tree_util.keystr(path))
