"""`jaxdpo run [CONFIG] --out DIR [--resume]`: run an experiment (the embedded default without CONFIG).
`jaxdpo report DIR [DIR...] [--out FILE]`: re-render runs' summary tables and curves from their metrics.jsonl."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_CONFIG, EXIT_LABELS_PENDING = 2, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxdpo", description="ActiveDPO in JAX: active preference selection, then DPO.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run or resume an experiment")
    run.add_argument("config", nargs="?", help="TOML or YAML config (default: the embedded CPU demo)")
    run.add_argument("--out", required=True, type=Path, help="output folder: metrics.jsonl, labels.jsonl, checkpoints/, curves.png")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoints")
    report_ = commands.add_parser("report", help="re-render runs' summary tables and curves from their metrics.jsonl")
    report_.add_argument("runs", nargs="+", type=Path, metavar="DIR", help="run folders; several are overlaid in one plot")
    report_.add_argument("--out", type=Path, help="the plot (default: DIR/curves.png for one run, ./curves.png for several)")
    args = parser.parse_args(argv)
    if args.command == "report":
        return report_runs(args.runs, args.out)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxdpo import experiment, report
    from jaxdpo.config import ConfigError, load_config
    from jaxdpo.oracles import LabelsPending

    console = Console(stderr=True)
    try:
        config = load_config(args.config)
        experiment.prepare_out_dir(config, args.out, resume=args.resume)
    except (ConfigError, FileExistsError, ValueError) as error:
        console.print(f"error: {error}", style="red", markup=False, highlight=False, soft_wrap=True)
        return EXIT_CONFIG
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            rows = experiment.run(config, args.out, resume=True, progress=progress)
    except LabelsPending as pending:
        console.print(f"waiting for labels: {pending}", style="yellow", markup=False, highlight=False, soft_wrap=True)
        return EXIT_LABELS_PENDING
    Console().print(report.summary_table(rows))
    plot = report.plot_curves(rows, args.out / "curves.png", title=config.run.name)
    Console().print(f"metrics: {args.out / experiment.METRICS}\nlabels:  {args.out / experiment.LABELS}\ncurves:  {plot}")
    return 0


def report_runs(folders: list[Path], plot: Path | None) -> int:
    """`jaxdpo report`: print each run's summary table and write their curves, overlaid when several."""
    from rich.console import Console

    from jaxdpo import report

    try:
        runs = {str(folder): report.read_run(folder) for folder in folders}
        for name, rows in runs.items():
            Console().print(report.summary_table(rows, title=name))
        written = report.plot_runs(runs, plot or (folders[0] / "curves.png" if len(folders) == 1 else Path("curves.png")), title=" vs ".join(runs))
    except (ValueError, OSError) as error:
        Console(stderr=True).print(f"error: {error}", style="red", markup=False, highlight=False, soft_wrap=True)
        return EXIT_CONFIG
    Console().print(f"curves:  {written}" if written else f"curves:  not written, {report.NOTHING_TO_PLOT}", markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
