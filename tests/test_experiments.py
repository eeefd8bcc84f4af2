"""Every shipped experiment config parses, validates and builds its selectors and trainer."""

import dataclasses
from pathlib import Path

import pytest

from jaxdpo.config import ExperimentConfig, load_config
from jaxdpo.selection import SELECTORS, make_selector

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.toml"))


def test_there_are_paper_configs():
    names = {p.stem for p in CONFIGS}
    assert {f"{m}-{d}" for m in ("gemma-2b", "llama2-7b", "qwen3-4b") for d in ("tldr", "webgpt")} <= names
    assert {"ablation-no-normalization", "ablation-dim-1024", "ablation-dim-32768", "embedded", "embedded-redundant"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_builds(path):
    config = load_config(path)
    for method in config.run.methods:
        make_selector(method, **config.selection.options.get(method, {}))
    trainer = config.dpo.trainer()
    assert (trainer.learning_rate, trainer.epochs, trainer.beta) == (config.dpo.learning_rate, config.dpo.epochs, config.dpo.beta)
    if not path.stem.startswith("embedded"):
        assert (config.selection.batch_size, config.lora.rank, config.lora.alpha, config.data.prompts_per_round) == (50, 128, 512.0, 1000)
        assert config.dpo.nll_weight == 0.0  # the paper's plain DPO


def test_embedded_config_is_the_default():
    config = load_config(CONFIGS[[p.stem for p in CONFIGS].index("embedded")])
    assert dataclasses.replace(config, run=dataclasses.replace(config.run, name="experiment")) == ExperimentConfig()


def test_redundant_config_compares_every_registered_method_on_the_redundant_task():
    config = load_config(CONFIGS[[p.stem for p in CONFIGS].index("embedded-redundant")])
    assert config.data.embedded_task == "redundant" and len(config.run.seeds) == 5
    assert {make_selector(m).name for m in config.run.methods} == {make_selector(m).name for m in SELECTORS}
