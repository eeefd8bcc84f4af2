"""Start-up time of the command line in two jaxdpo checkouts, side by side: each timed call is a
fresh interpreter running `jaxdpo ARGS` (default `--help`), alternating A, B, A, B, … so both see
the same background load; prints one JSON object per checkout (best and median seconds) with the
load average.

    git archive <commit> | tar -x -C /tmp/before        # the checkout to compare against
    python benchmarks/startup.py --calls 10 /tmp/before .
    python benchmarks/startup.py --calls 10 /tmp/before . --version     # the jaxdpo arguments come last
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def timed_call(checkout: str, argv: list[str]) -> float:
    """Seconds of one fresh `python -c "jaxdpo.cli.main(argv)"` with `checkout` first on the path."""
    code = f"import sys\nfrom jaxdpo.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout)}
    start = time.perf_counter()  # cwd: `python -c` puts the working folder first on sys.path
    subprocess.run([sys.executable, "-c", code], env=env, cwd=checkout, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per checkout")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="the jaxdpo arguments (default: --help)")
    args = parser.parse_args()
    args.argv = args.argv or ["--help"]
    times = {args.before: [], args.after: []}
    for _ in range(args.calls):
        for checkout in times:
            times[checkout].append(timed_call(checkout, args.argv))
    for checkout, seconds in times.items():
        print(json.dumps({"checkout": checkout, "argv": args.argv, "calls": args.calls, "best_s": round(min(seconds), 3),
                          "median_s": round(statistics.median(seconds), 3), "loadavg": os.getloadavg()}))


if __name__ == "__main__":
    main()
