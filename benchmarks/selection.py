"""Selection throughput, side by side in one run; prints one JSON object per (config, method) and
a summary per config with the ratios. Public API only.

Methods, all jitted JAX on the same device and the same features:
- `select_batch`: jaxdpo's exact greedy, once per `--strategy` ("auto", "full": a pass over Φ per
  pick, "lazy": re-scoring only candidates whose bound can still win) and `--dtype` of the stored
  features (bfloat16/float16: half the bytes, float32 accumulation); with `strategy`,
  `full_from`, `passes`, `rescored` and `coordinates` from `SelectionStats`.
- `pass`: ONE pass over Φ (φ_iᵀx for every candidate; pairs mode: over g, then the pairs'
  differences) — the unit of the lazy targets.
- `floor`: B dependent passes (argmax, gather the row, one pass) — the memory-bandwidth floor of
  any method that looks at every candidate after every pick (the prior, if any, not included).
- `textbook`: keeps V⁻¹ (d×d, from V₀ = λI + PᵀP) and re-scores all n candidates at every pick,
  O(n·d²) per pick; `reinvert`: re-inverts V at every pick, O(d³ + n·d²) per pick. Both read a
  dense float32 φ (pairs mode: materialized for them).

Features (`--features`): `gradient` (decaying spectrum, log-normal row norms, like projected
gradient differences), `unit` (the same rows normalized to unit norm, as the paper normalizes
gradients), `heavy` (Student-t entries, df 2.5, and Pareto row norms), `correlated` (rows in a
random 32-dimensional subspace plus 10% noise, norms log-uniform over two orders of magnitude,
like gradient features of a trained model), or a `FILE.npy` of real gradient features. `--prior
P` adds P labeled rows of the same kind. With `--pairs`, the rows are per-response features g of
prompts with `--responses` m each and the candidates are their C(m, 2) pairs, φ = g[a] − g[b];
`--n` counts candidates.

Slow methods on big configs are timed over fewer picks and extrapolated to B: their setup (V₀⁻¹,
`setup_ms`) once plus B times the cost of a pick (`pick_ms`; `timed_picks` < `picks` says so).
Without a prior the textbook starts from V₀⁻¹ = I/λ. Peak memory is XLA's buffer assignment of the compiled program. `agree` counts
positions whose pick equals the config's first select_batch row. Every row carries the machine's
load (`os.getloadavg()`); `--runs` repeats the whole grid.

    python benchmarks/selection.py --suite targets --runs 2          # issue 25's shapes, in one run
    python benchmarks/selection.py --n 3000 --d 8192 --prior 450 --methods select_batch pass floor textbook
    python benchmarks/selection.py --features correlated --n 200000 --d 1024 --methods select_batch pass
    python benchmarks/selection.py --pairs --n 1000000 --d 2048 --methods select_batch pass
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpo import checks, select_batch
from jaxdpo.experiment.stages import triplets

HIGHEST = jax.lax.Precision.HIGHEST
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
KINDS = ("gradient", "unit", "heavy", "correlated")
METHODS = ("select_batch", "pass", "floor", "textbook", "reinvert")
SUBSPACE, NOISE = 32, 0.1  # the correlated kind
TARGETS = [  # issue 25: (name, n, d, prior, pairs, responses, features, methods)
    ("paper", 3000, 8192, 0, False, 3, "gradient", ("select_batch", "pass", "floor", "textbook")),
    ("paper_prior", 3000, 8192, 450, False, 3, "gradient", ("select_batch", "pass", "floor", "textbook")),
    ("paper_pairs", 3000, 8192, 0, True, 3, "gradient", ("select_batch", "pass", "floor", "textbook")),
    ("paper_pairs_prior", 3000, 8192, 450, True, 3, "gradient", ("select_batch", "pass", "floor", "textbook")),
    ("correlated", 200_000, 1024, 0, False, 3, "correlated", ("select_batch", "pass")),
    ("pairs_1e6", 1_000_000, 2048, 0, True, 8, "gradient", ("select_batch", "pass")),
]


def _dense(features, pairs):
    return features if pairs is None else features[pairs[:, 0]] - features[pairs[:, 1]]


def _v0_inverse(phi, prior, reg):
    """V₀⁻¹: I/λ without a prior, else the inverse of λI + priorᵀprior."""
    d = phi.shape[1]
    if prior is None:
        return jnp.eye(d, dtype=phi.dtype) / reg
    return jnp.linalg.inv(reg * jnp.eye(d, dtype=phi.dtype) + jnp.matmul(prior.T, prior, precision=HIGHEST))


@jax.jit
def textbook_setup(features, pairs, prior, reg):
    """The textbook's work before its first pick."""
    phi = _dense(features, pairs)
    return phi, _v0_inverse(phi, prior, reg)


