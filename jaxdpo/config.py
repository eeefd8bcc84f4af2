"""Experiment configuration: typed sections, strict TOML/YAML parsing, errors that name the key.

A config file mirrors `ExperimentConfig`: one table per section (`[run]`, `[model]`, `[data]`,
`[generation]`, `[features]`, `[selection]`, `[lora]`, `[dpo]`, `[oracle]`, `[eval]`). Every key
is optional; a missing key takes the default documented on its field. An unknown key, a value of
the wrong type or out of range fails at load time with the dotted key in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import yaml


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to compare, for how long, over which seeds."""

    name: str = "experiment"
    methods: tuple[str, ...] = ("activedpo", "random", "aplp")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    rounds: int = 5


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The policy. `path`: an HF checkpoint folder (or hub name where a hub is reachable), or
    "embedded" for the built-in tiny decoder trained in-process on the synthetic task."""

    path: str = "embedded"
    dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Prompt source (see `jaxdpo.data`). `prompts_per_round` are sampled each round (paper: 1000)."""

    source: str = "embedded"
    path: str | None = None
    split: str = "train"
    eval_split: str | None = None
    prompts_per_round: int = 64
    max_prompt_tokens: int = 64
    max_prompts: int | None = None


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampled decoding of m responses per prompt (paper: m = 3 → 3 triplets per prompt).
    `entropy_samples`: the n extra temperature-1 samples per prompt behind APLP's predictive
    entropy (their setting: 8); only methods that use the entropy draw them."""

    responses_per_prompt: int = 3
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    entropy_samples: int = 8


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Gradient features g = P·∇r (paper §3.3): projection dim d (paper: 8192), normalization,
    method (see `jaxdpo.features`); `chunk_size` responses per vmapped backward pass and, for
    "dense", `projection_batch` responses per projection pass (memory: that many LoRA gradients)."""

    dim: int = 8192
    normalize: bool = True
    method: Literal["dense", "factored"] = "factored"
    seed: int = 0
    chunk_size: int = 16
    projection_batch: int = 64


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """B picks per round (paper: 50); `options` go to the selectors by method name, e.g.
    `[selection.options.activedpo] reg = 1.0`, `[selection.options.aplp] ogf = 16`."""

    batch_size: int = 16
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter (paper: r = 128, α = 512) on the listed projections."""

    rank: int = 8
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


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
    starts a fresh optimizer state and learning-rate schedule."""

    beta: float = 0.1
    epochs: int = 4
    learning_rate: float = 2e-3
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    nll_weight: float = 0.2
    train_on: Literal["new", "all"] = "all"
    reset_lora: bool = False


@dataclasses.dataclass(frozen=True)
class OracleConfig:
    """Who labels. kind "synthetic" (the embedded task's programmatic reward), "reward_model" (an HF
    *ForSequenceClassification checkpoint run in JAX), "torch_reward_model" (any transformers
    PyTorch reward model; needs torch) or "human" (JSONL files for annotators)."""

    kind: Literal["synthetic", "reward_model", "torch_reward_model", "human"] = "synthetic"
    path: str | None = None
    mode: Literal["bradley_terry", "deterministic"] = "deterministic"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Mean oracle reward of responses to held-out prompts (paper: 100), and the win-rate against
    the initial model's responses to the same prompts."""

    prompts: int = 256
    samples_per_prompt: int = 1
    temperature: float = 1.0


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

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


class ConfigError(ValueError):
    """A config problem; the message starts with the dotted key."""


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {message}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation (as a string resolved by get_type_hints)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
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
    hints = typing.get_type_hints(cls)
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


def _positive(key: str, value, strict: bool = True) -> None:
    if value is not None and (value <= 0 if strict else value < 0):
        _fail(key, f"must be {'>' if strict else '>='} 0, got {value}")


