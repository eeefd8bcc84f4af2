"""What XLA says about one stage's program, lowered from abstract arguments and compiled for the
devices its arguments are placed on (this machine's, or a TPU slice's through libtpu): bytes per
device (`memory_analysis`), FLOPs and bytes accessed per call (`cost_analysis`) and the seconds
compiling took. Nothing runs.

XLA's cost analysis counts the body of a loop once, whatever its trip count (checked on CPU and
TPU: a `lax.scan` over 18 layers costs what one layer costs). `analyze(costs=True)` therefore
compiles, for each set of loops with the same trip counts (the loop's and those of the loops
around it), a variant of the program with those loops' bodies doubled (a `scan` unrolled twice, a
`while` body run twice per iteration), never run: the difference is one body's cost, S. With C
the cost of the program as compiled and T₁…Tₖ the trip counts from the outermost loop in,

    cost = C + Σ over loop sets (T₁⋯Tₖ − T₁⋯Tₖ₋₁) · S.

A scan's trip count is its length; a `while` loop runs `loop_trips` times (the stage's bound on its
data-dependent loop: decoding's `max_new_tokens`; 1, i.e. counted once, elsewhere). A scan of odd
length unrolled twice keeps one body outside its loop, so its difference is 2S.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable

import jax
from jax.extend import core

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
            flops, bytes_accessed = _with_loops(program, args, base, loop_trips)
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


@dataclasses.dataclass(frozen=True)
class _Loop:
    address: tuple  # eqn indices and parameter names from the top-level jaxpr down to the loop
    kind: str  # "scan" or "while"
    trips: tuple[int, ...]  # the trip counts of the loops around it, then its own


def _with_loops(program, args, base: tuple[float, float], loop_trips: int) -> tuple[float, float]:
    closed = jax.jit(program).trace(*args).jaxpr
    loops = [loop for loop in _loops(closed.jaxpr, (), (), loop_trips) if loop.trips[-1] > 1]
    flops, bytes_accessed = base
    flat = jax.tree.leaves(args)
    for trips in sorted({loop.trips for loop in loops}):
        group = [loop for loop in loops if loop.trips == trips]
        variant = core.ClosedJaxpr(_doubled(closed.jaxpr, {loop.address for loop in group}, ()), closed.consts)
        doubled = _cost(jax.jit(core.jaxpr_as_fun(variant)).lower(*flat).compile())
        bodies = 1 + (trips[-1] % 2 if group[0].kind == "scan" else 0)
        extra = math.prod(trips) - math.prod(trips[:-1])
        flops += extra * (doubled[0] - base[0]) / bodies
        bytes_accessed += extra * (doubled[1] - base[1]) / bodies
    return flops, bytes_accessed


def _subjaxprs(value):
    """The jaxprs inside one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
    items = value if isinstance(value, tuple) else (value,)
    return [item for item in items if isinstance(item, (core.Jaxpr, core.ClosedJaxpr))]


def _loops(jaxpr: core.Jaxpr, address: tuple, trips: tuple[int, ...], loop_trips: int) -> list[_Loop]:
    found = []
    for i, eqn in enumerate(jaxpr.eqns):
        inner = trips
        if eqn.primitive.name in ("scan", "while"):
            count = eqn.params["length"] if eqn.primitive.name == "scan" else loop_trips
            inner = trips + (count,)
            found.append(_Loop(address + (i,), eqn.primitive.name, inner))
        for name, value in eqn.params.items():
            for j, sub in enumerate(_subjaxprs(value)):
                found += _loops(getattr(sub, "jaxpr", sub), address + (i, name, j), inner, loop_trips)
    return found


def _doubled(jaxpr: core.Jaxpr, targets: set[tuple], address: tuple) -> core.Jaxpr:
    """`jaxpr` with the loops at `targets` running their body twice per iteration."""
    eqns = []
    for i, eqn in enumerate(jaxpr.eqns):
        params = dict(eqn.params)
        if address + (i,) in targets:
            if eqn.primitive.name == "scan":
                params["unroll"] = 2
            else:
                params["body_jaxpr"] = _twice(params["body_jaxpr"], params["body_nconsts"])
        for name, value in params.items():
            subs = _subjaxprs(value)
            if not subs:
                continue
            replaced = [_rewrite(sub, targets, address + (i, name, j)) for j, sub in enumerate(subs)]
            params[name] = tuple(replaced) if isinstance(value, tuple) else replaced[0]
        eqns.append(eqn.replace(params=params))
    return jaxpr.replace(eqns=eqns)


def _rewrite(sub, targets: set[tuple], address: tuple):
    if isinstance(sub, core.ClosedJaxpr):
        return core.ClosedJaxpr(_doubled(sub.jaxpr, targets, address), sub.consts)
    return _doubled(sub, targets, address)


def _twice(body: core.ClosedJaxpr, num_consts: int) -> core.ClosedJaxpr:
    """A while body that runs `body` twice (for its cost only: the loop's condition is skipped
    between the two)."""
    step = core.jaxpr_as_fun(body)

    def twice(*args):
        consts = args[:num_consts]
        return step(*consts, *step(*consts, *args[num_consts:]))

    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in body.in_avals]
    return jax.make_jaxpr(twice)(*avals)
