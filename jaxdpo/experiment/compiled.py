"""What XLA says about one stage's program, lowered from abstract arguments and compiled for the
devices its arguments are placed on (this machine's, or a TPU slice's through libtpu): bytes per
device (`memory_analysis`), FLOPs and bytes accessed per call (`cost_analysis`) and the seconds
compiling took. Nothing runs.

XLA's cost analysis counts the body of a loop once, whatever its trip count (checked on CPU and
TPU: a `lax.scan` over 18 layers costs what one layer costs). `analyze(costs=True)` therefore reads
the loops of the compiled program (`hlo_loops`): for each `while` of its optimized HLO, S the cost
of one run of its body as compiled, and T₁…Tₖ the trip counts from the outermost loop around it
in. With C the cost of the program as compiled,

    cost = C + Σ over loops (T₁⋯Tₖ − T₁⋯Tₖ₋₁) · S.

A loop whose trip count the HLO does not state (a data-dependent `while_loop`) runs `loop_trips`
times: the stage's bound (decoding's `max_new_tokens`; 1, i.e. counted once, elsewhere).

An earlier version compiled a second program with each loop's body doubled and took the
difference. On the TPU compiler that difference is not one body: the doubled decode step of an
8-layer Llama-2-7B slice was scheduled with more prefetch copies, and counted 8.5 GB per step
where the body as compiled counts 4.1 GB. It also cost a second compile of every looped stage.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable

import jax

from jaxdpo.experiment import hlo_loops

_SIZE = re.compile(r"\(([\d.]+)\s*([KMGT]?)i?B?\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One program's compiled size and cost per device. `need`: bytes it needs while it runs
    (arguments + outputs + temporaries − what outputs alias, or the compiler's peak when that is
    larger: the TPU compiler reports some programs' working memory only there). `flops` /
    `bytes_accessed`: per call,
    loops counted as they run (None without `costs`, or where the backend gives none). `error`:
    the compiler's out-of-memory message when it refused the program (`need` then is what the
    message says it required)."""

    need: int
    arguments: int
    outputs: int
    temporaries: int
    flops: float | None
    bytes_accessed: float | None
    compile_seconds: float
    error: str | None = None


def analyze(program: Callable, args: tuple, *, costs: bool = False, loop_trips: int = 1) -> Analysis:
    """`program(*args)` (abstract, sharded arguments) lowered, compiled and analysed."""
    start = time.perf_counter()
    try:
        compiled = jax.jit(program).lower(*args).compile()
    except jax.errors.JaxRuntimeError as error:
        return _refused(error, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    need = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    need = int(max(need, getattr(stats, "peak_memory_in_bytes", 0)))
    flops = bytes_accessed = None
    if costs:
        base = _cost(compiled)
        if base is not None:
            flops, bytes_accessed = _with_loops(compiled.as_text(), base, loop_trips)
    return Analysis(
        need, stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.temp_size_in_bytes, flops, bytes_accessed, round(seconds, 2)
    )


def required_bytes(message: str) -> int | None:
    """The bytes a compiler's out-of-memory refusal says the program needs ("RESOURCE_EXHAUSTED:
    ... the total memory required for HLO temporaries (20.00G) exceeds available HBM (15.75G)"),
    None when `message` is no such refusal or names no size."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    sizes = [float(number) * _UNITS[unit] for number, unit in _SIZE.findall(message)]
    return int(sizes[0]) if sizes else None


def _refused(error: Exception, seconds: float) -> Analysis:
    """An out-of-memory refusal as an Analysis (`need`: what it required, 0 if it says not); any
    other compile error is raised."""
    message = str(error).strip().splitlines()[0]
    if "RESOURCE_EXHAUSTED" not in message:
        raise error
    return Analysis(required_bytes(message) or 0, 0, 0, 0, None, None, round(seconds, 2), error=message)


def _cost(compiled) -> tuple[float, float] | None:
    stats = compiled.cost_analysis()
    stats = stats[0] if isinstance(stats, list) else stats
    if not stats or "flops" not in stats:
        return None
    return float(stats["flops"]), float(stats.get("bytes accessed", 0.0))


# -- loops -------------------------------------------------------------------------------------------


def _with_loops(text: str, base: tuple[float, float], loop_trips: int) -> tuple[float, float]:
    """`base` (the program's cost, each loop body counted once) with every loop of the optimized
    HLO `text` counted as it runs: cost = C + Σ (T₁⋯Tₖ − T₁⋯Tₖ₋₁) · S (module doc)."""
    flops, bytes_accessed = base
    for loop in hlo_loops.loops(text, loop_trips):
        extra = math.prod(loop.trips) - math.prod(loop.trips[:-1])
        if extra:
            body_flops, body_bytes = hlo_loops.body_cost(text, loop.body)
            flops += extra * body_flops
            bytes_accessed += extra * body_bytes
    return flops, bytes_accessed