def _is_local(path: str) -> bool:
    """Clearly a filesystem path, not a hub name ("name" or "org/name"): only those can be checked offline."""
    return path.startswith(("/", ".", "~")) or path.count("/") >= 2


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Range and consistency checks that do not need the model or the data."""
    from jaxdpo.selection import SELECTORS, make_selector

    if not config.run.methods:
        _fail("run.methods", "must name at least one method")
    for i, method in enumerate(config.run.methods):
        if method not in SELECTORS:
            _fail(f"run.methods[{i}]", f"unknown method {method!r}; known methods: {', '.join(SELECTORS)}")
    if len(set(config.run.methods)) != len(config.run.methods):
        _fail("run.methods", f"lists a method twice: {list(config.run.methods)}")
    if not config.run.seeds:
        _fail("run.seeds", "must list at least one seed")
    for method, options in config.selection.options.items():
        if method not in SELECTORS:
            _fail(f"selection.options.{method}", f"unknown method; known methods: {', '.join(SELECTORS)}")
        try:
            make_selector(method, **options)
        except ValueError as error:
            _fail(f"selection.options.{method}", str(error))
    for key, value in [
        ("run.rounds", config.run.rounds),
        ("data.prompts_per_round", config.data.prompts_per_round),
        ("data.max_prompt_tokens", config.data.max_prompt_tokens),
        ("data.max_prompts", config.data.max_prompts),
        ("generation.max_new_tokens", config.generation.max_new_tokens),
        ("generation.top_p", config.generation.top_p),
        ("generation.entropy_samples", config.generation.entropy_samples),
        ("features.dim", config.features.dim),
        ("features.chunk_size", config.features.chunk_size),
        ("features.projection_batch", config.features.projection_batch),
        ("selection.batch_size", config.selection.batch_size),
        ("lora.rank", config.lora.rank),
        ("lora.alpha", config.lora.alpha),
        ("dpo.beta", config.dpo.beta),
        ("dpo.epochs", config.dpo.epochs),
        ("dpo.learning_rate", config.dpo.learning_rate),
        ("dpo.batch_size", config.dpo.batch_size),
        ("dpo.grad_accum", config.dpo.grad_accum),
        ("eval.prompts", config.eval.prompts),
        ("eval.samples_per_prompt", config.eval.samples_per_prompt),
    ]:
        _positive(key, value)
    for key, value in [
        ("generation.temperature", config.generation.temperature),
        ("generation.top_k", config.generation.top_k),
        ("eval.temperature", config.eval.temperature),
        ("dpo.warmup_steps", config.dpo.warmup_steps),
        ("dpo.weight_decay", config.dpo.weight_decay),
        ("dpo.nll_weight", config.dpo.nll_weight),
    ]:
        _positive(key, value, strict=False)
    if config.generation.top_p > 1:
        _fail("generation.top_p", f"must be in (0, 1], got {config.generation.top_p}")
    if not 0 <= config.dpo.label_smoothing < 0.5:
        _fail("dpo.label_smoothing", f"must be in [0, 0.5), got {config.dpo.label_smoothing}")
    if config.generation.responses_per_prompt < 2:
        _fail("generation.responses_per_prompt", f"must be >= 2 to form pairs, got {config.generation.responses_per_prompt}")
    m = config.generation.responses_per_prompt
    pool = config.data.prompts_per_round * m * (m - 1) // 2
    if config.selection.batch_size > pool:
        _fail(
            "selection.batch_size",
            f"{config.selection.batch_size} is larger than the pool of {pool} candidate pairs per round "
            f"(data.prompts_per_round={config.data.prompts_per_round} × C({m}, 2))",
        )
    if config.data.max_prompts is not None and config.data.max_prompts < config.data.prompts_per_round:
        _fail("data.max_prompts", f"{config.data.max_prompts} is below data.prompts_per_round={config.data.prompts_per_round}")
    for key, path in [("model.path", config.model.path), ("oracle.path", config.oracle.path), ("data.path", config.data.path)]:
        if path and _is_local(path) and not Path(path).expanduser().exists():
            _fail(key, f"{path} does not exist")
    if config.oracle.kind in ("reward_model", "torch_reward_model") and not config.oracle.path:
        _fail("oracle.path", f"oracle.kind = {config.oracle.kind!r} needs the reward model's path")
    if config.model.path != "embedded" and config.oracle.kind == "synthetic" and config.data.source != "embedded":
        _fail("oracle.kind", "the synthetic oracle scores the embedded task only; use a reward model or human labels")
    return config


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from nested dicts (as parsed from TOML/YAML)."""
    return validate(_build(ExperimentConfig, raw, ""))


def load_config(path: str | Path | None = None) -> ExperimentConfig:
    """Read a TOML (.toml) or YAML (.yaml/.yml) config; None gives the embedded default."""
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
    return config_from_dict(raw)
