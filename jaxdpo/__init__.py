"""jaxdpo: ActiveDPO in JAX — gradient-based active selection of preference pairs, then DPO.

The public names below are imported on first use (`jaxdpo.lazy`), so the command line starts
without loading JAX."""

from typing import TYPE_CHECKING

from jaxdpo.lazy import lazy_exports

VERSION = "0.1.0"
__version__ = VERSION  # the conventional name for tools that read it

_EXPORTS = {
    "jaxdpo.projection": ("projection",),
    "jaxdpo.dpo": ("DpoTrainer", "dpo_loss"),
    "jaxdpo.features": ("gradient_features",),
    "jaxdpo.models": ("Decoder", "DecoderConfig", "LoRA", "init_lora", "load_pretrained", "load_reward_model", "save_pretrained"),
    "jaxdpo.sampling": ("generate",),
    "jaxdpo.sequences": ("Sequences",),
    "jaxdpo.rewards": ("implicit_reward", "reward_gradients", "sequence_logprobs"),
    "jaxdpo.selection": ("SELECTORS", "SelectionPool", "SelectionResult", "Selector", "make_selector", "select_batch", "v_inv_norms"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what type checkers and editors see: the same names, imported eagerly
    from jaxdpo import projection
    from jaxdpo.dpo import DpoTrainer, dpo_loss
    from jaxdpo.features import gradient_features
    from jaxdpo.models import Decoder, DecoderConfig, LoRA, init_lora, load_pretrained, load_reward_model, save_pretrained
    from jaxdpo.rewards import implicit_reward, reward_gradients, sequence_logprobs
    from jaxdpo.sampling import generate
    from jaxdpo.selection import SELECTORS, SelectionPool, SelectionResult, Selector, make_selector, select_batch, v_inv_norms
    from jaxdpo.sequences import Sequences
