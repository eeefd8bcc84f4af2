"""`jaxdpo run [CONFIG] --out DIR [--resume]`: run an experiment (the embedded default without CONFIG).
`jaxdpo rehearse CONFIG --out DIR [--scale S]`: one round of CONFIG on random-weight stand-ins.
`jaxdpo plan CONFIG --target T [--mesh D,M] [--json FILE] [--cache FILE]`: a round of CONFIG compiled for a TPU slice (or this machine), per-stage memory and roofline time.
`jaxdpo report DIR [DIR...] [--out FILE]`: re-render runs' summary tables and curves from their metrics.jsonl.
`jaxdpo annotate DIR [--port P]`: label the pairs a run waits for, on a page at 127.0.0.1:P.
`jaxdpo export DIR dataset --out PATH [--format F]`: every label as a Hugging Face dataset (TRL's preference format).
`jaxdpo export DIR adapter --track METHOD-seedS [--round N] --out PATH [--merged]`: a track's LoRA as a PEFT adapter.

Exit codes: 0 done; `EXIT_USER_ERROR` (2) a problem with the config, data, files or run folder,
told in one line; `EXIT_LABELS_PENDING` (3) the run waits for human labels (resume when they are
in); `EXIT_INTERRUPTED` (130) stopped by Ctrl-C, `EXIT_TERMINATED` (143) stopped by SIGTERM
(everything collected is kept; the message says how to resume; `jaxdpo.interrupts`); 1 a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from pathlib import Path

from jaxdpo import VERSION, interrupts
from jaxdpo.annotate import DEFAULT_PORT
from jaxdpo.errors import EXIT_USER_ERROR, UserError
from jaxdpo.experiment.targets import TARGETS, quiet_libtpu

EXIT_CONFIG = EXIT_USER_ERROR  # config errors are user errors
EXIT_LABELS_PENDING, EXIT_INTERRUPTED, EXIT_TERMINATED = 3, 128 + signal.SIGINT, 128 + signal.SIGTERM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxdpo", description="ActiveDPO in JAX: active preference selection, then DPO.")
    parser.add_argument("--version", action="version", version=f"jaxdpo {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run or resume an experiment")
    run.add_argument("config", nargs="?", help="TOML or YAML config (default: the embedded CPU demo)")
    run.add_argument("--out", required=True, type=Path, help="output folder: metrics.jsonl, labels.jsonl, checkpoints/, curves.png")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoints")
    rehearse = commands.add_parser("rehearse", help="one round of a config on random-weight stand-ins of its models and data, timed per stage")
    rehearse.add_argument("config", help="a TOML or YAML experiment config (its model.path names a shipped shape)")
    rehearse.add_argument("--out", required=True, type=Path, help="folder for the stand-ins, the run and rehearsal.json")
    rehearse.add_argument("--scale", type=float, default=1.0, help="shrink widths, depth, vocabulary and counts by this factor in (0, 1]")
    plan = commands.add_parser("plan", help="compile a round of a config for a TPU slice or this machine: memory per device, roofline time")
    plan.add_argument("config", help="a TOML or YAML experiment config (its model.path: a shipped shape or a local folder)")
    plan.add_argument("--target", required=True, choices=TARGETS, help="a TPU slice (needs libtpu: pip install 'jax[tpu]') or local")
    plan.add_argument("--mesh", metavar="D,M", help="data × model devices (default: the config's [mesh], else every device on data)")
    plan.add_argument("--json", type=Path, metavar="FILE", help="also write the plan as JSON")
    plan.add_argument("--cache", type=Path, metavar="FILE", help="keep each stage's analysis in FILE as it finishes; a plan run again with FILE compiles only the stages not in it")
    plan.add_argument("--memory-only", action="store_true", help="bytes per device only: skip the FLOPs, bytes accessed and roofline")
    report_ = commands.add_parser("report", help="re-render runs' summary tables and curves from their metrics.jsonl")
    report_.add_argument("runs", nargs="+", type=Path, metavar="DIR", help="run folders; several are overlaid in one plot")
    report_.add_argument("--out", type=Path, help="the plot (default: DIR/curves.png for one run, ./curves.png for several)")
    annotate = commands.add_parser("annotate", help="label the pairs a run waits for, in the browser")
    annotate.add_argument("out", metavar="DIR", type=Path, help="the --out folder of a run waiting for human labels")
    annotate.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port of the page on 127.0.0.1 (default {DEFAULT_PORT}; 0: any free one)")
    _add_export(commands)
    args = parser.parse_args(argv)
    logging.getLogger("transformers").addFilter(_not_the_missing_torch_notice)  # before anything imports transformers

    from rich.console import Console

    console = Console(stderr=True)
    handler = _log_to(console)
    try:
        with interrupts.stop_on_signals():  # SIGTERM too: handlers kept while the message is printed
            try:
                commands = {"run": _run, "rehearse": _rehearse, "plan": _plan, "report": _report, "annotate": _annotate, "export": _export}
                return commands[args.command](args, console)
            except UserError as error:
                _say(console, f"error: {error}", "red")
                return EXIT_USER_ERROR
            except KeyboardInterrupt as interrupt:
                code = interrupt.exit_code if isinstance(interrupt, interrupts.Interrupted) else EXIT_INTERRUPTED
                _say(console, f"interrupted ({signal.Signals(code - 128).name}): {_how_to_continue(args)}", "yellow")
                return code
    finally:
        logging.getLogger("jaxdpo").removeHandler(handler)


def entry() -> None:
    """The `jaxdpo` command: `main`; stopped by a signal, it leaves by `interrupts.leave` (no
    interpreter teardown under XLA threads still running), with the same exit code every time."""
    code = main()
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        interrupts.leave(code)
    sys.exit(code)


def _how_to_continue(args) -> str:
    if args.command != "run":
        return "run the same command again"
    from jaxdpo.experiment.folder import continue_command

    config_file = None if args.config is None else Path(args.config).resolve()  # as the run folder records it
    return f"every label collected so far is saved; continue with: {continue_command(config_file, args.out)}"


def _report(args, console) -> int:
    """`jaxdpo report`: print each run's summary table and write their curves, overlaid when several."""
    from rich.console import Console

    from jaxdpo import report

    folders = args.runs
    try:
        runs = {str(folder): report.read_run(folder) for folder in folders}
        for name, rows in runs.items():
            Console().print(f"\n{name}", markup=False, highlight=False, soft_wrap=True)  # a path to copy: never wrapped
            Console().print(report.summary_table(rows))
        written = report.plot_runs(runs, args.out or (folders[0] / "curves.png" if len(folders) == 1 else Path("curves.png")), title=" vs ".join(runs))
    except (ValueError, OSError) as error:
        raise UserError(str(error)) from error
    Console().print(f"curves:  {written}" if written else f"curves:  not written, {report.NOTHING_TO_PLOT}", markup=False, highlight=False, soft_wrap=True)
    return 0


