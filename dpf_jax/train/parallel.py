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


# `train.cuda_graphs`: how XLA runs the step's kernels inside the CUDA graphs ("command buffers")
# it builds. XLA's default ("xla") keeps them one after another in its schedule's order and
# launches collectives between graphs. "concurrent" lets kernels that touch different buffers run
# at the same time (xla_gpu_command_buffer_scheduling_mode=CONCURRENT); "concurrent_collectives"
# also puts the collectives inside the graphs. The same kernels run, so no number should change
# (GPU loss curves compared in session 22: within the spread of repeated "xla" runs). A small
# per-GPU batch leaves most SMs idle in each kernel, which concurrency fills. Measured (session
# 21, pure step, real data, 4 x H200 machines A, B, C; scripts/results/h200x4_session21/), ms
# per step, xla / concurrent / concurrent_collectives:
#   one GPU, JARVIS fine-tuning B=32 (B): 1.82 / 1.37
#   one GPU, pre-training B=64, 128 (C): 3.52, 5.21 / 2.93, 4.52
#   one GPU, pre-training B=256, 1024 (A): 8.61, 26.42 / 8.83 (slower), 26.37
#   two GPUs, pre-training B=256: 5.93 (B) / 5.22 (B) / 4.84 (C)
#   four GPUs, pre-training B=256, 1024: 4.12, 9.36 (A) / 3.56, 8.66 (A) / 3.23, 8.38 (C)
CUDA_GRAPH_MODES = ("auto", "xla", "concurrent", "concurrent_collectives")
# "auto" on one GPU: concurrent up to this many crystals per step, XLA's order above
CONCURRENT_MAX_BATCH_ONE_GPU = 128
# XLA's default command types plus the collectives (as measured; named in full because an XLA
# option given to one jit replaces the list rather than adding to it)
_COMMAND_TYPES_WITH_COLLECTIVES = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES"


def check_cuda_graphs(mode: str) -> None:
    """A `train.cuda_graphs` value this module knows, else ValueError (checked before data loads)."""
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"train.cuda_graphs must be one of {CUDA_GRAPH_MODES}, got {mode!r}")


def resolve_cuda_graphs(mode: str, mesh: Mesh, batch_size: int) -> str:
    """`train.cuda_graphs` as it runs on `mesh` for steps of `batch_size` crystals (all runs'):
    "auto" becomes "concurrent_collectives" on several GPUs, "concurrent" on one GPU with at
    most `CONCURRENT_MAX_BATCH_ONE_GPU` crystals per step, else "xla" (always off a GPU)."""
    check_cuda_graphs(mode)
    if mode != "auto":
        return mode
    if mesh.devices.flat[0].platform != "gpu":
        return "xla"
    if mesh.devices.size > 1:
        return "concurrent_collectives"
    return "concurrent" if batch_size <= CONCURRENT_MAX_BATCH_ONE_GPU else "xla"


def describe_cuda_graphs(mode: str, mesh: Mesh, batch_size: int) -> str:
    """For the run log: "cuda graphs concurrent (train.cuda_graphs=auto)" and the like."""
    resolved = resolve_cuda_graphs(mode, mesh, batch_size)
    return f"cuda graphs {resolved}" + (f" (train.cuda_graphs={mode})" if resolved != mode else "")


def step_compiler_options(mode: str, mesh: Mesh, batch_size: int) -> dict[str, str]:
    """XLA options for the jitted training step (`jax.jit(..., compiler_options=)`) from
    `train.cuda_graphs`: {} for XLA's defaults."""
    mode = resolve_cuda_graphs(mode, mesh, batch_size)
    options = {}
    if mode.startswith("concurrent"):
        options["xla_gpu_command_buffer_scheduling_mode"] = "CONCURRENT"
    if mode == "concurrent_collectives":
        options["xla_gpu_enable_command_buffer"] = _COMMAND_TYPES_WITH_COLLECTIVES
    return options


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
