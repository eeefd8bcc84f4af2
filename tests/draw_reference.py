"""The float64 reference of `jaxdpo.sampling.draw_tokens`: the same two-level inverse CDF (a block
of `block_width(vocab)` ids by its probability mass with the first uniform, then a token within
it with the second), on probabilities computed in float64 with NumPy."""

from __future__ import annotations

import numpy as np

from jaxdpo.sampling import block_width


def softmax64(logits) -> np.ndarray:
    """softmax over the last axis in float64; −inf entries get probability 0."""
    logits = np.asarray(logits, np.float64)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def inverse_cdf_reference(logits, uniforms) -> np.ndarray:
    """`[n]` tokens of `[n, vocab]` logits and `[n, 2]` uniforms."""
    probs, uniforms = softmax64(logits), np.asarray(uniforms, np.float64)
    vocab = probs.shape[-1]
    width = block_width(vocab)
    tokens = []
    for p, (u_block, u_token) in zip(probs, uniforms):
        mass = np.add.reduceat(p, np.arange(0, vocab, width))
        block = int(np.searchsorted(np.cumsum(mass), u_block * mass.sum(), side="right"))
        inside = p[block * width : (block + 1) * width]
        tokens.append(block * width + int(np.searchsorted(np.cumsum(inside), u_token * inside.sum(), side="right")))
    return np.asarray(tokens)
