"""Sequence-classification reward models: the decoder backbone plus a linear score head."""

from __future__ import annotations

import json

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxdpo.models.decoder import Decoder


class RewardModel(nnx.Module):
    """`rm(input_ids, attention_mask=...)` → float32 rewards `[b]`: the score head applied to the
    hidden state of the last real token (the rightmost position with attention_mask = 1), as
    transformers' *ForSequenceClassification does for the last non-pad token."""

    def __init__(self, backbone: Decoder, score: Float[Array, "h 1"], *, hf_config: dict | None = None):
        self.backbone = backbone
        self.score = nnx.Param(score)
        self.hf_config_json = json.dumps(hf_config or {}, sort_keys=True)

    @property
    def config(self):
        return self.backbone.config

    def __call__(self, input_ids, *, attention_mask=None, lora=None) -> Float[Array, " b"]:
        hidden = self.backbone.hidden_states(input_ids, attention_mask=attention_mask, lora=lora)
        if attention_mask is None:
            last = jnp.full((input_ids.shape[0],), input_ids.shape[1] - 1)
        else:
            positions = jnp.arange(input_ids.shape[1])
            last = jnp.argmax(positions * (jnp.asarray(attention_mask) > 0), axis=1)
        pooled = hidden[jnp.arange(input_ids.shape[0]), last]
        return jnp.matmul(pooled, self.score[...].astype(pooled.dtype), preferred_element_type=jnp.float32)[:, 0]
