"""What every track of a run shares: the initial model and tokenizer, the prompt pools, the oracle
and the DPO trainer, resolved from the config in one place (`build_setup`), and the run's keys.

The embedded task and a real one differ only here (`_embedded_task` vs `_checkpoint_task`): where
the model, tokenizer and prompts come from, and how long a response may be.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdpo import embedded
from jaxdpo.config import ExperimentConfig
from jaxdpo.data import HUB_DATASETS, load_references, tokenize_prompts, tokenize_references
from jaxdpo.dpo import DpoTrainer
from jaxdpo.errors import UserError
from jaxdpo.experiment import stages
from jaxdpo.models import Decoder, LoRA, load_pretrained, load_reward_model, save_pretrained
from jaxdpo.multihost import from_writer
from jaxdpo.oracles import HumanOracle, Oracle, label_studio, reward_model_oracle, synthetic_oracle, torch_reward_model_oracle
from jaxdpo.oracles.human import human_folder
from jaxdpo.oracles.shared import SharedOracle
from jaxdpo.sequences import Sequences, pad_rows
from jaxdpo.sharding import initialize_distributed, limit_accelerator_memory, make_mesh, put_rows, shard_model


def derive_key(seed: int, *path: int | str) -> jax.Array:
    """The key of one random draw, from the track's seed and a path such as ("generate", round):
    every draw of a run is a function of (seed, purpose, round) — and a sampled row's of its
    prompt and sample index too (`Setup.generate`) — so runs are deterministic and the prompts and
    evaluation samples are the same for every method."""
    key = jax.random.key(seed)
    for part in path:
        key = jax.random.fold_in(key, zlib.crc32(part.encode()) if isinstance(part, str) else part)
    return key


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Prompt texts, their left-padded tokens `[n, max_prompt_tokens]` and their identities `[n]`:
    each prompt's index in the pool it was taken from (the training prompts or the held-out ones)."""

    texts: tuple[str, ...]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    index: np.ndarray

    def take(self, index: np.ndarray) -> Prompts:
        return Prompts(tuple(self.texts[i] for i in index), self.input_ids[index], self.attention_mask[index], self.index[index])


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every track shares; `mesh` is None on one device. `references`: reference responses to
    held-out prompts (the task's own; None when it has none), for the capability guard."""

    config: ExperimentConfig
    model: Decoder
    tokenizer: Any
    train: Prompts
    eval: Prompts
    references: Sequences | None
    oracle: Oracle
    trainer: DpoTrainer
    max_new_tokens: int
    mesh: Mesh | None

    @property
    def logprob_chunking(self) -> dict:
        """Keyword arguments of `batched_logprobs` / `reference_logprobs` for this run."""
        return dict(chunk_size=stages.logprob_rows(self.config, self.mesh), mesh=self.mesh)

    @property
    def round_shape(self) -> stages.RoundShape:
        """What fixes this run's stage programs (`stages.round_stages`)."""
        return stages.RoundShape(
            self.config, self.model, self.mesh, self.train.input_ids.shape[1], self.max_new_tokens,
            self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, getattr(self.oracle, "model", None),
        )

    def generate(
        self, prompts: Prompts, *, lora: LoRA | None, key: jax.Array, num_samples: int, temperature: float,
        top_p: float = 1.0, top_k: int = 0,
    ) -> Sequences:
        """`num_samples` sampled responses per prompt (host arrays; prompt i's are rows i·num_samples …),
        in calls of about `generation.chunk_rows` rows (fewer for fewer prompts; a multiple of the
        mesh's data axis). Sample j of a prompt draws from (`key`, the prompt's `index`, j) alone,
        so the responses do not depend on how the prompts are split into calls, on the padding
        rows or on the mesh (up to float rounding of the logits)."""
        per_call = stages.prompts_per_call(self.config, num_samples, len(prompts.texts), self.mesh)
        sampling = stages.Sampling(num_samples, temperature, top_p, top_k)
        chunks = []
        for start in range(0, len(prompts.texts), per_call):
            rows = (pad_rows(x[start : start + per_call], per_call) for x in (prompts.input_ids, prompts.attention_mask, prompts.index))
            out = stages.sample(
                self.model, lora, *put_rows(tuple(rows), self.mesh), key, sampling=sampling,
                max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            )
            chunks.append(out.to_host().take(slice(0, min(per_call, len(prompts.texts) - start) * num_samples)))
        return Sequences(*(np.concatenate(parts) for parts in zip(*chunks)))

    def response_texts(self, sequences: Sequences) -> list[str]:
        """The responses as annotators and reward models read them: special tokens (end of
        sequence, padding, beginning of sequence) left out."""
        return [
            self.tokenizer.decode(ids[mask == 1], skip_special_tokens=True) for ids, mask in zip(sequences.input_ids, sequences.response_mask)
        ]


def build_setup(config: ExperimentConfig, out_dir: Path) -> Setup:
    _require_reachable(config)  # every hub name at once, before anything loads
    mesh = _mesh(config)
    oracle = _oracle(config, out_dir, mesh)  # first: an annotation server that is down fails the start at once
    model, tokenizer, train, evaluation, references, max_new_tokens = (_embedded_task if config.embedded else _checkpoint_task)(config, out_dir)
    if len(train.texts) < config.data.prompts_per_round:
        raise UserError(f"data.prompts_per_round: {config.data.prompts_per_round} prompts per round, but only {len(train.texts)} usable prompts")
    if mesh is not None:
        stages.check_splits(config, mesh)
        shard_model(model, mesh)
    return Setup(config, model, tokenizer, train, evaluation, references, oracle, config.dpo.trainer(), max_new_tokens, mesh)


def start_devices(config: ExperimentConfig) -> None:
    """What must precede JAX's first use of a device: the accelerator memory fraction, and
    `jax.distributed` in a job of several processes (`initialize_distributed`)."""
    limit_accelerator_memory(config.mesh.memory_fraction)
    initialize_distributed()


def _mesh(config: ExperimentConfig) -> Mesh | None:
    """The run's mesh, None when it has one device (the plain single-device path)."""
    start_devices(config)
    mesh = make_mesh(config.mesh.data, config.mesh.model)
    return None if mesh.size == 1 else mesh


def _dtype(config: ExperimentConfig):
    return jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32


def _prompts(tokenizer, texts, max_tokens: int) -> Prompts:
    tokens = tokenize_prompts(tokenizer, texts, max_tokens=max_tokens, truncate=True)
    return Prompts(tuple(texts[i] for i in tokens.kept), tokens.input_ids, tokens.attention_mask, np.arange(len(tokens.kept)))


def _embedded_task(config: ExperimentConfig, out_dir: Path):
    """The built-in task (`data.embedded_task`): its SFT model (trained once, saved with its word
    tokenizer as an HF checkpoint in `out_dir/sft-model` and loaded from there on resume), prompts,
    the reference generator's answers to the held-out prompts, and lengths."""
    folder, task = out_dir / "sft-model", config.data.embedded_task
    tokenizer = embedded.build_tokenizer()
    from_writer(_save_embedded_sft, folder, tokenizer, task)  # trained once, by process 0; the others load it
    model = load_pretrained(folder, dtype=_dtype(config), remat=config.model.remat)
    pool = embedded.sample_prompts(np.random.default_rng(embedded.TASK_SEED), config.data.max_prompts or 4096, task)
    held_out = embedded.sample_prompts(np.random.default_rng(embedded.TASK_SEED + 1), config.eval.prompts, task)
    train, evaluation = (_prompts(tokenizer, texts, embedded.PROMPT_TOKENS) for texts in (pool, held_out))
    answers = embedded.sample_responses(np.random.default_rng(embedded.TASK_SEED + 2), list(evaluation.texts), task)
    references = tokenize_references(tokenizer, evaluation.input_ids, evaluation.attention_mask, answers, max_new_tokens=embedded.MAX_NEW_TOKENS)
    return model, tokenizer, train, evaluation, references, embedded.MAX_NEW_TOKENS


def _save_embedded_sft(folder: Path, tokenizer, task: str) -> None:
    """Written to `sft-model.partial` and renamed once whole, so a kill never leaves a half-written
    `sft-model` (one without its config.json is such a leftover, and replaced)."""
    if not (folder / "config.json").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_pretrained(embedded.train_sft(task=task), partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    if not (folder / "tokenizer.json").exists():
        tokenizer.save_pretrained(folder)  # the folder is then a complete checkpoint: model.path can name it


def _checkpoint_task(config: ExperimentConfig, out_dir: Path):
    """An HF checkpoint and its tokenizer, prompts from `config.data` (the held-out prompts from
    `data.eval_split`, or the last `eval.prompts` of the split) and the held-out prompts' reference
    responses where the data have them (`load_references`)."""
    from transformers import AutoTokenizer

    path, data = config.model.path, config.data
    if Path(path).is_dir() and not any((Path(path) / name).exists() for name in _TOKENIZER_FILES):
        raise UserError(f"model.path: {path} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the model's tokenizer next to its weights")
    tokenizer = _loaded("model.path", "the tokenizer", lambda: AutoTokenizer.from_pretrained(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _loaded("model.path", "the model", lambda: load_pretrained(path, dtype=_dtype(config), remat=config.model.remat))
    answers = _loaded("data.path", f"the {data.source} prompts", lambda: load_references(data.source, data.path, data.split))
    texts = list(answers)
    if data.eval_split is not None:
        answers = _loaded("data.eval_split", "the held-out prompts", lambda: load_references(data.source, data.path, data.eval_split))
        if len(answers) < config.eval.prompts:
            raise UserError(f"eval.prompts: {config.eval.prompts} held-out prompts asked, data.eval_split {data.eval_split!r} has {len(answers)}")
        held_out = list(answers)[: config.eval.prompts]
    else:
        if len(texts) <= config.eval.prompts:
            raise UserError(
                f"eval.prompts: {config.eval.prompts} prompts are held out from data.split {data.split!r}, which has only "
                f"{len(texts)}, leaving none to train on; lower eval.prompts or set data.eval_split"
            )
        texts, held_out = texts[: -config.eval.prompts], texts[-config.eval.prompts :]
    texts = texts[: data.max_prompts] if data.max_prompts else texts
    train, evaluation = (_prompts(tokenizer, t, data.max_prompt_tokens) for t in (texts, held_out))
    references = tokenize_references(
        tokenizer, evaluation.input_ids, evaluation.attention_mask, [answers[t] for t in evaluation.texts],
        max_new_tokens=config.generation.max_new_tokens,
    )
    return model, tokenizer, train, evaluation, references, config.generation.max_new_tokens


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _loaded(key: str, what: str, load):
    """`load()`, with a failure to read the user's files turned into a one-line UserError."""
    try:
        return load()
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{key}: cannot load {what}: {first}") from error


def _hub_names(config: ExperimentConfig) -> list[tuple[str, str, str]]:
    """(config key, name, "model" | "dataset") of everything the run loads by name: the policy, a
    reward-model oracle, and the prompts of a hub dataset without `data.path`."""
    names = []
    if not config.embedded:
        names.append(("model.path", config.model.path, "model"))
    if config.oracle.kind in ("reward_model", "torch_reward_model"):
        names.append(("oracle.path", config.oracle.path, "model"))
    if config.data.path is None and config.data.source in HUB_DATASETS:
        names.append(("data.source", HUB_DATASETS[config.data.source][0], "dataset"))
    return names


def _require_reachable(config: ExperimentConfig) -> None:
    """Each name of `_hub_names` must be a local folder, in the Hugging Face cache, or on a reachable
    hub; one message names every one that is not, at once instead of after a minute of retries."""
    import huggingface_hub
    from huggingface_hub import constants

    def found(name: str, repo_type: str) -> bool:
        marker = "config.json" if repo_type == "model" else "README.md"
        return Path(name).expanduser().exists() or isinstance(huggingface_hub.try_to_load_from_cache(name, marker, repo_type=repo_type), str)

    missing = [f"{key} {name!r}" for key, name, repo_type in _hub_names(config) if not found(name, repo_type)]
    if not missing:
        return
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError as error:
        raise UserError(
            f"{', '.join(missing)}: not {'a local folder' if len(missing) == 1 else 'local folders'}, not in the Hugging Face "
            f"cache, and the hub ({host}) cannot be reached ({error}); download {'it' if len(missing) == 1 else 'each'} where "
            "the hub is reachable and point the key at the local copy"
        ) from error


def _oracle(config: ExperimentConfig, out_dir: Path, mesh: Mesh | None) -> Oracle:
    """The oracle of `config`; in a job of several processes, asked by process 0 for all (`SharedOracle`)."""
    if jax.process_count() == 1:
        return _own_oracle(config, out_dir, mesh)
    return SharedOracle(lambda: _own_oracle(config, out_dir, mesh), collective=config.oracle.kind == "reward_model")


def _own_oracle(config: ExperimentConfig, out_dir: Path, mesh: Mesh | None) -> Oracle:
    o = config.oracle
    kind, mode = o.kind, o.mode
    if kind == "synthetic":
        return synthetic_oracle(embedded.reward, mode=mode)
    if kind == "reward_model":
        from transformers import AutoTokenizer

        def jax_oracle():
            model = load_reward_model(o.path)
            if mesh is not None:
                shard_model(model, mesh)
            tokenizer = AutoTokenizer.from_pretrained(o.path)
            return reward_model_oracle(model, tokenizer, mode=mode, max_length=o.max_length, batch_size=stages.reward_rows(config, mesh), mesh=mesh)

        return _loaded("oracle.path", "the reward model", jax_oracle)
    if kind == "torch_reward_model":
        return _loaded(
            "oracle.path", "the reward model",
            lambda: torch_reward_model_oracle(o.path, mode=mode, max_length=o.max_length, batch_size=o.batch_size, device=o.device),
        )
    if kind == "label_studio":
        return label_studio.connect(o.url, o.token_env, project=o.project, run_name=config.run.name, out_dir=out_dir)
    return HumanOracle(human_folder(out_dir))
