"""Devices: the (data, fsdp) mesh and its shardings, multi-host start-up, and the pmap layout.

jit mode puts every array on a `Mesh(('data', 'fsdp'))`: the batch is split over both axes, and with
fsdp > 1 each parameter (and its optimizer moments) is split along its largest dimension that the
fsdp size divides. pmap mode replicates the state and splits the batch over local devices.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


@functools.cache  # once per process: the command line calls it before its device checks, the Trainer again
def maybe_initialize_distributed() -> None:
    """Join a multi-host run (TPU pod slice, or `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` +
    `JAX_PROCESS_ID` on GPUs/CPUs) before any device is touched; a single host needs nothing."""
    multi_env = "JAX_COORDINATOR_ADDRESS" in os.environ and int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1
    tpu_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    if multi_env or tpu_pod:
        if multi_env:
            jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                       int(os.environ["JAX_PROCESS_ID"]))
        else:
            jax.distributed.initialize()


def make_mesh(fsdp: int = 1) -> Mesh:
    """All devices as a (data, fsdp) mesh."""
    devices = np.asarray(jax.devices())
    if devices.size % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), BATCH_AXES)


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2 ** 14) -> P:
    """FSDP rule: split the largest dimension divisible by `fsdp`; small or indivisible arrays replicate."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every leaf of a (shape-only) state, by the FSDP rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's slice of the batch -> arrays sharded over the whole mesh (every host calls it)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def split_for_pmap(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(batch, ...) -> (local devices, batch / devices, ...)."""
    n = jax.local_device_count()
    out = {}
    for k, v in local.items():
        if v.shape[0] % n:
            raise ValueError(f"per-host batch {v.shape[0]} is not divisible by the {n} local devices")
        out[k] = v.reshape((n, v.shape[0] // n) + v.shape[1:])
    return out


def replicate(tree: Any) -> Any:
    """Copy a pytree onto every local device (leading device axis), for pmap."""
    devices = jax.local_devices()
    sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), P("devices"))
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), sharding), tree)


def unreplicate(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x[0], tree)