@partial(jax.jit, static_argnames="picks")
def textbook(features, pairs, prior, reg, picks: int):
    """Keeps V⁻¹ and re-scores every candidate with it at every pick."""
    phi = _dense(features, pairs)
    n, d = phi.shape

    def body(b, state):
        v_inv, eligible, indices = state
        scores = jnp.sum(jnp.matmul(phi, v_inv, precision=HIGHEST) * phi, axis=1)
        i = jnp.argmax(jnp.where(eligible, scores, -jnp.inf))
        x = jnp.matmul(v_inv, phi[i], precision=HIGHEST)
        v_inv = v_inv - jnp.outer(x, x) / (1.0 + phi[i] @ x)
        return v_inv, eligible.at[i].set(False), indices.at[b].set(i)

    state = (_v0_inverse(phi, prior, reg), jnp.ones(n, bool), jnp.zeros(picks, jnp.int32))
    return jax.lax.fori_loop(0, picks, body, state)[2]


@partial(jax.jit, static_argnames="picks")
def reinvert(features, pairs, prior, reg, picks: int):
    """Builds V explicitly and inverts it before every pick."""
    phi = _dense(features, pairs)
    n, d = phi.shape
    v0 = reg * jnp.eye(d, dtype=phi.dtype) + (0.0 if prior is None else jnp.matmul(prior.T, prior, precision=HIGHEST))

    def body(b, state):
        v, eligible, indices = state
        scores = jnp.sum(jnp.matmul(phi, jnp.linalg.inv(v), precision=HIGHEST) * phi, axis=1)
        i = jnp.argmax(jnp.where(eligible, scores, -jnp.inf))
        return v + jnp.outer(phi[i], phi[i]), eligible.at[i].set(False), indices.at[b].set(i)

    return jax.lax.fori_loop(0, picks, body, (v0, jnp.ones(n, bool), jnp.zeros(picks, jnp.int32)))[2]


def _products(features, pairs, x):
    """φ_iᵀx for every candidate: one pass over the stored rows (pairs: then differences)."""
    stored = jnp.sum(features.astype(x.dtype) * x, axis=1)
    return stored if pairs is None else stored[pairs[:, 0]] - stored[pairs[:, 1]]


def _row(features, pairs, i, dtype):
    return features[i].astype(dtype) if pairs is None else features[pairs[i, 0]].astype(dtype) - features[pairs[i, 1]].astype(dtype)


@partial(jax.jit, static_argnames="picks")
def floor(features, pairs, prior, reg, picks: int):
    """B dependent passes: the next vector is the row at the argmax of the previous pass."""
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    count = features.shape[0] if pairs is None else pairs.shape[0]

    def body(b, state):
        scores, row, indices = state
        scores = scores - _products(features, pairs, row) ** 2
        i = jnp.argmax(scores)
        return scores, _row(features, pairs, i, dtype), indices.at[b].set(i)

    state = (jnp.zeros(count, dtype), _row(features, pairs, 0, dtype), jnp.zeros(picks, jnp.int32))
    return jax.lax.fori_loop(0, picks, body, state)[2]


@jax.jit
def one_pass(features, pairs, prior, reg):
    return _products(features, pairs, jnp.ones(features.shape[1], jnp.promote_types(features.dtype, jnp.float32)))


def greedy(strategy: str):
    def run(features, pairs, prior, reg, picks: int):
        result, stats = select_batch(features, picks, reg=reg, prior=prior, pairs=pairs, strategy=strategy, with_stats=True)
        return result.indices, stats

    return run


# ---------------------------------------------------------------------------------------------
# Features


