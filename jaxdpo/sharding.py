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

`make_mesh` builds the mesh from `[mesh] data, model`; with more than one host it first calls
`jax.distributed.initialize()` (`initialize_distributed`).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdpo.errors import UserError

DATA, MODEL = "data", "model"
_MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_NUM_NODES", "MEGASCALE_COORDINATOR_ADDRESS")


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
    """`jax.distributed.initialize()` when the environment describes a multi-host job (a
    coordinator address, a multi-node SLURM job, a TPU pod slice); returns whether it did."""
    multi_node_slurm = int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) > 1
    asked = multi_node_slurm or any(os.environ.get(name) for name in _MULTI_HOST_ENV if name != "SLURM_JOB_NUM_NODES")
    if asked and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        return True
    return False


def make_mesh(data: int | None = None, model: int = 1) -> Mesh:
    """A ("data", "model") mesh over data × model devices; `data` None: every device left over."""
    devices = jax.devices()
    if data is None:
        if len(devices) % model:
            raise UserError(f"mesh.model: {model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data * model > len(devices):
        raise UserError(f"mesh: data × model = {data} × {model} = {data * model} devices, but only {len(devices)} are available")
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
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, param_spec(x.shape, size, stacked=stacked))), tree)


def shard_model(model, mesh: Mesh):
    """Place a decoder's (or reward model's) parameters on `mesh` in place; returns the model.
    Layer weights are stacked [L, ...]; the embedding, final norm and head are not."""
    state = nnx.state(model)
    placed = jax.tree_util.tree_map_with_path(lambda path, x: _place(path, x, mesh), state)
    nnx.update(model, placed)
    return model


def _place(path, x, mesh: Mesh):
    stacked = any(getattr(key, "key", None) == "layers" for key in path)
    return jax.device_put(x, NamedSharding(mesh, param_spec(x.shape, mesh.shape[MODEL], stacked=stacked)))


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

    def place(x):
        x = np.asarray(x)
        if x.shape[axis] % size:
            raise ValueError(f"{x.shape[axis]} rows do not split over the mesh's {size} data devices")
        return jax.device_put(x, rows_sharding(mesh, x.ndim, axis))

    return jax.tree.map(place, tree)


def put_candidates(features, mesh: Mesh | None):
    """Selection candidates `[n, d]` split by rows over every device of the mesh when n divides."""
    if mesh is None or mesh.size == 1 or np.shape(features)[0] % mesh.size:
        return features
    return jax.device_put(features, NamedSharding(mesh, PartitionSpec((DATA, MODEL), None)))
