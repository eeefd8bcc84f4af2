"""LoRA adapters exported in PEFT's format: `peft.PeftModel.from_pretrained` on the transformers
model gives jaxdpo's adapted logits (Llama, Gemma, Qwen3; every target and a subset)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402

from jaxdpo.models import LoRA, load_pretrained, save_peft_adapter  # noqa: E402
from tests.models.conftest import torch_logits  # noqa: E402
from tests.tiny import trained_lora  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

forward = jax.jit(lambda model, ids, mask, lora: model(ids, attention_mask=mask, lora=lora))
RANK, ALPHA = 4, 8.0  # scale α/r = 2: neither 1 nor rsLoRA's α/√r = 4, so a wrong scaling shows


def peft_logits(folder, adapter, ids, mask):
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return torch_logits(peft.PeftModel.from_pretrained(base, adapter).eval(), ids, mask)


@pytest.mark.parametrize("family, targets", [("llama", None), ("gemma", None), ("qwen3", None), ("qwen3", ("q", "v", "down"))])
def test_peft_model_gives_jaxdpos_adapted_logits(tmp_path, checkpoints, batch, family, targets):
    folder = checkpoints[family][0]
    model = load_pretrained(folder)
    lora = trained_lora(model, rank=RANK, alpha=ALPHA)
    if targets:
        lora = LoRA({t: lora.params[t] for t in targets}, RANK, ALPHA)
    ids, mask = batch
    expected = np.asarray(forward(model, ids, mask, lora))
    save_peft_adapter(lora, tmp_path / "adapter", base_model=str(folder))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["base_model_name_or_path"]) == (RANK, 8, False, str(folder))
    modules = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    assert config["target_modules"] == [modules[t] for t in (targets or modules)]
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "np") as f:
        a = f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
        assert len(list(f.keys())) == 2 * model.config.num_layers * len(targets or modules)
    np.testing.assert_array_equal(a, np.asarray(lora.params["q"]["a"][1]).T)  # [r, in]
    np.testing.assert_array_equal(b, np.asarray(lora.params["q"]["b"][1]).T)  # [out, r]

    got = peft_logits(folder, tmp_path / "adapter", ids, mask)
    valid = mask.astype(bool)
    assert np.abs(expected - np.asarray(forward(model, ids, mask, None))).max() > 0.1  # the adapter changes the logits
    assert_close(got[valid], expected[valid], ulps=512)  # transformers' float32 order: 6e-5 of the logits' scale
