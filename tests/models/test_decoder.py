"""The decoder against transformers (PyTorch) on tiny random checkpoints of every family."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpo.models import DecoderConfig, init_lora, load_pretrained
from tests.models.conftest import FAMILIES, build, torch_logits
from tests.tolerance import assert_close, assert_trees_close


@pytest.fixture(scope="module")
def models(checkpoints):
    return {family: load_pretrained(folder) for family, (folder, _) in checkpoints.items()}


PARITY_ULPS = 512
"""Logits from another float32 summation order (transformers, the cache, padding): within a few
dozen roundings of the largest |logit|."""

forward = jax.jit(lambda model, ids, mask: model(ids, attention_mask=mask))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_with_left_padding(family, checkpoints, models, batch):
    ids, mask = batch
    ref = torch_logits(checkpoints[family][1], ids, mask)
    out = np.asarray(forward(models[family], ids, mask))
    assert out.dtype == np.float32 and out.shape == (2, 7, 97)
    assert_close(out[mask.astype(bool)], ref[mask.astype(bool)], ulps=PARITY_ULPS)
    assert np.all(np.isfinite(out))  # padded rows stay finite


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "qwen3"])
def test_left_padded_rows_equal_the_unpadded_sequence(family, models, batch):
    ids, mask = batch
    padded = np.asarray(forward(models[family], ids, mask))[1, 3:]
    alone = np.asarray(models[family](jnp.asarray(ids[1:, 3:])))[0]
    assert_close(padded, alone, ulps=PARITY_ULPS)


def test_family_switches_come_from_the_hf_config(models):
    gemma, qwen3, qwen2, llama = (models[f].config for f in ("gemma", "qwen3", "qwen2", "llama"))
    assert gemma.norm_offset and gemma.embed_scale and gemma.activation == "gelu_tanh" and gemma.tie_embeddings
    assert gemma.num_kv_heads == 1 and gemma.head_dim == 16
    assert qwen3.qk_norm and qwen3.head_dim == 12 and not qwen3.norm_offset
    assert qwen2.qkv_bias and not qwen2.o_bias
    assert llama.rope_theta == 500.0 and llama.activation == "silu"
    gemma2 = models["gemma2"].config
    assert gemma2.sandwich_norms and gemma2.norm_offset and gemma2.query_pre_attn_scalar == 20
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (0.5, 2.0)
    assert gemma2.sliding_window == 3 and gemma2.sliding_layers == (True, False)  # HF's default: every other layer
    assert not gemma.sandwich_norms and gemma.final_logit_softcap is None and not gemma.sliding_layers
    window = models["qwen2_window"].config
    assert window.sliding_window == 3 and window.sliding_layers == (False, True)  # layers ≥ max_window_layers
    assert qwen2.sliding_window is None and not qwen2.sliding_layers
    assert models["llama_mqa_bias"].config.mlp_bias and models["llama_mqa_bias"].config.o_bias


def test_sharded_checkpoint_loads(tmp_path, checkpoints, models, batch):
    folder, torch_model = checkpoints["qwen3"]
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids, mask = batch
    np.testing.assert_array_equal(forward(load_pretrained(tmp_path), ids, mask), forward(models["qwen3"], ids, mask))


def test_bfloat16_is_close_to_float32(checkpoints, models, batch):
    ids, mask = batch
    bf16 = load_pretrained(checkpoints["llama"][0], dtype=jnp.bfloat16)
    assert bf16.embed[...].dtype == jnp.bfloat16
    low = np.asarray(forward(bf16, ids, mask))
    high = np.asarray(forward(models["llama"], ids, mask))
    assert low.dtype == np.float32
    valid = mask.astype(bool)
    assert np.abs(low - high)[valid].max() < 0.05 * np.abs(high[valid]).max()


def test_remat_gives_the_same_logits_and_gradients(checkpoints, models, batch):
    ids, mask = batch
    plain = models["gemma"]
    remat = load_pretrained(checkpoints["gemma"][0], remat=True)
    lora = init_lora(plain, rank=2, alpha=4.0, key=jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.01, lora)

    def loss(model, lora):
        return jnp.sum(model(ids, attention_mask=mask, lora=lora)[:, -1] ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=1))
    (v1, g1), (v2, g2) = grad(plain, lora), grad(remat, lora)
    assert_close(v1, v2, ulps=64)
    assert_trees_close(g1, g2, ulps=1024)  # recompute reorders f32 sums


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "qwen2_window"])  # sliding windows move with the decoded slots
def test_kv_cache_prefill_and_decode_equal_a_full_forward(family, models, batch):
    model = models[family]
    ids, mask = batch
    extra = np.random.default_rng(1).integers(0, 97, size=(2, 3)).astype(np.int32)
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    full = np.asarray(forward(model, full_ids, full_mask))

    step = jax.jit(lambda m, ids, cache, mask: m.forward_cached(ids, cache, attention_mask=mask))
    cache = model.init_cache(2, 12)
    logits, cache = step(model, ids, cache, mask)
    assert_close(np.asarray(logits)[mask.astype(bool)], full[:, :7][mask.astype(bool)], ulps=PARITY_ULPS)
    for t in range(3):
        logits, cache = step(model, extra[:, t : t + 1], cache, np.ones((2, 1), np.int32))
        assert_close(np.asarray(logits)[:, 0], full[:, 7 + t], ulps=PARITY_ULPS)
    assert int(cache.index) == 10
    np.testing.assert_array_equal(cache.next_position, [10, 7])


@pytest.mark.parametrize(
    "family, overrides, match",
    [
        ("llama", dict(model_type="mistral"), "unsupported model_type 'mistral'.*gemma, gemma2, llama, qwen2, qwen3"),
        ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), "RoPE scaling type 'llama3'"),
        ("llama", dict(hidden_act="relu"), "activation 'relu'"),
        ("gemma2", dict(layer_types=["chunked_attention", "full_attention"]), r"gemma2: layer types \['chunked_attention'\] are not supported"),
        ("gemma2", dict(use_bidirectional_attention=True), "gemma2: bidirectional attention is not supported"),
    ],
)
def test_unsupported_configs(tmp_path, checkpoints, family, overrides, match):
    folder = checkpoints[family][0]
    config = {**json.loads((folder / "config.json").read_text()), **overrides}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path)


def test_missing_tensor_and_shape_mismatch_are_named(tmp_path, checkpoints):
    from safetensors.numpy import load_file, save_file

    folder = checkpoints["llama"][0]
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    (tmp_path / "a").mkdir()
    save_file(missing, tmp_path / "a" / "model.safetensors")
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_pretrained(tmp_path / "a")
    (tmp_path / "b").mkdir()
    save_file(tensors, tmp_path / "b" / "model.safetensors")
    (tmp_path / "b" / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(48, 32\).*\(40, 32\)"):
        load_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="config.json is missing"):
        load_pretrained(tmp_path)


def test_bad_input_ids(models):
    with pytest.raises(ValueError, match="input_ids must be an integer array"):
        models["llama"](jnp.ones((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="input_ids must be 2-D"):
        models["llama"](jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        models["llama"](jnp.ones((1, 3), jnp.int32), attention_mask=jnp.ones((1, 4), jnp.int32))


def test_config_round_trips_through_transformers(models):
    for model in models.values():
        assert DecoderConfig.from_hf(model.config.to_hf()) == model.config


def test_random_model_from_a_config_exports_and_reloads(tmp_path, batch):
    from flax import nnx

    from jaxdpo.models import Decoder, save_pretrained

    torch_model = build("llama")
    config = DecoderConfig.from_hf(torch_model.config)
    model = Decoder(config, rngs=nnx.Rngs(3))
    save_pretrained(model, tmp_path)
    ids, mask = batch
    np.testing.assert_array_equal(forward(load_pretrained(tmp_path), ids, mask), forward(model, ids, mask))
