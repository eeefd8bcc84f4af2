"""Hugging Face checkpoints: `config.json` + one or sharded `*.safetensors` in, merged exports out."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from jaxdpo.models.config import DecoderConfig, as_pretrained_config
from jaxdpo.models.decoder import Decoder, layer_shapes
from jaxdpo.models.lora import LoRA, merged_delta
from jaxdpo.models.reward_model import RewardModel

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# our per-layer name -> (HF name inside "layers.{i}.", whether the tensor is a [out, in] matrix)
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "attn_post_norm": ("post_attention_layernorm.weight", False),
    "mlp_post_norm": ("post_feedforward_layernorm.weight", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    **{p: (f"self_attn.{p}_proj.weight", True) for p in ("q", "k", "v", "o")},
    **{p: (f"mlp.{p}_proj.weight", True) for p in ("gate", "up", "down")},
    **{f"{p}_bias": (f"self_attn.{p}_proj.bias", False) for p in ("q", "k", "v", "o")},
    **{f"{p}_bias": (f"mlp.{p}_proj.bias", False) for p in ("gate", "up", "down")},
}


def hf_module_name(target: str) -> str:
    """HF's module path, inside a decoder layer, of the projection a LoRA `target` adapts
    ("q" → "self_attn.q_proj"); the same in every supported family."""
    return _LAYER_NAMES[target][0].removesuffix(".weight")


def _hf_layer_name(name: str, config: DecoderConfig) -> tuple[str, bool]:
    """HF's name and layout of our per-layer tensor `name`; Gemma-2 norms the MLP input with
    `pre_feedforward_layernorm` and uses `post_attention_layernorm` on the attention output."""
    if name == "mlp_norm" and config.sandwich_norms:
        return "pre_feedforward_layernorm.weight", False
    return _LAYER_NAMES[name]


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a Hugging Face checkpoint folder: config.json is missing")
    return json.loads(config_file.read_text())


class _Tensors:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, path: Path):
        if (path / _INDEX).is_file():
            weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
            self.files = {name: path / file for name, file in weight_map.items()}
        elif (path / _SINGLE).is_file():
            with safe_open(path / _SINGLE, framework="flax") as f:
                self.files = {name: path / _SINGLE for name in f.keys()}
        else:
            raise ValueError(f"{path}: no {_SINGLE} or {_INDEX} found")
        self.path = path

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple[int, ...], dtype, transpose: bool = False) -> jax.Array:
        if name not in self.files:
            raise ValueError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        with safe_open(self.files[name], framework="flax") as f:
            tensor = f.get_tensor(name)
        if transpose:
            tensor = tensor.T
        if tuple(tensor.shape) != tuple(shape):
            got = tuple(tensor.T.shape if transpose else tensor.shape)
            want = tuple(shape[::-1] if transpose else shape)
            raise ValueError(f"{self.path}: tensor {name!r} has shape {got}, the config implies {want}")
        return jnp.asarray(tensor, dtype)


def _prefix(tensors: _Tensors) -> str:
    return "model." if "model.embed_tokens.weight" in tensors else ""


def _load_decoder(path: Path, hf_config: dict, dtype, remat: bool, tensors: _Tensors) -> Decoder:
    config = DecoderConfig.from_hf(hf_config)
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype, remat=remat, hf_config=hf_config))
    prefix = _prefix(tensors)
    for name, shape in layer_shapes(config).items():
        hf_name, transpose = _hf_layer_name(name, config)
        per_layer = [
            tensors.get(f"{prefix}layers.{i}.{hf_name}", shape, dtype, transpose) for i in range(config.num_layers)
        ]
        model.layers[name].set_value(jnp.stack(per_layer))
    model.embed.set_value(tensors.get(f"{prefix}embed_tokens.weight", (config.vocab_size, config.hidden_size), dtype))
    model.final_norm.set_value(tensors.get(f"{prefix}norm.weight", (config.hidden_size,), dtype))
    if model.lm_head is not None:
        model.lm_head.set_value(tensors.get("lm_head.weight", (config.hidden_size, config.vocab_size), dtype, True))
    return model


def load_pretrained(path, dtype=jnp.float32, *, remat: bool = False) -> Decoder:
    """A `Decoder` from an HF causal-LM checkpoint folder (Llama, Gemma, Gemma-2, Qwen2, Qwen3)."""
    path = Path(path)
    hf_config = _read_config(path)
    return _load_decoder(path, hf_config, dtype, remat, _Tensors(path))


def load_reward_model(path, dtype=jnp.float32, *, remat: bool = False) -> RewardModel:
    """A `RewardModel` from an HF `*ForSequenceClassification` checkpoint with one label."""
    path = Path(path)
    hf_config = _read_config(path)
    num_labels = as_pretrained_config(hf_config).num_labels
    if num_labels != 1:
        raise ValueError(f"{path}: a reward model must have exactly one label, the config has {num_labels}")
    tensors = _Tensors(path)
    backbone = _load_decoder(path, {**hf_config, "tie_word_embeddings": True}, dtype, remat, tensors)
    score = tensors.get("score.weight", (backbone.config.hidden_size, 1), dtype, transpose=True)
    return RewardModel(backbone, score, hf_config=hf_config)


def hf_state_dict(model: Decoder, lora: LoRA | None = None) -> dict[str, jax.Array]:
    """The model's weights under HF names and layouts, with `lora` merged in (W + (α/r)·A B)."""
    prefix = "model."
    state = {f"{prefix}embed_tokens.weight": model.embed[...], f"{prefix}norm.weight": model.final_norm[...]}
    if model.lm_head is not None:
        state["lm_head.weight"] = model.lm_head[...].T
    for name, param in model.layers.items():
        weight = param[...]
        if lora is not None and name in lora.params:
            weight = (weight.astype(jnp.float32) + merged_delta(lora, name)).astype(weight.dtype)
        hf_name, transpose = _hf_layer_name(name, model.config)
        for i in range(model.config.num_layers):
            state[f"{prefix}layers.{i}.{hf_name}"] = weight[i].T if transpose else weight[i]
    return state


def save_pretrained(model: Decoder, path, *, lora: LoRA | None = None, max_shard_size: int = 5 * 2**30) -> Path:
    """Write `model` (with `lora` merged) as an HF checkpoint folder transformers can load.

    Tensors go to `model.safetensors`, or to shards of at most `max_shard_size` bytes with a
    `model.safetensors.index.json` when they do not fit in one."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: jnp.asarray(t) for name, t in hf_state_dict(model, lora).items()}
    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].size * state[name].dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    for stale in list(path.glob("model*.safetensors")) + [path / _INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(path / _SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = int(sum(t.size * t.dtype.itemsize for t in state.values()))
        (path / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config = json.loads(model.hf_config_json)
    hf_config["dtype"] = str(np.dtype(model.dtype)) if model.dtype != jnp.bfloat16 else "bfloat16"
    hf_config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    return path
