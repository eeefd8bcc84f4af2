"""People label pairs in Label Studio: `[oracle] kind = "label_studio"`.

When a run needs labels it imports every pair that every waiting track needs as tasks of one
Label Studio project — the one named by `oracle.project`, or one it creates with the pairwise
"Human Preference collection for RLHF" template (`LABELING_CONFIG`) and reuses at every later stop
— and stops (exit code 3). A task's data: "prompt", "answer1" (response a), "answer2" (response b),
and where the pair comes from: "run" (run.name), "run_id", "track", "round", "pair_id".
`--resume` pulls the annotations through Label Studio's REST API:

- a task is answered once as many annotators have submitted or skipped it as the task's overlap
  (the project's "annotations per task", 1 by default); until then its pair stays pending;
- each annotator's latest annotation is their vote: the Pairwise choice "left" (answer1) is "a",
  "right" (answer2) is "b", a skip or no choice is "skip";
- the label is the majority of "a" and "b" votes; a tie (skips do not count) is no label: the
  pair is paid for and not trained on, like a skip in the file-based oracle. Every label records
  its votes (`LabelRecord.votes`), why it has no preference ("tie", or "skip" when every vote is a
  skip) and that response a was shown on the left.

`label-studio-tasks.jsonl` in the run folder maps each pair to its task (first line: the project
and the run's id), rewritten atomically after every change. Pairs are never imported twice: before
importing, the project's tasks are listed and those of this run adopted by their "pair_id" (a stop
between an import and the file's rewrite leaves no duplicate). A task that was deleted, or whose
texts were edited, stops the run with an error naming it; labels already in `labels.jsonl` are
never asked again.

Plain HTTP over the standard library: the official `label-studio-sdk` would bring pandas, OpenCV,
nltk and a code generator into every install for the six calls made here. The token is a personal
access token (exchanged for short-lived access tokens, as the SDK does) or a legacy token; it is
read from the environment and never written anywhere.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdpo.errors import UserError
from jaxdpo.files import write_jsonl_atomic
from jaxdpo.oracles.base import LabelsPending, PairRequest, Preferences, Votes, check_requests

TASKS_FILE = "label-studio-tasks.jsonl"
LABELING_CONFIG = """<View className="root">
  <Style>
    .prompt { padding: 16px; margin-bottom: 16px; border-radius: 5px; background: #0084ff; color: #fff; }
    .answers { display: flex; gap: 16px; }
    .answer-box { flex-basis: 49%; padding: 16px; border-radius: 5px; background: rgba(44, 62, 80, 0.9); color: #fff; white-space: pre-wrap; }
  </Style>
  <View className="prompt">
    <Text name="prompt" value="$prompt"/>
  </View>
  <View className="answers">
    <Pairwise name="comparison" toName="answer1,answer2" selectionStyle="background-color: #27ae60; border: 2px solid #2ecc71;"/>
    <View className="answer-box">
      <Text name="answer1" value="$answer1"/>
    </View>
    <View className="answer-box">
      <Text name="answer2" value="$answer2"/>
    </View>
  </View>
</View>"""
PAIRWISE_TARGETS = "answer1,answer2"  # Pairwise's "left" is its first target, answer1
SIDES = {"left": "a", "right": "b"}
_PAGE_SIZE = 100
_TIMEOUT_S = 60


class LabelStudioApi:
    """The REST calls to one Label Studio server; every failure becomes a `UserError` that says
    what to do (the server is down, the token is refused, a call is rejected)."""

    def __init__(self, url: str, token: str, token_env: str):
        self.url, self.token_env = url.rstrip("/"), token_env
        self._token = token
        self._access: str | None = None  # for a personal access token: the current access token

    def call(self, method: str, path: str, body=None, *, missing_ok: bool = False):
        """The JSON answer to `method path` (None for an empty one, or a 404 when `missing_ok`)."""
        for attempt in (1, 2):
            try:
                return self._send(method, path, body, {"Authorization": self._authorization()})
            except urllib.error.HTTPError as error:
                if error.code == 401 and self._access is not None and attempt == 1:
                    self._access = None  # expired: exchange the personal access token again
                    continue
                if error.code == 404 and missing_ok:
                    return None
                raise self._refused(method, path, error) from error

    def tasks(self, project: int) -> list[dict]:
        """Every task of `project`, with its annotations."""
        tasks, page = [], 1
        while True:
            reply = self.call("GET", f"/api/tasks/?project={project}&fields=all&page_size={_PAGE_SIZE}&page={page}")
            tasks += reply["tasks"]
            if not reply["tasks"] or len(tasks) >= reply["total"]:
                return tasks
            page += 1

    def _authorization(self) -> str:
        if not is_personal_access_token(self._token):
            return f"Token {self._token}"
        if self._access is None:
            try:
                self._access = self._send("POST", "/api/token/refresh/", {"refresh": self._token}, {})["access"]
            except urllib.error.HTTPError as error:
                raise self._refused("POST", "/api/token/refresh/", error) from error
        return f"Bearer {self._access}"

    def _send(self, method: str, path: str, body, headers: dict):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
                text = response.read()
        except urllib.error.HTTPError:
            raise
        except OSError as error:  # URLError, a refused connection, a timeout
            reason = getattr(error, "reason", error)
            raise UserError(
                f"oracle.url: cannot reach Label Studio at {self.url} ({reason}); start the server or correct oracle.url, "
                "then run the same command again (everything collected so far is kept)"
            ) from error
        try:
            return json.loads(text) if text else None
        except ValueError as error:
            raise UserError(f"oracle.url: {self.url} answered {method} {path} with something other than JSON; is it a Label Studio server?") from error

    def _refused(self, method: str, path: str, error: urllib.error.HTTPError) -> UserError:
        detail = _detail(error)
        if error.code == 401:
            return UserError(
                f"oracle.token_env: Label Studio at {self.url} does not accept the token in ${self.token_env} ({detail}); put a valid "
                "API token in it (Label Studio: Account & Settings → Personal Access Token)"
            )
        return UserError(f"Label Studio at {self.url} answered {error.code} to {method} {path}: {detail}")


def _detail(error: urllib.error.HTTPError) -> str:
    body = error.read().decode(errors="replace")
    try:
        return str(json.loads(body).get("detail") or body)
    except (ValueError, AttributeError):
        return body.strip()[:200] or error.reason


def is_personal_access_token(token: str) -> bool:
    """Whether `token` is a JWT refresh token (a personal access token), not a legacy token."""
    parts = token.split(".")
    if len(parts) != 3:
        return False
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(claims, dict) and claims.get("token_type") == "refresh"


# -- answers --------------------------------------------------------------------------------------


def annotator_votes(task: dict) -> Votes:
    """Each annotator's vote on `task`: the choice of their latest annotation."""
    latest = {}
    for annotation in sorted(task.get("annotations") or [], key=lambda a: a["id"]):
        latest[_annotator(annotation)] = _choice(annotation)
    return tuple(sorted(latest.items()))


def _annotator(annotation: dict) -> str:
    who = annotation.get("completed_by")
    return str(who.get("email") or who.get("id")) if isinstance(who, dict) else str(who)


def _choice(annotation: dict) -> str:
    """ "a", "b", or "skip" (a skipped annotation, or one without a Pairwise choice)."""
    if annotation.get("was_cancelled"):
        return "skip"
    for result in annotation.get("result") or []:
        if result.get("type") == "pairwise":
            return SIDES.get((result.get("value") or {}).get("selected"), "skip")
    return "skip"


def majority(votes: Votes) -> str | None:
    """"a" or "b", whichever has more votes; None on a tie (skips are no votes)."""
    a, b = (sum(choice == side for _, choice in votes) for side in ("a", "b"))
    return "a" if a > b else "b" if b > a else None


def no_preference(votes: Votes) -> str | None:
    """Why `votes` give no label: "tie" (as many a as b votes), "skip" (no a or b vote at all);
    None when they give one."""
    if majority(votes) is not None:
        return None
    return "tie" if any(choice in ("a", "b") for _, choice in votes) else "skip"


def is_answered(task: dict, votes: Votes) -> bool:
    """As many annotators answered (or skipped) as the task's overlap asks for."""
    return len(votes) >= max(1, int(task.get("overlap") or 1))


def task_texts(request: PairRequest) -> dict[str, str]:
    return {"prompt": request.prompt, "answer1": request.response_a, "answer2": request.response_b}


def pairwise_problem(label_config: str) -> str | None:
    """Why a project's labeling config cannot give the labels this oracle reads (None if it can)."""
    try:
        root = ElementTree.fromstring(label_config)
    except ElementTree.ParseError as error:
        return f"its labeling config is not valid XML ({error})"
    texts = {element.get("value") for element in root.iter("Text")}
    if not {"$prompt", "$answer1", "$answer2"} <= texts:
        return 'its labeling config does not show $prompt, $answer1 and $answer2 in <Text> tags'
    if not any(element.get("toName", "").replace(" ", "") == PAIRWISE_TARGETS for element in root.iter("Pairwise")):
        return f'its labeling config has no <Pairwise toName="{PAIRWISE_TARGETS}"> tag'
    return None


# -- the run's tasks ------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskMap:
    """`label-studio-tasks.jsonl`: the project, the run's id (in every task's data, to tell this
    run's tasks apart in a shared project) and each asked pair's task id."""

    path: Path
    run_id: str
    project: int | None = None
    tasks: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> TaskMap:
        if not path.exists():
            return cls(path, uuid.uuid4().hex[:12])
        try:
            head, *rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return cls(path, head["run_id"], head["project"], {row["pair"]: int(row["task"]) for row in rows})
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path} is damaged ({error!r}); it says which Label Studio task asks each pair: restore it from a backup") from error

    def save(self) -> None:
        head = {"project": self.project, "run_id": self.run_id}
        write_jsonl_atomic(self.path, [head] + [{"pair": pair, "task": task} for pair, task in self.tasks.items()])


class LabelStudioOracle:
    """People, through a Label Studio server (see the module docstring)."""

    can_score = False

    def __init__(self, api: LabelStudioApi, task_map: TaskMap, run_name: str):
        self.api, self.task_map, self.run_name = api, task_map, run_name
        self.queued: list[PairRequest] = []
        self.waiting: set[str] = set()  # pairs already in Label Studio, not answered yet

    def scores(self, prompts, responses) -> np.ndarray:
        raise NotImplementedError("people compare pairs; they do not score single responses")

    def label(self, requests: Sequence[PairRequest], *, seed: int = 0) -> Preferences:
        check_requests(requests)
        tasks = self._run_tasks()
        self._check_unchanged(requests, tasks)
        votes = {r.id: annotator_votes(tasks[r.id]) for r in requests if r.id in tasks}
        answered = {pair: v for pair, v in votes.items() if is_answered(tasks[pair], v)}
        self.waiting = (self.waiting - answered.keys()) | (votes.keys() - answered.keys())
        if len(answered) == len(requests):
            chosen = [majority(answered[r.id]) for r in requests]
            return Preferences(
                np.array([c == "a" for c in chosen]), valid=np.array([c is not None for c in chosen]), votes=tuple(answered[r.id] for r in requests),
                no_preference=tuple(no_preference(answered[r.id]) for r in requests), left=("a",) * len(requests),  # answer1 (a) is on the left
            )
        queued = {q.id for q in self.queued}
        self.queued += [r for r in requests if r.id not in tasks and r.id not in queued]
        raise LabelsPending(f"{len(requests) - len(answered)} pairs of {requests[0].track} await labels in Label Studio")

    def submit_pending(self) -> str:
        """Import the queued pairs (those not in the project yet); say where to label them."""
        imported = 0
        if self.queued:
            project = self._project()
            new = [r for r in self.queued if r.id not in self._run_tasks()]
            if new:
                self.api.call("POST", f"/api/projects/{project}/import", [{"data": self._task_data(r)} for r in new])
                missing = [r.id for r in new if r.id not in self._run_tasks()]
                if missing:
                    raise UserError(
                        f"Label Studio at {self.api.url} did not import {len(missing)} of {len(new)} pairs into project {project} "
                        f"(first: {missing[0]}); run again with --resume to import them"
                    )
            imported, self.waiting = len(new), self.waiting | {r.id for r in self.queued}
            self.queued = []
        project = self.task_map.project
        return (
            f"{len(self.waiting)} pairs await labels in Label Studio project {project}, {self.api.url}/projects/{project}/data "
            f"({imported} imported now). Label them there, then run again with --resume"
        )

    def _task_data(self, request: PairRequest) -> dict:
        where = {"run": self.run_name, "run_id": self.task_map.run_id, "track": request.track, "round": request.round, "pair_id": request.id}
        return {**task_texts(request), **where}

    def _project(self) -> int:
        """The project's id (a new project the first time), saved with the run's id before any
        task that carries that id is imported."""
        if self.task_map.project is None:
            title = f"jaxdpo {self.run_name}"[:50]
            description = f"Preference pairs chosen by jaxdpo (run {self.run_name!r}, id {self.task_map.run_id})"
            created = self.api.call("POST", "/api/projects/", {"title": title, "description": description, "label_config": LABELING_CONFIG})
            self.task_map.project = created["id"]
        self.task_map.save()
        return self.task_map.project

    def _run_tasks(self) -> dict[str, dict]:
        """This run's tasks in the project by pair id; tasks missing from the map (imported just
        before a stop) are adopted into it."""
        project = self.task_map.project
        if project is None:
            return {}
        if self.api.call("GET", f"/api/projects/{project}/", missing_ok=True) is None:
            raise UserError(
                f"Label Studio at {self.api.url} has no project {project} any more, where this run asked {len(self.task_map.tasks)} pairs "
                f"(labels already in labels.jsonl are kept); move {self.task_map.path} aside and run again with --resume to ask the open "
                "pairs in a new project"
            )
        tasks = {t["data"].get("pair_id"): t for t in self.api.tasks(project) if t["data"].get("run_id") == self.task_map.run_id}
        adopted = {pair: task["id"] for pair, task in tasks.items() if pair not in self.task_map.tasks}
        if adopted:
            self.task_map.tasks.update(adopted)
            self.task_map.save()
        return tasks

    def _check_unchanged(self, requests: Sequence[PairRequest], tasks: dict[str, dict]) -> None:
        """Every requested pair that was asked still has its task, with the texts it was asked with."""
        problems = []
        for request in requests:
            asked = self.task_map.tasks.get(request.id)
            task = tasks.get(request.id)
            if asked is not None and (task is None or task["id"] != asked):
                problems.append(f"task {asked} (pair {request.id}) was deleted")
            elif task is not None:
                edited = [key for key, text in task_texts(request).items() if task["data"].get(key) != text]
                if edited:
                    problems.append(f"task {task['id']} (pair {request.id}) was edited: its {', '.join(edited)} differ from what was asked")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(
                f"Label Studio project {self.task_map.project} at {self.api.url}: {problems[0]}{more}; labels already in labels.jsonl are kept. "
                f"Edit the texts back, or delete the task in Label Studio and its line in {self.task_map.path} to ask for the pair again"
            )


def connect(url: str, token_env: str, *, project: int | None, run_name: str, out_dir: Path) -> LabelStudioOracle:
    """The oracle of a run in `out_dir`, once the server at `url` has answered and taken the token
    in the environment variable `token_env` (and `project`, if given, is a pairwise project)."""
    token = os.environ.get(token_env, "")
    if not token:
        raise UserError(
            f"oracle.token_env: the environment variable {token_env} is not set; put your Label Studio API token in it "
            "(Account & Settings → Personal Access Token), e.g. export " + token_env + "=..."
        )
    api = LabelStudioApi(url, token, token_env)
    api.call("GET", "/api/current-user/whoami")
    task_map = TaskMap.load(Path(out_dir) / TASKS_FILE)
    if project is not None:
        found = api.call("GET", f"/api/projects/{project}/", missing_ok=True)
        if found is None:
            raise UserError(f"oracle.project: Label Studio at {api.url} has no project {project} (or the token's user cannot see it)")
        problem = pairwise_problem(found.get("label_config", ""))
        if problem:
            raise UserError(f"oracle.project: project {project} cannot collect pairwise preferences: {problem}; use the 'Human Preference collection for RLHF' template")
        task_map.project = project
    return LabelStudioOracle(api, task_map, run_name)
