"""jaxdpo: ActiveDPO in JAX — gradient-based active selection of preference pairs, then DPO."""

from jaxdpo import projection
from jaxdpo.dpo import DpoTrainer, dpo_loss
from jaxdpo.features import gradient_features
from jaxdpo.models import Decoder, DecoderConfig, LoRA, init_lora, load_pretrained, load_reward_model, save_pretrained
from jaxdpo.sampling import generate
from jaxdpo.sequences import Sequences
from jaxdpo.rewards import implicit_reward, reward_gradients, sequence_logprobs
from jaxdpo.selection import (
    SELECTORS,
    SelectionPool,
    SelectionResult,
    Selector,
    make_selector,
    select_batch,
    v_inv_norms,
)

__version__ = "0.1.0"

__all__ = [
    "SELECTORS",
    "Decoder",
    "DpoTrainer",
    "DecoderConfig",
    "LoRA",
    "SelectionPool",
    "SelectionResult",
    "Sequences",
    "Selector",
    "dpo_loss",
    "generate",
    "gradient_features",
    "implicit_reward",
    "init_lora",
    "load_pretrained",
    "load_reward_model",
    "make_selector",
    "projection",
    "reward_gradients",
    "save_pretrained",
    "select_batch",
    "sequence_logprobs",
    "v_inv_norms",
]
