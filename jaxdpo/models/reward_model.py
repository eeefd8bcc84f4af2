"""Sequence-classification reward models: the decoder backbone plus a linear score head."""

from __future__ import annotations

import json

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Float, Int

from jaxdpo.models.decoder import Decoder


class RewardModel(nnx.Module):
    """`rm(input_ids, attention_mask=...)` → float32 rewards `[b]`: the score head applied to the
    hidden state of the last real token (the rightmost position with attention_mask = 1), as
    transformers' *ForSequenceClassification does for the last non-pad token."""

    def __init__(self, backbone: Decoder, score: Float[ArrayLike, "h 1"], *, hf_config: dict | None = None):
        self.backbone = backbone
        self.score = nnx.Param(score)
        self.hf_config_json = json.dumps(hf_config or {}, sort_keys=True)

    @property
    def config(self):
        return self.backbone.config

    def __call__(self, input_ids, *, attention_mask=None, lora=None) -> Float[Array, " b"]:
        hidden = self.backbone.hidden_states(input_ids, attention_mask=attention_mask, lora=lora)
        pooled = last_token_states(hidden, attention_mask)
        return jnp.matmul(pooled, self.score[...].astype(pooled.dtype), preferred_element_type=jnp.float32)[:, 0]


def last_token_states(hidden: Float[ArrayLike, "b s h"], attention_mask: Int[ArrayLike, "b s"] | None) -> Float[Array, "b h"]:
    """Each row's hidden state at its last real token (the rightmost position with attention_mask
    = 1; the last position without a mask): a sequence's summary for score heads and APO features."""
    if attention_mask is None:
        return hidden[:, -1]
    last = jnp.argmax(jnp.arange(hidden.shape[1]) * (jnp.asarray(attention_mask) > 0), axis=1)
    return hidden[jnp.arange(hidden.shape[0]), last]
