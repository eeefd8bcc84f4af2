"""Experiment configuration: typed sections, strict TOML/YAML parsing, errors that name the key.

A config file mirrors `ExperimentConfig`: one table per section (`[run]`, `[model]`, `[data]`,
`[generation]`, `[features]`, `[selection]`, `[lora]`, `[dpo]`, `[oracle]`, `[eval]`, `[mesh]`, `[log]`). Every key
is optional; a missing key takes the default documented on its field. An unknown key, a value of
the wrong type or out of range fails at load time with the dotted key in the message.
"""

from jaxdpo.config.fields import ConfigError, Range
from jaxdpo.config.loading import config_from_dict, load_config, validate
from jaxdpo.config.sections import (
    DataConfig,
    DpoConfig,
    EvalConfig,
    ExperimentConfig,
    FeatureConfig,
    GenerationConfig,
    LogConfig,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    OracleConfig,
    RunConfig,
    SelectionConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "DpoConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FeatureConfig",
    "GenerationConfig",
    "LogConfig",
    "LoraConfig",
    "MeshConfig",
    "ModelConfig",
    "OracleConfig",
    "Range",
    "RunConfig",
    "SelectionConfig",
    "config_from_dict",
    "load_config",
    "validate",
]
