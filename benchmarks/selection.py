"""Selection throughput, side by side in one run; prints one JSON object per (config, method).

Methods, all jitted JAX on the same device and the same features:
- `select_batch`: jaxdpo's greedy (Sherman–Morrison on the scores, O(n·d) per pick).
- `textbook`: the usual Sherman–Morrison greedy that keeps V⁻¹ (d×d) and re-scores all n
  candidates against it at every pick, O(n·d²) per pick.
- `reinvert`: re-inverts V at every pick, then re-scores, O(d³ + n·d²) per pick.
- `floor`: B dependent matrix-vector passes over Φ (argmax, gather the row, one pass) — the
  memory-bandwidth floor of any method that must look at every candidate after every pick.

Slow methods on big configs are timed over fewer picks and extrapolated to B
(`timed_picks` < `picks` says so). Peak memory is XLA's buffer assignment for the compiled
program (arguments + outputs + temporaries). `agree_with_select_batch` counts positions whose pick
equals select_batch's.

    python benchmarks/selection.py                        # the issue's grid, B = 50
    python benchmarks/selection.py --n 3000 --d 2048      # one config
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpo.selection._greedy import _greedy

HIGHEST = jax.lax.Precision.HIGHEST


@partial(jax.jit, static_argnames="picks")
def textbook(phi, reg, picks: int):
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
def reinvert(phi, reg, picks: int):
    """Builds V explicitly and inverts it before every pick."""
    n, d = phi.shape

    def body(b, state):
        v, eligible, indices = state
        scores = jnp.sum(jnp.matmul(phi, jnp.linalg.inv(v), precision=HIGHEST) * phi, axis=1)
        i = jnp.argmax(jnp.where(eligible, scores, -jnp.inf))
        return v + jnp.outer(phi[i], phi[i]), eligible.at[i].set(False), indices.at[b].set(i)

    state = (reg * jnp.eye(d, dtype=phi.dtype), jnp.ones(n, bool), jnp.zeros(picks, jnp.int32))
    return jax.lax.fori_loop(0, picks, body, state)[2]


@partial(jax.jit, static_argnames="picks")
def floor(phi, reg, picks: int):
    """B dependent passes: the next vector is the row at the argmax of the previous pass."""

    def body(b, state):
        scores, row, indices = state
        scores = scores - jnp.matmul(phi, row, precision=HIGHEST) ** 2
        i = jnp.argmax(scores)
        return scores, phi[i], indices.at[b].set(i)

    state = (jnp.sum(phi * phi, axis=1) / reg, phi[0], jnp.zeros(picks, jnp.int32))
    return jax.lax.fori_loop(0, picks, body, state)[2]


def select(phi, reg, picks: int):
    return _greedy(phi, None, None, jnp.ones(phi.shape[0], bool), reg, picks).indices


METHODS = {"select_batch": select, "floor": floor, "textbook": textbook, "reinvert": reinvert}


def peak_bytes(fn, phi, reg, picks: int) -> int:
    compiled = jax.jit(fn, static_argnums=2).lower(phi, reg, picks).compile()
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def timed(fn, phi, reg, picks: int, repeats: int) -> tuple[float, np.ndarray]:
    out = fn(phi, reg, picks).block_until_ready()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(phi, reg, picks).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), np.asarray(out)


def features(n: int, d: int, seed: int) -> jax.Array:
    """Rows with a decaying spectrum and spread-out norms, like projected gradient differences:
    the greedy scores are well separated, so exact methods should agree pick for pick."""
    k_rows, k_scale = jax.random.split(jax.random.key(seed))
    spectrum = (1.0 + jnp.arange(d, dtype=jnp.float32)) ** -0.5
    phi = jax.random.normal(k_rows, (n, d), jnp.float32) * spectrum
    return phi * jnp.exp(0.3 * jax.random.normal(k_scale, (n, 1), jnp.float32))


def run_config(n: int, d: int, batch: int, budget_s: float, repeats: int, methods: list[str]) -> list[dict]:
    phi = features(n, d, seed=n + d)
    reg = jnp.float32(1.0)
    reference = None
    rows = []
    for name in methods:
        fn = METHODS[name]
        picks = batch
        if name in ("textbook", "reinvert"):  # time one pick first; extrapolate when B would take too long
            one, _ = timed(fn, phi, reg, 1, repeats=1)
            picks = int(max(1, min(batch, budget_s // max(one, 1e-9))))
        seconds, indices = timed(fn, phi, reg, picks, repeats if picks == batch else 1)
        seconds_for_batch = seconds * batch / picks
        if name == "select_batch":
            reference = indices
        row = {
            "n": n,
            "d": d,
            "batch": batch,
            "method": name,
            "ms": round(seconds_for_batch * 1e3, 3),
            "candidates_per_s": round(n * batch / seconds_for_batch, 1),
            "peak_bytes": peak_bytes(fn, phi, reg, picks),
            "timed_picks": picks,
            "picks": batch,
            "device": jax.devices()[0].device_kind,
        }
        if reference is not None and name != "floor":
            row["agree_with_select_batch"] = int(np.sum(indices[:picks] == reference[:picks]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["method"]: r["ms"] for r in rows}
    summary = {"n": n, "d": d, "batch": batch, "summary": True}
    if "select_batch" in by and "floor" in by:
        summary["select_batch_over_floor"] = round(by["select_batch"] / by["floor"], 3)
    for slow in ("textbook", "reinvert"):
        if "select_batch" in by and slow in by:
            summary[f"speedup_vs_{slow}"] = round(by[slow] / by["select_batch"], 1)
    print(json.dumps(summary), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[3000, 30000])
    parser.add_argument("--d", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=20.0, help="time budget per slow method before extrapolating")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    print(f"# jax {jax.__version__} on {jax.devices()}", file=sys.stderr)
    for n in args.n:
        for d in args.d:
            run_config(n, d, args.batch, args.budget_s, args.repeats, args.methods)


if __name__ == "__main__":
    main()
