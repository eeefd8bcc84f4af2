"""Gradient-feature throughput, side by side in one run; prints one JSON object per method.

Same model, adapter, sequences and projection dim for every method:
- `fwd_bwd`: the plain per-example LoRA gradients (vmapped and chunked, `reward_gradients`), no
  projection — the cost every method pays at least once.
- `dense`: `gradient_features(method="dense")`: per-example gradients + on-the-fly dense projection
  (`--projection-batch` examples per projection pass).
- `factored`: `gradient_features(method="factored")`: Kronecker projection, no per-example gradient.
- `dense_every_position`, `factored_every_position`: the same with the response window set to the
  whole sequence: the last layer, LM head and log-softmax at every position, as jaxdpo computed
  features before it read only the positions that predict response tokens.
- `less`: LESS-style: one example per backward pass (log-probs at every position), the full
  flattened gradient, unit-normalized, projected densely in buffers of 16 examples (LESS's
  `project_interval`).
- `torch_func` (when torch and transformers are installed): the same weights in transformers'
  PyTorch Llama with LoRA wrappers, `torch.func.vmap(grad)` per chunk, and a dense Rademacher
  projection generated block by block from a seeded generator.

m responses per prompt give C(m, 2) pairs per prompt, so pairs/s = responses/s · (m − 1)/2 (= 1 for
the paper's m = 3). Peak memory is XLA's buffer assignment (arguments + outputs + temporaries) of the
compiled program; for `less` the largest of its two programs; for torch the growth of the process'
max RSS during the timed run (a coarse upper bound).

    python benchmarks/features.py            # ~4M-param Llama, 128 tokens (prompt:response = 1:3), r = 8, d = 8192
    python benchmarks/features.py --prompt-to-response 4 --skip-torch      # prompt:response = 4:1
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import add_model_args, benchmark_model, best_time

from jaxdpo.features import features_program
from jaxdpo.models import Decoder, LoRA, init_lora
from jaxdpo.projection import project_leaves, as_key
from jaxdpo.rewards import per_example_grads, sequence_logprobs
from jaxdpo.sequences import response_window

BETA = 0.1


def build(args) -> tuple[Decoder, LoRA, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    model = benchmark_model(args)
    lora = init_lora(model, rank=args.rank, alpha=2.0 * args.rank, key=jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(2), x.shape), lora)  # B ≠ 0, as after DPO
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.responses, args.seq)).astype(np.int32)
    response = np.zeros_like(ids)
    response[:, round(args.seq * args.prompt_to_response / (1 + args.prompt_to_response)) :] = 1
    return model, lora, (ids, response, np.ones_like(ids))


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def jax_methods(model, lora, batch, args):
    window = response_window(batch[1])
    batch = tuple(jnp.asarray(x) for x in batch)
    key = as_key(0)

    every_position = args.seq - 1

    def scaled_logprob(lora, example, window=window):
        ids, response, attention = (x[None] for x in example)
        return BETA * sequence_logprobs(model, lora, ids, response, attention_mask=attention, window=window)[0]

    plain = jax.jit(lambda lora, batch: per_example_grads(scaled_logprob, lora, batch, args.chunk))
    feature_args = (model, lora, batch, jnp.float32(BETA), key)
    feature_kwargs = lambda method, window=window: dict(  # noqa: E731
        dim=args.dim, normalize=True, method=method, chunk_size=args.chunk, projection_batch=args.projection_batch, window=window
    )

    single_grad = jax.jit(lambda lora, example: jax.grad(scaled_logprob)(lora, example, every_position))  # as LESS: every position

    def less():
        """One backward pass per example, full flattened gradient, unit-normalized; projected in
        buffers of `--less-interval` examples, as LESS's gradient collection does."""
        out, buffer = [], []
        for i in range(batch[0].shape[0]):
            grads = single_grad(lora, tuple(x[i] for x in batch))
            flat = jnp.concatenate([leaf.reshape(1, -1) for leaf in jax.tree.leaves(grads)], axis=1)
            buffer.append(flat / jnp.linalg.norm(flat))
            if len(buffer) == args.less_interval or i == batch[0].shape[0] - 1:
                out.append(project_leaves([jnp.concatenate(buffer)], key, args.dim))
                buffer = []
        return jnp.concatenate(out)

    example = tuple(x[0] for x in batch)
    flat_size = sum(leaf.size for leaf in jax.tree.leaves(lora))
    less_peak = max(
        peak_bytes(single_grad.lower(lora, example).compile()),
        peak_bytes(project_leaves.lower([jnp.zeros((args.less_interval, flat_size))], key, dim=args.dim).compile()),
    )
    return {
        "fwd_bwd": (lambda: plain(lora, batch), peak_bytes(plain.lower(lora, batch).compile())),
        **{
            f"{method}{suffix}": (
                lambda method=method, width=width: features_program(*feature_args, **feature_kwargs(method, width)),
                peak_bytes(features_program.lower(*feature_args, **feature_kwargs(method, width)).compile()),
            )
            for method in ("dense", "factored")
            for suffix, width in (("", window), ("_every_position", every_position))
        },
        "less": (less, less_peak),
    }


