"""A rehearsal of one paper round with no hub: random-weight checkpoints with the exact shapes of a
config's policy and reward model, a tokenizer trained in-process, synthetic prompts with the
dataset's lengths; then one round of the config, timed stage by stage (`jaxdpo rehearse`).

`scale` in (0, 1] shrinks widths, depth, vocabulary and counts (prompts per round, evaluation
prompts, the batch B, the LoRA rank and the projection dim), not sequence lengths, so a CPU can
rehearse the shape of the work: `--scale 0.02` on gemma-2b-tldr runs on 2 cores in minutes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from jaxdpo.config import ExperimentConfig
from jaxdpo.errors import UserError

POLICY_SHAPES = {"google/gemma-2b": "gemma-2b", "meta-llama/Llama-2-7b-hf": "llama-2-7b", "Qwen/Qwen3-4B": "qwen3-4b"}
REWARD_SHAPES = {"OpenAssistant/reward-model-deberta-v3-large-v2": "deberta-v3-large"}
PROMPT_TOKENS = {"tldr": (300, 500), "webgpt": (10, 60), "hh_rlhf": (40, 300), "jsonl": (50, 200)}
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")


def shipped_shape(name: str) -> dict:
    """The `config.json` shipped for `name` (a key of POLICY_SHAPES / REWARD_SHAPES values)."""
    return json.loads(resources.files("jaxdpo.experiment").joinpath("shapes", f"{name}.json").read_text())


def scaled_shape(hf: dict, scale: float) -> dict:
    """`hf` with widths, depth and vocabulary times `scale` (heads and head size kept consistent:
    kv heads divide heads, sizes stay multiples of 8); `scale` = 1 returns the exact shape."""
    if scale == 1.0:
        return dict(hf)
    def times(value: int, floor: int, multiple: int = 1) -> int:
        return max(floor, multiple * round(value * scale / multiple))
    hidden = times(hf["hidden_size"], 16, 8)
    heads = times(hf["num_attention_heads"], 1)
    if "head_dim" not in hf:
        heads = math.gcd(heads, hidden)  # the head size is hidden / heads
    out = dict(hf, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=times(hf["num_hidden_layers"], 1),
               vocab_size=times(hf["vocab_size"], 512, 8), intermediate_size=times(hf["intermediate_size"], 16, 8))
    if "num_key_value_heads" in hf:
        out["num_key_value_heads"] = math.gcd(heads, times(hf["num_key_value_heads"], 1))
    if "head_dim" in hf:
        out["head_dim"] = times(hf["head_dim"], 8, 2)
    if "max_window_layers" in hf:
        out["max_window_layers"] = out["num_hidden_layers"]
    return out


def scaled_config(config: ExperimentConfig, scale: float) -> ExperimentConfig:
    """The counts of `config` times `scale` (at least what a round needs), one round, one seed."""
    def times(value: int, floor: int) -> int:
        return max(floor, round(value * scale))
    prompts = times(config.data.prompts_per_round, 4)
    m = config.generation.responses_per_prompt
    return dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, rounds=1, seeds=config.run.seeds[:1]),
        data=dataclasses.replace(config.data, prompts_per_round=prompts, max_prompts=None),
        selection=dataclasses.replace(config.selection, batch_size=min(times(config.selection.batch_size, 2), prompts * m * (m - 1) // 2)),
        lora=dataclasses.replace(config.lora, rank=times(config.lora.rank, 2), alpha=config.lora.alpha * times(config.lora.rank, 2) / config.lora.rank),
        features=dataclasses.replace(config.features, dim=times(config.features.dim, 64)),
        eval=dataclasses.replace(config.eval, prompts=times(config.eval.prompts, 2)),
    )


def word_list(size: int) -> list[str]:
    """`size` distinct pseudo-words (a, b, …, z, ba, bb, …): the synthetic language's vocabulary."""
    words = []
    for index in range(size):
        word, index = "", index
        while True:
            word = chr(ord("a") + index % 26) + word
            index //= 26
            if index == 0:
                break
        words.append(word)
    return words


def train_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` entries (the special tokens, then the most
    frequent words), trained in-process on the synthetic corpus; one word is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    words = word_list(vocab_size - len(SPECIAL_TOKENS))
    core.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS)))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")


def synthetic_prompts(count: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts of uniformly drawn word counts in `lengths`, words Zipf-distributed
    over the first `vocab` pseudo-words (natural text's rank-frequency shape)."""
    rng = np.random.default_rng(seed)
    words = word_list(vocab)
    weights = 1.0 / np.arange(1, vocab + 1)
    weights /= weights.sum()
    return [f"{i} " + " ".join(words[j] for j in rng.choice(vocab, size=rng.integers(*lengths, endpoint=True) - 1, p=weights)) for i in range(count)]


def write_policy(shape: dict, tokenizer, folder: Path, dtype) -> Path:
    """A random-weight checkpoint of `shape` (jaxdpo's decoder, saved as an HF folder) with `tokenizer`."""
    from flax import nnx

    from jaxdpo.models import Decoder, DecoderConfig, save_pretrained

    hf = dict(shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = Decoder(DecoderConfig.from_hf(hf), rngs=nnx.Rngs(0), dtype=dtype, hf_config=hf)
    save_pretrained(model, folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_reward_model(shape: dict, vocab_size: int, folder: Path) -> Path:
    """A random-weight PyTorch sequence-classification checkpoint of `shape` and its tokenizer."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise UserError("oracle.path: the rehearsal builds the PyTorch reward model; install torch") from error
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**dict(shape, vocab_size=vocab_size))
    transformers.AutoModelForSequenceClassification.from_config(config).eval().save_pretrained(folder)
    train_tokenizer(vocab_size).save_pretrained(folder)
    return folder
