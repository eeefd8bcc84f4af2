"""Several JAX processes: one `jaxdpo run` as two processes of 2 CPU devices each (jax.distributed
over loopback, gloo collectives), on a ("data" 2, "model" 2) mesh over the 4 global devices,
killed mid-run and resumed, against the same run as one process of 4 devices and the same mesh."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxdpo import experiment
from jaxdpo.errors import UserError
from jaxdpo.sharding import COORDINATOR_ENV, DISTRIBUTED_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV, initialize_distributed
from tests.test_loop import TINY, write_toml
from tests.tolerance import assert_close

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    **TINY, "run": {"methods": ["activedpo", "random"], "seeds": [0], "rounds": 1}, "mesh": {"data": 2, "model": 2},
    "eval": {"prompts": 8, "samples_per_prompt": 3},  # evaluation then runs the program that generates the round's responses
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(config: Path, out: Path, *, processes: int, devices: int, resume: bool = False) -> list[subprocess.Popen]:
    """`jaxdpo run` as `processes` JAX processes of `devices` CPU devices each; stderr to out.<i>.log."""
    command = [sys.executable, "-m", "jaxdpo.cli", "run", str(config), "--out", str(out), *(["--resume"] if resume else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if processes > 1:
        env.update({COORDINATOR_ENV: f"127.0.0.1:{free_port()}", NUM_PROCESSES_ENV: str(processes)})
    else:
        env[DISTRIBUTED_ENV] = "0"  # one process, even inside a cluster job
    started = []
    for i in range(processes):
        log = out.parent / f"{out.name}.{i}.{'resume' if resume else 'start'}.log"
        own = {**env, PROCESS_ID_ENV: str(i)} if processes > 1 else env
        started.append(subprocess.Popen(command, env=own, stdout=subprocess.DEVNULL, stderr=log.open("w")))
    return started


def logs(out: Path) -> str:
    return "\n".join(f"{path.name}:\n{path.read_text()[-3000:]}" for path in sorted(out.parent.glob(f"{out.name}.*.log")))


def finish(processes: list[subprocess.Popen], out: Path) -> None:
    for i, process in enumerate(processes):
        code = process.wait(timeout=600)
        assert code == 0, f"process {i} exited with {code}:\n{logs(out)}"


@pytest.fixture
def started():
    """The processes a test starts; any still running when it ends (a failure) is killed."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / experiment.METRICS).read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_run_as_one_and_resume_after_a_kill(tmp_path, started):
    from flax import nnx

    from jaxdpo import embedded
    from jaxdpo.models import Decoder, save_pretrained

    config = write_toml(tmp_path / "run.toml", CONFIG)
    one, two = tmp_path / "one", tmp_path / "two"
    save_pretrained(Decoder(embedded.MODEL_CONFIG, rngs=nnx.Rngs(0)), one / "sft-model")  # the same initial model, trained or not
    shutil.copytree(one / "sft-model", two / "sft-model")
    reference = start(config, one, processes=1, devices=4)
    job = start(config, two, processes=2, devices=2)
    started += reference + job
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in job) and not experiment.read_labels(two / experiment.LABELS):
        time.sleep(0.05)
    assert all(p.poll() is None for p in job), f"the two-process run ended before it could be killed:\n{logs(two)}"
    for process in job:  # a preempted job: every process dies at once, after the first labels were logged
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = experiment.read_labels(two / experiment.LABELS)
    resumed = start(config, two, processes=2, devices=2, resume=True)
    started += resumed
    finish(resumed, two)
    finish(reference, one)

    after, expected = experiment.read_labels(two / experiment.LABELS), experiment.read_labels(one / experiment.LABELS)
    assert before and after[: len(before)] == before  # nothing logged before the kill is lost or rewritten
    assert after == expected  # same picks, texts, token rows and preferences; nothing asked twice
    got, want = metrics(two), metrics(one)  # seconds left out: the resumed round took its labels from the log
    assert [sorted(k for k in r if not k.endswith("_s")) for r in got] == [sorted(k for k in r if not k.endswith("_s")) for r in want]
    for row, reference_row in zip(got, want):
        for key, value in reference_row.items():
            if key.endswith("_s"):
                continue
            if not isinstance(value, float):
                assert row[key] == value, (row, key)
                continue
            # the same SPMD programs on the same mesh: equal bit for bit here (an all-reduce of two data shards is
            # a + b, through gloo or within one process). The metrics are means of float32 values of order 1 (rewards,
            # losses, per-token NLLs, differences of sequence log-probs): 64 roundings of max(|value|, 1) allow a
            # build that splits a cross-process all-reduce into more partial sums
            assert_close(row[key], value, ulps=64, scale=max(abs(value), 1.0), err_msg=f"{row['method']} round {row['round']} {key}")


@pytest.mark.slow
def test_a_coordinator_without_the_job_size_is_a_user_error():
    """JAX reads only the coordinator from the environment; jaxdpo passes the other two on."""
    script = "from jaxdpo.sharding import initialize_distributed\ninitialize_distributed()"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", COORDINATOR_ENV: f"127.0.0.1:{free_port()}"}
    for name in (NUM_PROCESSES_ENV, PROCESS_ID_ENV, "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and f"needs {COORDINATOR_ENV}, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("name, value", [(DISTRIBUTED_ENV, "yes"), (PROCESS_ID_ENV, "first")])
def test_malformed_job_variables_are_user_errors(monkeypatch, name, value):
    monkeypatch.setenv(COORDINATOR_ENV, "127.0.0.1:1")
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=name):
        initialize_distributed()
