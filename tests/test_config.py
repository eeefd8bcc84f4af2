"""Experiment configs: strict parsing, defaults, and errors that name the offending key."""

from __future__ import annotations

import pytest

from jaxdpo.config import ConfigError, ExperimentConfig, config_from_dict, load_config


def test_default_is_valid_and_round_trips_through_toml_and_yaml(tmp_path):
    default = load_config(None)
    assert default == ExperimentConfig()
    toml = tmp_path / "c.toml"
    toml.write_text('[run]\nmethods = ["activedpo", "random"]\nseeds = [3]\n[selection]\nbatch_size = 4\n'
                    '[selection.options.activedpo]\nreg = 0.5\n[dpo]\ntrain_on = "all"\nlearning_rate = 1e-3\n')
    parsed = load_config(toml)
    assert parsed.run.methods == ("activedpo", "random") and parsed.run.seeds == (3,)
    assert parsed.selection.options == {"activedpo": {"reg": 0.5}}
    assert parsed.dpo.train_on == "all" and parsed.dpo.learning_rate == 1e-3
    yml = tmp_path / "c.yaml"
    yml.write_text("run:\n  methods: [activedpo, random]\n  seeds: [3]\nselection:\n  batch_size: 4\n"
                   "  options:\n    activedpo: {reg: 0.5}\ndpo:\n  train_on: all\n  learning_rate: 0.001\n")
    assert load_config(yml) == parsed


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"run": {"methods": ["activedpo", "bald"]}}, r"run\.methods\[1\]: unknown method 'bald'"),
        ({"run": {"method": ["random"]}}, r"run\.method: unknown key; did you mean 'methods'\?"),
        ({"selction": {}}, r"selction: unknown key; did you mean 'selection'\?"),
        ({"run": {"rounds": "5"}}, r"run\.rounds: must be an integer"),
        ({"run": {"rounds": 0}}, r"run\.rounds: must be > 0"),
        ({"run": {"methods": "random"}}, r"run\.methods: must be a list"),
        ({"run": {"methods": ["random", "random"]}}, r"run\.methods: lists a method twice"),
        ({"dpo": {"train_on": "everything"}}, r"dpo\.train_on: must be one of \['new', 'all'\]"),
        ({"dpo": {"label_smoothing": 0.5}}, r"dpo\.label_smoothing"),
        ({"dpo": {"nll_weight": -1.0}}, r"dpo\.nll_weight: must be >= 0"),
        ({"selection": {"batch_size": 10_000}}, r"selection\.batch_size: 10000 is larger than the pool of 192"),
        ({"selection": {"options": {"aplp": {"nu": 1.0}}}}, r"selection\.options\.aplp: .*unknown \['nu'\]"),
        ({"selection": {"options": {"bald": {}}}}, r"selection\.options\.bald: unknown method"),
        ({"generation": {"responses_per_prompt": 1}}, r"generation\.responses_per_prompt: must be >= 2"),
        ({"generation": {"top_p": 1.5}}, r"generation\.top_p"),
        ({"generation": {"entropy_samples": 0}}, r"generation\.entropy_samples: must be > 0"),
        ({"features": {"projection_batch": 0}}, r"features\.projection_batch: must be > 0"),
        ({"oracle": {"kind": "reward_model"}}, r"oracle\.path: .*needs the reward model's path"),
        ({"oracle": {"kind": "gpt4"}}, r"oracle\.kind: must be one of"),
        ({"lora": {"rank": True}}, r"lora\.rank: must be an integer"),
        ({"model": {"remat": "yes"}}, r"model\.remat: must be true or false"),
        ({"data": {"source": "reddit"}}, r"data\.source: must be one of \['embedded', 'tldr'"),
        ({"data": {"embedded_task": "templates"}}, r"data\.embedded_task: must be one of \['topics', 'redundant'\]"),
        ({"model": {"path": "org/m"}, "data": {"source": "tldr", "embedded_task": "redundant"}, "oracle": {"kind": "human"}},
         r"data\.embedded_task: 'redundant' is a task of data\.source = 'embedded', not of 'tldr'"),
        ({"data": {"source": "tldr"}}, r"data\.source: 'tldr' with model\.path = 'embedded'"),
        ({"model": {"path": "org/model"}, "oracle": {"kind": "human"}}, r"data\.source: 'embedded' with model\.path = 'org/model'"),
        ({"model": {"path": "org/model"}, "data": {"source": "tldr"}}, r"oracle\.kind: the synthetic oracle scores the embedded task only"),
        ({"model": {"path": "org/m"}, "data": {"source": "jsonl"}, "oracle": {"kind": "human"}}, r"data\.path: data\.source = 'jsonl' needs"),
        ({"lora": {"targets": ["q", "v", "mlp"]}}, r"lora\.targets\[2\]: must be one of \['q', 'k'"),
        ({"lora": {"targets": ["q", "q"]}}, r"lora\.targets: must list distinct"),
        ({"dpo": {"schedule": "step"}}, r"dpo\.schedule: must be one of \['constant', 'linear', 'cosine'\]"),
        ({"run": {"seeds": [1, 1]}}, r"run\.seeds: lists a seed twice"),
        ({"oracle": {"kind": "label_studio", "token_env": "LS_TOKEN"}}, r"oracle\.url: oracle\.kind = 'label_studio' needs the server's http\(s\) address"),
        ({"oracle": {"kind": "label_studio", "url": "localhost:8080", "token_env": "LS_TOKEN"}}, r"oracle\.url: .*got 'localhost:8080'"),
        ({"oracle": {"kind": "label_studio", "url": "http://localhost:8080"}}, r"oracle\.token_env: must be the NAME of the environment variable"),
        ({"oracle": {"kind": "label_studio", "url": "http://localhost:8080", "token_env": "3f2a9c0e1b7d4a6f8e5c2b1a0d9f8e7c6b5a4d3e"}}, r"oracle\.token_env: must be the NAME .*the token itself never"),
        ({"oracle": {"kind": "label_studio", "url": "http://localhost:8080", "token_env": "LS_TOKEN", "project": 0}}, r"oracle\.project: must be > 0"),
        ({"log": {"tensorboard": "yes"}}, r"log\.tensorboard: must be true or false"),
        ({"log": {"wandb_project": " "}}, r"log\.wandb_project: must name a Weights & Biases project"),
        ({"log": {"wanb_project": "x"}}, r"log\.wanb_project: unknown key; did you mean 'wandb_project'\?"),
    ],
)
def test_bad_configs_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    other = tmp_path / "c.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match="must end in .toml"):
        load_config(other)


