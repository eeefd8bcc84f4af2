"""The run folder (`--out`) as a whole: whether a path can be one, its lock, the config it was
started with, and the command that resumes it.

- `.lock`: held by the process running in the folder (`RunLock`).
- `config.json`: the config the run was started with; written once the run's setup has worked,
  so a start that fails (or is killed) before it leaves no run that blocks the same command.
- `config-file.json`: the config file the run was last started or resumed with (by the CLI), for
  the resume command (`resume_command`) and for the message when a resumed run's config differs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
from pathlib import Path

from jaxdpo.config import ExperimentConfig
from jaxdpo.errors import UserError
from jaxdpo.files import write_atomic
from jaxdpo.multihost import SHARED_CHECK

CONFIG, CONFIG_FILE, LOCK = "config.json", "config-file.json", ".lock"
STARTUP_FILES = frozenset({LOCK, SHARED_CHECK, "sft-model", "sft-model.partial", "memory-plan.json", CONFIG + ".tmp"})
"""What a run writes before its `config.json`: a folder holding only these is a start cut short."""

_GROWABLE = {("run", "rounds"), ("run", "seeds")}
_MOVABLE = {
    ("oracle", "url"), ("oracle", "token_env"),  # where the annotation server is, and how to reach it
    ("log", "tensorboard"), ("log", "wandb_project"),  # where live metrics go
}
_log = logging.getLogger("jaxdpo")


def make_out_dir(out_dir: Path, *, resume: bool) -> None:
    """Create the run folder and its missing parents. A path that cannot be one (a file, a path
    under a file, a place where folders cannot be created, a folder that is not writable) raises
    UserError naming it and why, and so does `resume` for a folder that does not exist (a typo);
    nothing is created then."""
    out_dir = Path(out_dir)
    if resume and not out_dir.exists():
        raise UserError(f"{out_dir} holds no run to resume (it does not exist); check --out, or leave out --resume to start a new run")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} cannot be a run folder: it is a file; choose another --out")
    blocker = next((parent for parent in out_dir.absolute().parents if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{out_dir} cannot be a run folder: {blocker} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{out_dir} cannot be a run folder: creating {error.filename or out_dir} failed ({error.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"{out_dir} cannot be a run folder: it is not writable (its permissions, a read-only file system or chattr +i)")


class RunLock:
    """An exclusive lock on a run folder (`DIR/.lock`, holding the owner's pid) for as long as a
    process runs in it: a second run on the same folder stops at once instead of corrupting it or
    paying for labels twice. The operating system releases the lock when its process dies, so a
    stale lock of a killed run never blocks the next one."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK
        self.file = None

    def __enter__(self) -> RunLock:
        try:
            self.file = self.path.open("a+")
        except OSError as error:
            raise UserError(f"{self.path.parent} cannot be a run folder: its lock file {self.path} cannot be opened ({error.strerror})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "unknown"
            self.file.close()
            raise UserError(f"{self.path.parent} is in use by another jaxdpo process (pid {owner}); wait for it to end or stop it") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def prepare_out_dir(config: ExperimentConfig, out_dir: Path, *, resume: bool, config_file: str | os.PathLike | None = None) -> bool:
    """Whether `config` must be (re)written to `out_dir`: a new run, or a resumed one that grows.

    A resumed run must have the config it was started with, except that `run.rounds` may grow and
    `run.seeds` may gain seeds (a finished run is extended), `oracle.url` and `oracle.token_env`
    may change (the Label Studio server moved), and so may `[log]`; otherwise UserError names each
    key with both values and the config file the run was started with (`config_file`: the one
    given now, if any). A
    folder without `config.json` that holds only `STARTUP_FILES` (a start killed before its config
    was written) starts afresh also under `resume`; one that holds anything else is refused."""
    out_dir = Path(out_dir)
    saved = out_dir / CONFIG
    if not saved.exists():
        if resume:
            others = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in STARTUP_FILES)
            if others:
                raise UserError(
                    f"{out_dir} holds no run to resume (no {CONFIG}) but holds {', '.join(others[:3])}{' …' if len(others) > 3 else ''}; "
                    "check --out, or leave out --resume to start a new run there"
                )
            _log.info("%s holds no run yet (its start was cut short): starting it afresh", out_dir)
        return True
    if not resume:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    before, now = json.loads(saved.read_text()), config.to_dict()
    changed = {
        (section, key) for section, values in now.items() for key, value in values.items() if before.get(section, {}).get(key) != value
    }
    refused = sorted(changed - _GROWABLE - _MOVABLE)
    if refused:
        differences = "; ".join(f"{section}.{key} was {_shown(before.get(section, {}).get(key))}, now {_shown(now[section][key])}" for section, key in refused)
        raise UserError(
            f"{out_dir} was run with another config: {differences} (a resumed run may only grow run.rounds and run.seeds and "
            f"change oracle.url, oracle.token_env and [log]){_which_file(out_dir, before, config_file)}"
        )
    if before["run"]["rounds"] > now["run"]["rounds"] or not set(before["run"]["seeds"]) <= set(now["run"]["seeds"]):
        raise UserError(f"{out_dir}: a resumed run may add rounds and seeds, not remove them (it has rounds = {before['run']['rounds']}, seeds = {before['run']['seeds']})")
    return bool(changed)


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _which_file(out_dir: Path, before: dict, config_file) -> str:
    """The end of the message for a resumed run whose config differs: the config file left out?"""
    started_with = recorded_config_file(out_dir)
    given = None if config_file is None else str(Path(config_file).resolve())
    if started_with is not None and started_with == given:
        return f"; {given} has changed since the run started"
    if started_with is not None:
        left_out = "was the config file left out? " if given is None else ""
        return f"; {left_out}it was started with {started_with}: {resume_command(out_dir)}"
    if given is None and before != ExperimentConfig().to_dict():
        return "; was the config file left out? Without one the run takes the embedded default"
    return ""


def saved_config(out_dir: Path) -> dict:
    """The config the run in `out_dir` was started with, as `config.json` holds it."""
    path = Path(out_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"{out_dir} holds no run (no {CONFIG}); name the --out folder of a run")
    return json.loads(path.read_text())


def save_config(config: ExperimentConfig, out_dir: Path, config_file: str | os.PathLike | None = None) -> None:
    """`config.json`, and `config-file.json` when the run was started from a config file."""
    write_atomic(Path(out_dir) / CONFIG, json.dumps(config.to_dict(), indent=2))
    if config_file is not None:
        write_atomic(Path(out_dir) / CONFIG_FILE, json.dumps({"path": str(Path(config_file).resolve())}))


def recorded_config_file(out_dir: Path) -> str | None:
    """The config file the run in `out_dir` was last started or resumed with (None: none recorded)."""
    try:
        return json.loads((Path(out_dir) / CONFIG_FILE).read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_command(out_dir: Path) -> str:
    """The command that continues the run in `out_dir`: with its recorded config file, without one
    for the embedded default, with a CONFIG placeholder when neither is known."""
    config_file = recorded_config_file(out_dir)
    if config_file is None and not _embedded_default(out_dir):
        config_file = "CONFIG"
    return continue_command(config_file, out_dir)


def continue_command(config_file: str | Path | None, out_dir: Path) -> str:
    """`jaxdpo run [CONFIG_FILE] --resume --out OUT_DIR`, quoted for a shell (None: the embedded
    default, no config file; "CONFIG": a placeholder left unquoted)."""
    words = ["jaxdpo", "run", *([] if config_file is None else [str(config_file)]), "--resume", "--out", str(out_dir)]
    return " ".join(word if word == "CONFIG" else shlex.quote(word) for word in words)


def _embedded_default(out_dir: Path) -> bool:
    try:
        return json.loads((Path(out_dir) / CONFIG).read_text()) == ExperimentConfig().to_dict()
    except (OSError, ValueError):
        return False
