"""`jaxdpo plan CONFIG --target T [--mesh D,M] [--json FILE] [--cache FILE]`: a round of CONFIG compiled for a
TPU slice (or this machine, `local`) with the target's own compiler, without its hardware, without
weights and without the hub.

The policy (and a JAX reward model) are abstract arrays placed on a mesh over the target's devices
(`nnx.eval_shape`, shapes from the shipped `config.json`s of `jaxdpo/experiment/shapes` or a local
model folder); every stage of a round (`stages.round_stages`, the programs the run calls) is
lowered and compiled at the config's chunk shapes (`compiled.analyze`). Per stage: bytes per device
(arguments, outputs, temporaries, plus what stays resident) against what the chip's compiler says
a program may use; FLOPs and the bytes XLA counts as accessed per call; the roofline time of a
call, max(FLOPs ÷ peak, bytes ÷ bandwidth) from the chip's published figures (`targets`), and its
floor (`floor_seconds`), times the calls the round makes; the compile seconds. The round's floor
(every call of every method's last round for one seed; the run's: of all its rounds and seeds) is
a lower bound; the roofline of XLA's counts is not (on a TPU they include on-chip traffic).
Neither has the ICI traffic of collectives, host work (tokenizing, the oracle, checkpoints) or the
gaps between calls; nothing is measured on hardware.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxdpo.config import ExperimentConfig
from jaxdpo.errors import UserError
from jaxdpo.experiment import stage_cache, stages, targets
from jaxdpo.experiment.compiled import analyze

NOTES = (
    "the round floor adds every call's max(FLOPs / peak, the bytes it must read / HBM bandwidth: its arguments once per loop trip, "
    "a decode step's KV cache), a lower bound "
    "without collectives' interconnect time, host work or the oracle",
    "the roofline adds every call's max(FLOPs / peak, bytes accessed / HBM bandwidth) with XLA's byte counts, which on a TPU "
    "include on-chip (VMEM) traffic and count async copies several times: not a bound",
    "generation decodes max_new_tokens steps per call (an upper bound: a chunk stops when every row has ended)",
    "log-probs, features and the DPO step are compiled at their widest response window (every position)",
)


@dataclasses.dataclass(frozen=True)
class StageRow:
    """One stage of the plan (bytes per device; FLOPs and bytes accessed per call; seconds from
    the roofline of XLA's counts, and its floor from FLOPs and `floor_reads`, the bytes a call must
    read from HBM, see `floor_seconds`). `calls`: per method, the calls of each round; `calls_per_round`: of every
    method's last round (the one with the most labels); `seconds_per_run`: of every round of every
    method, one seed."""

    stage: str
    key: str
    bytes: int
    arguments: int
    outputs: int
    temporaries: int
    resident: int
    fits: bool
    flops: float | None
    bytes_accessed: float | None
    seconds_per_call: float | None
    floor_seconds_per_call: float | None
    floor_reads: int
    calls: dict[str, list[int]]
    calls_per_round: int
    seconds_per_round: float | None
    seconds_per_run: float | None
    compile_seconds: float
    error: str | None


def parse_mesh(text: str | None) -> tuple[int, int] | None:
    """`--mesh D,M` as (data, model)."""
    if text is None:
        return None
    try:
        data, model = (int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--mesh: expected two positive integers D,M (data, model), got {text!r}") from None
    if data < 1 or model < 1:
        raise UserError(f"--mesh: expected two positive integers D,M (data, model), got {text!r}")
    return data, model


def plan(
    config: ExperimentConfig, target: str, *, mesh: tuple[int, int] | None = None, costs: bool = True, progress=None, cache: Path | None = None
) -> dict:
    """The plan of a round of `config` on `target` (a name of `targets.TARGETS`) as a JSON-ready
    dict; `mesh` (data, model) overrides `config.mesh`; `cache`: a file keeping each stage's
    analysis as it finishes (`stage_cache`), reused by a later plan with the same file."""
    import jax

    from jaxdpo.experiment.abstract import abstract_round
    from jaxdpo.sharding import make_mesh

    devices = targets.target_devices(target)
    data, model = mesh or (config.mesh.data, config.mesh.model)
    grid = make_mesh(data, model, devices=devices)
    if grid.size > 1:
        stages.check_splits(config, grid)
    shape = abstract_round(config, grid if grid.size > 1 or target != "local" else None)
    chip = targets.chip_of(devices[0].device_kind)
    if target == "local":
        from jaxdpo.experiment.memory import device_memory

        limit = device_memory()
    else:
        limit = targets.usable_memory(devices[0], chip)
    held = stages.long_lived(shape)
    rows = []
    kept = stage_cache.read(cache) if cache is not None else {}
    for stage in stages.round_stages(shape):
        key = stage_cache.stage_key(stage, target, dict(grid.shape), costs)
        analysis = kept.get(key)
        if analysis is None:
            task = progress.add_task(f"  compiling {stage.name}", total=None) if progress is not None else None
            analysis = analyze(stage.program, stage.args, costs=costs, loop_trips=stage.loop_trips)
            jax.clear_caches()  # JAX's caches keep each compiled program alive; a plan never runs them
            if cache is not None:
                stage_cache.append(cache, key, stage.name, analysis)
            if task is not None:
                progress.remove_task(task)
        rows.append(_row(stage, analysis, held, limit, chip))
    timed = all(row.seconds_per_call is not None for row in rows)
    round_seconds = sum(row.seconds_per_round for row in rows) if timed else None
    floor = sum(row.floor_seconds_per_call * row.calls_per_round for row in rows) if timed else None
    floor_run = sum(row.floor_seconds_per_call * sum(map(sum, row.calls.values())) for row in rows) * len(config.run.seeds) if timed else None
    per_method = {
        method: sum(row.seconds_per_call * row.calls[method][-1] for row in rows) if timed else None for method in config.run.methods
    }
    largest = max(rows, key=lambda row: row.bytes)
    return {
        "target": target, "devices": len(devices), "device_kind": devices[0].device_kind, "platform": devices[0].platform,
        "jax": jax.__version__, "mesh": {"data": grid.shape["data"], "model": grid.shape["model"]},
        "chip": None if chip is None else chip._asdict(), "limit_bytes": limit, "costs": costs,
        "fits": all(row.fits for row in rows), "largest_stage": largest.stage, "largest_bytes": largest.bytes,
        "round_seconds": round_seconds, "round_floor_seconds": floor, "run_floor_seconds": floor_run, "method_round_seconds": per_method,
        "run_seconds": sum(row.seconds_per_run for row in rows) * len(config.run.seeds) if timed else None,
        "stages": [dataclasses.asdict(row) for row in rows], "notes": list(NOTES) + _notes(config),
    }


def _row(stage: stages.Stage, analysis, held: dict[str, int], limit: int | None, chip) -> StageRow:
    resident = stage.resident(held)
    need = analysis.need + resident
    per_call = floor = None
    reads = stage.loop_trips * analysis.arguments + stage.state_reads
    if chip is not None and analysis.flops is not None:
        per_call = max(analysis.flops / chip.peak_flops, analysis.bytes_accessed / chip.bandwidth)
        floor = floor_seconds(analysis.flops, reads, chip)
    last, every = sum(c[-1] for c in stage.calls.values()), sum(sum(c) for c in stage.calls.values())
    return StageRow(
        stage.name, stage.key, need, analysis.arguments, analysis.outputs, analysis.temporaries, resident,
        analysis.error is None and (limit is None or need <= limit), analysis.flops, analysis.bytes_accessed, per_call, floor, reads,
        {method: list(c) for method, c in stage.calls.items()}, last, None if per_call is None else per_call * last,
        None if per_call is None else per_call * every, analysis.compile_seconds, analysis.error,
    )


def floor_seconds(flops: float, reads: int, chip) -> float:
    """A call's time floor on `chip`: its FLOPs at peak, or the bytes per device it must read from
    HBM at the HBM bandwidth: its arguments (weights above all) once per trip of its loop (a
    decode step reads every weight) and the state it builds and reads again (`Stage.state_reads`:
    a decode step's KV cache).

    Unlike XLA's bytes accessed, which on a TPU count on-chip traffic and an async copy's buffers
    several times (a prefetch slice-start: 3 × the tile; copy-start: 4 × the buffer), no call can
    take less. It holds while the weights do not fit on chip (VMEM: 128 MiB on v5e)."""
    return max(flops / chip.peak_flops, reads / chip.bandwidth)


def _notes(config: ExperimentConfig) -> list[str]:
    notes = [
        "selection as the run computes it: on a mesh, ActiveDPO on every device (whole prompts of its pool per device), "
        "other methods on one device (their pool gathered from the host)"
    ]
    if config.oracle.kind == "torch_reward_model":
        notes.append("the oracle is a PyTorch reward model: it runs outside JAX and is not planned")
    return notes


def check_fits(report: dict) -> None:
    """UserError naming the keys to lower when a stage does not fit."""
    over = [row for row in report["stages"] if not row["fits"]]
    if not over:
        return
    limit = report["limit_bytes"]
    where = f"{limit / 2**30:.2f} GiB a {report['target']} device may use" if limit else "the device's memory"
    parts = ", ".join(f"{row['key']} ({row['stage']} needs {row['bytes'] / 2**30:.2f} GiB)" for row in over)
    raise UserError(f"does not fit in the {where}: {parts}; lower those keys or split the model over more devices (mesh.model)")


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def print_plan(report: dict, title: str) -> None:
    """The plan as a table: per stage its bytes per device (arguments; working memory, outputs and
    temporaries; what stays resident; their total), whether it fits, its FLOPs and bytes accessed per call, roofline
    milliseconds per call, calls and seconds per round, compile seconds; the caption has the round
    estimate."""
    import sys

    from rich.console import Console
    from rich.table import Table

    mesh = report["mesh"]
    table = Table(
        title=f"{title} on {report['target']}: {report['devices']} × {report['device_kind']}, mesh data {mesh['data']} × model "
        f"{mesh['model']}, {_size(report['limit_bytes'])} usable per device",
        caption=_caption(report),
    )
    columns = ("stage", "arguments", "working", "resident", "per device", "fits", "GFLOP/call", "GB/call", "ms/call", "calls/round",
               "s/round", "compile s")
    for column in columns:
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in report["stages"]:
        table.add_row(
            row["stage"], _size(row["arguments"]), _size(row["bytes"] - row["arguments"] - row["resident"]), _size(row["resident"]), _size(row["bytes"]),
            "yes" if row["fits"] else "[red]NO[/red]", _number(row["flops"], 1e9),
            _number(row["bytes_accessed"], 1e9), _number(row["seconds_per_call"], 1e-3), str(row["calls_per_round"]),
            _number(row["seconds_per_round"], 1.0), f"{row['compile_seconds']:.1f}",
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _size(value: int | None) -> str:
    if value is None:
        return "–"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _number(value: float | None, unit: float) -> str:
    if value is None:
        return "–"
    scaled = value / unit
    return f"{scaled:.3g}" if scaled < 1000 else f"{scaled:,.0f}"


def _caption(report: dict) -> str:
    fits = "fits" if report["fits"] else "DOES NOT FIT"
    largest = f"largest stage: {report['largest_stage']} ({_size(report['largest_bytes'])})"
    if report["round_seconds"] is None:
        why = "--memory-only" if not report["costs"] else f"no published figures for {report['device_kind']}"
        return f"{fits}; {largest}; no roofline ({why})"
    return (
        f"{fits}; {largest}; a round ≥ {report['round_floor_seconds']:.1f} s, {report['round_seconds']:.1f} s at the roofline of "
        f"XLA's counts (every method's last round, one seed); the run ≥ {report['run_floor_seconds'] / 3600:.2f} h, "
        f"{report['run_seconds'] / 3600:.2f} h (every round, method and seed)"
    )
