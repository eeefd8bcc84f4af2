"""The loops of a compiled program, read from its optimized HLO text: each `while` the program runs,
how many times it runs, and what one run of its body costs.

XLA's cost analysis counts a loop's body once, whatever its trip count. A loop's cost here is
its body's, as the compiler scheduled it in the program (the body computation made the entry of
the same module and given to XLA's generic cost analysis on this machine's CPU client: the TPU's
compile-only client computes no costs for a module). On whole TPU programs of a 2-layer
Llama-2-7B slice (v5e, data 2 × model 4) the generic analysis gives the TPU's FLOPs exactly, but
not its bytes: 17.46 vs 17.30 GB for generation, 5.30 vs 5.55 for log-probs, 21.1 vs 15.9 for
features and 18.0 vs 15.3 for the DPO step, so the bytes of loops with backward passes may be
overstated by up to a third.

A trip count is read from the loop itself when its condition is `counter < N` (or `N > counter`) on a
tuple element the loop starts from a constant (`lax.scan`, `fori_loop` with static bounds, and the
loops XLA makes); any other loop (a data-dependent `while_loop`: decoding, selection) runs
`loop_trips` times, the stage's bound.
"""

from __future__ import annotations

import dataclasses
import re

_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) ", re.M)
_INSTRUCTION = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z\-]*)\((.*)$")
_CALLED = re.compile(r"(?:calls|branch_computations|true_computation|false_computation|to_apply)=\{?%([\w.\-]+(?:, %[\w.\-]+)*)")


@dataclasses.dataclass(frozen=True)
class Loop:
    """A `while` of the program: its body computation and the trip counts of the loops around
    it, then its own."""

    body: str
    trips: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    op: str
    arguments: str  # the text between the operation's parentheses
    attributes: str  # the text after them
    root: bool

    @property
    def operands(self) -> tuple[str, ...]:
        return tuple(re.findall(r"%([\w.\-]+)", self.arguments))


Computation = dict[str, _Instruction]
"""A computation's instructions by name, in the order of the text."""


def _computations(text: str) -> dict[str, Computation]:
    """Each computation of an HLO module's text by name (the entry's under "ENTRY" too)."""
    found, starts = {}, list(_COMPUTATION.finditer(text))
    for match, following in zip(starts, starts[1:] + [None]):
        block = text[match.end() : following.start() if following else len(text)]
        instructions: Computation = {}
        for line in block.splitlines()[1:]:
            parsed = _INSTRUCTION.match(line)
            if parsed:
                root, name, _, op, rest = parsed.groups()
                depth, end = 1, 0
                for end, char in enumerate(rest):  # the operand list ends at its closing parenthesis
                    depth += {"(": 1, ")": -1}.get(char, 0)
                    if depth == 0:
                        break
                instructions[name] = _Instruction(name, op, rest[:end], rest[end + 1 :], bool(root))
        found[match.group(2)] = instructions
        if match.group(1):
            found["ENTRY"] = instructions
    return found


def loops(text: str, loop_trips: int) -> list[Loop]:
    """Every `while` the entry computation runs, directly or through calls, conditionals or other
    loops' bodies, with its trip counts (see the module doc)."""
    module = _computations(text)
    found: list[Loop] = []

    def visit(computation: str, trips: tuple[int, ...]) -> None:
        for instruction in module[computation].values():
            if instruction.op == "while":
                body = re.search(r"body=%([\w.\-]+)", instruction.attributes).group(1)
                own = _trip_count(instruction, module, module[computation])
                found.append(Loop(body, trips + (loop_trips if own is None else own,)))
                visit(body, found[-1].trips)
            for match in _CALLED.finditer(instruction.attributes):
                for called in re.findall(r"[\w.\-]+", match.group(1)):
                    if called in module and called != computation:
                        visit(called, trips)

    visit("ENTRY", ())
    return found


def _trip_count(loop: _Instruction, module: dict[str, Computation], caller: Computation) -> int | None:
    """The trip count XLA annotated (`known_trip_count`), else ⌈(N − start) / step⌉ when the
    loop's condition is `tuple[k] < N` (or `N > tuple[k]`), its body adds a constant `step` to
    tuple[k], and its initial tuple's element k is a constant `start`; None otherwise."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attributes)
    if known:
        return int(known.group(1))
    condition = module[re.search(r"condition=%([\w.\-]+)", loop.attributes).group(1)]
    op, operands, attributes = _seen_through_fusion(_root(condition), module)
    direction = re.search(r"direction=(\w+)", attributes)
    if op != "compare" or direction is None or direction.group(1) not in ("LT", "GT"):
        return None
    counter, bound = operands if direction.group(1) == "LT" else operands[::-1]
    index, limit = _element(counter, condition), _constant(bound, condition)
    init = caller.get(loop.operands[0])
    if index is None or limit is None or init is None or init.op != "tuple":
        return None
    start, step = _constant(init.operands[index], caller), _step(module[re.search(r"body=%([\w.\-]+)", loop.attributes).group(1)], index, module)
    if start is None or step is None or step <= 0:
        return None
    return max(-(-(limit - start) // step), 0)


def _root(computation: Computation) -> _Instruction:
    return next(i for i in computation.values() if i.root)


def _seen_through_fusion(instruction: _Instruction, module: dict[str, Computation]) -> tuple[str, tuple[str, ...], str]:
    """(operation, operand names, attributes) of `instruction`, or of the one operation a fusion
    wraps on its parameters (the CPU compiler wraps a loop's compare and add so)."""
    if instruction.op == "fusion":
        called = module.get(re.search(r"calls=%([\w.\-]+)", instruction.attributes).group(1), {})
        params = {i.name: int(i.arguments) for i in called.values() if i.op == "parameter"}
        inner = _root(called) if called else None
        if inner is not None and inner.operands and all(name in params for name in inner.operands):
            return inner.op, tuple(instruction.operands[params[name]] for name in inner.operands), inner.attributes
    return instruction.op, instruction.operands, instruction.attributes


def _element(name: str, computation: Computation) -> int | None:
    """k when `name` is `get-tuple-element(parameter, index=k)` in `computation` (through copies)."""
    instruction = _through_copies(name, computation)
    if instruction is None or instruction.op != "get-tuple-element":
        return None
    return int(re.search(r"index=(\d+)", instruction.attributes).group(1))


def _step(body: Computation, index: int, module: dict[str, Computation]) -> int | None:
    """c when the body's result element `index` is its element `index` plus a constant c."""
    result = _root(body)
    if result.op != "tuple" or index >= len(result.operands):
        return None
    added = body.get(result.operands[index])
    if added is None:
        return None
    op, operands, _ = _seen_through_fusion(added, module)
    if op != "add" or len(operands) != 2:
        return None
    for counter, amount in (operands, operands[::-1]):
        if _element(counter, body) == index:
            return _constant(amount, body)
    return None


def _constant(name: str, computation: Computation) -> int | None:
    """The integer the scalar constant `name` holds (through copies); None for anything else."""
    instruction = _through_copies(name, computation)
    if instruction is None or instruction.op != "constant":
        return None
    return int(instruction.arguments) if re.fullmatch(r"-?\d+", instruction.arguments.strip()) else None


def _through_copies(name: str, computation: Computation) -> _Instruction | None:
    """The instruction `name` is a copy, bitcast or conversion of (or itself)."""
    instruction = computation.get(name)
    while instruction is not None and instruction.op in ("copy", "bitcast", "convert") and instruction.operands:
        instruction = computation.get(instruction.operands[0])
    return instruction


def body_cost(text: str, body: str) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of one run of the computation `body` of the HLO module `text`: the
    module with `body` as its entry, given to XLA's cost analysis on this machine's CPU client."""
    import jax
    from jax._src.lib import _jax, hlo

    as_entry = re.sub(r"^ENTRY %", "%", text, count=1, flags=re.M)
    as_entry = re.sub(rf"^%{re.escape(body)} ", f"ENTRY %{body} ", as_entry, count=1, flags=re.M)
    stats = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, hlo.hlo_module_from_text(as_entry))
    return float(stats.get("flops", 0.0)), float(stats.get("bytes accessed", 0.0))
