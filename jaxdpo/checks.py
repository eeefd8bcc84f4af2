"""Input validation shared by the public API: clear `ValueError`s that name the problem.

Shape and dtype checks work on tracers too, so they still apply under `jax.jit`. Value checks
(NaN/inf, ranges of data) need concrete arrays and are skipped for tracers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpo.sharding import to_host


def is_concrete(x) -> bool:
    """True when `x` holds actual values (not a tracer inside `jit`/`vmap`/`grad`)."""
    return not isinstance(x, jax.core.Tracer)


def require(condition: bool, message: str) -> None:
    """Raise `ValueError(message)` unless `condition` holds."""
    if not condition:
        raise ValueError(message)


def check_ndim(name: str, x, ndim: int, dims: str | None = None) -> None:
    """`x` must have `ndim` dimensions; `dims` names them for the message, e.g. "[n, d]"."""
    shape = tuple(np.shape(x))
    expected = f" {dims}" if dims else ""
    require(len(shape) == ndim, f"{name} must be {ndim}-D{expected}, got shape {shape}")


def check_shape(name: str, x, shape: Sequence[int | None]) -> None:
    """`x` must have `shape`, where `None` matches any size along that axis."""
    actual = tuple(np.shape(x))
    ok = len(actual) == len(shape) and all(s is None or s == a for s, a in zip(shape, actual))
    wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    require(ok, f"{name} must have shape {wanted}, got {actual}")


def check_floating(name: str, x) -> None:
    require(
        jnp.issubdtype(jnp.result_type(x), jnp.floating),
        f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}",
    )


def check_integer(name: str, x) -> None:
    require(
        jnp.issubdtype(jnp.result_type(x), jnp.integer),
        f"{name} must be an integer array, got dtype {jnp.result_type(x)}",
    )


def check_finite(name: str, x) -> None:
    """No NaN or inf in `x` (skipped under tracing, where values are unknown)."""
    if not is_concrete(x):
        return
    values = to_host(x)
    if not np.issubdtype(values.dtype, np.floating) and values.dtype.name != "bfloat16":
        return
    bad = ~np.isfinite(values.astype(np.float32))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        kind = "NaN" if np.isnan(values.astype(np.float32)[where]) else "inf"
        raise ValueError(f"{name} contains {int(bad.sum())} non-finite values ({kind} at index {where})")


def check_index_range(name: str, x, size: int, of: str) -> None:
    """Every entry of integer array `x` must index an axis of length `size` (named `of`)."""
    if not is_concrete(x) or np.size(x) == 0:
        return
    values = to_host(x)
    lo, hi = int(values.min()), int(values.max())
    require(lo >= 0 and hi < size, f"{name} must index {of} (0..{size - 1}), got values in [{lo}, {hi}]")


def free_device_bytes(device=None) -> int | None:
    """Free memory of `device` (default: the first device) in bytes, or None if it cannot tell.
    For the host CPU: the available physical memory."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def check_fits_device(name: str, x) -> None:
    """A host (NumPy) array about to be copied to the default device must fit in its free memory."""
    if not isinstance(x, np.ndarray):
        return
    free = free_device_bytes()
    require(
        free is None or x.nbytes <= free,
        f"{name} needs {x.nbytes / 2**30:.2f} GiB ({x.nbytes} bytes) on {jax.devices()[0]}, but only "
        f"{(free or 0) / 2**30:.2f} GiB are free; pass fewer candidates, a smaller d, or bfloat16 features",
    )
