"""How `jaxdpo run` (the embedded default) ends when SIGINT or SIGTERM arrives mid-run, tried many
times: each try starts a fresh run in a temporary folder, waits until the run holds its folder
(`.lock`: the command has started), waits AFTER more seconds, sends the signal and records the exit
status (negative: killed by that signal, e.g. -11 a segfault), the seconds to exit, and whether a
traceback, a fatal error or the "interrupted …" message was printed. One JSON line per try, then a
summary line with the load average. A try still running 60 s after its signal is killed and
counted as "ignored".

    git archive <commit> | tar -x -C /tmp/before         # a checkout to compare against
    python benchmarks/interrupts.py --signal INT --after 0 10 30 --tries 3 --checkout /tmp/before
    python benchmarks/interrupts.py --signal TERM --after 0 10 30 --tries 3
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_try(checkout: Path, signum: int, after: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out, log = Path(folder) / "run", Path(folder) / "log"
        env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONFAULTHANDLER": "1"}
        new_entry = (checkout / "jaxdpo" / "interrupts.py").exists()  # older checkouts: main() and sys.exit
        entry = "from jaxdpo.cli import entry; entry()" if new_entry else "import sys; from jaxdpo.cli import main; sys.exit(main())"
        code = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); " + entry
        with log.open("w") as stream:  # SIGINT at its default even where this script's is ignored (a background job)
            process = subprocess.Popen([sys.executable, "-c", code, "run", "--out", str(out)], env=env, cwd=folder, stdout=stream, stderr=stream)
            while not (out / ".lock").exists() and process.poll() is None:
                time.sleep(0.02)
            time.sleep(after)
            process.send_signal(signum)
            sent = time.perf_counter()
            try:
                status = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                status = "ignored"
        text = log.read_text()
        return dict(
            signal=signal.Signals(signum).name, after_s=after, exit=status, seconds_to_exit=round(time.perf_counter() - sent, 1),
            fatal_error="Fatal Python error" in text, traceback="Traceback" in text, message="interrupted" in text,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signal", choices=("INT", "TERM"), default="INT")
    parser.add_argument("--after", type=float, nargs="+", default=[0.0, 10.0, 30.0], help="seconds after the run holds its folder")
    parser.add_argument("--tries", type=int, default=3, help="tries per --after")
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1], help="the jaxdpo checkout to run")
    args = parser.parse_args()
    signum = getattr(signal, "SIG" + args.signal)
    counts = collections.Counter()
    for after in args.after:
        for _ in range(args.tries):
            row = one_try(args.checkout.resolve(), signum, after)
            counts[str(row["exit"])] += 1
            print(json.dumps(row), flush=True)
    print(json.dumps({"checkout": str(args.checkout), "signal": args.signal, "exits": dict(counts), "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