def _rehearse(args, console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxdpo.experiment import rehearsal

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        report = rehearsal.rehearse(args.config, args.out, scale=args.scale, progress=progress)
    rehearsal.print_report(report)
    return 0


def _plan(args, console) -> int:
    """`jaxdpo plan`: the table (and --json); exit 2 naming the keys to lower when a stage does not fit."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from jaxdpo.config import load_config
    from jaxdpo.experiment import plan

    quiet_libtpu()  # before JAX starts its backends
    config = load_config(args.config)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as progress:
        report = plan.plan(config, args.target, mesh=plan.parse_mesh(args.mesh), costs=not args.memory_only, progress=progress, cache=args.cache)
    report["config"] = str(args.config)
    plan.print_plan(report, str(args.config))
    if args.json:
        plan.write_json(report, args.json)
    plan.check_fits(report)
    return 0


def _run(args, console) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxdpo import experiment, multihost, report
    from jaxdpo.config import load_config
    from jaxdpo.experiment.setup import start_devices
    from jaxdpo.oracles import LabelsPending

    config = load_config(args.config)
    start_devices(config)
    writer = multihost.is_writer()  # of several processes, process 0 alone reports (they all exit alike)
    if not writer:
        logging.getLogger("jaxdpo").setLevel(logging.ERROR)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) if writer else contextlib.nullcontext() as progress:
            rows = experiment.run(config, args.out, resume=args.resume, progress=progress, config_file=args.config)
    except LabelsPending as pending:
        _say(console, f"waiting for labels: {pending}", "yellow")
        if writer:
            _say(console, _how_to_continue(args), "yellow")
        return EXIT_LABELS_PENDING
    if not writer:
        return 0
    Console().print(report.summary_table(rows))
    plot = report.plot_curves(rows, args.out / "curves.png", title=str(args.out))
    curves = plot or f"not written, {report.NOTHING_TO_PLOT}"
    Console().print(f"metrics: {args.out / experiment.METRICS}\nlabels:  {args.out / experiment.LABELS}\ncurves:  {curves}", markup=False, highlight=False, soft_wrap=True)
    return 0


def _annotate(args, console) -> int:
    from jaxdpo.annotate import serve

    serve(args.out, args.port, say=lambda message: _say(console, message, "green"))
    return 0


def _add_export(commands) -> None:
    from jaxdpo.export import FORMATS

    export = commands.add_parser("export", help="a run's labels as a Hugging Face dataset, or a track's LoRA as a PEFT adapter")
    export.add_argument("out", metavar="DIR", type=Path, help="a run folder (the --out of jaxdpo run)")
    what = export.add_subparsers(dest="what", required=True)
    dataset = what.add_parser("dataset", help="every label as a datasets.Dataset: prompt, chosen, rejected (TRL's DPO format) and where each came from")
    dataset.add_argument("--out", dest="to", metavar="PATH", required=True, type=Path, help="where to write it")
    dataset.add_argument("--format", choices=FORMATS, help="disk: a save_to_disk folder for datasets.load_from_disk (default, unless --out ends in .jsonl or .parquet); jsonl; parquet")
    adapter = what.add_parser("adapter", help="a track's LoRA as a PEFT adapter folder (peft, vLLM, TGI), or merged into the base model")
    adapter.add_argument("--track", required=True, metavar="METHOD-seedS", help="the track, e.g. activedpo-seed0")
    adapter.add_argument("--round", type=int, metavar="N", help="after which round (default: the track's latest checkpoint; a run keeps the last two)")
    adapter.add_argument("--out", dest="to", metavar="PATH", required=True, type=Path, help="the folder to write")
    adapter.add_argument("--merged", action="store_true", help="the base model with the adapter merged in, as a whole HF checkpoint (weights, config, tokenizer)")


def _export(args, console) -> int:
    """`jaxdpo export`: write the labels or an adapter, and say what was written."""
    from rich.console import Console

    from jaxdpo import export

    if args.what == "dataset":
        fmt = export.format_of(args.to, args.format)
        counts = export.export_labels(args.out, args.to, fmt)
        kinds = ", ".join(f"{count} {kind}" for kind, count in counts.items())
        how = "datasets.load_from_disk" if fmt == "disk" else f'datasets.load_dataset("{"json" if fmt == "jsonl" else fmt}", data_files=...)'
        message = f"{sum(counts.values())} labels ({kinds or 'none yet'}) written to {args.to} (read it with {how})"
    else:
        round_, base = export.export_adapter(args.out, args.track, args.to, round_=args.round, merged=args.merged)
        what = "the base model with the adapter merged in" if args.merged else "a PEFT adapter"
        message = f"{args.track} after round {round_}: {what}, written to {args.to} (base model: {base})"
    Console().print(message, markup=False, highlight=False, soft_wrap=True)
    return 0


def _say(console, message: str, style: str) -> None:
    console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def _not_the_missing_torch_notice(record: logging.LogRecord) -> bool:
    """transformers imported without torch says "PyTorch was not found. Models won't be
    available…"; jaxdpo uses only its tokenizers and configurations, so the notice misleads."""
    return not record.getMessage().startswith("PyTorch was not found")


def _log_to(console) -> logging.Handler:
    """jaxdpo's warnings (a repaired label log, a checkpoint fallback) go to the console."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_time=False, show_path=False)
    logger = logging.getLogger("jaxdpo")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, here, whatever the root logger does
    return handler


if __name__ == "__main__":
    entry()
