"""One device mesh for every stage (JAX SPMD): axes "data" (batches split) × "model" (parameters
split, FSDP-style).

- Parameters (base weights and LoRA) are split over "model" along their largest dimension that
  divides evenly (the stacked layer axis excepted, so a scanned layer step touches one layer's
  shard on every device); norms, biases and anything that does not divide stay replicated.
  Under `jit`, XLA gathers a layer's weights for its step only: no stage holds the whole model.
- Batches (prompts, responses, DPO micro-batches, reward-model inputs) are split over "data"
  along their rows (`put_rows`); a jitted stage then runs data-parallel, and results equal the
  one-device run up to floating-point reassociation.
- `select_batch`'s candidates are split over every device of the mesh (`put_candidates`).

Several processes (multi-host): `make_mesh` spans every device of every process, and each process
holds the same host data. `place` copies to each process's own devices only their shards
(`jax.make_array_from_callback`); `to_host` reads a sharded result back whole on every process
(`process_allgather`: a process can read only its own shards). `initialize_distributed` starts
`jax.distributed` when the environment describes such a job.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdpo.errors import UserError

DATA, MODEL = "data", "model"
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
DISTRIBUTED_ENV = "JAXDPO_DISTRIBUTED"


MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def limit_accelerator_memory(fraction: float | None) -> None:
    """Let JAX take only `fraction` of each accelerator's memory (it preallocates 75% by default),
    e.g. to leave room for a PyTorch reward model on the same GPU. Works only before JAX starts its
    backends (the first device query), which `experiment.setup` makes sure of; an environment value
    set by the user wins."""
    if fraction is None or os.environ.get(MEMORY_FRACTION_ENV):
        return
    from jax._src import xla_bridge  # no public way to ask whether the backends have started

    if xla_bridge.backends_are_initialized():
        logging.getLogger(__name__).warning(
            "mesh.memory_fraction = %s is ignored: JAX's devices were already started in this process "
            "(set %s before starting Python instead)", fraction, MEMORY_FRACTION_ENV,
        )
        return
    os.environ[MEMORY_FRACTION_ENV] = str(fraction)


def initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when the environment describes a job of several processes;
    returns whether it did. Such a job is named by

    - `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with `JAX_NUM_PROCESSES` and
      `JAX_PROCESS_ID` (any launcher; the last two may come from SLURM or Open MPI instead);
    - a SLURM step of several tasks (`srun`: SLURM_STEP_NUM_TASKS > 1);
    - a TPU slice whose environment lists several hosts (TPU_WORKER_HOSTNAMES or
      TPU_PROCESS_ADDRESSES, GKE) or several slices (MEGASCALE_COORDINATOR_ADDRESS);
    - `JAXDPO_DISTRIBUTED=1` (JAX then finds the cluster itself, e.g. a Cloud TPU VM slice through
      its metadata server); `JAXDPO_DISTRIBUTED=0` never initializes."""
    env = os.environ
    forced = env.get(DISTRIBUTED_ENV, "").strip().lower()
    if forced not in ("", "0", "1"):
        raise UserError(f"{DISTRIBUTED_ENV}={env[DISTRIBUTED_ENV]!r}: use 1 (start jax.distributed) or 0 (never)")
    tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    asked = forced == "1" or (forced != "0" and (
        bool(env.get(COORDINATOR_ENV)) or int(env.get("SLURM_STEP_NUM_TASKS") or 1) > 1
        or "," in tpu_hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
    ))
    if not asked or jax.distributed.is_initialized():
        return False
    try:
        jax.distributed.initialize(num_processes=_env_int(NUM_PROCESSES_ENV), process_id=_env_int(PROCESS_ID_ENV))
    except ValueError as error:  # JAX found no cluster to take the rest from
        raise UserError(
            f"a job of several processes needs {COORDINATOR_ENV}, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} "
            f"(or a cluster manager JAX detects: SLURM, Open MPI, Cloud TPU): {error}"
        ) from error
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise UserError(f"{name}={value!r} must be a non-negative integer")
    return int(value)


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over data × model of `devices` (default: this process's view of
    every device; a compile-only TPU topology's devices for `jaxdpo plan`); `data` None: every
    device left over."""
    devices = jax.devices() if devices is None else list(devices)
    if data is None:
        if len(devices) % model:
            raise UserError(f"mesh.model: {model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data * model > len(devices):
        raise UserError(f"mesh: data × model = {data} × {model} = {data * model} devices, but only {len(devices)} are available")
    if jax.process_count() > 1 and data * model != len(devices):
        raise UserError(
            f"mesh: data × model = {data} × {model} = {data * model} devices, but this job of {jax.process_count()} processes "
            f"has {len(devices)}; a run of several processes uses every device (leave mesh.data unset to fill it)"
        )
    auto = (jax.sharding.AxisType.Auto,) * 2  # XLA propagates shardings from the placed inputs
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=auto, devices=devices[: data * model])


def param_spec(shape: tuple[int, ...], model_size: int, *, stacked: bool) -> PartitionSpec:
    """Split the largest dimension that `model_size` divides over "model" (not the leading layer
    axis of a stacked parameter); replicate when none does or the parameter is a vector."""
    axes = range(1 if stacked else 0, len(shape))
    candidates = [a for a in axes if shape[a] % model_size == 0 and shape[a] >= model_size]
    if model_size == 1 or len(shape) - (1 if stacked else 0) < 2 or not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: shape[a])
    return PartitionSpec(*(MODEL if a == axis else None for a in range(len(shape))))


def shard_params(tree, mesh: Mesh, *, stacked: bool = True):
    """Every array leaf of `tree` placed by `param_spec` on `mesh`."""
    size = mesh.shape[MODEL]
    return jax.tree.map(lambda x: place(x, NamedSharding(mesh, param_spec(x.shape, size, stacked=stacked))), tree)


def shard_model(model, mesh: Mesh):
    """Place a decoder's (or reward model's) parameters on `mesh` in place; returns the model.
    Layer weights are stacked [L, ...]; the embedding, final norm and head are not."""
    state = nnx.state(model)
    placed = jax.tree_util.tree_map_with_path(lambda path, x: place(x, model_sharding(path, x.shape, mesh)), state)
    nnx.update(model, placed)
    return model


def model_sharding(path, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Where `shard_model` puts the parameter at `path` (a key path into a model or its state):
    stacked when under "layers"."""
    stacked = any(getattr(key, "key", getattr(key, "name", None)) == "layers" for key in path)
    return NamedSharding(mesh, param_spec(shape, mesh.shape[MODEL], stacked=stacked))


