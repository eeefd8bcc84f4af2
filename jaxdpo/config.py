"""Experiment configuration: typed sections, strict TOML/YAML parsing, errors that name the key.

A config file mirrors `ExperimentConfig`: one table per section (`[run]`, `[model]`, `[data]`,
`[generation]`, `[features]`, `[selection]`, `[lora]`, `[dpo]`, `[oracle]`, `[eval]`, `[mesh]`). Every key
is optional; a missing key takes the default documented on its field. An unknown key, a value of
the wrong type or out of range fails at load time with the dotted key in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple
from urllib.parse import urlparse

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import yaml

from jaxdpo.errors import UserError

if TYPE_CHECKING:
    from jaxdpo.dpo import DpoTrainer


class Range(NamedTuple):
    """A numeric field's allowed interval, attached with `Annotated[int | float, Range(...)]`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, key: str, value) -> None:
        if value is None:
            return
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low and self.high is None:
            _fail(key, f"must be {'>' if self.low_open else '>='} {self.low:g}, got {value}")
        if too_low or too_high:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            _fail(key, f"must be in {left}{self.low:g}, {self.high:g}{right}, got {value}")


PositiveInt = Annotated[int, Range(0, low_open=True)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]

DATA_SOURCES = ("embedded", "tldr", "webgpt", "hh_rlhf", "jsonl")
LoraTarget = Literal["q", "k", "v", "o", "gate", "up", "down"]