def test_ranges_are_checked_for_configs_built_in_python():
    from dataclasses import replace

    from jaxdpo.config import validate

    default = ExperimentConfig()
    with pytest.raises(ConfigError, match=r"generation\.top_p: must be in \(0, 1\], got 0\.0"):
        validate(replace(default, generation=replace(default.generation, top_p=0.0)))
    with pytest.raises(ConfigError, match=r"eval\.prompts: must be > 0"):
        validate(replace(default, eval=replace(default.eval, prompts=0)))


def test_dpo_section_maps_every_field_to_the_trainer():
    import dataclasses

    from jaxdpo.dpo import DpoTrainer

    config = config_from_dict({"dpo": {"schedule": "cosine", "warmup_steps": 3, "grad_accum": 2, "label_smoothing": 0.1}})
    trainer = config.dpo.trainer()
    for field in dataclasses.fields(DpoTrainer):
        assert getattr(trainer, field.name) == getattr(config.dpo, field.name), field.name


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (folder / "model").mkdir()
    path = folder / "c.toml"
    path.write_text('[model]\npath = "./model"\n[data]\nsource = "jsonl"\npath = "prompts.jsonl"\n[oracle]\nkind = "human"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.model.path == str(folder / "model") and config.data.path == str(folder / "prompts.jsonl")


def test_log_destinations_need_their_writers_installed(monkeypatch):
    import importlib.util

    assert config_from_dict({"log": {"tensorboard": True}}).log.tensorboard
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name in ("wandb", "tensorboardX") else find_spec(name, *args))
    with pytest.raises(ConfigError, match=r"log\.wandb_project: needs wandb, which is not installed: pip install wandb"):
        config_from_dict({"log": {"wandb_project": "p"}})
    with pytest.raises(ConfigError, match=r"log\.tensorboard: needs tensorboardX: pip install tensorboardX"):
        config_from_dict({"log": {"tensorboard": True}})


def test_relative_paths_never_fall_back_to_the_working_directory(tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "configs", tmp_path / "cwd"
    folder.mkdir()
    elsewhere.mkdir()
    (elsewhere / "prompts.jsonl").write_text('{"prompt": "hi"}\n')  # only in the working directory
    (elsewhere / "org").mkdir()
    (elsewhere / "org" / "model").mkdir()
    monkeypatch.chdir(elsewhere)
    path = folder / "c.toml"
    path.write_text('[model]\npath = "org/model"\n[data]\nsource = "jsonl"\npath = "prompts.jsonl"\n[oracle]\nkind = "human"\n')
    with pytest.raises(ConfigError, match=f"model.path: 'org/model' is not next to the config file \\({folder / 'org/model'} does not exist\\) but is in the current directory"):
        load_config(path)
    path.write_text('[model]\npath = "org/model-on-the-hub"\n[data]\nsource = "jsonl"\npath = "prompts.jsonl"\n[oracle]\nkind = "human"\n')
    with pytest.raises(ConfigError, match=f"data.path: {folder / 'prompts.jsonl'} does not exist"):
        load_config(path)
    (folder / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    config = load_config(path)
    assert config.data.path == str(folder / "prompts.jsonl") and config.model.path == "org/model-on-the-hub"  # a hub name stays one
