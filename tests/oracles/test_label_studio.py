"""`[oracle] kind = "label_studio"` against a real Label Studio server (see conftest.py): a run that
stops, is annotated through the server's API the way its labeling page does, and resumes; several
annotators; deleted and edited tasks; a wrong token; a server that is down."""

import base64
import json
import socket

import numpy as np
import pytest

from jaxdpo import experiment as loop
from jaxdpo.cli import EXIT_LABELS_PENDING, main
from jaxdpo.errors import EXIT_USER_ERROR, UserError
from jaxdpo.oracles import LabelsPending, PairRequest
from jaxdpo.oracles.label_studio import (
    LABELING_CONFIG,
    TASKS_FILE,
    connect,
    is_personal_access_token,
    majority,
    no_preference,
    pairwise_problem,
)
from tests.test_loop import TINY, new_run, sft_dir, write_toml  # noqa: F401 (sft_dir: a fixture)

TOKEN_ENV = "JAXDPO_TEST_LABEL_STUDIO_TOKEN"
server = pytest.mark.xdist_group("label_studio")


def pairs(track: str, n: int) -> list[PairRequest]:
    return [PairRequest(f"{track}-round001-pick{i:03d}", track, 1, f"prompt {i}", f"response a{i}", f"response b{i}") for i in range(n)]


def oracle_for(label_studio, out_dir, monkeypatch, *, project=None, token=None):
    monkeypatch.setenv(TOKEN_ENV, token or label_studio.legacy_token)
    return connect(label_studio.url, TOKEN_ENV, project=project, run_name="test", out_dir=out_dir)


def asked(oracle, requests) -> str:
    """Ask for `requests`; the stop's message."""
    with pytest.raises(LabelsPending):
        oracle.label(requests)
    return oracle.submit_pending()


def task_ids(oracle) -> list[int]:
    return list(oracle.task_map.tasks.values())


@pytest.mark.parametrize(
    "votes, expected, why_none",
    [
        ((("1", "a"),), "a", None),
        ((("1", "b"), ("2", "b"), ("3", "a")), "b", None),
        ((("1", "a"), ("2", "b")), None, "tie"),  # a tie between annotators is no label
        ((("1", "a"), ("2", "b"), ("3", "skip")), None, "tie"),
        ((("1", "skip"), ("2", "a")), "a", None),  # skips are no votes
        ((("1", "skip"),), None, "skip"),
        ((("1", "skip"), ("2", "skip")), None, "skip"),
    ],
)
def test_majority_rule(votes, expected, why_none):
    assert majority(votes) == expected
    assert no_preference(votes) == why_none


def test_labeling_config_and_token_kinds():
    assert pairwise_problem(LABELING_CONFIG) is None
    assert "no <Pairwise" in pairwise_problem('<View><Text name="p" value="$prompt"/><Text name="a" value="$answer1"/><Text name="b" value="$answer2"/></View>')
    claims = base64.urlsafe_b64encode(json.dumps({"token_type": "refresh"}).encode()).decode().rstrip("=")
    assert is_personal_access_token(f"eyJhbGciOiJIUzI1NiJ9.{claims}.signature")
    assert not is_personal_access_token("0123456789abcdef0123456789abcdef01234567")


