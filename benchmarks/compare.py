"""Times the same workload in two jaxdpo checkouts side by side, for machines shared with other
work: one worker process per checkout, each compiles once, then their timed calls alternate (A, B,
A, B, …), so both see the same background load; prints one JSON object per checkout with the best
of `--rounds` calls. The workloads use only the public API (`generate`, `gradient_features`).

- `generation`: `generate` at `--temperature` (default 1, the paper's sampling; 0: greedy) of
  `--new-tokens` and of 1 token; `step_ms` is their difference over new_tokens − 1.
- `features`: `gradient_features(method=--method)` of `--responses` rows of `--seq` tokens, the
  last 1/(1 + `--prompt-to-response`) of each row being the response.

    git archive <commit> | tar -x -C /tmp/before        # the checkout to compare against
    python benchmarks/compare.py generation /tmp/before . --vocab 32000 --hidden 1024 \\
        --intermediate 2752 --layers 8 --batch 8 --prompt 32 --new-tokens 64
    python benchmarks/compare.py features /tmp/before . --prompt-to-response 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def workload(args) -> dict:
    """name → zero-argument function, built with the checkout on `sys.path`."""
    import jax
    import numpy as np

    import jaxdpo
    from common import benchmark_model

    model = benchmark_model(args)
    rng = np.random.default_rng(0)
    if args.what == "generation":
        ids = rng.integers(0, args.vocab, size=(args.batch, args.prompt)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[::2, : args.prompt // 4] = 0
        ids[mask == 0] = 0

        def run(new_tokens):
            return lambda: jaxdpo.generate(
                model, ids, mask, max_new_tokens=new_tokens, temperature=args.temperature, key=jax.random.key(0)
            ).input_ids

        return {"all_tokens": run(args.new_tokens), "one_token": run(1)}
    lora = jaxdpo.init_lora(model, rank=args.rank, alpha=2.0 * args.rank, key=jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(2), x.shape), lora)
    ids = rng.integers(0, args.vocab, size=(args.responses, args.seq)).astype(np.int32)
    response = np.zeros_like(ids)
    response[:, round(args.seq * args.prompt_to_response / (1 + args.prompt_to_response)) :] = 1
    return {"features": lambda: jaxdpo.gradient_features(
        model, lora, ids, response, beta=0.1, dim=args.dim, seed=0, method=args.method, chunk_size=args.chunk
    )}


def jaxdpo_file() -> str:
    import jaxdpo

    return jaxdpo.__file__


def worker(args) -> None:
    """Compile every function, then time one call per line read from stdin."""
    import jax

    functions = workload(args)
    for fn in functions.values():
        jax.block_until_ready(fn())
    print("ready", os.path.dirname(os.path.dirname(jaxdpo_file())), flush=True)
    for _ in sys.stdin:
        times = {}
        for name, fn in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name] = time.perf_counter() - start
        print(json.dumps(times), flush=True)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.append(os.path.dirname(here))  # this checkout's jaxdpo, after any on PYTHONPATH (a worker's)
    from common import add_model_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("generation", "features"))
    parser.add_argument("checkouts", nargs="*", help="two jaxdpo checkouts (folders holding jaxdpo/)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--responses", type=int, default=48)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prompt-to-response", type=float, default=4.0)
    parser.add_argument("--method", choices=("dense", "factored"), default="factored")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=8)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if len(args.checkouts) != 2:
        parser.error("give two checkouts")
    flags = [a for a in sys.argv[1:] if a not in args.checkouts]
    workers = []
    for checkout in args.checkouts:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout)}
        proc = subprocess.Popen([sys.executable, __file__, *flags, "--worker"], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        workers.append(proc)
    for checkout, proc in zip(args.checkouts, workers):
        status, package = proc.stdout.readline().split()
        assert status == "ready" and os.path.samefile(package, checkout), f"{checkout}: the worker imported jaxdpo from {package}"
    best = [{} for _ in workers]
    for _ in range(args.rounds):
        for proc, record in zip(workers, best):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            for name, seconds in json.loads(proc.stdout.readline()).items():
                record[name] = min(record.get(name, seconds), seconds)
    for proc in workers:
        proc.stdin.close()
        proc.wait()
    for checkout, record in zip(args.checkouts, best):
        row = dict(checkout=os.path.abspath(checkout), what=args.what, **{f"{k}_ms": round(1e3 * v, 1) for k, v in record.items()})
        if args.what == "generation":
            row["step_ms"] = round(1e3 * (record["all_tokens"] - record["one_token"]) / max(args.new_tokens - 1, 1), 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
