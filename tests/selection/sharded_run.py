"""Run in a subprocess with 4 host CPU devices: select_batch on candidate-sharded features must
make the same picks as on one device, for both strategies. Prints one JSON object."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import jaxdpo  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)  # as in the test suite: compile time dominates

rng = np.random.default_rng(0)
n, d, batch = 64, 24, 10
phi = rng.normal(size=(n, d)).astype(np.float32)
phi[40] = phi[3]  # an exact tie across shards: the lowest global index must win
prior = rng.normal(size=(5, d)).astype(np.float32)
g = rng.normal(size=(n, d)).astype(np.float32)
pairs = rng.integers(0, n, size=(n, 2)).astype(np.int32)

mesh = Mesh(np.array(jax.devices()), ("candidates",))
rows = NamedSharding(mesh, PartitionSpec("candidates"))
single = jax.devices()[0]
jitted = jax.jit(jaxdpo.select_batch, static_argnames=("batch_size", "strategy"))

out = {"devices": len(jax.devices())}
sharded_phi = jax.device_put(phi, rows)
for name, kwargs in [("full", {"strategy": "full"}), ("lazy", {"strategy": "lazy"}), ("lazy_prior", {"strategy": "lazy", "prior": prior})]:
    one = jaxdpo.select_batch(jax.device_put(phi, single), batch, **kwargs)
    many = jitted(sharded_phi, batch_size=batch, **kwargs)
    out[name] = {
        "shards": len(sharded_phi.sharding.device_set),
        "same_picks": bool(np.array_equal(one.indices, many.indices)),
        "max_score_diff": float(np.max(np.abs(np.asarray(one.scores) - np.asarray(many.scores))) / np.max(np.abs(np.asarray(one.scores)))),
    }
# The explicit path never gathers Φ: per round it moves only per-device leaders and the row φ*.
from jaxdpo.selection._greedy import _greedy_sharded  # noqa: E402

hlo = _greedy_sharded.lower(
    sharded_phi, None, jax.device_put(np.ones(n, bool), rows), np.float32(1.0), batch, True, mesh, "candidates"
).compile().as_text()
out["gathers_feature_matrix"] = any(
    ("all-gather" in line or "all-reduce" in line) and f"[{n},{d}]" in line for line in hlo.splitlines()
)
one = jaxdpo.select_batch(jax.device_put(g, single), batch, pairs=pairs)
many = jaxdpo.select_batch(jax.device_put(g, rows), batch, pairs=jax.device_put(pairs, rows))
out["pairs"] = {
    "shards": 4,
    "same_picks": bool(np.array_equal(one.indices, many.indices)),
    "max_score_diff": float(np.max(np.abs(np.asarray(one.scores) - np.asarray(many.scores))) / np.max(np.abs(np.asarray(one.scores)))),
}
print(json.dumps(out))