@server
def test_one_round_end_to_end(tmp_path, sft_dir, label_studio, monkeypatch, capsys):  # noqa: F811
    """Exit 3 with the pairs in a new project; partly annotated, a resume imports nothing again and
    still waits; fully annotated, it finishes with exactly those labels. With a personal access
    token, which no file of the run holds."""
    monkeypatch.setenv(TOKEN_ENV, label_studio.personal_access_token)
    config = {
        **TINY, "run": {"name": "ls-e2e", "methods": ["random"], "seeds": [0], "rounds": 1},
        "oracle": {"kind": "label_studio", "url": label_studio.url, "token_env": TOKEN_ENV},
    }
    out = new_run(tmp_path, sft_dir, "run")
    command = ["run", str(write_toml(tmp_path / "ls.toml", config)), "--out", str(out)]
    assert main(command) == EXIT_LABELS_PENDING
    assert "4 pairs await labels in Label Studio project" in capsys.readouterr().err
    project = json.loads((out / TASKS_FILE).read_text().splitlines()[0])["project"]
    tasks = sorted(label_studio.tasks(project), key=lambda t: t["data"]["pair_id"])
    assert [t["data"]["pair_id"] for t in tasks] == [f"random-seed0-round001-pick{i:03d}" for i in range(4)]
    assert {(t["data"]["run"], t["data"]["track"], t["data"]["round"]) for t in tasks} == {("ls-e2e", "random-seed0", 1)}

    sides = ["left", "right", None, "right"]  # None: skipped
    for task, side in list(zip(tasks, sides))[:2]:
        label_studio.annotate(task["id"], side)
    assert main([*command, "--resume"]) == EXIT_LABELS_PENDING
    assert "2 pairs await labels" in capsys.readouterr().err
    assert len(label_studio.tasks(project)) == 4  # nothing imported twice
    for task, side in list(zip(tasks, sides))[2:]:
        label_studio.annotate(task["id"], side)
    assert main([*command, "--resume"]) == 0

    labels = loop.read_labels(out / loop.LABELS)
    assert [r.preferred for r in labels] == ["a", "b", None, "b"]  # left is answer1 is response a
    assert [(r.prompt, r.response_a, r.response_b) for r in labels] == [(t["data"]["prompt"], t["data"]["answer1"], t["data"]["answer2"]) for t in tasks]
    assert [r.votes for r in labels] == [(("1", choice),) for choice in ("a", "b", "skip", "b")]
    assert [(r.no_preference, r.left) for r in labels] == [(None, "a"), (None, "a"), ("skip", "a"), (None, "a")]
    rows = [json.loads(line) for line in (out / loop.METRICS).read_text().splitlines()]
    assert [r["labels"] for r in rows] == [0, 3]

    label_studio.api.call("DELETE", f"/api/tasks/{tasks[0]['id']}/")  # a label already collected stays, and is not asked again
    assert main([*command, "--resume"]) == 0
    assert loop.read_labels(out / loop.LABELS) == labels
    token = label_studio.personal_access_token.encode()
    assert not [path for path in out.rglob("*") if path.is_file() and token in path.read_bytes()]


@server
def test_several_annotators_majority_in_a_configured_project(tmp_path, label_studio, monkeypatch):
    """A task is answered when as many annotators as its overlap have answered; each annotator's
    latest annotation is their vote; the majority of a/b votes is the label, a tie is none."""
    project = label_studio.api.call("POST", "/api/projects/", {"title": "several annotators", "label_config": LABELING_CONFIG})["id"]
    label_studio.api.call("PATCH", f"/api/projects/{project}/", {"maximum_annotations": 3})
    oracle = oracle_for(label_studio, tmp_path, monkeypatch, project=project)
    requests = pairs("activedpo-seed0", 4)
    assert "4 pairs await labels in Label Studio project" in asked(oracle, requests)
    alice, bob, carol = (str(label_studio.new_user(f"{name}@example.com")) for name in ("alice", "bob", "carol"))
    votes = [
        [(alice, "left"), (bob, "left"), (carol, "right")],  # a, 2:1
        [(alice, "right"), (bob, None), (carol, "right")],  # b, 2:0 and a skip
        [(alice, "left"), (bob, "right"), (carol, None), (alice, "right")],  # alice changed her mind: b, 2:0
        [(alice, "left"), (bob, "right")],  # 2 of 3 annotators: still pending
    ]
    ids = task_ids(oracle)
    for task, task_votes in zip(ids, votes):
        for user, side in task_votes:
            label_studio.annotate(task, side, user=int(user))
    message = asked(oracle, requests)
    assert "1 pairs await labels" in message and "(0 imported now)" in message
    label_studio.annotate(ids[3], None, user=int(carol))  # a tie with a skip
    answer = oracle.label(requests)
    assert answer.prefer_a.tolist()[:1] == [True] and answer.valid.tolist() == [True, True, True, False]
    assert not answer.prefer_a[1] and not answer.prefer_a[2]
    expected = [("a", "a", "b"), ("b", "skip", "b"), ("b", "b", "skip"), ("a", "b", "skip")]  # alice's, bob's and carol's votes
    assert answer.votes == tuple(tuple(sorted(zip((alice, bob, carol), choices))) for choices in expected)
    assert {t["project"] for t in label_studio.tasks(project)} == {project} and len(label_studio.tasks(project)) == 4