def _rows(kind: str, rows: int, d: int, seed: int) -> np.ndarray:
    """Synthetic float32 feature rows (see the module docstring), drawn with NumPy in blocks of rows
    (JAX's Student-t sampler takes ~20x longer on CPU)."""
    rng = np.random.default_rng(seed)
    spectrum = ((1.0 + np.arange(d)) ** -0.5).astype(np.float32)
    basis = np.linalg.qr(np.random.default_rng(d).standard_normal((d, SUBSPACE)))[0].T.astype(np.float32)
    out = np.empty((rows, d), np.float32)
    block = max(1, 2**22 // d)
    for start in range(0, rows, block):
        size = min(block, rows - start)
        if kind == "heavy":
            phi = rng.standard_t(2.5, (size, d)) * spectrum * rng.pareto(1.5, (size, 1))
        elif kind == "correlated":
            phi = rng.standard_normal((size, SUBSPACE)) @ basis / math.sqrt(SUBSPACE) + NOISE * rng.standard_normal((size, d)) / math.sqrt(d)
            phi *= np.exp(rng.uniform(np.log(0.1), np.log(10.0), (size, 1))) / np.linalg.norm(phi, axis=1, keepdims=True)
        else:
            phi = rng.standard_normal((size, d)) * spectrum * np.exp(0.3 * rng.standard_normal((size, 1)))
            if kind == "unit":
                phi /= np.linalg.norm(phi, axis=1, keepdims=True)
        out[start : start + size] = phi
    return out


def _require_fits(what: str, nbytes: int) -> None:
    free = checks.free_device_bytes()
    if free is not None and nbytes > free:
        raise SystemExit(
            f"{what} needs {nbytes / 2**30:.2f} GiB ({nbytes} bytes) on {jax.devices()[0]}, "
            f"but only {free / 2**30:.2f} GiB are free; use a smaller --n or --d, or --dtype bfloat16"
        )


def make_features(kind: str, n: int, d: int, prior: int, pairs_mode: bool, responses: int, dtype):
    """(features, pairs or None, prior or None, n, d) on the default device."""
    pairs = None
    if kind.endswith(".npy"):
        host = np.load(kind, mmap_mode="r")
        rows, d = host.shape
        if pairs_mode:
            pairs = triplets(rows // responses, responses)[:n]
        else:
            host = host[:n]
        _require_fits(f"{kind} ({host.shape[0]}×{d} in {np.dtype(dtype).name})", host.shape[0] * d * np.dtype(dtype).itemsize)
        features, labeled = jnp.asarray(np.asarray(host, np.float32)).astype(dtype), None
        checks.require(prior == 0, "--prior needs synthetic features")
    else:
        rows = n
        if pairs_mode:
            prompts = math.ceil(n / math.comb(responses, 2))
            rows, pairs = prompts * responses, triplets(prompts, responses)[:n]
        _require_fits(f"{rows}×{d} {kind} features (made in float32)", 2 * rows * d * 4)
        features = jnp.asarray(_rows(kind, rows, d, seed=rows + d), dtype)
        labeled = None
        if prior:  # φ of labeled triplets: rows of the same kind, or differences of two in pairs mode
            drawn = _rows(kind, 2 * prior if pairs_mode else prior, d, seed=7)
            labeled = jnp.asarray(drawn[0::2] - drawn[1::2] if pairs_mode else drawn)
    count = features.shape[0] if pairs is None else len(pairs)
    return features, None if pairs is None else jnp.asarray(pairs), labeled, count, d


# ---------------------------------------------------------------------------------------------
# Timing


def peak_bytes(fn, features, pairs, prior, reg, picks: int) -> int:
    compiled = jax.jit(fn, static_argnums=4).lower(features, pairs, prior, reg, picks).compile()
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def pick_cost(fn, setup, features, pairs, prior, reg) -> tuple[float, float]:
    """(seconds per pick, seconds of the setup before the first pick) of a slow method, from its
    `setup` program (None: nothing worth timing) and one call with a single pick."""
    one = partial(fn, features, pairs, prior, reg, 1)
    jax.block_until_ready(one())
    before = 0.0
    if setup is not None:
        jax.block_until_ready(setup(features, pairs, prior, reg))
        before = timed(lambda: setup(features, pairs, prior, reg))[0]
    return max(timed(one)[0] - before, 0.0), before


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - wall, time.process_time() - cpu


def run_config(args, name: str, n: int, d: int, prior: int, pairs_mode: bool, responses: int, kind: str, methods) -> None:
    """Every method of one config, compiled first, then timed in turns (method after method,
    `--repeats` rounds) so that all see the same load; ratios are medians of per-round ratios, of
    wall time and of this process's CPU time (less sensitive to other processes on the machine)."""
    reg, batch = jnp.float32(args.reg), args.batch
    base = {"config": name, "n": n, "d": d, "batch": batch, "prior": prior, "features": Path(kind).name,
            "pairs": pairs_mode, "responses": responses if pairs_mode else None}
    rows, calls, reference = {}, {}, None
    for dtype_name in args.dtype:
        features, pairs, labeled, n, d = make_features(kind, n, d, prior, pairs_mode, responses, DTYPES[dtype_name])
        base.update(n=n, d=d)
        for method in methods:
            if method in ("textbook", "reinvert") and dtype_name != "float32":
                continue
            for strategy in args.strategy if method == "select_batch" else [None]:
                label = method if strategy is None else f"{method}:{strategy}:{dtype_name}"
                fn = {"select_batch": greedy(strategy or "auto"), "floor": floor, "textbook": textbook, "reinvert": reinvert}.get(method)
                row = {**base, "method": method, "strategy": strategy, "dtype": dtype_name}
                if method == "pass":
                    call, picks = partial(one_pass, features, pairs, labeled, reg), batch
                    out = jax.block_until_ready(call())
                else:
                    picks = batch
                    if method in ("textbook", "reinvert"):  # time one pick first; extrapolate if B would take too long
                        per_pick, setup = pick_cost(fn, textbook_setup if method == "textbook" else None, features, pairs, labeled, reg)
                        picks = int(max(1, min(batch, (args.budget_s - setup) // max(per_pick, 1e-9))))
                    call = partial(fn, features, pairs, labeled, reg, picks)
                    out = jax.block_until_ready(call())
                    row.update(peak_bytes=peak_bytes(fn, features, pairs, labeled, reg, picks), timed_picks=picks, picks=batch)
                    if picks < batch:
                        row.update(setup_ms=round(1e3 * setup, 3), pick_ms=round(1e3 * per_pick, 3))
                if method == "select_batch":
                    indices, stats = np.asarray(out[0]), out[1]
                    row.update(planned=stats.strategy, full_from=int(stats.full_from), passes=int(stats.passes),
                               rescored=int(stats.rescored), coordinates=int(stats.coordinates))
                    reference = indices if reference is None else reference
                    row["agree"] = int(np.sum(indices == reference))
                elif method in ("textbook", "reinvert"):
                    row["agree"] = int(np.sum(np.asarray(out)[:picks] == reference[:picks])) if reference is not None else None
                rows[label], calls[label] = row, (call, picks, 1 if picks < batch else args.repeats)
        times = {label: [] for label in calls}
        for turn in range(args.repeats):
            for label, (call, picks, repeats) in calls.items():
                if turn < repeats:
                    wall, cpu = timed(call)
                    if picks < batch:  # the setup (V₀⁻¹) once, the timed picks' share B / picks times
                        setup = rows[label]["setup_ms"] / 1e3
                        wall, cpu = setup + (wall - setup) * batch / picks, setup + (cpu - setup) * batch / picks
                    times[label].append((wall, cpu))
        for label, row in rows.items():
            row.update(ms=round(1e3 * float(np.median([w for w, _ in times[label]])), 3),
                       cpu_ms=round(1e3 * float(np.median([c for _, c in times[label]])), 3),
                       device=jax.devices()[0].device_kind, load=[round(x, 2) for x in os.getloadavg()])
            print(json.dumps(row), flush=True)
        del features, pairs, labeled
    print(json.dumps({**base, "summary": True, **ratios(times), "load": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def ratios(times: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Medians over turns of select_batch's time over `pass` and `floor` (and the slow methods'
    over select_batch's), from wall time and, suffixed `_cpu`, from CPU time."""
    out = {}
    for label, own in times.items():
        if not label.startswith("select_batch:"):
            continue
        tag = label.removeprefix("select_batch:").replace(":", "_")
        for unit in ("pass", "floor", "textbook", "reinvert"):
            if unit not in times:
                continue
            for which, suffix in ((0, ""), (1, "_cpu")):
                pairs = list(zip(own, times[unit])) if unit in ("pass", "floor") else [(o, times[unit][0]) for o in own]
                values = [(mine[which] / theirs[which]) if unit in ("pass", "floor") else theirs[which] / mine[which] for mine, theirs in pairs]
                key = f"{tag}_over_{unit}{suffix}" if unit in ("pass", "floor") else f"{unit}_over_{tag}{suffix}"
                out[key] = round(float(np.median(values)), 3 if unit in ("pass", "floor") else 1)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["targets"], help="issue 25's shapes (ignores --n, --d, --prior, --pairs, --features)")
    parser.add_argument("--n", type=int, nargs="+", default=[3000, 30000])
    parser.add_argument("--d", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--prior", type=int, default=0, help="labeled rows (V0 = reg I + prior^T prior)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--reg", type=float, default=1.0)
    parser.add_argument("--strategy", nargs="+", default=["auto"], choices=["auto", "full", "lazy"])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES), help="storage dtype of the features")
    parser.add_argument("--features", default="gradient", help=" | ".join(KINDS) + " | FILE.npy")
    parser.add_argument("--pairs", action="store_true", help="candidates are the C(m,2) pairs of m responses per prompt")
    parser.add_argument("--responses", type=int, default=8, help="m, responses per prompt with --pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole grid (a shared machine's load varies)")
    parser.add_argument("--budget-s", type=float, default=20.0, help="time budget per slow method before extrapolating")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    if not args.features.endswith(".npy") and args.features not in KINDS:
        parser.error(f"--features must be one of {', '.join(KINDS)} or a .npy file, got {args.features!r}")
    print(f"# jax {jax.__version__} on {jax.devices()}", file=sys.stderr)
    for _ in range(args.runs):
        if args.suite:
            for config in TARGETS:
                run_config(args, *config)
            continue
        for n in args.n:
            for d in args.d if not args.features.endswith(".npy") else [0]:
                run_config(args, "grid", n, d, args.prior, args.pairs, args.responses, args.features, args.methods)


if __name__ == "__main__":
    main()
