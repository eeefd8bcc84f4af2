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
from jaxdpo.experiment.pool import triplets  # noqa: E402
from jaxdpo.selection import place_pairs, select_on_mesh  # noqa: E402

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


out = {"devices": len(jax.devices())}
jitted = jax.jit(jaxdpo.select_batch, static_argnames=("batch_size", "strategy"))
sharded_phi = jax.device_put(phi, rows)
for name, kwargs in [("full", {"strategy": "full"}), ("lazy", {"strategy": "lazy"}), ("lazy_prior", {"strategy": "lazy", "prior": prior})]:
    one = jaxdpo.select_batch(jax.device_put(phi, single), batch, **kwargs)
    out[name] = {"shards": len(sharded_phi.sharding.device_set), **compare(one, jitted(sharded_phi, batch_size=batch, **kwargs))}

placed = place_pairs(g, pairs, square)
out["placed"] = {"rows": int(placed.features.shape[0]), "pairs": int(placed.pairs.shape[0]), "padding": int(np.sum(placed.positions < 0))}
for name, kwargs in [("pairs_full", {"strategy": "full"}), ("pairs_lazy", {"strategy": "lazy"}), ("pairs_prior", {"prior": prior})]:
    one = jaxdpo.select_batch(g, batch, pairs=pairs, **kwargs)
    many = jaxdpo.select_batch(placed.features, batch, pairs=placed.pairs, mask=placed.mask, **kwargs)
    restored = jaxdpo.SelectionResult(placed.restore(many.indices), many.scores)
    out[name] = {"shards": len(placed.features.sharding.device_set), **compare(one, restored)}

# Compiled from shapes alone (a memory plan's view): per round only leaders and one row move.
lower = partial(select_on_mesh, batch_size=batch)
dense = jax.jit(partial(lower, mesh=mesh)).lower(jax.ShapeDtypeStruct((n, d), np.float32, sharding=rows)).compile().as_text()
placed_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in (placed.features, placed.pairs, placed.mask)]
by_pairs = jax.jit(lambda f, p, k: select_on_mesh(f, batch, mesh=square, pairs=p, mask=k)).lower(*placed_shapes).compile().as_text()
out["gathers_feature_matrix"] = gathers(dense, {(n, d)}) or gathers(by_pairs, {tuple(placed.features.shape), (len(placed.positions), d)})
print(json.dumps(out))
