"""LoRA adapters in PEFT's format: a folder with `adapter_config.json` and
`adapter_model.safetensors` that `peft.PeftModel.from_pretrained(base_model, folder)` loads, and
vLLM and TGI serve.

PEFT's LoRA adds `(lora_alpha / r) · B(A x)` to a Linear's output, `lora_A.weight` [r, in] and
`lora_B.weight` [out, r] in torch's [out, in] layout; jaxdpo's adds `(α / r) · (x A) B` with A
[L, in, r] and B [L, r, out]. So layer i's `lora_A.weight` is A[i]ᵀ and `lora_B.weight` is B[i]ᵀ,
r = rank and lora_alpha = α with `use_rslora` false (rsLoRA would scale by α / √r instead)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from safetensors.flax import save_file

from jaxdpo.models.checkpoint import hf_module_name
from jaxdpo.models.lora import LORA_TARGETS, LoRA

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LAYERS_KEY = "base_model.model.model.layers"
"""Where PEFT's keys of a causal LM's decoder layers start: PeftModel → the *ForCausalLM → its `model`."""


def peft_state_dict(lora: LoRA) -> dict[str, jax.Array]:
    """The adapter's tensors under PEFT's names and layout
    (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`: [r, in], `lora_B`: [out, r])."""
    state = {}
    for target, params in lora.params.items():
        module = hf_module_name(target)
        for i in range(params["a"].shape[0]):
            state[f"{LAYERS_KEY}.{i}.{module}.lora_A.weight"] = jnp.asarray(params["a"][i]).T
            state[f"{LAYERS_KEY}.{i}.{module}.lora_B.weight"] = jnp.asarray(params["b"][i]).T
    return state


def peft_config(lora: LoRA, base_model: str) -> dict:
    """`adapter_config.json`: PEFT's `LoraConfig` of this adapter on the causal LM `base_model`."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": alpha,
        "use_rslora": False,
        "target_modules": [hf_module_name(t).rpartition(".")[2] for t in LORA_TARGETS if t in lora.params],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft_adapter(lora: LoRA, path, *, base_model: str) -> Path:
    """Write `lora` as a PEFT adapter folder for the causal LM `base_model` (a folder or hub name)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(lora), str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(peft_config(lora, base_model), indent=2) + "\n")
    return path
