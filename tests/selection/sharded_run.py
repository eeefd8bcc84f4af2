"""Run in a subprocess with 4 host CPU devices: select_batch on candidates split over the devices
(dense rows of Φ; pairs mode: whole prompts per device via place_pairs) must make the same picks
as on one device, for both strategies, with exact ties across devices; the compiled programs
(lowered from ShapeDtypeStructs, as a memory plan does) never gather Φ or g. Prints one JSON object."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402
import re  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import jaxdpo  # noqa: E402
from jaxdpo.experiment.stages import triplets  # noqa: E402
from jaxdpo.selection import layout_pairs, place_pairs, select_on_mesh  # noqa: E402
from jaxdpo.selection import plan as selection_plan  # noqa: E402
from jaxdpo.selection.sharded import moved_rows  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)  # as in the test suite: compile time dominates

rng = np.random.default_rng(0)
n, d, batch = 64, 24, 10
phi = rng.normal(size=(n, d)).astype(np.float32)
phi[3] *= 4  # the largest row, so the first pick is a tie:
phi[40] = phi[3]  # an exact tie across devices (shards 0 and 2): the lowest global index must win
prior = rng.normal(size=(5, d)).astype(np.float32)
prompts, m = 10, 4  # 10 prompts over 4 devices: place_pairs pads
g = rng.normal(size=(prompts * m, d)).astype(np.float32)
g[1 * m : 2 * m] *= 4  # prompt 1's pairs are the largest, so the first pick is a tie:
g[8 * m : 9 * m] = g[1 * m : 2 * m]  # prompt 8 repeats prompt 1 on another device: tied pairs
pairs = triplets(prompts, m)

single = jax.devices()[0]
mesh = Mesh(np.array(jax.devices()), ("candidates",))
rows = NamedSharding(mesh, PartitionSpec("candidates"))
square = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def compare(one, many) -> dict:
    one_scores, many_scores = np.asarray(one.scores), np.asarray(many.scores)
    return {
        "first": int(np.asarray(many.indices)[0]),
        "same_picks": bool(np.array_equal(np.asarray(one.indices), np.asarray(many.indices))),
        "max_score_diff": float(np.max(np.abs(one_scores - many_scores)) / np.max(np.abs(one_scores))),
    }


def gathers(text: str, shapes: set[tuple[int, ...]]) -> bool:
    """Whether a compiled program all-gathers or all-reduces an array of one of `shapes`."""
    found = {tuple(int(x) for x in m.group(1).split(",")) for m in re.finditer(r"= \w+\[([\d,]+)\][^=]*all-(?:gather|reduce)\(", text)}
    return bool(found & shapes)


def unordered_collectives(text: str) -> list[str]:
    """Pairs of collectives (or loops/branches/calls holding one) in the same computation of a
    compiled program with no data dependence between them: XLA's CPU runtime may start those in a
    different order on each device, and a device in an all-gather with another in an all-reduce
    hang (the greedy makes each sync point one collective that depends on the one before)."""
    bodies, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = bodies.setdefault(head.group(1), {})
        elif current is not None and (m := re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)", line)):
            current[m.group(1)] = m.group(2)
    called = lambda body: re.findall(r"(?:calls|body|condition|branch_computations|true_computation|false_computation)=\{?%?([\w.\-]+)", body)  # noqa: E731
    collective = lambda body: re.match(r"\S+ (all-reduce|all-gather|all-to-all|collective-permute)\(", body)  # noqa: E731
    holds = {}

    def has(name: str) -> bool:
        if name not in holds:
            holds[name] = False
            holds[name] = any(collective(b) or any(has(c) for c in called(b) if c in bodies) for b in bodies[name].values())
        return holds[name]

    found = []
    for name, body in bodies.items():
        members = [i for i, b in body.items() if collective(b) or any(has(c) for c in called(b) if c in bodies)]
        operands = {i: set(re.findall(r"%([\w.\-]+)", b.split(", metadata")[0])) & body.keys() for i, b in body.items()}

        def after(a: str, b: str) -> bool:  # whether a depends on b
            seen, stack = set(), [a]
            while stack:
                for x in operands[stack.pop()] - seen:
                    if x == b:
                        return True
                    seen.add(x)
                    stack.append(x)
            return False

        found += [f"{name}: {a} | {b}" for k, a in enumerate(members) for b in members[k + 1 :] if not after(a, b) and not after(b, a)]
    return found


out = {"devices": len(jax.devices())}
jitted = jax.jit(jaxdpo.select_batch, static_argnames=("batch_size", "strategy"))
sharded_phi = jax.device_put(phi, rows)
for name, kwargs in [("full", {"strategy": "full"}), ("lazy", {"strategy": "lazy"}), ("lazy_prior", {"strategy": "lazy", "prior": prior})]:
    one = jaxdpo.select_batch(jax.device_put(phi, single), batch, **kwargs)
    out[name] = {"shards": len(sharded_phi.sharding.device_set), **compare(one, jitted(sharded_phi, batch_size=batch, **kwargs))}

placed = place_pairs(g, pairs, square)
out["placed"] = {"rows": int(placed.features.shape[0]), "pairs": int(placed.pairs.shape[0]), "padding": int(np.sum(placed.positions < 0))}
by_data = NamedSharding(square, PartitionSpec("data", None))  # g as the features stage leaves it
everywhere = NamedSharding(square, PartitionSpec())  # g not split by rows: every device takes its own rows
out["placed_on_devices"] = {  # laid out by the devices, as from the host
    name: bool(np.array_equal(np.asarray(place_pairs(jax.device_put(x, on), p, square).features), np.asarray(place_pairs(x, p, square).features)))
    for name, x, p, on in [("padded", g, pairs, by_data), ("even", g[: 8 * m], triplets(8, m), by_data), ("replicated", g, pairs, everywhere)]
}  # 8 prompts over 4 devices: no padding
padded_rows = layout_pairs(pairs, square.size, rows=len(g)).rows  # g split over 'data' moved to the padded layout:
moved = jax.jit(lambda f: moved_rows(f, padded_rows, square, "data")).lower(jax.ShapeDtypeStruct(g.shape, g.dtype, sharding=by_data))
moved_text = moved.compile().as_text()  # blocks to neighbours (collective permutes), never all of g
out["moved_rows"] = {"gathers": gathers(moved_text, {g.shape, (len(padded_rows), d)}), "permutes": "collective-permute" in moved_text}
wide_prior = rng.normal(size=(20, d)).astype(np.float32)  # more rows than the bound pass's 16 directions: bounds only
pair_modes = [("pairs_full", {"strategy": "full"}), ("pairs_lazy", {"strategy": "lazy"}), ("pairs_prior", {"prior": prior})]
bounds_from, active_from, active_share = selection_plan.PAIR_BOUNDS_FROM, selection_plan.ACTIVE_FROM, selection_plan.ACTIVE_SHARE
for name, kwargs in [*pair_modes, ("pairs_bounds", {}), ("pairs_wide_prior", {"prior": wide_prior})]:
    selection_plan.PAIR_BOUNDS_FROM = 0 if name == "pairs_bounds" else bounds_from  # "pairs_bounds": any pool starts from them
    one = jaxdpo.select_batch(g, batch, pairs=pairs, **kwargs)
    many = jaxdpo.select_batch(placed.features, batch, pairs=placed.pairs, mask=placed.mask, **kwargs)
    restored = jaxdpo.SelectionResult(placed.restore(many.indices), many.scores)
    out[name] = {"shards": len(placed.features.sharding.device_set), **compare(one, restored)}

# Active sets (patched: any lazy search first runs on the quarter of candidates of highest bound on
# each device): on bounds (pairs from the norms' bounds) and on values (dense, pairs without a prior).
selection_plan.ACTIVE_FROM, selection_plan.ACTIVE_SHARE = 0, 4
lower = partial(select_on_mesh, batch_size=batch)
placed_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in (placed.features, placed.pairs, placed.mask)]
one = jaxdpo.select_batch(jax.device_put(phi, single), batch, strategy="lazy")
out["lazy_active"] = {"shards": len(sharded_phi.sharding.device_set), **compare(one, jitted(sharded_phi, batch_size=batch, strategy="lazy"))}
for name, kwargs, bounds in [("pairs_active", {}, 0), ("pairs_active_values", {"strategy": "lazy"}, bounds_from)]:
    selection_plan.PAIR_BOUNDS_FROM = bounds
    one = jaxdpo.select_batch(g, batch, pairs=pairs, **kwargs)
    many = jaxdpo.select_batch(placed.features, batch, pairs=placed.pairs, mask=placed.mask, **kwargs)
    out[name] = {"shards": len(placed.features.sharding.device_set), **compare(one, jaxdpo.SelectionResult(placed.restore(many.indices), many.scores))}
selection_plan.PAIR_BOUNDS_FROM = 0
active_texts = [
    jax.jit(lambda f, p, k: select_on_mesh(f, batch, mesh=square, pairs=p, mask=k)).lower(*placed_shapes).compile().as_text(),
    jax.jit(partial(lower, mesh=mesh, strategy="lazy")).lower(jax.ShapeDtypeStruct((n, d), np.float32, sharding=rows)).compile().as_text(),
]
selection_plan.ACTIVE_FROM, selection_plan.ACTIVE_SHARE, selection_plan.PAIR_BOUNDS_FROM = active_from, active_share, bounds_from

# Compiled from shapes alone (a memory plan's view): per round only leaders and one row move.
dense = jax.jit(partial(lower, mesh=mesh)).lower(jax.ShapeDtypeStruct((n, d), np.float32, sharding=rows)).compile().as_text()
by_pairs = jax.jit(lambda f, p, k: select_on_mesh(f, batch, mesh=square, pairs=p, mask=k)).lower(*placed_shapes).compile().as_text()
placed_matrices = {tuple(placed.features.shape), (len(placed.positions), d)}
out["gathers_feature_matrix"] = gathers(dense, {(n, d)}) or gathers(by_pairs, placed_matrices)
out["gathers_feature_matrix"] |= gathers(active_texts[0], placed_matrices) or gathers(active_texts[1], {(n, d)})
prior_shape = jax.ShapeDtypeStruct(prior.shape, prior.dtype)
with_prior = {
    strategy: jax.jit(lambda f, p, k, q, s=strategy: select_on_mesh(f, batch, mesh=square, pairs=p, mask=k, prior=q, strategy=s))
    .lower(*placed_shapes, prior_shape).compile().as_text()
    for strategy in ("full", "lazy")
}
out["unordered_collectives"] = [x for text in (dense, by_pairs, *with_prior.values()) for x in unordered_collectives(text)]
out["unordered_collectives"] += [x for text in active_texts for x in unordered_collectives(text)]
print(json.dumps(out))
