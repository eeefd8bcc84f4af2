"""A rehearsal of one paper round with no hub: random-weight checkpoints with the exact shapes of a
config's policy and reward model, a tokenizer trained in-process, synthetic prompts with the
dataset's lengths (and reference responses of the generation length, for the capability guard);
then one round of the config, timed stage by stage (`jaxdpo rehearse`).

`scale` in (0, 1] shrinks widths, depth, vocabulary and counts (prompts per round, evaluation
prompts, the batch B, the LoRA rank and the projection dim), not sequence lengths, so a CPU can
rehearse the shape of the work: `--scale 0.02` on gemma-2b-tldr runs on 2 cores in minutes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from jaxdpo.config import ExperimentConfig
from jaxdpo.errors import UserError
from jaxdpo.experiment.targets import chip_of

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
    return [" ".join(words[j] for j in rng.choice(vocab, size=rng.integers(*lengths, endpoint=True), p=weights)) for _ in range(count)]


def write_policy(shape: dict, tokenizer, folder: Path, dtype) -> Path:
    """A random-weight checkpoint of `shape` (jaxdpo's decoder, saved as an HF folder) with `tokenizer`."""
    from flax import nnx

    from jaxdpo.models import Decoder, DecoderConfig, save_pretrained

    hf = dict(shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = Decoder(DecoderConfig.from_hf(hf), rngs=nnx.Rngs(0), dtype=dtype, hf_config=hf)
    save_pretrained(model, folder)
    tokenizer.save_pretrained(folder)
    return folder


def require_torch() -> None:
    """The rehearsal's reward model is a transformers PyTorch model; without torch, say what to install."""
    if importlib.util.find_spec("torch") is None:
        raise UserError(
            "the rehearsal runs its reward model in PyTorch, which is not installed: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu (the CPU wheel; or a CUDA build for a GPU), or pip install 'jaxdpo[torch]'"
        )


def write_reward_model(shape: dict, vocab_size: int, folder: Path) -> Path:
    """A random-weight PyTorch sequence-classification checkpoint of `shape` and its tokenizer."""
    require_torch()
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**dict(shape, vocab_size=vocab_size))
    transformers.AutoModelForSequenceClassification.from_config(config).eval().save_pretrained(folder)
    train_tokenizer(vocab_size).save_pretrained(folder)
    return folder


def rehearse(config_path: str | Path, out_dir: str | Path, *, scale: float = 1.0, progress=None) -> dict:
    """Build the stand-ins of `config_path`'s models and data in `out_dir` (at `scale`), run one
    round of its first ActiveDPO track there, and return (and write to `rehearsal.json`) the
    per-stage seconds, peak bytes per device (the memory plan), tokens/s and MFU."""
    from jaxdpo.config import load_config
    from jaxdpo.experiment import folder, loop

    if not 0 < scale <= 1:
        raise UserError(f"--scale must be in (0, 1], got {scale}")
    require_torch()  # before minutes of writing the policy
    out_dir = Path(out_dir)
    config = scaled_config(load_config(config_path), scale)
    policy_name = POLICY_SHAPES.get(config.model.path)
    if policy_name is None:
        raise UserError(f"model.path: no shipped shape for {config.model.path!r}; the rehearsal knows {', '.join(POLICY_SHAPES)}")
    reward_name = REWARD_SHAPES.get(config.oracle.path or "", "deberta-v3-large")
    policy_shape = scaled_shape(shipped_shape(policy_name), scale)
    reward_shape = scaled_shape(shipped_shape(reward_name), scale)
    folder.make_out_dir(out_dir, resume=False)
    stand_in = _stand_ins(config, out_dir, policy_shape, reward_shape)
    run_dir = out_dir / "run"
    rows = loop.run(stand_in, run_dir, resume=(run_dir / "config.json").exists(), progress=progress, plan=True)
    report = _report(stand_in, policy_shape, rows, json.loads((run_dir / "memory-plan.json").read_text()))
    report.update(config=str(config_path), scale=scale)
    (out_dir / "rehearsal.json").write_text(json.dumps(report, indent=2))
    return report


def _stand_ins(config: ExperimentConfig, out_dir: Path, policy_shape: dict, reward_shape: dict) -> ExperimentConfig:
    """Write the random-weight policy and reward model and the synthetic prompts and references; the config of
    one ActiveDPO round on them."""
    import jax.numpy as jnp

    tokenizer = train_tokenizer(policy_shape["vocab_size"])
    policy = out_dir / "policy"
    if not (policy / "config.json").exists():
        write_policy(policy_shape, tokenizer, policy, jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32)
    reward = out_dir / "reward-model"
    if not (reward / "config.json").exists():
        write_reward_model(reward_shape, reward_shape["vocab_size"], reward)
    low, high = PROMPT_TOKENS[config.data.source]
    lengths = (min(low, config.data.max_prompt_tokens), min(high, config.data.max_prompt_tokens))
    prompts = out_dir / "prompts.jsonl"
    count, vocab, length = config.data.prompts_per_round + config.eval.prompts, policy_shape["vocab_size"] - len(SPECIAL_TOKENS), config.generation.max_new_tokens
    texts, answers = synthetic_prompts(count, lengths, vocab), synthetic_prompts(count, (length, length), vocab, seed=1)
    prompts.write_text("".join(json.dumps({"prompt": text, "chosen": answer}) + "\n" for text, answer in zip(texts, answers)))
    method = "activedpo" if "activedpo" in config.run.methods else config.run.methods[0]
    return dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, methods=(method,)),
        model=dataclasses.replace(config.model, path=str(policy)),
        data=dataclasses.replace(config.data, source="jsonl", path=str(prompts), eval_split=None),
        oracle=dataclasses.replace(config.oracle, kind="torch_reward_model", path=str(reward)),
    )


