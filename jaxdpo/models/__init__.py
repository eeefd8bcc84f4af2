"""Decoder LLMs (Llama, Gemma, Gemma-2, Qwen2/Qwen3) in Flax NNX, HF checkpoint I/O, and LoRA adapters (PEFT export)."""

from jaxdpo.models.checkpoint import hf_module_name, hf_state_dict, load_pretrained, load_reward_model, save_pretrained
from jaxdpo.models.config import SUPPORTED_FAMILIES, DecoderConfig
from jaxdpo.models.decoder import DecodeWeights, Decoder, KVCache
from jaxdpo.models.lora import LORA_TARGETS, LoRA, LoraFn, default_lora_fn, init_lora, target_shapes
from jaxdpo.models.peft import peft_config, peft_state_dict, save_peft_adapter
from jaxdpo.models.reward_model import RewardModel, last_token_states

__all__ = [
    "LORA_TARGETS",
    "SUPPORTED_FAMILIES",
    "DecodeWeights",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "LoRA",
    "LoraFn",
    "RewardModel",
    "default_lora_fn",
    "hf_module_name",
    "hf_state_dict",
    "init_lora",
    "last_token_states",
    "load_pretrained",
    "load_reward_model",
    "peft_config",
    "peft_state_dict",
    "save_peft_adapter",
    "save_pretrained",
    "target_shapes",
]
