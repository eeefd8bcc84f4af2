"""What the model benchmarks share: the ~4M-parameter Llama they run on, and best-of-n timing."""

from __future__ import annotations

import argparse
import math
import time

import jax
from flax import nnx

from jaxdpo.models import Decoder, DecoderConfig


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the model's compute dtype")


def benchmark_model(args: argparse.Namespace) -> Decoder:
    """A random Llama of the sizes and dtype in `args` (64-dim heads, no GQA)."""
    config = DecoderConfig(
        family="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64, head_dim=64,
    )
    return Decoder(config, rngs=nnx.Rngs(0), dtype=args.dtype)


def best_time(fn, repeats: int) -> tuple[float, object]:
    """(fastest of `repeats` timed calls in seconds, the warm-up call's output); compiles first."""
    out = jax.block_until_ready(fn())
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, out


def best_times(fns: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """`best_time` of several functions whose timed calls alternate (a, b, a, b, …), so each sees
    the same background load on a shared machine: name → (fastest seconds, warm-up output)."""
    outputs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], outputs[name]) for name in fns}
