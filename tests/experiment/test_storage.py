"""The run folder's files on their own: the label log, the config check on resume."""

import dataclasses
import json

import pytest

from jaxdpo.config import ExperimentConfig
from jaxdpo.errors import UserError
from jaxdpo.experiment.folder import CONFIG, prepare_out_dir, save_config
from jaxdpo.experiment.storage import LabelLog, LabelRecord


def record(round_: int, pick: int, preferred="a") -> LabelRecord:
    return LabelRecord(
        method="activedpo", seed=0, round=round_, pick=pick, candidate=pick, prompt="p", response_a="x", response_b="y",
        prompt_len=1, input_ids_a=(1, 2), attention_mask_a=(1, 1), input_ids_b=(1, 3), attention_mask_b=(1, 1),
        preferred=preferred, score_a=0.5 if preferred else None, score_b=-0.25 if preferred else None,
    )


def test_log_round_trips_records_and_repairs_only_a_torn_tail(tmp_path):
    log = LabelLog(tmp_path / "labels.jsonl")
    records = [record(1, 0), record(1, 1, "b"), record(1, 2, None)]
    log.append(records)
    assert log.read() == records and log.repair() == 0
    whole = log.path.read_bytes()
    log.path.write_bytes(whole + whole.splitlines(keepends=True)[0][:30])  # a kill mid-write
    assert log.read() == records
    assert log.repair() == 30 and log.path.read_bytes() == whole
    log.append([record(2, 0)])  # appends after the repair start on a fresh line
    assert log.read() == [*records, record(2, 0)]


def test_votes_round_trip_and_are_checked(tmp_path):
    log = LabelLog(tmp_path / "labels.jsonl")
    voted = dataclasses.replace(record(1, 0), votes=(("alice", "a"), ("bob", "skip")))
    log.append([voted, record(1, 1)])
    assert log.read() == [voted, record(1, 1)]
    assert log.path.read_text().count('"votes": {"alice": "a", "bob": "skip"}') == 1 and log.path.read_text().count('"votes"') == 1
    assert LabelRecord.from_json({**voted.to_json(), "votes": {"bob": "skip", "alice": "a"}}) == voted  # one order
    with pytest.raises(ValueError, match="field 'votes' must map annotators"):
        LabelRecord.from_json({**voted.to_json(), "votes": {"alice": "left"}})


def test_tie_skip_and_left_round_trip_and_are_checked(tmp_path):
    log = LabelLog(tmp_path / "labels.jsonl")
    tie = dataclasses.replace(record(1, 0, None), no_preference="tie", left="b")
    shown = dataclasses.replace(record(1, 1), left="a")
    log.append([tie, shown, record(1, 2, None)])  # the last: an older log's no-preference label, reason not recorded
    assert log.read() == [tie, shown, record(1, 2, None)]
    assert '"no_preference"' not in log.path.read_text().splitlines()[2]
    with pytest.raises(ValueError, match="a label with a preference \\('a'\\) cannot also be a 'skip'"):
        LabelRecord.from_json({**shown.to_json(), "no_preference": "skip"})
    with pytest.raises(ValueError, match="field 'left' must be \"a\", \"b\" or null, got 'right'"):
        LabelRecord.from_json({**shown.to_json(), "left": "right"})
    with pytest.raises(ValueError, match="field 'no_preference' must be \"tie\", \"skip\" or null"):
        LabelRecord.from_json({**tie.to_json(), "no_preference": "both bad"})


@pytest.mark.parametrize("damage, why", [
    (lambda line: line.replace(b'"pick": 1', b'"pick": 7'), "the checksum does not match"),
    (lambda line: line[:20] + b"\n", "not valid JSON"),
    (lambda line: json.dumps({"pick": 1}).encode() + b"\n", "no crc32 checksum"),
])
def test_damage_before_the_last_line_is_reported_with_its_number(tmp_path, damage, why):
    log = LabelLog(tmp_path / "labels.jsonl")
    log.append([record(1, 0), record(1, 1), record(1, 2)])
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[1] = damage(lines[1])
    log.path.write_bytes(b"".join(lines))
    for call in (log.read, log.repair):
        with pytest.raises(UserError, match=f"line 2 is damaged \\({why}"):
            call()


def test_resume_may_grow_rounds_and_seeds_move_the_annotation_server_and_switch_logging_only(tmp_path):
    config = ExperimentConfig()
    assert prepare_out_dir(config, tmp_path, resume=False)
    save_config(config, tmp_path)
    run = config.run
    assert not prepare_out_dir(config, tmp_path, resume=True)
    assert prepare_out_dir(dataclasses.replace(config, run=dataclasses.replace(run, rounds=run.rounds + 2)), tmp_path, resume=True)
    assert prepare_out_dir(dataclasses.replace(config, run=dataclasses.replace(run, seeds=(*run.seeds, 9))), tmp_path, resume=True)
    with pytest.raises(UserError, match="not remove them"):
        prepare_out_dir(dataclasses.replace(config, run=dataclasses.replace(run, rounds=1)), tmp_path, resume=True)
    moved = dataclasses.replace(config.oracle, url="http://elsewhere:8080", token_env="OTHER_TOKEN")  # the annotation server moved
    assert prepare_out_dir(dataclasses.replace(config, oracle=moved), tmp_path, resume=True)
    assert prepare_out_dir(dataclasses.replace(config, log=dataclasses.replace(config.log, tensorboard=True)), tmp_path, resume=True)
    older = {key: value for key, value in json.loads((tmp_path / CONFIG).read_text()).items() if key != "log"}
    (tmp_path / CONFIG).write_text(json.dumps(older))  # a run started before [log] existed resumes
    assert prepare_out_dir(config, tmp_path, resume=True)
    with pytest.raises(UserError, match="another config: dpo.beta was 0.1, now 0.5 "):
        prepare_out_dir(dataclasses.replace(config, dpo=dataclasses.replace(config.dpo, beta=0.5)), tmp_path, resume=True)
    with pytest.raises(UserError, match="already holds a run"):
        prepare_out_dir(config, tmp_path, resume=False)
    (tmp_path / CONFIG).unlink()
    (tmp_path / "notes.txt").write_text("not a run's")
    with pytest.raises(UserError, match="holds no run to resume"):
        prepare_out_dir(config, tmp_path, resume=True)