def torch_method(model, lora, batch, args):
    """The same model and adapter through transformers + torch.func; None without torch."""
    try:
        import torch
        import transformers
        from torch.func import functional_call, grad, vmap
    except ImportError:
        return None
    from jaxdpo.models.checkpoint import hf_state_dict

    torch.set_num_threads(args.threads)
    hf_config = model.config.to_hf()
    hf_config._attn_implementation = "eager"  # sdpa has no vmap batching rule on CPU
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in hf_state_dict(model).items()}, strict=False)
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

    class LoraLinear(torch.nn.Module):
        def __init__(self, base, a, b, scale):
            super().__init__()
            self.base, self.scale = base, scale
            self.a, self.b = torch.nn.Parameter(a), torch.nn.Parameter(b)

        def forward(self, x):
            return self.base(x) + self.scale * (x @ self.a) @ self.b

    for target, p in lora.params.items():
        for layer, block in enumerate(hf.model.layers):
            parent_name, child = names[target].split(".")
            parent = getattr(block, parent_name)
            a, b = (torch.from_numpy(np.array(p[s][layer])) for s in ("a", "b"))
            setattr(parent, child, LoraLinear(getattr(parent, child), a, b, lora.scale))
    adapter = {n: p.detach() for n, p in hf.named_parameters() if n.endswith((".a", ".b"))}
    ids, response, attention = (torch.from_numpy(x).long() for x in batch)

    def logprob(params, ids, response):
        logits = functional_call(hf, params, (ids[None],), {"use_cache": False}).logits[0, :-1]
        token = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
        return BETA * (token * response[1:]).sum()

    per_example = vmap(grad(logprob), in_dims=(None, 0, 0))
    generator = torch.Generator()
    flat_size = sum(p.numel() for p in adapter.values())
    block = 2048

    def run():
        out = []
        with torch.no_grad():
            for start in range(0, ids.shape[0], args.chunk):
                grads = per_example(adapter, ids[start : start + args.chunk], response[start : start + args.chunk])
                flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
                flat = flat / flat.norm(dim=1, keepdim=True)
                total = torch.zeros(flat.shape[0], args.dim)
                for j, lo in enumerate(range(0, flat_size, block)):
                    generator.manual_seed(j)
                    signs = torch.randint(0, 2, (min(block, flat_size - lo), args.dim), generator=generator) * 2.0 - 1.0
                    total += flat[:, lo : lo + block] @ signs
                out.append(total / math.sqrt(args.dim))
        return torch.cat(out)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=48)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prompt-to-response", type=float, default=1 / 3, help="prompt tokens per response token")
    add_model_args(parser)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--projection-batch", type=int, default=64, help="dense: examples per projection pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--less-interval", type=int, default=16, help="examples per projection call in the LESS baseline")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--skip-torch", action="store_true", help="leave out the (slow) torch.func row")
    parser.add_argument("--responses-per-prompt", type=int, default=3)
    parser.add_argument("--save", type=Path, help="also write the factored features [responses, dim] (float32 .npy), e.g. for "
                        "benchmarks/selection.py --features")
    args = parser.parse_args()
    args.projection_batch = min(args.projection_batch, args.responses)  # as gradient_features clamps it

    model, lora, batch = build(args)
    common = dict(
        device=str(jax.devices()[0]), params=sum(x.size for x in jax.tree.leaves(nnx.state(model))),
        lora_params=sum(x.size for x in jax.tree.leaves(lora)), responses=args.responses, seq=args.seq,
        rank=args.rank, dim=args.dim, chunk=args.chunk, projection_batch=args.projection_batch,
        response_tokens=int(batch[1][0].sum()), window=response_window(batch[1]),
    )
    pairs_per_response = (args.responses_per_prompt - 1) / 2
    rows = {}
    methods = jax_methods(model, lora, batch, args)
    for name, (fn, peak) in methods.items():
        rows[name] = dict(seconds=best_time(fn, args.repeats)[0], peak_bytes=peak)
        print(f"# {name}: {rows[name]['seconds']:.3f} s", file=sys.stderr, flush=True)
    if args.save:
        np.save(args.save, np.asarray(methods["factored"][0](), np.float32))
    torch_run = None if args.skip_torch else torch_method(model, lora, batch, args)
    if torch_run is not None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        seconds, _ = best_time(torch_run, args.repeats)
        rows["torch_func"] = dict(seconds=seconds, peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    plain = rows["fwd_bwd"]["seconds"]
    for name, row in rows.items():
        responses_per_s = args.responses / row["seconds"]
        print(json.dumps(dict(
            method=name, **common, ms=round(1e3 * row["seconds"], 1), responses_per_s=round(responses_per_s, 2),
            pairs_per_s=round(responses_per_s * pairs_per_response, 2), peak_mb=round(row["peak_bytes"] / 2**20, 1),
            vs_fwd_bwd=round(row["seconds"] / plain, 3),
            speedup_vs_less=round(rows["less"]["seconds"] / row["seconds"], 2),
            speedup_vs_every_position=round(rows[f"{name}_every_position"]["seconds"] / row["seconds"], 2)
            if f"{name}_every_position" in rows else None,
        )), flush=True)


if __name__ == "__main__":
    main()
