"""The command line's first impression: `--version`, a `--help` that loads neither JAX nor
transformers, and no transformers notice about a missing PyTorch (jaxdpo does not need it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jaxdpo
from jaxdpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("jax", "transformers", "torch", "datasets", "orbax", "flax", "matplotlib")
TORCH_NOTICE = "PyTorch was not found"


def python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that imports this checkout's jaxdpo."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as done:
        assert done.code == 0
    assert capsys.readouterr().out.strip() == f"jaxdpo {jaxdpo.__version__}"


def test_help_imports_nothing_heavy():
    shown = python(
        "import sys\nfrom jaxdpo.cli import main\n"
        "for argv in (['--help'], ['export', '--help'], ['export', 'DIR', 'adapter', '--help'], ['plan', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        f"print({list(HEAVY)!r}, [m for m in {list(HEAVY)!r} if m in sys.modules])"
    )
    assert shown.returncode == 0, shown.stderr
    assert "--track" in shown.stdout and "dataset" in shown.stdout
    assert shown.stdout.strip().splitlines()[-1].endswith("[]"), shown.stdout.splitlines()[-1]


def test_commands_without_torch_print_no_notice_about_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(method="random", seed=0, round=0, labels=0, eval_reward=0.5)) + "\n")
    hide_torch = "import sys\nsys.modules['torch'] = None\n"  # importlib finds no torch, as on a fresh install
    control = python(hide_torch + "import transformers")
    assert TORCH_NOTICE in control.stderr  # transformers does print it without torch
    report = python(hide_torch + f"from jaxdpo.cli import main\ncode = main(['report', {str(tmp_path)!r}])\nprint('transformers' in sys.modules)\nsys.exit(code)")
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip().endswith("True")  # the command did import transformers
    assert TORCH_NOTICE not in report.stderr, report.stderr
