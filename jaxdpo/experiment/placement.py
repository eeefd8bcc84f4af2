"""A stage's abstract inputs, placed on the mesh as the run places them: the adapter and the
optimizer state split over 'model' (`shard_params`), chunks of rows over 'data' (`put_rows`),
replicated scalars, the pool's fields on the first device, and ActiveDPO's pool laid out over
every device as `place_pairs` lays it out (whole prompts per device)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxdpo.models import init_lora
from jaxdpo.selection.sharded import layout_pairs, mesh_axes
from jaxdpo.sequences import Sequences
from jaxdpo.sharding import MODEL, param_spec, rows_sharding

if TYPE_CHECKING:
    from jaxdpo.experiment.stages import RoundShape


def abstract(tree):
    """`tree` with every array replaced by its shape, dtype and sharding (abstract trees pass)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def abstract_adapter(shape: RoundShape):
    """The config's LoRA for the policy, abstract, placed as the run places it (`shard_params`)."""
    c = shape.config.lora
    lora = jax.eval_shape(lambda: init_lora(shape.model, rank=c.rank, alpha=c.alpha, targets=c.targets, key=jax.random.key(0)))
    return params(shape, lora)


def abstract_optimizer(shape: RoundShape, lora):
    """The DPO trainer's optimizer state for `lora`, abstract; its moments placed like the adapter."""
    return params(shape, jax.eval_shape(lambda lora: shape.config.dpo.trainer().init(lora).opt_state, lora))


def device_bytes(tree) -> int:
    """Bytes of `tree`'s arrays (concrete or abstract) that one device holds: its shard of each."""
    def shard(x):
        sharding = getattr(x, "sharding", None)
        dims = x.shape if sharding is None else sharding.shard_shape(x.shape)
        return math.prod(dims) * np.dtype(x.dtype).itemsize

    return int(sum(shard(x) for x in jax.tree.leaves(tree)))


def params(shape: RoundShape, tree):
    if shape.mesh is None:
        return tree
    size = shape.mesh.shape[MODEL]
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(shape.mesh, param_spec(x.shape, size, stacked=True))), tree)


def rows(shape: RoundShape, dims: tuple[int, ...], dtype=np.int32, axis: int = 0) -> jax.ShapeDtypeStruct:
    """A chunk as `put_rows` places it: split over the data axis along `axis`."""
    sharding = None if shape.mesh is None else rows_sharding(shape.mesh, len(dims), axis)
    return jax.ShapeDtypeStruct(dims, dtype, sharding=sharding)


def sequences(shape: RoundShape, dims: tuple[int, ...], axis: int = 0) -> Sequences:
    tokens = rows(shape, dims, axis=axis)
    return Sequences(tokens, tokens, tokens)


def replicated(shape: RoundShape, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    sharding = None if shape.mesh is None else NamedSharding(shape.mesh, PartitionSpec())
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def pooled(shape: RoundShape, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """A pool field where the run puts it: on the first device."""
    sharding = None if shape.mesh is None else SingleDeviceSharding(shape.mesh.devices.flat[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def placed_pool(shape: RoundShape, fields: dict[str, jax.ShapeDtypeStruct], pairs: np.ndarray) -> dict[str, jax.ShapeDtypeStruct]:
    """ActiveDPO's pool as `place_pairs` lays `pairs` out over every device of the mesh: g, the
    pairs and the mask in equal blocks of whole prompts per device, the prior replicated."""
    mesh = shape.mesh
    layout = layout_pairs(pairs, mesh.size, rows=fields["features"].shape[0])
    split = lambda dims, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        dims, dtype, sharding=NamedSharding(mesh, PartitionSpec(mesh_axes(mesh), *(None,) * (len(dims) - 1)))
    )
    features = fields["features"]
    return fields | {
        "features": split((len(layout.rows), features.shape[1]), features.dtype),
        "pairs": split(layout.pairs.shape, fields["pairs"].dtype),
        "mask": split(layout.mask.shape, np.bool_),
        "prior": replicated(shape, fields["prior"]),
    }
