"""A memory plan before the first round: each stage's compiled program (`memory_analysis()` of the
program XLA would run, per device) against the device's memory, so a run that cannot fit stops at
once with the config key to lower, instead of hours later in an out-of-memory crash.

The programs are the run's own (`stages.round_stages` of the run's `Setup`), lowered from abstract
shapes; nothing runs. A stage's need is its program's (its arguments — the weights it reads, the
chunk — plus its outputs and temporaries) plus what stays resident meanwhile and is not among its
arguments (`Stage.resident`: the other model, the train states). `jaxdpo plan` compiles the same
stages for a TPU slice (`jaxdpo.experiment.plan`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import NamedTuple

import jax

from jaxdpo.errors import UserError
from jaxdpo.experiment import stages
from jaxdpo.experiment.compiled import analyze

_log = logging.getLogger("jaxdpo")


class StagePlan(NamedTuple):
    """One stage's program: bytes it needs per device, the config key that bounds them, and the
    run's stage timings it runs under."""

    stage: str
    key: str
    bytes: int
    timed_as: tuple[str, ...]


def device_memory() -> int:
    """Bytes one device may use: the allocator's limit on accelerators, physical RAM on a CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(plan: StagePlan, limit: int, where: str = "available") -> None:
    """UserError when `plan` is over `limit`, naming the key to lower."""
    if plan.bytes > limit:
        raise UserError(
            f"{plan.key}: the {plan.stage} stage needs {plan.bytes / 2**30:.3f} GiB per device, more than the "
            f"{limit / 2**30:.3f} GiB {where}; lower {plan.key} (or split the model over more devices: mesh.model)"
        )


def plan_memory(setup) -> Iterator[StagePlan]:
    """Every stage of a round of `setup`'s config (a `Setup`), at its chunk shapes, lowered and
    compiled one at a time (a caller can stop at the first that does not fit)."""
    shape = setup.round_shape
    held = stages.long_lived(shape)
    for stage in stages.round_stages(shape):
        analysis = analyze(stage.program, stage.args)
        if analysis.error is not None:
            raise UserError(f"{stage.key}: the compiler refused the {stage.name} stage ({analysis.error}); lower {stage.key} (or raise mesh.model)")
        yield StagePlan(stage.name, stage.key, analysis.need + stage.resident(held), stage.timed_as)


def log_plan(plan: StagePlan, limit: int) -> None:
    _log.info("memory plan: %-40s %8.3f GiB of %.1f GiB (bounded by %s)", plan.stage, plan.bytes / 2**30, limit / 2**30, plan.key)
