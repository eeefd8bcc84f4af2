"""Decode throughput of `jaxdpo.generate` (KV cache) against its memory-bandwidth limit, a decode
loop without a cache (every step re-runs the full forward pass over the prompt and the tokens so
far) and transformers' PyTorch `generate()` on the same weights; same prompts, no early stop, in
one run; prints one JSON object per method, each with the machine's load (`os.getloadavg()`).

Sampling is the paper's by default (temperature 1, no top-k/top-p), the path a run takes:
`--temperature T [--top-p P] [--top-k K]` (T = 0: greedy). Sampled runs add the greedy rows
(`kv_cache_greedy`, `torch_generate_greedy`), timed alternately with the sampled ones so both see
the same load, and `step_vs_greedy`, the sampled step over the greedy one.

- `ms`, `tokens_per_s`: one whole call (prefill, setup and every step), best of `--repeats`.
- `step_ms`: one decode step, (call with N new tokens − call with 1) / (N − 1).
- `fixed_ms`: the call with 1 new token: what a call costs besides its steps (prefill, setup,
  the first draw), paid once per generation chunk in a run. `prepare_ms`: making the model's
  `DecodeWeights` (CPU only), paid once per model, not per call.
- `kv_cache` rows: `bytes_per_step` is what a step must read (every weight but the embedding
  table, whose b rows are negligible, and the filled part of the KV cache, averaged over the
  steps); `copy_gb_s` the bandwidth of a plain 1 GiB copy (NumPy, bytes read + bytes written per
  second); `limit_step_ms` = bytes_per_step / copy_gb_s, `limit_tokens_per_s` = batch / that, and
  `fraction_of_limit` = limit_step_ms / step_ms. A step only reads, and a copy writes too, so the
  same figures against `read_gb_s` (a jitted sum over 1 GiB) follow as `read_limit_step_ms` and
  `fraction_of_read_limit`.
- `torch_generate` (when torch is installed): the model exported with `jaxdpo.models.
  save_pretrained` and loaded with `transformers.AutoModelForCausalLM.from_pretrained`;
  `tokens_agree` (greedy rows) is the share of generated tokens equal to jaxdpo's greedy ones.
- `--profile`: one `draw` row per way of choosing a token from `[batch, vocab]` logits, timed
  alone (alternating) with XLA's cost analysis of its compiled program: `categorical` (a
  `jax.random.categorical` Gumbel draw, one threefry number per vocabulary entry: jaxdpo's former
  sampler), `inverse_cdf` (`draw_tokens` of `step_uniforms`, jaxdpo's sampler), `argmax` (greedy).

    python benchmarks/generation.py            # ~4M-param Llama, 8 prompts of 32 tokens, 128 new tokens
    python benchmarks/generation.py --vocab 32000 --hidden 1024 --intermediate 2752 --layers 8 \\
        --batch 8 --prompt 32 --new-tokens 64 --skip-no-cache --profile      # 167M params
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import add_model_args, benchmark_model, best_time, best_times

import jaxdpo
from jaxdpo.sampling import draw_tokens, greedy_tokens, step_uniforms


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


def per_step(runs: dict, new_tokens: int, repeats: int) -> dict[str, tuple[float, float, float, object]]:
    """name → (seconds of a call making `new_tokens` tokens, seconds per decode step, seconds of a
    call making one token, its output); every call of every run timed alternately."""
    calls = {(name, n): partial(run, n) for name, run in runs.items() for n in (new_tokens, 1)}
    times = best_times(calls, repeats)
    result = {}
    for name in runs:
        (full, out), (one, _) = times[(name, new_tokens)], times[(name, 1)]
        result[name] = (full, (full - one) / max(new_tokens - 1, 1), one, out)
    return result


def torch_generate(model, ids, mask, args, sampling: dict):
    """transformers' `generate()` on the same weights with `sampling` (temperature 0: greedy), as
    a function of the token count; None without torch."""
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
    if sampling["temperature"] > 0:
        options = dict(do_sample=True, temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"])
    else:
        options = dict(do_sample=False)

    def run(new_tokens):
        torch.manual_seed(0)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **options)
        return out.numpy()

    return run


def draw_rows(args, repeats: int) -> list[dict]:
    """The token choice alone on `[batch, vocab]` logits, each way timed alternately, with XLA's
    cost analysis (flops, transcendentals, bytes accessed) of its compiled program."""
    logits = 3.0 * jax.random.normal(jax.random.key(0), (args.batch, args.vocab))
    keys = jax.random.split(jax.random.key(1), args.batch)
    draws = {
        "categorical": jax.jit(lambda logits, keys: jax.random.categorical(keys[0], logits, axis=-1)),
        "inverse_cdf": jax.jit(lambda logits, keys: draw_tokens(logits, step_uniforms(keys, 0))),
        "argmax": jax.jit(lambda logits, keys: greedy_tokens(logits)),
    }
    times = best_times({name: partial(fn, logits, keys) for name, fn in draws.items()}, repeats)
    rows = []
    for name, fn in draws.items():
        cost = fn.lower(logits, keys).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        rows.append(dict(method="draw", draw=name, batch=args.batch, vocab=args.vocab, ms=round(1e3 * times[name][0], 3),
                         flops=cost.get("flops"), transcendentals=cost.get("transcendentals"), bytes_accessed=cost.get("bytes accessed"),
                         load=os.getloadavg()[0]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1, the paper's sampling)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    add_model_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--skip-no-cache", action="store_true", help="leave out the (slow) decode loop without a cache")
    parser.add_argument("--skip-torch", action="store_true", help="leave out transformers' generate()")
    parser.add_argument("--profile", action="store_true", help="also time the token choice alone (draw rows)")
    args = parser.parse_args()

    model = benchmark_model(args)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, : args.prompt // 4] = 0  # half the prompts left-padded
    ids[mask == 0] = 0
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    start = time.perf_counter()
    jax.block_until_ready(model.decode_weights())
    prepare = time.perf_counter() - start

    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    variants = {"": sampling} if args.temperature == 0 else {"": sampling, "_greedy": dict(temperature=0.0, top_p=1.0, top_k=0)}

    def cached(options):
        return lambda n: jaxdpo.generate(model, ids, mask, max_new_tokens=n, key=jax.random.key(0), **options).input_ids

    runs = {f"kv_cache{suffix}": cached(options) for suffix, options in variants.items()}
    for suffix, options in ({} if args.skip_torch else variants).items():
        torch_run = torch_generate(model, ids, mask, args, options)
        if torch_run is not None:
            runs[f"torch_generate{suffix}"] = torch_run
    rows = per_step(runs, args.new_tokens, args.repeats)
    if not args.skip_no_cache:
        rows |= per_step({"no_cache": lambda n: decode_without_cache(model, ids, mask, max_new_tokens=n)}, args.new_tokens, args.repeats)
    copy, read = copy_bandwidth(args.repeats), read_bandwidth(args.repeats)
    needed = bytes_per_step(model, args)
    limit_step, read_limit_step = needed / copy, needed / read
    greedy_name = "kv_cache" if args.temperature == 0 else "kv_cache_greedy"
    reference = np.asarray(rows[greedy_name][3])[:, args.prompt :]
    common = dict(device=str(jax.devices()[0]), params=sum(x.size for x in jax.tree.leaves(nnx.state(model))), dtype=args.dtype,
                  batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens)
    tokens = args.batch * args.new_tokens
    for method, (seconds, step, one, out) in rows.items():
        greedy = method.endswith("_greedy") or method == "no_cache" or args.temperature == 0
        row = dict(method=method, **common, **(dict(temperature=0.0, top_p=1.0, top_k=0) if greedy else sampling),
                   ms=round(1e3 * seconds, 1), tokens_per_s=round(tokens / seconds, 1), step_ms=round(1e3 * step, 2),
                   step_tokens_per_s=round(args.batch / step, 1), fixed_ms=round(1e3 * one, 1),
                   tokens_agree=round(float(np.mean(np.asarray(out)[:, args.prompt :] == reference)), 4) if greedy else None)
        if method.startswith("kv_cache"):
            row.update(bytes_per_step=needed, copy_gb_s=round(copy / 1e9, 2), limit_step_ms=round(1e3 * limit_step, 2),
                       limit_tokens_per_s=round(args.batch / limit_step, 1), fraction_of_limit=round(limit_step / step, 3),
                       read_gb_s=round(read / 1e9, 2), read_limit_step_ms=round(1e3 * read_limit_step, 2),
                       fraction_of_read_limit=round(read_limit_step / step, 3), prepare_ms=round(1e3 * prepare, 1))
        if not greedy and f"{method}_greedy" in rows:
            row["step_vs_greedy"] = round(step / rows[f"{method}_greedy"][1], 3)
        row["load"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)
    if args.profile:
        for row in draw_rows(args, max(args.repeats, 20)):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
