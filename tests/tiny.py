"""A tiny random decoder and adapter shared by the reward/feature/generation/DPO tests (built from a
config, no checkpoint needed); one fixed set of shapes keeps JIT compilation to a minimum."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxdpo.models import Decoder, DecoderConfig, LoRA, init_lora

CONFIG = DecoderConfig(
    family="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8
)


def tiny_model(seed: int = 0, **config) -> Decoder:
    from dataclasses import replace

    return Decoder(replace(CONFIG, **config), rngs=nnx.Rngs(seed))


def trained_lora(model, rank: int = 2, alpha: float = 4.0, seed: int = 1) -> LoRA:
    """An adapter with non-zero B (as after DPO), so every LoRA gradient is non-trivial."""
    fresh = init_lora(model, rank=rank, alpha=alpha, key=jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(fresh.params))
    params = {
        t: {"a": p["a"], "b": 0.3 * jax.random.normal(k, p["b"].shape)} for k, (t, p) in zip(keys, fresh.params.items())
    }
    return LoRA(params=params, rank=rank, alpha=alpha)


def sequences(n: int = 4, length: int = 10, prompt: int = 5, seed: int = 0):
    """(input_ids, response_mask, attention_mask): left-padded prompts, responses of varied length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, size=(n, length)).astype(np.int32)
    attention = np.ones_like(ids)
    response = np.zeros_like(ids)
    response[:, prompt:] = 1
    for i in range(n):
        pad = i % 3
        attention[i, :pad] = 0
        response[i, length - (i % 2) :] = 0  # some rows end early (right padding)
        attention[i, length - (i % 2) :] = 0
    return ids, response, attention
