"""One decoder for the Llama, Gemma, Gemma-2 and Qwen2/Qwen3 families (switches in `DecoderConfig`).

Layer weights are stacked along a leading layer axis and the layers run under one `lax.scan`, so
the layer body compiles once whatever the depth; when only some positions' hidden states are read
(log-probs of a response), the scan stops before the last layer, which runs on those rows only.
The KV-cached prefill/decode used by sampling runs the same layer body, one layer after another
(no scan), over the stacked weights read in place — or, on CPU, over `DecodeWeights`, a copy in
the layout XLA's CPU matmuls read fastest, made once per model (the base model is frozen).
Attention always sees (query slots, key slots, key validity), and positions come from the
attention mask, so left-padded batches are exact.
"""

from __future__ import annotations

import json
import math
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from jaxdpo import checks
from jaxdpo.models import blocks
from jaxdpo.models.config import DecoderConfig
from jaxdpo.models.lora import LoRA, LoraFn, default_lora_fn, target_shapes


@struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` slots, and which slots hold real tokens.

    One array per layer, heads before slots, in the layouts attention multiplies them in (keys
    `[b, kv, hd, S]`, values `[b, kv, S, hd]`), so a decode step reads them in place. `index` is
    the next slot to write (the same for the whole batch); `next_position` the next position id
    of each sequence (padding does not advance it)."""

    k: tuple[Float[Array, "b kv hd S"], ...]
    v: tuple[Float[Array, "b kv S hd"], ...]
    key_mask: Bool[Array, "b S"]
    next_position: Int[Array, " b"]
    index: Int[Array, ""]

    def repeat_rows(self, m: int) -> KVCache:
        """Each row `m` times in a row: rows i·m … (i+1)·m − 1 continue row i (the samples of one
        prompt decode from its one prefill)."""
        rows = lambda x: jnp.repeat(x, m, axis=0)  # noqa: E731
        return KVCache(tuple(map(rows, self.k)), tuple(map(rows, self.v)), rows(self.key_mask), rows(self.next_position), self.index)


@struct.dataclass
class DecodeWeights:
    """A copy of the weights in the layout KV-cached decoding reads fastest on CPU, made by
    `Decoder.decode_weights()`: `layers[l]` holds layer l's tensors as separate arrays, matrices in
    [out, in] layout, and `head` is the LM head `[vocab, hidden]`.

    Separate arrays, because XLA's CPU backend copies a slice of the stacked `[L, in, out]` weights
    before a matmul reads it (on every decode step); [out, in], because a matmul of a few rows (one
    token per sequence) reads a matrix faster in that layout on CPU (`blocks.dense`). It is a second copy
    of the layer weights, held as long as the model: accelerators decode from the model's own
    weights instead (`forward_cached` without `weights`). (A pytree: while JAX transforms it the
    leaves are tracers or placeholders, hence no array type on the fields.)"""

    layers: tuple[dict[str, Any], ...]
    head: Any


_DECODE_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Each model's `DecodeWeights`, with weak references to the arrays they were made from."""


@jax.jit
def _transposed_layout(stacked: dict[str, Array], head: Array) -> DecodeWeights:
    """`DecodeWeights` of stacked layer weights `{name: [L, ...]}` (matrices: the 3-d ones) and an LM head `[h, vocab]`."""
    num_layers = next(iter(stacked.values())).shape[0]
    layers = tuple({name: x[layer].T if x.ndim == 3 else x[layer] for name, x in stacked.items()} for layer in range(num_layers))
    return DecodeWeights(layers=layers, head=head.T)


def _on_cpu(x: Array) -> bool:
    """Whether `x` lives on CPU devices (for a traced array: whether this process computes on CPU)."""
    if checks.is_concrete(x):
        return all(device.platform == "cpu" for device in x.devices())
    return jax.default_backend() == "cpu"


def layer_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer parameter shapes (without the leading layer axis), in [in, out] layout."""
    shapes = {"attn_norm": (config.hidden_size,), "mlp_norm": (config.hidden_size,)}
    if config.sandwich_norms:
        shapes.update(attn_post_norm=(config.hidden_size,), mlp_post_norm=(config.hidden_size,))
    shapes.update(target_shapes(config))
    if config.qk_norm:
        shapes.update(q_norm=(config.head_dim,), k_norm=(config.head_dim,))
    biases = {"q": config.qkv_bias, "k": config.qkv_bias, "v": config.qkv_bias, "o": config.o_bias,
              "gate": config.mlp_bias, "up": config.mlp_bias, "down": config.mlp_bias}
    for name, has_bias in biases.items():
        if has_bias:
            shapes[f"{name}_bias"] = (shapes[name][1],)
    return shapes


def _is_norm(name: str) -> bool:
    return name.endswith("norm")


class Decoder(nnx.Module):
    """A causal LM. `model(input_ids, attention_mask=..., lora=...)` → logits [b, s, vocab] in
    float32 (float64 for a float64 model), whatever the compute dtype (float32 or bfloat16)."""

    def __init__(
        self,
        config: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: bool = False,
        hf_config: dict | None = None,
    ):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.hf_config_json = json.dumps(hf_config if hf_config is not None else config.to_hf().to_dict(), sort_keys=True)
        normal = nnx.initializers.normal(0.02)
        norm_value = 0.0 if config.norm_offset else 1.0
        layers = {}
        for name, shape in layer_shapes(config).items():
            full = (config.num_layers, *shape)
            if _is_norm(name):
                layers[name] = jnp.full(full, norm_value, self.dtype)
            elif name.endswith("_bias"):
                layers[name] = jnp.zeros(full, self.dtype)
            else:
                layers[name] = normal(rngs.params(), full, self.dtype)
        self.layers = nnx.Dict({name: nnx.Param(value) for name, value in layers.items()})
        self.embed = nnx.Param(normal(rngs.params(), (config.vocab_size, config.hidden_size), self.dtype))
        self.final_norm = nnx.Param(jnp.full((config.hidden_size,), norm_value, self.dtype))
        self.lm_head = None if config.tie_embeddings else nnx.Param(
            normal(rngs.params(), (config.hidden_size, config.vocab_size), self.dtype)
        )

    # -- public calls ---------------------------------------------------------------------------

    def __call__(self, input_ids, *, attention_mask=None, lora: LoRA | None = None, lora_fn: LoraFn | None = None):
        """Float32 logits `[b, s, vocab]`. `attention_mask` [b, s]: 1 = token, 0 = (left) padding."""
        return self.logits(self.hidden_states(input_ids, attention_mask=attention_mask, lora=lora, lora_fn=lora_fn))

    def hidden_states(self, input_ids, *, attention_mask=None, lora=None, lora_fn=None, rows=None) -> Float[Array, "b s h"]:
        """Final-normed hidden states `[b, s, hidden]` (reward heads, APO features). With `rows`
        `[b, w]` (positions), only those `[b, w, hidden]`; the last layer then computes queries,
        attention output and MLP at those positions only (log-probs of a response)."""
        valid = self._valid(input_ids, attention_mask)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        return self._run(input_ids, positions, jnp.arange(input_ids.shape[1]), valid, lora, lora_fn, rows)

    def logits(self, hidden: Float[Array, "b s h"]) -> Float[Array, "b s vocab"]:
        return self._project_vocab(hidden, self._head(), out_in=False)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` tokens (prompt included)."""
        c = self.config
        dtype = dtype or self.dtype
        zeros = lambda *shape: tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))  # noqa: E731
        return KVCache(
            k=zeros(batch, c.num_kv_heads, c.head_dim, max_len),
            v=zeros(batch, c.num_kv_heads, max_len, c.head_dim),
            key_mask=jnp.zeros((batch, max_len), bool),
            next_position=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    def decode_weights(self) -> DecodeWeights | None:
        """The weights `forward_cached` decodes from fastest: on CPU a `DecodeWeights` copy, made
        once and reused for as long as the model's weights are the same arrays (the base model is
        frozen; weights replaced by `nnx.update` get a new copy); None on accelerators, which read
        the model's own weights in place (no second copy). Inside a trace, made in the trace."""
        stacked = {name: p[...] for name, p in self.layers.items()}
        head = self._head()
        sources = (*stacked.values(), head)
        if not _on_cpu(head):
            return None
        if not all(checks.is_concrete(x) for x in sources):
            return _transposed_layout(stacked, head)
        refs, weights = _DECODE_WEIGHTS.get(self, ((), None))
        if len(refs) != len(sources) or any(ref() is not x for ref, x in zip(refs, sources)):
            weights = _transposed_layout(stacked, head)
            _DECODE_WEIGHTS[self] = (tuple(weakref.ref(x) for x in sources), weights)
        return weights

    def forward_cached(
        self, input_ids, cache: KVCache, *, attention_mask=None, lora=None, lora_fn=None, weights: DecodeWeights | None = None,
        last_only: bool = False,
    ):
        """Run t new tokens on top of `cache` (prefill: the left-padded prompts; decode: t = 1).

        Returns float32 logits `[b, t, vocab]` (`[b, 1, vocab]`, the last position's, with
        `last_only`) and the cache with the tokens written at slots `index … index + t − 1`.
        `weights`: `self.decode_weights()`, made outside a decode loop; None reads the model's
        stacked weights in place."""
        valid = self._valid(input_ids, attention_mask)
        checks.require(
            input_ids.shape[0] == cache.key_mask.shape[0],
            f"input_ids has batch {input_ids.shape[0]} but the cache was made for {cache.key_mask.shape[0]}",
        )
        t = input_ids.shape[1]
        positions = jnp.maximum(cache.next_position[:, None] + jnp.cumsum(valid, axis=1) - 1, 0)
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, valid.astype(bool), (0, cache.index))
        query_slots = cache.index + jnp.arange(t)
        key_slots = jnp.arange(cache.key_mask.shape[1])
        x, cos, sin = self._embed(input_ids, positions)
        masks = self._masks(query_slots, key_slots, key_mask)
        adapters = self._adapter_layers(lora)
        layers, head, out_in = self._decode_layers(weights)
        keys, values = [], []
        for layer, params in enumerate(layers):

            def attend(q, k, v, layer=layer):
                k = jax.lax.dynamic_update_slice(cache.k[layer], blocks.key_layout(k).astype(cache.k[layer].dtype), (0, 0, 0, cache.index))
                v = jax.lax.dynamic_update_slice(cache.v[layer], blocks.value_layout(v).astype(cache.v[layer].dtype), (0, 0, cache.index, 0))
                mask = masks[1] if self.config.layer_is_sliding[layer] else masks[0]
                return blocks.attention(q, k.astype(self.dtype), v.astype(self.dtype), mask, self.config), (k, v)

            x, (k, v) = self._layer(x, params, adapters[layer], jnp.int32(layer), cos, sin, attend, lora, lora_fn, out_in=out_in)
            keys.append(k)
            values.append(v)
        hidden = blocks.rms_norm(x[:, -1:] if last_only else x, self.final_norm[...], self.config)
        new_cache = KVCache(
            tuple(keys), tuple(values), key_mask, cache.next_position + jnp.sum(valid, axis=1, dtype=jnp.int32), cache.index + t
        )
        return self._project_vocab(hidden, head, out_in=out_in), new_cache

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _valid(input_ids, attention_mask) -> Int[Array, "b s"]:
        checks.check_ndim("input_ids", input_ids, 2, "[batch, seq]")
        checks.check_integer("input_ids", input_ids)
        if attention_mask is None:
            return jnp.ones(input_ids.shape, jnp.int32)
        checks.check_shape("attention_mask", attention_mask, input_ids.shape)
        return jnp.asarray(attention_mask).astype(jnp.int32)

    def _decode_layers(self, weights: DecodeWeights | None) -> tuple[tuple[dict[str, Array], ...], Array, bool]:
        """(each layer's weights, the LM head, whether matrices are [out, in]) that a KV-cached
        pass reads: those of `weights`, or the model's own, a static slice of the stacked arrays
        per layer (read in place)."""
        if weights is not None:
            return weights.layers, weights.head, True
        stacked = {name: p[...] for name, p in self.layers.items()}
        layers = tuple({name: x[layer] for name, x in stacked.items()} for layer in range(self.config.num_layers))
        return layers, self._head(), False

    def _head(self) -> Float[Array, "h vocab"]:
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def _project_vocab(self, hidden: Array, head: Array, out_in: bool) -> Array:
        logits = blocks.dense(hidden, head.astype(hidden.dtype), out_in, preferred_element_type=blocks.wide_dtype(hidden.dtype))
        return blocks.softcap(logits, self.config.final_logit_softcap)

    def _embed(self, input_ids, positions) -> tuple[Array, Array, Array]:
        """The (scaled) token embeddings and the RoPE cos/sin of `positions`."""
        config, dtype = self.config, self.dtype
        x = self.embed[...][input_ids].astype(dtype)
        if config.embed_scale:
            x = x * jnp.asarray(math.sqrt(config.hidden_size), dtype)
        return (x, *blocks.rope(positions, config, dtype))

    def _masks(self, query_slots, key_slots, key_valid) -> tuple[Bool[Array, "b t S"], Bool[Array, "b t S"]]:
        """(causal, causal within the sliding window) masks of allowed keys per query."""
        allowed = (key_slots[None, None, :] <= query_slots[None, :, None]) & key_valid[:, None, :].astype(bool)
        windowed = allowed & (key_slots[None, None, :] > query_slots[None, :, None] - (self.config.sliding_window or 0))
        return allowed, windowed

    def _adapter_layers(self, lora: LoRA | None) -> list:
        """Each layer's slice of the adapter (None everywhere without one)."""
        layers = range(self.config.num_layers)
        return [None if lora is None else jax.tree.map(lambda p, layer=layer: p[layer], lora.params) for layer in layers]

    def _layer(self, x, params, adapter, layer, cos, sin, attend, lora, lora_fn, out_in: bool, rows=None):
        """One decoder layer on `x` `[b, t, h]`; `attend(q, k, v)` → (attention output, what it
        returns besides). Matrices in [in, out] layout, or [out, in] with `out_in`. With `rows`
        `[b, w]` (positions), keys and values come from every position but the queries, attention
        output and MLP only from those rows: the output is `[b, w, h]`."""
        config = self.config
        b = x.shape[0]
        heads, kv_heads, hd = config.num_heads, config.num_kv_heads, config.head_dim
        lora_fn = lora_fn or default_lora_fn

        def project(h, name):
            y = blocks.dense(h, params[name], out_in)
            if f"{name}_bias" in params:
                y = y + params[f"{name}_bias"]
            if adapter is not None and name in adapter:
                y = y + lora_fn(h, adapter[name], lora.scale, layer, name).astype(y.dtype)
            return y

        def post_norm(y, name):  # Gemma-2's norms on the attention and MLP outputs
            return blocks.rms_norm(y, params[name], config) if config.sandwich_norms else y

        h = blocks.rms_norm(x, params["attn_norm"], config)
        k = project(h, "k").reshape(b, -1, kv_heads, hd)
        v = project(h, "v").reshape(b, -1, kv_heads, hd)
        if config.qk_norm:
            k = blocks.rms_norm(k, params["k_norm"], config)
        k = blocks.apply_rope(k, cos, sin)
        if rows is not None:
            x, h, cos, sin = (blocks.take_rows(a, rows) for a in (x, h, cos, sin))
        q = project(h, "q").reshape(b, -1, heads, hd)
        if config.qk_norm:
            q = blocks.rms_norm(q, params["q_norm"], config)
        attended, extra = attend(blocks.apply_rope(q, cos, sin), k, v)
        x = x + post_norm(project(attended, "o"), "attn_post_norm")
        h = blocks.rms_norm(x, params["mlp_norm"], config)
        x = x + post_norm(project(blocks.activation(config.activation, project(h, "gate")) * project(h, "up"), "down"), "mlp_post_norm")
        return x, extra

    def _run(self, input_ids, positions, slots, valid, lora, lora_fn, rows=None):
        """Final-normed hidden states of a plain forward: the layers under one `lax.scan`, each
        step slicing its layer out of the stacked weights. With `rows` `[b, w]`, only those
        positions': the scan stops before the last layer, which runs on those rows only."""
        config = self.config
        x, cos, sin = self._embed(input_ids, positions)
        allowed, windowed = self._masks(slots, slots, valid)
        stacked = (
            {name: p[...] for name, p in self.layers.items()},
            lora.params if lora is not None else None,
            jnp.asarray(config.layer_is_sliding),
        )

        def layer_fn(x, layer, rows=None):
            params, adapter, sliding = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), stacked)
            mask = jnp.where(sliding, windowed, allowed) if config.sliding_layers else allowed
            mask = mask if rows is None else blocks.take_rows(mask, rows)

            def attend(q, k, v):
                return blocks.attention(q, blocks.key_layout(k), blocks.value_layout(v), mask, config), None

            return self._layer(x, params, adapter, layer, cos, sin, attend, lora, lora_fn, False, rows)[0]

        if self.remat:
            layer_fn = jax.checkpoint(layer_fn)
        scanned = config.num_layers if rows is None else config.num_layers - 1
        x, _ = jax.lax.scan(lambda x, layer: (layer_fn(x, layer), None), x, jnp.arange(scanned, dtype=jnp.int32))
        if rows is not None:
            x = layer_fn(x, jnp.int32(config.num_layers - 1), rows)
        return blocks.rms_norm(x, self.final_norm[...], config)
