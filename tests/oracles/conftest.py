"""A real Label Studio server on 127.0.0.1 for the session (SQLite in a temporary folder).

The `label-studio` executable is the one named by $JAXDPO_LABEL_STUDIO (CI installs it in a venv of
its own: it pins Django and friends) or the one on PATH. When $JAXDPO_LABEL_STUDIO is set, a server
that cannot start fails the tests; otherwise they are skipped, saying why. Tests that use the
server carry `xdist_group("label_studio")`, so one pytest-xdist worker starts it once."""

from __future__ import annotations

import contextlib
import dataclasses
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


def _executable() -> tuple[str | None, bool]:
    named = os.environ.get(EXECUTABLE_ENV)
    return (named, True) if named else (shutil.which("label-studio"), False)


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


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> Server:
    executable, required = _executable()
    if executable is None:
        pytest.skip(f"label-studio is not installed (pip install label-studio, in a venv of its own; set {EXECUTABLE_ENV} to its executable)")
    folder = tmp_path_factory.mktemp("label-studio")
    url = f"http://127.0.0.1:{_free_port()}"
    command = [
        executable, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--data-dir", str(folder),
        "--database", str(folder / "label_studio.sqlite3"), "--username", ADMIN, "--password", PASSWORD, "--user-token", LEGACY_TOKEN,
        "--enable-legacy-api-token",
    ]
    log = folder / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            command, env={**os.environ, **QUIET, "LABEL_STUDIO_BASE_DATA_DIR": str(folder)}, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        problem = _wait_until_up(url, process, time.time() + START_TIMEOUT_S)
        if problem:
            message = f"Label Studio ({executable}) did not start: {problem}; its log ends with:\n" + "".join(log.read_text().splitlines(True)[-20:])
            if required:
                pytest.fail(message)
            pytest.skip(message)
        api = LabelStudioApi(url, LEGACY_TOKEN, "LEGACY_TOKEN")
        yield Server(url, api, LEGACY_TOKEN, api.call("POST", "/api/token/")["token"])
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """End the server's process group (its own session, started above)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            continue
