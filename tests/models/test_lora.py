"""LoRA adapters: initialization, gradients, the lora_fn hook, and the merged export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from jaxdpo.models import LORA_TARGETS, LoRA, default_lora_fn, init_lora, load_pretrained, save_pretrained
from tests.models.conftest import torch_logits
from tests.tolerance import assert_close


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_pretrained(checkpoints["qwen3"][0])


def trained(model) -> LoRA:
    """An adapter with non-zero B, as after some DPO steps."""
    lora = init_lora(model, rank=4, alpha=8.0, key=jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 20))
    params = {t: {"a": p["a"], "b": 0.1 * jax.random.normal(next(keys), p["b"].shape)} for t, p in lora.params.items()}
    return LoRA(params=params, rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def trained_lora(model):
    return trained(model)


forward = jax.jit(lambda model, ids, mask, lora: model(ids, attention_mask=mask, lora=lora))


def test_init_shapes_and_zero_b(model):
    lora = init_lora(model, rank=3, alpha=6.0, key=jax.random.key(0))
    c = model.config
    assert lora.targets == LORA_TARGETS and lora.scale == 2.0
    assert lora.params["q"]["a"].shape == (c.num_layers, c.hidden_size, 3)
    assert lora.params["k"]["b"].shape == (c.num_layers, 3, c.num_kv_heads * c.head_dim)
    assert lora.params["down"]["a"].shape == (c.num_layers, c.intermediate_size, 3)
    bound = 1 / np.sqrt(c.hidden_size)
    assert 0 < np.abs(lora.params["q"]["a"]).max() <= bound
    assert all(np.all(p["b"] == 0) for p in lora.params.values())
    only = init_lora(model, rank=2, alpha=2.0, targets=("q", "v"), key=jax.random.key(1))
    assert only.targets == ("q", "v")


def test_fresh_adapter_is_the_reference_model(model, batch):
    ids, mask = batch
    lora = init_lora(model, rank=2, alpha=4.0, key=jax.random.key(0))
    np.testing.assert_array_equal(forward(model, ids, mask, lora), forward(model, ids, mask, None))


def test_gradient_at_init_b_nonzero_a_exactly_zero(model, batch):
    ids, mask = batch
    lora = init_lora(model, rank=2, alpha=4.0, key=jax.random.key(0))
    grads = jax.grad(lambda l: jnp.sum(model(ids, attention_mask=mask, lora=l)[:, -1, 0]))(lora)
    assert isinstance(grads, LoRA)
    for target, g in grads.params.items():
        assert np.all(np.isfinite(g["a"])) and np.all(np.isfinite(g["b"]))
        assert np.all(g["a"] == 0), target
        assert np.abs(g["b"]).max() > 0, target


def test_custom_lora_fn_sees_each_layers_slice(model, batch, trained_lora):
    ids, mask = batch
    seen = []

    def spy(x, params, scale, layer, target):
        seen.append((target, x.shape, {k: v.shape for k, v in params.items()}, scale))
        return default_lora_fn(x, params, scale, layer, target)

    extra = LoRA({t: {**p, "probe": jnp.zeros((model.config.num_layers, 5))} for t, p in trained_lora.params.items()}, 4, 8.0)
    out = model(ids, attention_mask=mask, lora=extra, lora_fn=spy)
    assert_close(out, forward(model, ids, mask, trained_lora), ulps=64)
    by_target = {t: (x, p, s) for t, x, p, s in seen}
    x, params, scale = by_target["q"]
    assert x == (2, 7, 32) and scale == 2.0
    assert params == {"a": (32, 4), "b": (4, 48), "probe": (5,)}
    assert by_target["down"][0] == (2, 7, 48)


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_merged_export_loads_into_transformers_with_the_same_logits(tmp_path, family, checkpoints, batch):
    model = load_pretrained(checkpoints[family][0])
    trained_lora = trained(model)
    ids, mask = batch
    expected = np.asarray(forward(model, ids, mask, trained_lora))
    save_pretrained(model, tmp_path / "merged", lora=trained_lora)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    assert hf.dtype == torch.float32
    valid = mask.astype(bool)
    assert_close(torch_logits(hf.eval(), ids, mask)[valid], expected[valid], ulps=1024)  # another library's float32 order
    save_pretrained(model, tmp_path / "sharded", lora=trained_lora, max_shard_size=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    reloaded = load_pretrained(tmp_path / "sharded")
    assert_close(forward(reloaded, ids, mask, None), expected, ulps=256)  # merged weights W + BA: rounded once more


def test_bad_lora_arguments(model):
    with pytest.raises(ValueError, match="LoRA targets must be distinct names from"):
        init_lora(model, rank=2, alpha=2.0, targets=("q", "lm_head"), key=jax.random.key(0))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        init_lora(model, rank=0, alpha=2.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        init_lora(model, rank=2, alpha=0.0, key=jax.random.key(0))
