"""A real Label Studio server on 127.0.0.1 (SQLite in a temporary folder), one per test run.

The `label-studio` executable is the one named by $JAXDPO_LABEL_STUDIO (CI installs it in a venv of
its own: it pins Django and friends) or the one on PATH. When $JAXDPO_LABEL_STUDIO is set, a server
that cannot start fails the tests; otherwise they are skipped, saying why.

Starting it takes most of a minute, so the pytest-xdist workers share it (xdist's `loadgroup`
cannot keep the tests on one worker under pytest 9): the first worker that needs it starts it,
the others find it in `server.json` of the run's temporary folder, and the last one to finish
stops it. A file lock orders all of that."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from jaxdpo.oracles.label_studio import LabelStudioApi

EXECUTABLE_ENV = "JAXDPO_LABEL_STUDIO"
ADMIN, PASSWORD, LEGACY_TOKEN = "admin@example.com", "jaxdpo-test-password", "jaxdpo-test-legacy-token-0123456789"
START_TIMEOUT_S = 300
QUIET = {"SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false"}  # no calls outside


@dataclasses.dataclass
class Server:
    url: str
    api: LabelStudioApi  # the admin, with the legacy token
    legacy_token: str
    personal_access_token: str

    def annotate(self, task: int, side: str | None, *, user: int | None = None) -> None:
        """Submit an annotation as the labeling page does: the Pairwise choice ("left" or
        "right"), or a skip (`side` None); `user`: on behalf of that annotator."""
        body = {"result": [], "was_cancelled": True} if side is None else {
            "result": [{"from_name": "comparison", "to_name": "comparison", "type": "pairwise", "value": {"selected": side}, "origin": "manual"}],
            "lead_time": 2.5,
        }
        self.api.call("POST", f"/api/tasks/{task}/annotations/", {**body, **({} if user is None else {"completed_by": user})})

    def new_user(self, email: str) -> int:
        return self.api.call("POST", "/api/users/", {"email": email, "username": email.split("@")[0]})["id"]

    def tasks(self, project: int) -> list[dict]:
        return self.api.tasks(project)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> Server:
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "label-studio"  # the workers' basetemps share a parent
    folder.mkdir(exist_ok=True)
    with _locked(folder) as shared:
        server = shared.get("server") or _start(folder)
        shared.update(server=server, users=shared.get("users", 0) + 1)
    try:
        if server["problem"]:
            if os.environ.get(EXECUTABLE_ENV):
                pytest.fail(server["problem"])
            pytest.skip(server["problem"])
        api = LabelStudioApi(server["url"], LEGACY_TOKEN, "LEGACY_TOKEN")
        yield Server(server["url"], api, LEGACY_TOKEN, server["personal_access_token"])
    finally:
        with _locked(folder) as shared:
            shared["users"] -= 1
            if shared["users"] == 0 and shared["server"]["pid"]:
                _stop(shared["server"]["pid"])
                shared.clear()


@contextlib.contextmanager
def _locked(folder: Path):
    """`server.json` of the run, as a dict to read and change while holding the lock."""
    path = folder / "server.json"
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shared = json.loads(path.read_text()) if path.exists() else {}
        yield shared
        path.write_text(json.dumps(shared))


def _start(folder: Path) -> dict:
    """Start the server; {"url", "pid", "personal_access_token", "problem": why it did not start or None}."""
    executable = os.environ.get(EXECUTABLE_ENV) or shutil.which("label-studio")
    if executable is None:
        return {"pid": None, "problem": f"label-studio is not installed (pip install label-studio, in a venv of its own; set {EXECUTABLE_ENV} to its executable)"}
    port = _free_port()
    command = [
        executable, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port), "--data-dir", str(folder),
        "--database", str(folder / "label_studio.sqlite3"), "--username", ADMIN, "--password", PASSWORD, "--user-token", LEGACY_TOKEN,
        "--enable-legacy-api-token",
    ]
    log = folder / "server.log"
    try:
        with log.open("w") as output:
            process = subprocess.Popen(
                command, env={**os.environ, **QUIET, "LABEL_STUDIO_BASE_DATA_DIR": str(folder)}, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True,  # its own process group, outliving the worker that started it
            )
    except OSError as error:
        return {"pid": None, "problem": f"cannot run Label Studio ({executable}): {error}"}
    url = f"http://127.0.0.1:{port}"
    problem = _wait_until_up(url, process, time.time() + START_TIMEOUT_S)
    if problem:
        _stop(process.pid)
        tail = "".join(log.read_text().splitlines(True)[-20:])
        return {"pid": None, "problem": f"Label Studio ({executable}) did not start: {problem}; its log ends with:\n{tail}"}
    token = LabelStudioApi(url, LEGACY_TOKEN, "LEGACY_TOKEN").call("POST", "/api/token/")["token"]
    return {"url": url, "pid": process.pid, "personal_access_token": token, "problem": None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, deadline: float) -> str | None:
    """None once the server answers; else why it never will."""
    while time.time() < deadline:
        if process.poll() is not None:
            return f"it exited with code {process.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5):
                return None
        except OSError:
            time.sleep(0.5)
    return f"it did not answer within {START_TIMEOUT_S} s"


def _stop(pid: int) -> None:
    """End the server's process group (its own session, started by `_start`)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.time() + 30
        while _running(pid) and time.time() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reaps it when this process started it
            time.sleep(0.2)
        if not _running(pid):
            return


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for another worker to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False
