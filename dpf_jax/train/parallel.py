"""Data parallelism over every visible accelerator: one `Mesh` axis named "data".

A batch carries a leading device axis (see `dpf_jax.data.batching.GraphBatcher`): each device
gets one self-contained padded share of the global batch. The forward pass runs per device
under `shard_map`; losses, metrics and BatchNorm statistics are summed across the "data" axis
with `lax.psum`, so the program computes the same numbers on 1 or N devices. Gradients are
taken outside the `shard_map`, which lets JAX transpose the collectives itself.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpf_jax.data.batching import prefetch

log = logging.getLogger(__name__)

AXIS = "data"


def maybe_initialize_distributed(enabled: bool) -> None:
    """Multi-host: `jax.distributed.initialize()` (coordinator from the usual env variables)."""
    if enabled:
        jax.distributed.initialize()
        log.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(num_devices: int | None = None) -> Mesh:
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (AXIS,))


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """`jax.shard_map` on current JAX, the experimental one on older releases."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map as _sm  # jax < 0.6

    return _sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def put_batch(batch, mesh: Mesh, run_axis: bool = False):
    """Host batch with a leading device axis → device arrays sharded along it (async copy).

    `run_axis`: the batch has a leading axis of runs first (`dpf_jax.train.multirun`), then
    the device axis; it is sharded along the second."""
    if run_axis:
        if jax.process_count() > 1:
            raise NotImplementedError("training several runs together is single-host only")
        return jax.device_put(batch, NamedSharding(mesh, P(None, AXIS)))
    sharding = batch_sharded(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    # multi-host: every process builds the same global batch (same seed, same order) and
    # hands over the shares of its own devices; the global array is assembled from them.
    me = jax.process_index()
    local = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == me]
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, x[local], x.shape), batch)


def put_replicated(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def prefetch_to_device(iterator, mesh: Mesh, size: int = 2, with_host: bool = False, run_axis: bool = False):
    """Keeps `size` batches copied to the devices ahead of the step that needs them.

    Yields device batches, or (host batch, device batch) pairs with `with_host`. The copies
    are issued from a background thread (`prefetch`), so the main thread only dispatches
    steps; up to `size` + 2 batches are then alive on the devices. Measured (4 x H200
    host, pre-training, session 17): one GPU B=256 96.3% -> 98.2% of the pure step, four GPUs
    B=1024 70.9% -> 85.4%; four GPUs B=256 stayed host-bound (41.1% -> 38.8%) until the state
    and the batches went to the step as a few arrays (session 18: 88.9%; `train.pack_state`,
    `train.pack_batches`).
    """
    def put(item):
        dev = put_batch(item, mesh, run_axis)
        return (item, dev) if with_host else dev

    yield from prefetch(map(put, iterator), size)
