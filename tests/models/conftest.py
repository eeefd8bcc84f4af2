"""Tiny random checkpoints of every supported family, built with transformers' PyTorch classes and
saved as real HF folders once per session. Without torch, every test that needs one is skipped."""

from __future__ import annotations

import numpy as np
import pytest

import transformers

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, attn_implementation="eager")

# name -> (config class, causal-LM class, extra config): GQA, MQA, explicit head_dim, tied/untied, biases
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0)),
    "llama_mqa_bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    # window 3 < the 7-token test rows; caps low enough to bend these logits; query scale ≠ head_dim
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=20, sliding_window=3,
             attn_logit_softcapping=0.5, final_logit_softcapping=2.0),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    # Qwen's sliding window: layers ≥ max_window_layers, window 3 < the 7-token test rows
    "qwen2_window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    ),
}


def perturbed(model, seed: int):
    """Random weights well away from init (norm weights and biases too), so parity is not trivial."""
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def build(family: str, head: str = "CausalLM", **overrides):
    """A perturbed tiny model of `family`; `head` "CausalLM" or "SequenceClassification"."""
    torch = pytest.importorskip("torch")
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    cls = getattr(transformers, model_cls.replace("CausalLM", head))
    torch.manual_seed(0)
    return perturbed(cls(config), seed=len(family))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> (folder, torch model)."""
    out = {}
    for family in FAMILIES:
        model = build(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (folder, model)
    return out


@pytest.fixture(scope="session")
def batch():
    """A left-padded batch: row 1 has 3 padding tokens."""
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    """transformers' logits with the position ids jaxdpo uses for left padding (cumsum of the mask)."""
    torch = pytest.importorskip("torch")
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    return out.logits.float().numpy()
