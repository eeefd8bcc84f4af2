"""Round time: one paper round of a config on random-weight stand-ins of its models and data
(`jaxdpo rehearse`), one JSON object per stage, then the round's total.

    python benchmarks/round.py experiments/configs/gemma-2b-tldr.toml --scale 0.02   # 2 CPU cores: a few minutes
    python benchmarks/round.py experiments/configs/gemma-2b-tldr.toml                # full size, on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile

from jaxdpo.experiment.rehearsal import rehearse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--out", help="folder for the stand-ins (default: a temporary folder)")
    args = parser.parse_args()
    report = rehearse(args.config, args.out or tempfile.mkdtemp(prefix="round-"), scale=args.scale)
    common = dict(config=args.config, scale=args.scale, device=report["device"], params=report["params"])
    for stage, figures in report["stages"].items():
        print(json.dumps(dict(**common, stage=stage, **figures)), flush=True)
    print(json.dumps(dict(**common, stage="round", seconds=report["round_seconds"])), flush=True)


if __name__ == "__main__":
    main()
