"""Decode throughput of `jaxdpo.generate` (KV cache) against its memory-bandwidth limit, a decode
loop without a cache (every step re-runs the full forward pass over the prompt and the tokens so
far) and transformers' PyTorch `generate()` on the same weights; same prompts, greedy, no early
stop, in one run; prints one JSON object per method.

- `ms`, `tokens_per_s`: one whole call (prefill, setup and every step), best of `--repeats`.
- `step_ms`: one decode step, (call with N new tokens − call with 1) / (N − 1).
- `kv_cache` row: `bytes_per_step` is what a step must read (every weight but the embedding
  table, whose b rows are negligible, and the filled part of the KV cache, averaged over the
  steps); `copy_gb_s` the bandwidth of a plain 1 GiB copy (NumPy, bytes read + bytes written per
  second); `limit_step_ms` = bytes_per_step / copy_gb_s, `limit_tokens_per_s` = batch / that, and
  `fraction_of_limit` = limit_step_ms / step_ms. A step only reads, and a copy writes too, so the
  same figures against `read_gb_s` (a jitted sum over 1 GiB) follow as `read_limit_step_ms` and
  `fraction_of_read_limit`.
- `torch_generate` (when torch is installed): the model exported with `jaxdpo.models.
  save_pretrained` and loaded with `transformers.AutoModelForCausalLM.from_pretrained`;
  `tokens_agree` is the share of generated tokens equal to jaxdpo's.

    python benchmarks/generation.py            # ~4M-param Llama, 8 prompts of 32 tokens, 128 new tokens
    python benchmarks/generation.py --vocab 32000 --hidden 1024 --intermediate 2752 --layers 8 \\
        --batch 8 --prompt 32 --new-tokens 64 --skip-no-cache      # 167M params
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
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


def copy_bandwidth(repeats: int, size: int = 2**30) -> float:
    """Bytes read + bytes written per second by the fastest of `repeats` copies of `size` bytes."""
    src = np.ones(size // 4, np.float32)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(repeats + 1):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def read_bandwidth(repeats: int, size: int = 2**30) -> float:
    """Bytes read per second by the fastest of `repeats` jitted sums over `size` bytes."""
    x = jnp.ones(size // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    seconds, _ = best_time(lambda: total(x), repeats)
    return size / seconds


def bytes_per_step(model, args) -> int:
    """Weights (all but the embedding table, unless it is also the LM head) plus the filled part
    of the KV cache, averaged over the decode steps."""
    c, itemsize = model.config, jnp.dtype(model.dtype).itemsize
    weights = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    if not c.tie_embeddings:
        weights -= c.vocab_size * c.hidden_size
    mean_slots = args.prompt + (args.new_tokens - 1) / 2
    kv = 2 * c.num_layers * args.batch * c.num_kv_heads * c.head_dim * mean_slots
    return int((weights + kv) * itemsize)


def per_step(run, new_tokens: int, repeats: int) -> tuple[float, float, object]:
    """(seconds of a call making `new_tokens` tokens, seconds per decode step, its output)."""
    full, out = best_time(lambda: run(new_tokens), repeats)
    one, _ = best_time(lambda: run(1), repeats)
    return full, (full - one) / max(new_tokens - 1, 1), out


def torch_generate(model, ids, mask, args):
    """transformers' greedy `generate()` on the same weights, as a function of the token count;
    None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp()
    jaxdpo.models.save_pretrained(model, folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    ids, mask = torch.from_numpy(np.array(ids)).long(), torch.from_numpy(np.array(mask)).long()

    def run(new_tokens):
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
        return out.numpy()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    add_model_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--skip-no-cache", action="store_true", help="leave out the (slow) decode loop without a cache")
    parser.add_argument("--skip-torch", action="store_true", help="leave out transformers' generate()")
    args = parser.parse_args()

    model = benchmark_model(args)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, : args.prompt // 4] = 0  # half the prompts left-padded
    ids[mask == 0] = 0
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def cached(new_tokens):
        return jaxdpo.generate(model, ids, mask, max_new_tokens=new_tokens, temperature=0.0, key=jax.random.key(0)).input_ids

    rows = {"kv_cache": per_step(cached, args.new_tokens, args.repeats)}
    if not args.skip_no_cache:
        rows["no_cache"] = per_step(lambda n: decode_without_cache(model, ids, mask, max_new_tokens=n), args.new_tokens, args.repeats)
    torch_run = None if args.skip_torch else torch_generate(model, ids, mask, args)
    if torch_run is not None:
        rows["torch_generate"] = per_step(torch_run, args.new_tokens, args.repeats)
    copy, read = copy_bandwidth(args.repeats), read_bandwidth(args.repeats)
    needed = bytes_per_step(model, args)
    limit_step, read_limit_step = needed / copy, needed / read
    reference = np.asarray(rows["kv_cache"][2])[:, args.prompt :]
    common = dict(device=str(jax.devices()[0]), params=sum(x.size for x in jax.tree.leaves(nnx.state(model))), dtype=args.dtype,
                  batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens)
    tokens = args.batch * args.new_tokens
    for method, (seconds, step, out) in rows.items():
        row = dict(method=method, **common, ms=round(1e3 * seconds, 1), tokens_per_s=round(tokens / seconds, 1),
                   step_ms=round(1e3 * step, 2), step_tokens_per_s=round(args.batch / step, 1),
                   tokens_agree=round(float(np.mean(np.asarray(out)[:, args.prompt :] == reference)), 4))
        if method == "kv_cache":
            row.update(bytes_per_step=needed, copy_gb_s=round(copy / 1e9, 2), limit_step_ms=round(1e3 * limit_step, 2),
                       limit_tokens_per_s=round(args.batch / limit_step, 1), fraction_of_limit=round(limit_step / step, 3),
                       read_gb_s=round(read / 1e9, 2), read_limit_step_ms=round(1e3 * read_limit_step, 2),
                       fraction_of_read_limit=round(read_limit_step / step, 3))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