def data_multiple(rows: int, mesh: Mesh | None) -> int:
    """`rows` rounded up to a multiple of the mesh's data axis (every device gets as many rows)."""
    data = 1 if mesh is None else mesh.shape[DATA]
    return -(-rows // data) * data


def rows_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*(DATA if a == axis else None for a in range(ndim))))


def put_rows(tree, mesh: Mesh | None, axis: int = 0):
    """Host arrays split over "data" along `axis` (their rows; the size must divide); unchanged
    without a mesh."""
    if mesh is None:
        return tree
    size = mesh.shape[DATA]

    def split(x):
        x = np.asarray(x)
        if x.shape[axis] % size:
            raise ValueError(f"{x.shape[axis]} rows do not split over the mesh's {size} data devices")
        return place(x, rows_sharding(mesh, x.ndim, axis))

    return jax.tree.map(split, tree)


def put_candidates(features, mesh: Mesh | None):
    """Selection candidates `[n, d]` split by rows over every device of the mesh when n divides."""
    if mesh is None or mesh.size == 1 or np.shape(features)[0] % mesh.size:
        return features
    return place(features, NamedSharding(mesh, PartitionSpec((DATA, MODEL), None)))


def place(x, sharding: NamedSharding) -> jax.Array:
    """`x` (a host or single-device array, the same on every process) split by `sharding`: each
    process copies only the shards of its own devices. (`jax.device_put` would first compare the
    whole array across processes.) An array already split so is returned as it is."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    return jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index])


def to_host(x) -> np.ndarray:
    """`x` as a NumPy array on this host. An array split over several processes' devices is
    gathered from all of them (every process must call this at the same point)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
