"""DPO optimizer steps per second (`jaxdpo.dpo.DpoTrainer`) on LoRA parameters; prints JSON.

    python benchmarks/dpo.py            # ~4M-param Llama, 256-token pairs, batch 8, r = 8
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx

from common import add_model_args, benchmark_model

import jaxdpo
from jaxdpo.dpo import DpoTrainer, train_step, reference_logprobs
from jaxdpo.sequences import Sequences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    add_model_args(parser)
    args = parser.parse_args()

    model = benchmark_model(args)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(2 * args.pairs, args.seq)).astype(np.int32)
    response = np.zeros_like(ids)
    response[:, args.seq // 2 :] = 1
    data = Sequences(ids, response, np.ones_like(ids))
    pairs = np.arange(2 * args.pairs).reshape(args.pairs, 2)
    trainer = DpoTrainer(epochs=1, batch_size=args.batch, grad_accum=args.grad_accum, learning_rate=1e-4)
    lora = jaxdpo.init_lora(model, rank=args.rank, alpha=2.0 * args.rank, key=jax.random.key(0))

    start = time.perf_counter()
    ref = reference_logprobs(model, data)
    ref_s = time.perf_counter() - start
    state, _ = trainer.train(model, trainer.init(lora), data, pairs[: args.batch * args.grad_accum], ref, seed=0)  # compile
    compiles = train_step._cache_size()
    start = time.perf_counter()
    state, losses = trainer.train(model, state, data, pairs, ref, seed=1)
    jax.block_until_ready(state.lora)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(
        device=str(jax.devices()[0]), params=sum(x.size for x in jax.tree.leaves(nnx.state(model))),
        lora_params=sum(x.size for x in jax.tree.leaves(lora)), seq=args.seq, batch=args.batch, grad_accum=args.grad_accum,
        steps=len(losses), steps_per_s=round(len(losses) / seconds, 3),
        pairs_per_s=round(args.pairs / seconds, 2), reference_logprobs_s=round(ref_s, 3),
        step_compilations=compiles, step_compilations_after=train_step._cache_size(),
    )), flush=True)


if __name__ == "__main__":
    main()
