"""The rehearsal of a paper round: exact shipped shapes, scaled stand-ins, and one timed round."""

import json
import sys
from pathlib import Path

import pytest

from jaxdpo.cli import main
from jaxdpo.errors import EXIT_USER_ERROR
from jaxdpo.experiment import rehearsal
from jaxdpo.models import DecoderConfig

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


@pytest.mark.parametrize("name, params", [("gemma-2b", 2.506e9), ("llama-2-7b", 6.738e9), ("qwen3-4b", 4.022e9)])
def test_shipped_shapes_are_the_papers_models(name, params):
    shape = rehearsal.shipped_shape(name)
    assert rehearsal.scaled_shape(shape, 1.0) == shape
    count = rehearsal.parameter_count(DecoderConfig.from_hf(shape))
    assert count == pytest.approx(params, rel=0.01)  # without norms: published sizes to 1%


def test_tokenizer_and_prompts_have_the_asked_sizes():
    tokenizer = rehearsal.train_tokenizer(600)
    assert len(tokenizer) == 600
    prompts = rehearsal.synthetic_prompts(20, (30, 50), 596)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert min(lengths) >= 30 and max(lengths) <= 50 and len(set(prompts)) == 20
    assert tokenizer.unk_token_id not in {i for p in prompts for i in tokenizer(p)["input_ids"]}


@pytest.mark.slow
def test_rehearsal_of_a_scaled_paper_round(tmp_path, capsys):
    pytest.importorskip("torch")
    assert main(["rehearse", str(CONFIGS / "gemma-2b-webgpt.toml"), "--out", str(tmp_path), "--scale", "0.01"]) == 0
    report = json.loads((tmp_path / "rehearsal.json").read_text())
    assert report["device"] and report["round_seconds"] > 0
    for stage in ("generation", "features", "selection", "training"):
        assert report["stages"][stage]["seconds"] > 0 and report["stages"][stage]["peak_bytes"] > 0, stage
    policy = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert (policy["model_type"], policy["num_key_value_heads"]) == ("gemma", 1)
    assert "features" in capsys.readouterr().out


def test_rehearsal_without_torch_says_what_to_install_before_writing_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a fresh install: importlib finds no torch
    out = tmp_path / "rehearsal"
    assert main(["rehearse", str(CONFIGS / "gemma-2b-webgpt.toml"), "--out", str(out), "--scale", "0.01"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in err and "jaxdpo[torch]" in err
    assert not out.exists()
