"""Decode throughput with the KV cache (`jaxdpo.generate`) against a decode loop without a cache
(every step re-runs the full forward pass over the prompt and the tokens so far), same model, same
prompts, greedy, no early stop, in one run; prints one JSON object per method.

    python benchmarks/generation.py            # ~4M-param Llama, 8 prompts of 32 tokens, 128 new tokens
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from _common import add_model_args, benchmark_model, best_time

import jaxdpo


@partial(jax.jit, static_argnames="max_new_tokens")
def decode_without_cache(model, prompt_ids, prompt_mask, *, max_new_tokens: int):
    """Greedy decoding, one full forward pass over the whole (fixed-size) buffer per new token."""
    b, p = prompt_ids.shape
    ids = jnp.concatenate([prompt_ids, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
    mask = jnp.concatenate([prompt_mask, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)

    def step(i, state):
        ids, mask = state
        logits = model(ids, attention_mask=mask)
        token = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(jnp.int32)
        return ids.at[:, p + i].set(token), mask.at[:, p + i].set(1)

    return jax.lax.fori_loop(0, max_new_tokens, step, (ids, mask))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    add_model_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = benchmark_model(args)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, : args.prompt // 4] = 0  # half the prompts left-padded
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    cached_s, cached = best_time(
        lambda: jaxdpo.generate(model, ids, mask, max_new_tokens=args.new_tokens, temperature=0.0, key=jax.random.key(0)).input_ids,
        args.repeats,
    )
    plain_s, plain = best_time(lambda: decode_without_cache(model, ids, mask, max_new_tokens=args.new_tokens), args.repeats)
    agree = float(np.mean(np.asarray(cached) == np.asarray(plain)))
    common = dict(device=str(jax.devices()[0]), params=sum(x.size for x in jax.tree.leaves(nnx.state(model))),
                  batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens)
    tokens = args.batch * args.new_tokens
    for method, seconds in [("kv_cache", cached_s), ("no_cache", plain_s)]:
        print(json.dumps(dict(method=method, **common, ms=round(1e3 * seconds, 1), tokens_per_s=round(tokens / seconds, 1),
                              speedup_vs_no_cache=round(plain_s / seconds, 2), tokens_agree=round(agree, 4))), flush=True)


if __name__ == "__main__":
    main()
