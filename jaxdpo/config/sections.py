"""The config's sections: one frozen dataclass per table of a config file, every key documented
on its field with its default; `ExperimentConfig` holds them and checks across sections."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlparse

from jaxdpo.config.fields import (
    LoraTarget,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    fail,
    is_local,
)

if TYPE_CHECKING:
    from jaxdpo.dpo import DpoTrainer



@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to compare, for how long, over which seeds."""

    name: str = "experiment"
    methods: tuple[str, ...] = ("activedpo", "random", "aplp")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    rounds: PositiveInt = 5

    def check(self, key: str) -> None:
        from jaxdpo.selection import SELECTORS

        if not self.methods:
            fail(f"{key}.methods", "must name at least one method")
        for i, method in enumerate(self.methods):
            if method not in SELECTORS:
                fail(f"{key}.methods[{i}]", f"unknown method {method!r}; known methods: {', '.join(SELECTORS)}")
        if len(set(self.methods)) != len(self.methods):
            fail(f"{key}.methods", f"lists a method twice: {list(self.methods)}")
        if not self.seeds:
            fail(f"{key}.seeds", "must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            fail(f"{key}.seeds", f"lists a seed twice: {list(self.seeds)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The policy. `path`: an HF checkpoint folder (or hub name where a hub is reachable), or
    "embedded" for the built-in tiny decoder trained in-process on the synthetic task."""

    path: str = "embedded"
    dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Prompt source (see `jaxdpo.data`): "embedded" (the built-in task; needs the embedded model),
    "tldr", "webgpt", "hh_rlhf" (from `path`, or the hub) or "jsonl" (needs `path`).
    `prompts_per_round` are sampled each round (paper: 1000). `embedded_task` (embedded source
    only): "topics" (the default demo) or "redundant" (prompts from a few templates, responses
    near-copies of a few stock answers; `jaxdpo.embedded`, docs/design.md)."""

    source: Literal["embedded", "tldr", "webgpt", "hh_rlhf", "jsonl"] = "embedded"
    embedded_task: Literal["topics", "redundant"] = "topics"
    path: str | None = None
    split: str = "train"
    eval_split: str | None = None
    prompts_per_round: PositiveInt = 64
    max_prompt_tokens: PositiveInt = 64
    max_prompts: PositiveInt | None = None

    def check(self, key: str) -> None:
        if self.embedded_task != "topics" and self.source != "embedded":
            fail(f"{key}.embedded_task", f"{self.embedded_task!r} is a task of data.source = 'embedded', not of {self.source!r}")
        if self.source == "jsonl" and not self.path:
            fail(f"{key}.path", "data.source = 'jsonl' needs the path of a JSONL file (one {\"prompt\": ...} per line)")
        if self.max_prompts is not None and self.max_prompts < self.prompts_per_round:
            fail(f"{key}.max_prompts", f"{self.max_prompts} is below data.prompts_per_round={self.prompts_per_round}")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampled decoding of m responses per prompt (paper: m = 3 → 3 triplets per prompt).
    `entropy_samples`: the n extra temperature-1 samples per prompt behind APLP's predictive
    entropy (their setting: 8); only methods that use the entropy draw them. Memory: each call
    decodes at most `chunk_rows` rows (prompts × samples; the KV cache is per row: about 300 MB
    per row for Llama-2-7B at 565 tokens, so 128 rows fit next to the weights on an 80 GB GPU);
    the same chunks serve the responses, the entropy samples and evaluation."""

    responses_per_prompt: Annotated[int, Range(2)] = 3
    max_new_tokens: PositiveInt = 16
    chunk_rows: PositiveInt = 128
    temperature: NonNegativeFloat = 1.0
    top_p: Annotated[float, Range(0, 1, low_open=True)] = 1.0
    top_k: NonNegativeInt = 0
    entropy_samples: PositiveInt = 8


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Gradient features g = P·∇r (paper §3.3): projection dim d (paper: 8192), normalization,
    method (see `jaxdpo.features`); `chunk_size` responses per call, in one vmapped backward pass
    (memory: that many backward passes at once) and, for "dense", `projection_batch` responses per
    projection pass (memory: that many LoRA gradients)."""

    dim: PositiveInt = 8192
    normalize: bool = True
    method: Literal["dense", "factored"] = "factored"
    seed: int = 0
    chunk_size: PositiveInt = 16
    projection_batch: PositiveInt = 64


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """B picks per round (paper: 50); `options` go to the selectors by method name, e.g.
    `[selection.options.activedpo] reg = 1.0`, `[selection.options.aplp] ogf = 16`."""

    batch_size: PositiveInt = 16
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def check(self, key: str) -> None:
        from jaxdpo.selection import SELECTORS, make_selector

        for method, options in self.options.items():
            if method not in SELECTORS:
                fail(f"{key}.options.{method}", f"unknown method; known methods: {', '.join(SELECTORS)}")
            try:
                make_selector(method, **options)
            except ValueError as error:
                fail(f"{key}.options.{method}", str(error))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter (paper: r = 128, α = 512) on the listed projections."""

    rank: PositiveInt = 8
    alpha: PositiveFloat = 32.0
    targets: tuple[LoraTarget, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def check(self, key: str) -> None:
        if not self.targets or len(set(self.targets)) != len(self.targets):
            fail(f"{key}.targets", f"must list distinct projections, got {list(self.targets)}")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """DPO on the labels (paper: 4 epochs, lr 1e-4, plain DPO; the defaults here suit the embedded
    tiny model). `nll_weight` (default 0.2; the paper's plain DPO is 0) adds that multiple of the
    chosen response's per-token NLL (RPO): on the embedded task plain DPO raises the reward too, but
    unsteadily (in some rounds it moves probability onto prompt-only tokens and the reward of a
    seed collapses); with 0.2 it rises round after round.
    The paper leaves two choices open: `train_on` "new" (Algorithm 1 line 11: this round's batch) or
    "all" (every label so far; the default, steadier with few labels per round); `reset_lora` True
    retrains from the SFT model each round, False (default) continues from θ_{t−1}. Each round
    starts a fresh optimizer state and learning-rate `schedule` (after `warmup_steps`).
    `logprob_chunk`: rows per call when log-probs are computed outside training (reference
    log-probs, implicit-reward margins, entropy samples)."""

    beta: PositiveFloat = 0.1
    epochs: PositiveInt = 4
    learning_rate: PositiveFloat = 2e-3
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    warmup_steps: NonNegativeInt = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: NonNegativeFloat = 0.0
    label_smoothing: Annotated[float, Range(0, 0.5, high_open=True)] = 0.0
    nll_weight: NonNegativeFloat = 0.2
    train_on: Literal["new", "all"] = "all"
    reset_lora: bool = False
    logprob_chunk: PositiveInt = 16

    def trainer(self) -> DpoTrainer:
        """The `DpoTrainer` these settings describe (every trainer field named here)."""
        from jaxdpo.dpo import DpoTrainer

        return DpoTrainer(
            beta=self.beta, learning_rate=self.learning_rate, epochs=self.epochs, batch_size=self.batch_size,
            grad_accum=self.grad_accum, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing, schedule=self.schedule, nll_weight=self.nll_weight,
        )


@dataclasses.dataclass(frozen=True)
class OracleConfig:
    """Who labels. kind "synthetic" (the embedded task's programmatic reward), "reward_model" (an HF
    *ForSequenceClassification checkpoint run in JAX), "torch_reward_model" (any transformers
    PyTorch reward model; needs torch), "human" (JSONL files for annotators) or "label_studio"
    (a Label Studio server at `url`; `token_env`: the NAME of the environment variable holding its
    API token, never the token; `project`: an existing project's id, else the run creates one).
    Reward models score `batch_size` texts of at most `max_length` tokens per call; a torch model
    runs on `device` ("auto": the GPU when torch sees one; share it with JAX through
    `mesh.memory_fraction`)."""

    kind: Literal["synthetic", "reward_model", "torch_reward_model", "human", "label_studio"] = "synthetic"
    path: str | None = None
    mode: Literal["bradley_terry", "deterministic"] = "deterministic"
    batch_size: PositiveInt = 16
    max_length: PositiveInt = 512
    device: Literal["auto", "cpu", "cuda"] = "auto"
    url: str | None = None
    token_env: str | None = None
    project: PositiveInt | None = None

    def check(self, key: str) -> None:
        if self.kind in ("reward_model", "torch_reward_model") and not self.path:
            fail(f"{key}.path", f"oracle.kind = {self.kind!r} needs the reward model's path")
        if self.kind == "label_studio":
            address = urlparse(self.url or "")
            if address.scheme not in ("http", "https") or not address.netloc:
                fail(f"{key}.url", f"oracle.kind = 'label_studio' needs the server's http(s) address, e.g. \"http://localhost:8080\", got {self.url!r}")
            if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", self.token_env or ""):
                fail(f"{key}.token_env", "must be the NAME of the environment variable that holds the Label Studio API token (capital "
                      "letters, digits, _), e.g. \"LABEL_STUDIO_API_KEY\"; the token itself never goes into the config")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Mean oracle reward of responses to held-out prompts (paper: 100), and the win-rate against
    the initial model's responses to the same prompts; and the capability guard
    (`jaxdpo.experiment.evaluation`): the NLL of the prompts' reference responses and a Monte
    Carlo KL(π_θ ‖ π_ref) from the same samples, which needs `temperature` = 1 (else it is null)."""

    prompts: PositiveInt = 256
    samples_per_prompt: PositiveInt = 1
    temperature: NonNegativeFloat = 1.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The devices (see `jaxdpo.sharding`): `data` × `model` of them, batches split over `data`,
    parameters over `model` (FSDP-style). `data` unset: every device (of every process) left over
    on `data`. `memory_fraction`: the share of each accelerator JAX may take (it preallocates 75% by default);
    set it below 1 − what a PyTorch reward model on the same GPU needs."""

    data: PositiveInt | None = None
    model: PositiveInt = 1
    memory_fraction: Annotated[float, Range(0, 1, low_open=True)] | None = None


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Live metrics (off by default), one run per track, step = labels collected: every numeric
    field of each metrics row as it is written. `tensorboard`: TensorBoard scalars under
    DIR/tensorboard/<track>/ (tensorboardX); `wandb_project`: that Weights & Biases project
    (needs `pip install wandb` and a `wandb login`, or WANDB_MODE=offline). Both may be switched
    on or off when a run is resumed."""

    tensorboard: bool = False
    wandb_project: str | None = None

    def check(self, key: str) -> None:
        if self.tensorboard and importlib.util.find_spec("tensorboardX") is None:
            fail(f"{key}.tensorboard", "needs tensorboardX: pip install tensorboardX")
        if self.wandb_project is not None:
            if not self.wandb_project.strip():
                fail(f"{key}.wandb_project", "must name a Weights & Biases project")
            if importlib.util.find_spec("wandb") is None:
                fail(f"{key}.wandb_project", "needs wandb, which is not installed: pip install wandb")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    dpo: DpoConfig = dataclasses.field(default_factory=DpoConfig)
    oracle: OracleConfig = dataclasses.field(default_factory=OracleConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    @property
    def embedded(self) -> bool:
        """The built-in task: embedded model, prompts and (usually) the synthetic oracle."""
        return self.model.path == "embedded"

    @property
    def candidates_per_round(self) -> int:
        m = self.generation.responses_per_prompt
        return self.data.prompts_per_round * m * (m - 1) // 2

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def check(self) -> None:
        """Each section's own checks, then the checks across sections."""
        for field in dataclasses.fields(self):
            section = getattr(self, field.name)
            if hasattr(section, "check"):
                section.check(field.name)
        if self.selection.batch_size > self.candidates_per_round:
            m = self.generation.responses_per_prompt
            fail(
                "selection.batch_size",
                f"{self.selection.batch_size} is larger than the pool of {self.candidates_per_round} candidate pairs per round "
                f"(data.prompts_per_round={self.data.prompts_per_round} × C({m}, 2))",
            )
        if self.embedded != (self.data.source == "embedded"):
            fail(
                "data.source",
                f"{self.data.source!r} with model.path = {self.model.path!r}: the embedded model only speaks the "
                "embedded task, and the embedded prompts need it (use both, or neither)",
            )
        if self.oracle.kind == "synthetic" and not self.embedded:
            fail("oracle.kind", "the synthetic oracle scores the embedded task only; use a reward model or human labels")
        for key, path in [("model.path", self.model.path), ("oracle.path", self.oracle.path), ("data.path", self.data.path)]:
            if path and (key == "data.path" or is_local(path)) and not Path(path).expanduser().exists():
                fail(key, f"{Path(path).expanduser().absolute()} does not exist")