def _report(config: ExperimentConfig, shape: dict, rows: list[dict], plan: dict) -> dict:
    """Per stage of the round: seconds, peak bytes per device, tokens/s, model FLOPs utilization."""
    import jax

    from jaxdpo.models import DecoderConfig

    round_row = next(row for row in rows if row["round"] == 1)
    device = jax.devices()[0]
    chip = chip_of(device.device_kind)
    peak = None if chip is None else chip.peak_flops
    params = parameter_count(DecoderConfig.from_hf(shape))
    c, m = config, config.generation.responses_per_prompt
    seq = c.data.max_prompt_tokens + c.generation.max_new_tokens
    responses = c.data.prompts_per_round * m
    steps = c.dpo.epochs * -(-c.selection.batch_size // (c.dpo.batch_size * c.dpo.grad_accum))
    dpo_rows = steps * 2 * c.dpo.batch_size * c.dpo.grad_accum
    # tokens and FLOPs (2 per parameter and token forward; LoRA backward: activations only, 2 more)
    work = {
        "generation": (responses * c.generation.max_new_tokens, 2 * params),
        "features": (responses * seq, 4 * params),
        "selection": (None, None),
        "training": (dpo_rows * seq + 2 * c.selection.batch_size * seq, 4 * params),
        "eval": (_eval_tokens(c, seq), 2 * params),
    }
    stage_bytes = {name: max((p["bytes"] for p in plan["stages"] if name in p["timed_as"]), default=None) for name in work}
    stages = {}
    for name, (tokens, flops_per_token) in work.items():
        seconds = round_row.get(f"{name}_s")
        if seconds is None:
            continue
        entry = {"seconds": seconds, "peak_bytes": stage_bytes[name]}
        if tokens is not None:
            entry["tokens_per_s"] = round(tokens / seconds, 1)
            entry["mfu"] = None if peak is None else round(tokens * flops_per_token / seconds / (peak * jax.device_count()), 4)
        stages[name] = entry
    if "oracle_s" in round_row:
        stages["oracle"] = {"seconds": round_row["oracle_s"], "peak_bytes": None}
    return {
        "device": f"{jax.device_count()} × {device.device_kind}", "params": params, "round_seconds": round(sum(s["seconds"] for s in stages.values()), 3),
        "memory_limit_bytes": plan["limit_bytes"], "stages": stages,
    }


def _eval_tokens(config: ExperimentConfig, seq: int) -> int:
    """Tokens the evaluation runs through the model: the samples it generates, the two log-prob passes
    (policy, reference) over them for the KL when it is estimated, and the reference responses' NLL."""
    e = config.eval
    samples = e.prompts * e.samples_per_prompt
    return samples * config.generation.max_new_tokens + (2 * samples * seq if e.temperature == 1.0 else 0) + e.prompts * seq


def parameter_count(config) -> int:
    from jaxdpo.models import target_shapes

    per_layer = sum(a * b for a, b in target_shapes(config).values())
    head = 0 if config.tie_embeddings else config.hidden_size * config.vocab_size
    return config.num_layers * per_layer + config.vocab_size * config.hidden_size + head


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one round of {report['config']} at scale {report['scale']} on {report['device']}: {report['round_seconds']} s")
    for column in ("stage", "seconds", "peak GiB/device", "tokens/s", "MFU"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, stage in report["stages"].items():
        peak = stage.get("peak_bytes")
        table.add_row(
            name, f"{stage['seconds']:.2f}", "–" if peak is None else f"{peak / 2**30:.3f}",
            str(stage.get("tokens_per_s", "–")), "–" if stage.get("mfu") is None else f"{100 * stage['mfu']:.1f}%",
        )
    Console().print(table)