class ConfigError(UserError, ValueError):
    """A config problem; the message starts with the dotted key."""


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {message}")


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
            _fail(f"{key}.methods", "must name at least one method")
        for i, method in enumerate(self.methods):
            if method not in SELECTORS:
                _fail(f"{key}.methods[{i}]", f"unknown method {method!r}; known methods: {', '.join(SELECTORS)}")
        if len(set(self.methods)) != len(self.methods):
            _fail(f"{key}.methods", f"lists a method twice: {list(self.methods)}")
        if not self.seeds:
            _fail(f"{key}.seeds", "must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            _fail(f"{key}.seeds", f"lists a seed twice: {list(self.seeds)}")


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
    `prompts_per_round` are sampled each round (paper: 1000)."""

    source: Literal["embedded", "tldr", "webgpt", "hh_rlhf", "jsonl"] = "embedded"
    path: str | None = None
    split: str = "train"
    eval_split: str | None = None
    prompts_per_round: PositiveInt = 64
    max_prompt_tokens: PositiveInt = 64
    max_prompts: PositiveInt | None = None

    def check(self, key: str) -> None:
        if self.source == "jsonl" and not self.path:
            _fail(f"{key}.path", "data.source = 'jsonl' needs the path of a JSONL file (one {\"prompt\": ...} per line)")
        if self.max_prompts is not None and self.max_prompts < self.prompts_per_round:
            _fail(f"{key}.max_prompts", f"{self.max_prompts} is below data.prompts_per_round={self.prompts_per_round}")


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
                _fail(f"{key}.options.{method}", f"unknown method; known methods: {', '.join(SELECTORS)}")
            try:
                make_selector(method, **options)
            except ValueError as error:
                _fail(f"{key}.options.{method}", str(error))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter (paper: r = 128, α = 512) on the listed projections."""

    rank: PositiveInt = 8
    alpha: PositiveFloat = 32.0
    targets: tuple[LoraTarget, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def check(self, key: str) -> None:
        if not self.targets or len(set(self.targets)) != len(self.targets):
            _fail(f"{key}.targets", f"must list distinct projections, got {list(self.targets)}")


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
            _fail(f"{key}.path", f"oracle.kind = {self.kind!r} needs the reward model's path")
        if self.kind == "label_studio":
            address = urlparse(self.url or "")
            if address.scheme not in ("http", "https") or not address.netloc:
                _fail(f"{key}.url", f"oracle.kind = 'label_studio' needs the server's http(s) address, e.g. \"http://localhost:8080\", got {self.url!r}")
            if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", self.token_env or ""):
                _fail(f"{key}.token_env", "must be the NAME of the environment variable that holds the Label Studio API token (capital "
                      "letters, digits, _), e.g. \"LABEL_STUDIO_API_KEY\"; the token itself never goes into the config")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Mean oracle reward of responses to held-out prompts (paper: 100), and the win-rate against
    the initial model's responses to the same prompts."""

    prompts: PositiveInt = 256
    samples_per_prompt: PositiveInt = 1
    temperature: NonNegativeFloat = 1.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The devices (see `jaxdpo.sharding`): `data` × `model` of them, batches split over `data`,
    parameters over `model` (FSDP-style). `data` unset: every local device left over on `data`.
    `memory_fraction`: the share of each accelerator JAX may take (it preallocates 75% by default);
    set it below 1 − what a PyTorch reward model on the same GPU needs."""

    data: PositiveInt | None = None
    model: PositiveInt = 1
    memory_fraction: Annotated[float, Range(0, 1, low_open=True)] | None = None


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
            _fail(
                "selection.batch_size",
                f"{self.selection.batch_size} is larger than the pool of {self.candidates_per_round} candidate pairs per round "
                f"(data.prompts_per_round={self.data.prompts_per_round} × C({m}, 2))",
            )
        if self.embedded != (self.data.source == "embedded"):
            _fail(
                "data.source",
                f"{self.data.source!r} with model.path = {self.model.path!r}: the embedded model only speaks the "
                "embedded task, and the embedded prompts need it (use both, or neither)",
            )
        if self.oracle.kind == "synthetic" and not self.embedded:
            _fail("oracle.kind", "the synthetic oracle scores the embedded task only; use a reward model or human labels")
        for key, path in [("model.path", self.model.path), ("oracle.path", self.oracle.path), ("data.path", self.data.path)]:
            if path and _is_local(path) and not Path(path).expanduser().exists():
                _fail(key, f"{path} does not exist")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation (as resolved by get_type_hints with extras)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        value = _coerce(key, value, args[0])
        for rule in args[1:]:
            rule.check(key, value)
        return value
    if origin is Literal:
        if value not in args:
            _fail(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            _fail(key, f"must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"must be a table, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(key, f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            _fail(key, f"must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    raise TypeError(f"unsupported config annotation {annotation!r} at {key}")  # a bug, not user input


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        _fail(prefix or "config", f"must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            _fail(dotted, f"unknown key{hint}")
        values[key] = _coerce(dotted, value, hints[key])
    return cls(**values)


def _is_local(path: str) -> bool:
    """Clearly a filesystem path, not a hub name ("name" or "org/name"): only those can be checked offline."""
    return path.startswith(("/", ".", "~")) or path.count("/") >= 2


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Every check that does not need the model or the data: each field's range and choices (also
    for configs built in Python, not parsed), each section's cross-field checks, then across sections."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        hints = typing.get_type_hints(type(values), include_extras=True)
        for field in dataclasses.fields(values):
            _coerce(f"{section.name}.{field.name}", getattr(values, field.name), hints[field.name])
    config.check()
    return config


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from nested dicts (as parsed from TOML/YAML)."""
    return validate(_build(ExperimentConfig, raw, ""))


def load_config(path: str | Path | None = None) -> ExperimentConfig:
    """Read a TOML (.toml) or YAML (.yaml/.yml) config; None gives the embedded default. Relative
    local paths in it are taken relative to the file's folder."""
    if path is None:
        return validate(ExperimentConfig())
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {error}") from error
    return config_from_dict(_paths_relative_to(raw, path.resolve().parent))


_PATH_KEYS = (("model", "path"), ("oracle", "path"), ("data", "path"))


def _paths_relative_to(raw: Any, folder: Path) -> Any:
    """A config file's relative paths name files next to it, wherever the command runs: a relative
    path that looks local, or exists next to the file, is made absolute against `folder`."""
    if not isinstance(raw, dict):
        return raw
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for section, key in _PATH_KEYS:
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if not isinstance(value, str) or value == "embedded" or Path(value).expanduser().is_absolute():
            continue
        if _is_local(value) or (folder / value).exists():
            raw[section][key] = str((folder / value).resolve())
    return raw
