"""The run folder on its own: paths that cannot be one, a start cut short before its config, the
message of a resumed run whose config differs, the resume command."""

import contextlib
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from jaxdpo.cli import main
from jaxdpo.config import ExperimentConfig, config_from_dict
from jaxdpo.errors import EXIT_USER_ERROR, UserError
from jaxdpo.experiment.folder import CONFIG, prepare_out_dir, resume_command, save_config


def snapshot(path: Path) -> dict:
    """Every entry under `path` with its size and modification time (nothing touched: equal)."""
    if not path.exists():
        return {}
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    return {str(entry): (entry.stat().st_size, entry.stat().st_mtime_ns) for entry in entries}


def refused(out: Path, capsys) -> str:
    """The one line `jaxdpo run --out OUT` (the embedded default) fails with."""
    assert main(["run", "--out", str(out)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "Traceback" not in err
    return err


@contextlib.contextmanager
def immutable(folder: Path):
    """`folder` made immutable (chattr +i) for the block; skips where the file system or the user cannot."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here (file system or privileges)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_path_that_cannot_be_a_run_folder_is_one_line_and_touches_nothing(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    lock_folder = tmp_path / "odd"
    (lock_folder / ".lock").mkdir(parents=True)  # the lock file cannot be created
    before = snapshot(tmp_path)
    assert f"{a_file} cannot be a run folder: it is a file" in refused(a_file, capsys)
    assert f"{a_file / 'run'} cannot be a run folder: {a_file} is a file, not a folder" in refused(a_file / "run", capsys)
    assert f"its lock file {lock_folder / '.lock'} cannot be opened (Is a directory)" in refused(lock_folder, capsys)
    assert snapshot(tmp_path) == before and a_file.read_text() == "mine"
    if Path("/proc/self").exists():
        assert "/proc/jaxdpo-run cannot be a run folder: creating /proc/jaxdpo-run failed (" in refused(Path("/proc/jaxdpo-run"), capsys)


def test_a_folder_that_is_not_writable_is_refused_before_anything_is_written(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "mine.txt").write_text("keep")
    with immutable(locked):
        before = snapshot(locked)
        assert f"{locked} cannot be a run folder: it is not writable" in refused(locked, capsys)
        assert "cannot be a run folder: creating" in refused(locked / "run", capsys)  # a folder inside it
        assert snapshot(locked) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (chattr +i covers root)")
def test_a_read_only_folder_is_refused(tmp_path, capsys):
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    try:
        assert f"{read_only} cannot be a run folder: it is not writable" in refused(read_only, capsys)
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)


def test_resume_of_a_start_cut_short_starts_afresh_but_never_over_other_files(tmp_path):
    config = ExperimentConfig()
    cut_short = tmp_path / "cut-short"
    (cut_short / "sft-model").mkdir(parents=True)  # SIGKILL while the embedded SFT model was written
    (cut_short / "sft-model" / "model.safetensors").write_bytes(b"half")
    (cut_short / ".lock").write_text("999999")  # the lock of the dead process
    (cut_short / (CONFIG + ".tmp")).write_text("{")
    assert prepare_out_dir(config, cut_short, resume=True)  # a fresh start: config.json is to be written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_out_dir(config, empty, resume=True)
    (cut_short / "results.csv").write_text("the user's")
    with pytest.raises(UserError, match=r"holds no run to resume \(no config.json\) but holds results.csv; check --out"):
        prepare_out_dir(config, cut_short, resume=True)


def test_a_resumed_run_with_another_config_names_each_key_both_values_and_the_config_file(tmp_path):
    started = config_from_dict({"dpo": {"beta": 0.5}, "oracle": {"kind": "human"}})
    config_file = tmp_path / "experiment.toml"
    out = tmp_path / "run"
    out.mkdir()
    save_config(started, out, config_file)
    with pytest.raises(UserError) as left_out:
        prepare_out_dir(ExperimentConfig(), out, resume=True)  # the config file left out
    message = str(left_out.value)
    assert "dpo.beta was 0.5, now 0.1; oracle.kind was \"human\", now \"synthetic\"" in message
    assert f"was the config file left out? it was started with {config_file}: jaxdpo run {config_file} --resume --out {out}" in message
    other = tmp_path / "other.toml"
    with pytest.raises(UserError, match=f"it was started with {config_file}: "):
        prepare_out_dir(ExperimentConfig(), out, resume=True, config_file=other)
    with pytest.raises(UserError, match=f"{config_file} has changed since the run started"):
        prepare_out_dir(dataclasses.replace(started, dpo=ExperimentConfig().dpo), out, resume=True, config_file=config_file)
    (out / "config-file.json").unlink()  # started from Python: no config file recorded
    with pytest.raises(UserError, match=r"was the config file left out\? Without one the run takes the embedded default"):
        prepare_out_dir(ExperimentConfig(), out, resume=True)


def test_resume_command_names_the_config_file_the_run_was_started_with(tmp_path):
    out = tmp_path / "run dir"
    out.mkdir()
    save_config(ExperimentConfig(), out)
    assert resume_command(out) == f"jaxdpo run --resume --out '{out}'"  # the embedded default needs no file
    save_config(config_from_dict({"run": {"rounds": 2}}), out)
    assert resume_command(out) == f"jaxdpo run CONFIG --resume --out '{out}'"  # started from Python: unknown
    save_config(config_from_dict({"run": {"rounds": 2}}), out, tmp_path / "c.toml")
    assert resume_command(out) == f"jaxdpo run {tmp_path / 'c.toml'} --resume --out '{out}'"
    assert json.loads((out / "config-file.json").read_text()) == {"path": str(tmp_path / "c.toml")}


def test_a_half_written_sft_model_is_replaced_and_a_whole_one_appears_at_once(tmp_path, monkeypatch):
    from jaxdpo import embedded
    from jaxdpo.experiment import setup

    untrained, save = embedded.train_sft, setup.save_pretrained

    def save_elsewhere(model, path, **kwargs):  # a kill at any moment of the save leaves no half model in sft-model
        assert Path(path) != out / "sft-model"
        return save(model, path, **kwargs)

    monkeypatch.setattr(embedded, "train_sft", lambda **kwargs: untrained(steps=0))
    monkeypatch.setattr(setup, "save_pretrained", save_elsewhere)
    out = tmp_path / "run"
    (out / "sft-model").mkdir(parents=True)
    (out / "sft-model" / "model.safetensors").write_bytes(b"half")  # a kill mid-save, before its config.json
    built = setup.build_setup(config_from_dict({"data": {"max_prompts": 64, "prompts_per_round": 8}, "eval": {"prompts": 8}}), out)
    assert sorted(path.name for path in out.iterdir()) == ["sft-model"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in (out / "sft-model").iterdir()}
    assert built.model.config == embedded.MODEL_CONFIG
