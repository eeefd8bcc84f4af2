"""Selection throughput, side by side in one run; prints one JSON object per (config, method).

Methods, all jitted JAX on the same device and the same features:
- `select_batch`: jaxdpo's exact greedy, once per `--strategy` ("full": one pass over Φ per pick;
  "lazy": exact re-scoring of the candidates whose stale bound can still win) and `--dtype` of
  the stored features (bfloat16/float16: half the bytes, float32 accumulation).
- `pass`: ONE pass over Φ (φ_iᵀx for every candidate) — the unit of the lazy target.
- `floor`: B dependent passes (argmax, gather the row, one pass) — the memory-bandwidth floor of
  any method that looks at every candidate after every pick.
- `textbook`: keeps V⁻¹ (d×d) and re-scores all n candidates at every pick, O(n·d²) per pick.
- `reinvert`: re-inverts V at every pick, O(d³ + n·d²) per pick.
(`textbook` and `reinvert` need dense float32 φ.)

Features (`--features`): `gradient` (decaying spectrum, log-normal row norms, like projected
gradient differences), `unit` (the same rows normalized to unit norm, as the paper normalizes
gradients), `heavy` (Student-t entries, df 2.5, and Pareto row norms), or a `FILE.npy` of real
gradient features. With `--pairs`, the rows are per-response features g of prompts with m = 8
responses each and the candidates are their C(8, 2) = 28 pairs, φ = g[a] − g[b] (never
materialized); `--n` counts candidates.

Slow methods on big configs are timed over fewer picks and extrapolated to B (`timed_picks` <
`picks` says so). Peak memory is XLA's buffer assignment of the compiled program. `agree` counts
the positions whose pick equals the first select_batch row of the config (float32 storage first).
`rescored` and `passes` say what the greedy did: candidates re-scored exactly, and passes over Φ
after the initial one.

    python benchmarks/selection.py                                    # the issue's grid, B = 50
    python benchmarks/selection.py --n 300000 --d 2048 --methods select_batch pass floor
    python benchmarks/selection.py --pairs --n 1000000 --d 2048 --strategy lazy --methods select_batch pass
    python benchmarks/selection.py --features runs/g.npy --pairs --dtype float32 bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpo import checks
from jaxdpo.experiment.pool import triplets
from jaxdpo.selection._greedy import _Candidates, _greedy

HIGHEST = jax.lax.Precision.HIGHEST
RESPONSES_PER_PROMPT = 8
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@partial(jax.jit, static_argnames="picks")
def textbook(phi, pairs, reg, picks: int):
    """Keeps V⁻¹ and re-scores every candidate with it at every pick."""
    n, d = phi.shape

    def body(b, state):
        v_inv, eligible, indices = state
        scores = jnp.sum(jnp.matmul(phi, v_inv, precision=HIGHEST) * phi, axis=1)
        i = jnp.argmax(jnp.where(eligible, scores, -jnp.inf))
        x = jnp.matmul(v_inv, phi[i], precision=HIGHEST)
        v_inv = v_inv - jnp.outer(x, x) / (1.0 + phi[i] @ x)
        return v_inv, eligible.at[i].set(False), indices.at[b].set(i)

    state = (jnp.eye(d, dtype=phi.dtype) / reg, jnp.ones(n, bool), jnp.zeros(picks, jnp.int32))
    return jax.lax.fori_loop(0, picks, body, state)[2]


@partial(jax.jit, static_argnames="picks")
def reinvert(phi, pairs, reg, picks: int):
    """Builds V explicitly and inverts it before every pick."""
    n, d = phi.shape

    def body(b, state):
        v, eligible, indices = state
        scores = jnp.sum(jnp.matmul(phi, jnp.linalg.inv(v), precision=HIGHEST) * phi, axis=1)
        i = jnp.argmax(jnp.where(eligible, scores, -jnp.inf))
        return v + jnp.outer(phi[i], phi[i]), eligible.at[i].set(False), indices.at[b].set(i)

    state = (reg * jnp.eye(d, dtype=phi.dtype), jnp.ones(n, bool), jnp.zeros(picks, jnp.int32))
    return jax.lax.fori_loop(0, picks, body, state)[2]


def _candidates(features, pairs) -> _Candidates:
    return _Candidates(features, pairs, jnp.promote_types(features.dtype, jnp.float32))


@partial(jax.jit, static_argnames="picks")
def floor(features, pairs, reg, picks: int):
    """B dependent passes: the next vector is the row at the argmax of the previous pass."""
    candidates = _candidates(features, pairs)

    def body(b, state):
        scores, row, indices = state
        scores = scores - candidates.dot(row) ** 2
        i = jnp.argmax(scores)
        return scores, candidates.rows(i[None])[0], indices.at[b].set(i)

    start = candidates.rows(jnp.zeros((1,), jnp.int32))[0]
    state = (jnp.zeros(candidates.count, start.dtype), start, jnp.zeros(picks, jnp.int32))
    return jax.lax.fori_loop(0, picks, body, state)[2]


@jax.jit
def one_pass(features, pairs, reg):
    """φ_iᵀx for every candidate, once."""
    candidates = _candidates(features, pairs)
    return candidates.dot(jnp.ones(features.shape[1], candidates.dtype))


def select(strategy: str):
    lazy = strategy == "lazy"

    def run(features, pairs, reg, picks: int):
        count = features.shape[0] if pairs is None else pairs.shape[0]
        result, stats = _greedy(features, pairs, None, jnp.ones(count, bool), reg, picks, lazy)
        return result.indices, stats

    return run


# ---------------------------------------------------------------------------------------------
# Features


def _rows(kind: str, rows: int, d: int, seed: int, dtype) -> jax.Array:
    """Synthetic feature rows (see the module docstring), drawn with NumPy in blocks of rows (JAX's
    Student-t sampler takes ~20x longer on CPU) and stored on the device in `dtype`."""
    rng = np.random.default_rng(seed)
    spectrum = ((1.0 + np.arange(d)) ** -0.5).astype(np.float32)
    out = np.empty((rows, d), np.float32)
    block = max(1, 2**22 // d)
    for start in range(0, rows, block):
        size = min(block, rows - start)
        if kind == "heavy":
            phi = rng.standard_t(2.5, (size, d)) * spectrum * rng.pareto(1.5, (size, 1))
        else:
            phi = rng.standard_normal((size, d)) * spectrum * np.exp(0.3 * rng.standard_normal((size, 1)))
            if kind == "unit":
                phi /= np.linalg.norm(phi, axis=1, keepdims=True)
        out[start : start + size] = phi
    return jnp.asarray(out, dtype)


def _require_fits(what: str, nbytes: int) -> None:
    free = checks.free_device_bytes()
    if free is not None and nbytes > free:
        raise SystemExit(
            f"{what} needs {nbytes / 2**30:.2f} GiB ({nbytes} bytes) on {jax.devices()[0]}, "
            f"but only {free / 2**30:.2f} GiB are free; use a smaller --n or --d, or --dtype bfloat16"
        )


def make_features(kind: str, n: int, d: int, pairs_mode: bool, dtype) -> tuple[jax.Array, jax.Array | None, int, int]:
    """(features, pairs or None, n, d) on the default device, in `dtype`."""
    pairs = None
    if kind.endswith(".npy"):
        host = np.load(kind, mmap_mode="r")
        rows, d = host.shape
        if pairs_mode:
            prompts = rows // RESPONSES_PER_PROMPT
            pairs = triplets(prompts, RESPONSES_PER_PROMPT)[:n]
        else:
            host = host[:n]
        _require_fits(f"{kind} ({host.shape[0]}×{d} in {np.dtype(dtype).name})", host.shape[0] * d * np.dtype(dtype).itemsize)
        features = jnp.asarray(np.asarray(host, np.float32)).astype(dtype)
    else:
        rows = n
        if pairs_mode:
            prompts = math.ceil(n / math.comb(RESPONSES_PER_PROMPT, 2))
            rows, pairs = prompts * RESPONSES_PER_PROMPT, triplets(prompts, RESPONSES_PER_PROMPT)[:n]
        _require_fits(f"{rows}×{d} {kind} features (made in float32)", 2 * rows * d * 4)
        features = _rows(kind, rows, d, seed=rows + d, dtype=dtype)
    count = features.shape[0] if pairs is None else pairs.shape[0]
    return features, None if pairs is None else jnp.asarray(pairs), count, d


# ---------------------------------------------------------------------------------------------
# Timing


def peak_bytes(fn, features, pairs, reg, picks: int) -> int:
    compiled = jax.jit(fn, static_argnums=3).lower(features, pairs, reg, picks).compile()
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def timed(fn, repeats: int):
    """(median seconds over `repeats` calls after a warm-up, the last output)."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def run_config(args, n: int, d: int) -> list[dict]:
    reg, batch = jnp.float32(args.reg), args.batch
    base = {"n": n, "d": d, "batch": batch, "features": Path(args.features).name, "pairs": args.pairs}
    rows, reference, by = [], None, {}
    for dtype_name in args.dtype:
        features, pairs, n, d = make_features(args.features, n, d, args.pairs, DTYPES[dtype_name])
        base.update(n=n, d=d)
        for method in args.methods:
            if method in ("textbook", "reinvert") and (pairs is not None or dtype_name != "float32"):
                continue
            for strategy in args.strategy if method == "select_batch" else [None]:
                fn = {"select_batch": select(strategy or "full"), "floor": floor, "textbook": textbook, "reinvert": reinvert}.get(method)
                picks, stats = batch, None
                if method == "pass":
                    seconds, _ = timed(lambda: one_pass(features, pairs, reg), args.repeats)
                    indices = None
                else:
                    if method in ("textbook", "reinvert"):  # time one pick first; extrapolate if B would take too long
                        one, _ = timed(lambda: fn(features, pairs, reg, 1), 1)
                        picks = int(max(1, min(batch, args.budget_s // max(one, 1e-9))))
                    seconds, out = timed(lambda: fn(features, pairs, reg, picks), args.repeats if picks == batch else 1)
                    seconds *= batch / picks
                    indices, stats = out if method == "select_batch" else (out, None)
                    indices = np.asarray(indices)
                label = method if strategy is None else f"{method}:{strategy}:{dtype_name}"
                row = {**base, "method": method, "strategy": strategy, "dtype": dtype_name, "ms": round(seconds * 1e3, 3)}
                row["candidates_per_s"] = round(n * batch / seconds, 1)
                if method != "pass":
                    row.update(peak_bytes=peak_bytes(fn, features, pairs, reg, picks), timed_picks=picks, picks=batch)
                if stats is not None:
                    row.update(rescored=int(stats.rescored), passes=int(stats.passes))
                if method == "select_batch" and reference is None:
                    reference = indices
                if reference is not None and indices is not None and method != "floor":
                    row["agree"] = int(np.sum(indices[:picks] == reference[:picks]))
                row["device"] = jax.devices()[0].device_kind
                by[label] = row["ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
        del features, pairs
    print(json.dumps({**base, "summary": True, **ratios(by)}), flush=True)
    return rows


def ratios(by: dict[str, float]) -> dict[str, float]:
    out = {}
    for label, ms in by.items():
        if not label.startswith("select_batch:"):
            continue
        tag = label.removeprefix("select_batch:").replace(":", "_")
        for unit in ("pass", "floor"):
            if unit in by:
                out[f"{tag}_over_{unit}"] = round(ms / by[unit], 3)
        for slow in ("textbook", "reinvert"):
            if slow in by:
                out[f"{slow}_over_{tag}"] = round(by[slow] / ms, 1)
        full = label.replace(":lazy:", ":full:")
        if ":lazy:" in label and full in by:
            out[f"{tag}_over_full"] = round(ms / by[full], 3)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[3000, 30000])
    parser.add_argument("--d", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--reg", type=float, default=1.0)
    parser.add_argument("--strategy", nargs="+", default=["full", "lazy"], choices=["full", "lazy"])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES), help="storage dtype of the features")
    parser.add_argument("--features", default="gradient", help="gradient | unit | heavy | FILE.npy")
    parser.add_argument("--pairs", action="store_true", help="candidates are the C(8,2) pairs of 8 responses per prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=20.0, help="time budget per slow method before extrapolating")
    parser.add_argument("--methods", nargs="+", default=["select_batch", "pass", "floor", "textbook", "reinvert"],
                        choices=["select_batch", "pass", "floor", "textbook", "reinvert"])
    args = parser.parse_args(argv)
    if not args.features.endswith(".npy") and args.features not in ("gradient", "unit", "heavy"):
        parser.error(f"--features must be gradient, unit, heavy or a .npy file, got {args.features!r}")
    print(f"# jax {jax.__version__} on {jax.devices()}", file=sys.stderr)
    for n in args.n:
        for d in args.d if not args.features.endswith(".npy") else [0]:
            run_config(args, n, d)


if __name__ == "__main__":
    main()
