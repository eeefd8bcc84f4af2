"""A config's round without its weights: the policy and the JAX reward model as abstract arrays
(`nnx.eval_shape`) placed on a mesh as a run places them, their shapes from the shipped
`config.json`s (`jaxdpo/experiment/shapes`) or a local model folder, and the lengths a run's
chunks have (prompts padded to `data.max_prompt_tokens`). Reads no weights, asks no hub."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxdpo import embedded
from jaxdpo.config import ExperimentConfig
from jaxdpo.errors import UserError
from jaxdpo.experiment.rehearsal import POLICY_SHAPES, shipped_shape
from jaxdpo.experiment.stages import RoundShape
from jaxdpo.models import Decoder, DecoderConfig, RewardModel
from jaxdpo.sharding import model_sharding


def abstract_round(config: ExperimentConfig, mesh: Mesh | None) -> RoundShape:
    """The `RoundShape` of a run of `config` on `mesh` (None: one device), with abstract models."""
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    if config.embedded:
        tokenizer = embedded.build_tokenizer()
        model = nnx.eval_shape(lambda: Decoder(embedded.MODEL_CONFIG, rngs=nnx.Rngs(0), dtype=dtype, remat=config.model.remat))
        return RoundShape(
            config, placed(model, mesh), mesh, embedded.PROMPT_TOKENS, embedded.MAX_NEW_TOKENS, tokenizer.eos_token_id,
            tokenizer.pad_token_id, _reward_model(config, mesh),
        )
    hf = model_shape("model.path", config.model.path)
    model = nnx.eval_shape(lambda: Decoder(DecoderConfig.from_hf(hf), rngs=nnx.Rngs(0), dtype=dtype, remat=config.model.remat, hf_config=hf))
    eos = hf.get("eos_token_id")
    pad = hf.get("pad_token_id")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return RoundShape(
        config, placed(model, mesh), mesh, config.data.max_prompt_tokens, config.generation.max_new_tokens,
        tuple(eos) if isinstance(eos, list) else eos, 0 if pad is None else pad, _reward_model(config, mesh),
    )


def model_shape(key: str, path: str) -> dict:
    """The `config.json` of `path`: a shipped shape for a hub name the rehearsal knows, or a local
    folder's."""
    if path in POLICY_SHAPES:
        return shipped_shape(POLICY_SHAPES[path])
    file = Path(path).expanduser() / "config.json"
    if not file.is_file():
        raise UserError(
            f"{key}: jaxdpo plan reads a model's shape from a local folder's config.json or a shipped shape "
            f"({', '.join(POLICY_SHAPES)}); {path!r} is neither"
        )
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{key}: cannot read {file}: {error}") from error


def placed(model, mesh: Mesh | None):
    """An abstract model's arrays with the shardings `sharding.shard_model` gives them."""
    if mesh is None:
        return model
    return jax.tree_util.tree_map_with_path(lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=model_sharding(path, x.shape, mesh)), model)


def _reward_model(config: ExperimentConfig, mesh: Mesh | None):
    """The oracle's JAX reward model as `load_reward_model` builds it (float32, tied head), or None."""
    if config.oracle.kind != "reward_model":
        return None
    hf = model_shape("oracle.path", config.oracle.path)
    backbone = DecoderConfig.from_hf({**hf, "tie_word_embeddings": True})

    def build():
        return RewardModel(Decoder(backbone, rngs=nnx.Rngs(0), hf_config=hf), jnp.zeros((backbone.hidden_size, 1)), hf_config=hf)

    return placed(nnx.eval_shape(build), mesh)