@server
def test_a_stop_between_import_and_saving_the_map_imports_nothing_twice(tmp_path, label_studio, monkeypatch):
    oracle = oracle_for(label_studio, tmp_path, monkeypatch)
    requests = pairs("random-seed0", 3)
    asked(oracle, requests)
    project = oracle.task_map.project
    path = tmp_path / TASKS_FILE
    path.write_text(path.read_text().splitlines(True)[0])  # the map as it was before the import
    again = oracle_for(label_studio, tmp_path, monkeypatch)
    assert "(0 imported now)" in asked(again, requests)
    assert sorted(task_ids(again)) == sorted(t["id"] for t in label_studio.tasks(project))
    assert len(label_studio.tasks(project)) == 3


@server
def test_deleted_and_edited_tasks_are_errors_until_fixed(tmp_path, label_studio, monkeypatch):
    oracle = oracle_for(label_studio, tmp_path, monkeypatch)
    requests = pairs("aplp-seed0", 3)
    asked(oracle, requests)
    deleted, edited, _ = task_ids(oracle)
    label_studio.api.call("DELETE", f"/api/tasks/{deleted}/")
    task = label_studio.api.call("GET", f"/api/tasks/{edited}/")
    label_studio.api.call("PATCH", f"/api/tasks/{edited}/", {"data": {**task["data"], "answer2": "something else"}})
    with pytest.raises(UserError, match=rf"task {deleted} \(pair aplp-seed0-round001-pick000\) was deleted \(and 1 more\).*its line in"):
        oracle.label(requests)
    with pytest.raises(UserError, match=rf"task {edited} \(pair aplp-seed0-round001-pick001\) was edited: its answer2 differ"):
        oracle.label(requests[1:])
    path = tmp_path / TASKS_FILE  # the remedy the message names: delete the task's line, and the pair is asked again
    path.write_text("".join(line for line in path.read_text().splitlines(True) if f'"task": {deleted}}}' not in line))
    assert "(1 imported now)" in asked(connect(label_studio.url, TOKEN_ENV, project=None, run_name="test", out_dir=tmp_path), requests[:1])


@server
def test_wrong_or_missing_token(tmp_path, label_studio, monkeypatch):
    forged = label_studio.personal_access_token[:-4] + "AAAA"
    for token in ("0123456789abcdef0123456789abcdef01234567", forged):
        with pytest.raises(UserError, match=rf"oracle.token_env: Label Studio at .* does not accept the token in \${TOKEN_ENV}") as error:
            oracle_for(label_studio, tmp_path, monkeypatch, token=token)
        assert token not in str(error.value)
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(UserError, match=rf"oracle.token_env: the environment variable {TOKEN_ENV} is not set"):
        connect(label_studio.url, TOKEN_ENV, project=None, run_name="test", out_dir=tmp_path)
    monkeypatch.setenv(TOKEN_ENV, label_studio.legacy_token)
    with pytest.raises(UserError, match="oracle.project: Label Studio at .* has no project 999999"):
        connect(label_studio.url, TOKEN_ENV, project=999999, run_name="test", out_dir=tmp_path)
    other = label_studio.api.call("POST", "/api/projects/", {"title": "not pairwise", "label_config": '<View><Text name="t" value="$text"/></View>'})
    with pytest.raises(UserError, match=rf"oracle.project: project {other['id']} cannot collect pairwise preferences"):
        connect(label_studio.url, TOKEN_ENV, project=other["id"], run_name="test", out_dir=tmp_path)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@server
def test_server_down(tmp_path, label_studio, monkeypatch, capsys):
    """At the start: exit 2 before anything is written; later: an error, and the map is kept."""
    monkeypatch.setenv(TOKEN_ENV, "some-token")
    config = {**TINY, "oracle": {"kind": "label_studio", "url": closed_port_url(), "token_env": TOKEN_ENV}}
    out = tmp_path / "down"
    assert main(["run", str(write_toml(tmp_path / "down.toml", config)), "--out", str(out)]) == EXIT_USER_ERROR
    assert "oracle.url: cannot reach Label Studio at http://127.0.0.1:" in capsys.readouterr().err
    assert not (out / loop.CONFIG).exists()

    oracle = oracle_for(label_studio, tmp_path, monkeypatch)
    asked(oracle, pairs("random-seed1", 2))
    saved = (tmp_path / TASKS_FILE).read_text()
    oracle.api.url = closed_port_url()
    with pytest.raises(UserError, match="cannot reach Label Studio"):
        oracle.label(pairs("random-seed1", 2))
    assert (tmp_path / TASKS_FILE).read_text() == saved
    np.testing.assert_array_equal(sorted(task_ids(oracle)), sorted(t["id"] for t in label_studio.tasks(oracle.task_map.project)))
