"""The hardware `jaxdpo plan` compiles for: TPU slices by name (their topology, which libtpu's
compile-only client builds on any machine) and the published figures of chips; `local` is this
machine's own devices.

Per chip, the vendors' published figures: peak dense bf16 FLOP/s, HBM bandwidth (bytes/s) and HBM
capacity (Google's "GB" of HBM are binary: the runtime reports 16 GiB on a v5e chip):

| chip | bf16 FLOP/s | HBM bandwidth | HBM | source |
|---|---|---|---|---|
| TPU v4 | 275e12 | 1200 GB/s | 32 GiB | Google Cloud, "TPU v4", system architecture |
| TPU v5e | 197e12 | 819 GB/s | 16 GiB | Google Cloud, "TPU v5e", system architecture |
| TPU v5p | 459e12 | 2765 GB/s | 95 GiB | Google Cloud, "TPU v5p", system architecture |
| TPU v6e | 918e12 | 1638 GB/s | 32 GiB | Google Cloud, "TPU v6e", system architecture |
| H100 SXM | 989e12 | 3.35 TB/s | 80 GB | NVIDIA H100 Tensor Core GPU datasheet |
| H200 SXM | 989e12 | 4.8 TB/s | 141 GB | NVIDIA H200 Tensor Core GPU datasheet |
| A100 80GB SXM | 312e12 | 2.039 TB/s | 80 GB | NVIDIA A100 Tensor Core GPU datasheet |
| L4 | 121e12 | 300 GB/s | 24 GB | NVIDIA L4 Tensor Core GPU datasheet |

A v4 or v5p chip's two TensorCores are one JAX device ("megacore"), so v4-8 and v5p-8 are 4
devices; v5e-8 and v6e-8 are 8 single-core chips on one host, v5e-16 two such hosts.
"""

from __future__ import annotations

import glob
import os
import re
from typing import NamedTuple

from jaxdpo.errors import UserError


class Chip(NamedTuple):
    """Published per-chip figures (see the module docstring)."""

    name: str
    peak_flops: float
    bandwidth: float
    hbm: int


CHIPS = {
    "TPU v4": Chip("TPU v4", 275e12, 1200e9, 32 * 2**30),
    "TPU v5 lite": Chip("TPU v5e", 197e12, 819e9, 16 * 2**30),
    "TPU v5": Chip("TPU v5p", 459e12, 2765e9, 95 * 2**30),
    "TPU v6 lite": Chip("TPU v6e", 918e12, 1638e9, 32 * 2**30),
    "H100": Chip("H100", 989e12, 3.35e12, 80 * 10**9),
    "H200": Chip("H200", 989e12, 4.8e12, 141 * 10**9),
    "A100": Chip("A100", 312e12, 2.039e12, 80 * 10**9),
    "L4": Chip("L4", 121e12, 300e9, 24 * 10**9),
}
"""By the device kind JAX reports ("TPU v5 lite" is a v5e chip)."""


def chip_of(device_kind: str) -> Chip | None:
    """The figures of a device kind: the longest table name it contains ("TPU v5 lite" before "TPU v5")."""
    for name in sorted(CHIPS, key=len, reverse=True):
        if name in device_kind:
            return CHIPS[name]
    return None


class Slice(NamedTuple):
    """A TPU slice as libtpu names its topology: chips per axis, megacore or not, chips per host."""

    topology: str
    chip_config: str
    host_bounds: tuple[int, int, int]


SLICES = {
    "v5e-8": Slice("v5e:2x4", "default", (2, 4, 1)),
    "v5e-16": Slice("v5e:4x4", "default", (2, 4, 1)),
    "v4-8": Slice("v4:2x2x1", "megacore", (2, 2, 1)),
    "v5p-8": Slice("v5:2x2x1", "megacore", (2, 2, 1)),
    "v6e-8": Slice("v6e:2x4", "default", (2, 4, 1)),
}
TARGETS = (*SLICES, "local")


def target_devices(name: str) -> list:
    """The devices of target `name`: a TPU slice's compile-only devices (libtpu needed), or this
    machine's devices for "local"."""
    import jax

    if name == "local":
        return jax.devices()
    if name not in SLICES:
        raise UserError(f"--target: unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    quiet_libtpu()
    from jax.experimental import topologies

    spec = SLICES[name]
    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=spec.topology, chip_config_name=spec.chip_config, chips_per_host_bounds=spec.host_bounds
        )
    except Exception as error:  # no libtpu, or one that does not know the topology
        raise UserError(
            f"--target {name}: cannot build the {spec.topology} topology ({str(error).strip().splitlines()[0]}); compiling for a TPU "
            f"needs libtpu: pip install \"jax[tpu]=={jax.__version__}\""
        ) from error
    return list(topology.devices)


def usable_memory(device, chip: Chip | None) -> int | None:
    """Bytes of HBM a program may use on `device` as its compiler counts them: the compiler's
    answer to a program one chip's HBM in size ("... exceeds available HBM (15.75G)"), else the
    chip's published HBM (None: unknown)."""
    if chip is None:
        return None
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    probe = jax.ShapeDtypeStruct((chip.hbm // 4,), jnp.float32, sharding=SingleDeviceSharding(device))
    try:
        jax.jit(lambda x: x + 1).lower(probe).compile()
    except jax.errors.JaxRuntimeError as error:
        found = re.search(r"available HBM \(([\d.]+)([KMG])", str(error))
        if found:
            return int(float(found[1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[found[2]])
    return chip.hbm


def quiet_libtpu() -> None:
    """On a machine without TPU chips: name a nominal local host for libtpu, which otherwise logs
    errors about the cloud metadata it cannot find, and let several processes load it (its lock
    file guards chips there are none of). Call before JAX starts its backends."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    for name, value in (
        ("TPU_ACCELERATOR_TYPE", "v5litepod-8"), ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        os.environ.setdefault(name, value)
