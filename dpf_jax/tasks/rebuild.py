"""Pre-training with the k-NN topology rebuilt from each perturbed structure (paper §5.3).

By default a perturbation keeps the clean structure's edges and the model recomputes their
geometry on device. With `pretrain.rebuild_topology=True` the input pipeline instead perturbs
each crystal on the host — with exactly the noise the device path would draw for the same step
key (`perturb_arrays_host`) — and builds the k-NN graph of the perturbed structure. The batch
then carries the denoising targets in fields prefixed `denoise_`, and the objective reads them
instead of perturbing again. Everything stays a pure function of (run key, step).

The k-NN builds are ~90% of the host time (0.4 ms per crystal; one B=256 batch ~0.1 s on one
core, against a ~20 ms GPU step), so with `workers > 1` they run in a pool of spawned processes,
a few batches ahead of the one being padded, together with the per-crystal work around them
(Crystal record, `graph_to_jraph`); the main process keeps the one batched perturbation call
per device share and the padding. The batches are the same whatever the number of workers.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import logging
import multiprocessing
import signal
import threading
from typing import Callable, Sequence

import jraph
import numpy as np

from dpf_jax.data.batching import GraphBatcher, fit_budget, graph_to_jraph, pad_graphs, stack_device_batches
from dpf_jax.data.graphs import CrystalGraph
from dpf_jax.tasks.perturb import batch_host_targets, perturb_arrays_host, perturbed_crystal, rebuild_topology

log = logging.getLogger(__name__)

PREFIX = "denoise_"
GRAPH_LEVEL = ("lattice_params", "noisy_lattice_params", "lattice_mask")
LOOKAHEAD_BATCHES = 3  # batches whose graph builds are in flight while one is padded

# One pool per worker count, shared by every RebuildingBatcher of the process (a run's train,
# val and test batchers), started on first use; `shutdown_workers` (also at exit) stops them.
_POOLS: dict[int, cf.ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _ignore_sigint():  # in each worker: Ctrl-C is the training loop's to handle (it checkpoints)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _shared_pool(workers: int) -> cf.ProcessPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            # spawned, not forked: JAX's threads are running by now (see tasks/official.py)
            pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_ignore_sigint)
            _POOLS[workers] = pool
        return pool


def _drop_pool(pool: cf.ProcessPoolExecutor) -> None:
    with _POOLS_LOCK:
        for workers, p in list(_POOLS.items()):
            if p is pool:
                del _POOLS[workers]
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown_workers() -> None:
    """Stops the graph-rebuild worker processes (they start again when a batcher needs them)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)


atexit.register(shutdown_workers)


def _rebuild_graphs(jobs):
    """Worker: the single-crystal GraphsTuple (`graph_to_jraph`) of each perturbed crystal,
    from (clean crystal, (perturbed lattice, positions, species), graph kwargs): the Crystal
    record, its k-NN graph and its arrays are all made here, off the main process."""
    out = []
    for clean, arrays, graph_kwargs in jobs:
        graph = rebuild_topology(perturbed_crystal(clean, *arrays), clean_numbers=clean.numbers, **graph_kwargs)
        out.append(graph_to_jraph(graph))
    return out


class RebuildingBatcher(GraphBatcher):
    """A `GraphBatcher` whose batches are perturbed crystals with rebuilt graphs.

    `key_fn(epoch, batch_index)` gives the PRNG key of that batch (the training loop passes the
    key of the step that consumes it). `workers > 1` builds the graphs in that many processes
    (a pool shared by the process's batchers, see `shutdown_workers`).
    """

    def __init__(self, graphs: Sequence[CrystalGraph], batch_size: int, num_devices: int,
                 perturb_cfg: dict, key_fn: Callable, graph_kwargs: dict | None = None,
                 workers: int = 1, **kw):
        super().__init__([graph_to_jraph(g) for g in graphs], batch_size, num_devices, **kw)
        self.crystals = [g.crystal for g in graphs]
        self.perturb_cfg = dict(perturb_cfg)
        self.key_fn = key_fn
        self.graph_kwargs = dict(graph_kwargs or {})
        self.workers = max(1, int(workers))

    def iterate(self, seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_remainder: bool = False,
                start_batch: int = 0):
        order = self.epoch_order(seed, epoch, shuffle)
        pending = collections.deque()
        try:
            for b in range(start_batch, self.num_batches(drop_remainder)):
                idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                pending.append(self._start_batch(idx, self.key_fn(epoch, b)))
                if len(pending) > (LOOKAHEAD_BATCHES if self.workers > 1 else 0):
                    yield self._finish_batch(pending.popleft())
            while pending:
                yield self._finish_batch(pending.popleft())
        finally:  # the consumer stopped early (or failed): drop the builds nobody will read
            for shares in pending:
                for _, _, parts in shares:
                    for _, part, _ in parts:
                        if isinstance(part, cf.Future):
                            part.cancel()

    def make_perturbed_batch(self, indices: Sequence[int], key) -> jraph.GraphsTuple:
        return self._finish_batch(self._start_batch(indices, key))

    def _start_batch(self, indices: Sequence[int], key):
        """Perturbs the batch's crystals (here: one small jitted CPU call per share) and starts
        their graph builds (in the pool if there is one); `_finish_batch` collects and pads."""
        # shares balanced on the clean graphs' edge counts (perturbation changes them a little)
        indices = np.asarray(indices, np.int64)
        shares = []
        for positions in self.share_positions(indices):
            crystals = [self.crystals[i] for i in indices[positions]]
            perturbed = perturb_arrays_host(key, crystals, self.perturb_cfg, indices=positions.tolist())
            jobs = [(c, arrays, self.graph_kwargs) for c, (arrays, _) in zip(crystals, perturbed)]
            shares.append(([t for _, t in perturbed], positions, self._submit(jobs)))
        return shares

    def _submit(self, jobs):
        """[(jobs chunk, Future or its finished graphs, the pool or None)]."""
        if self.workers <= 1 or len(jobs) < 2:
            return [(jobs, _rebuild_graphs(jobs), None)]
        pool = _shared_pool(self.workers)
        size = -(-len(jobs) // self.workers)
        chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
        try:
            return [(chunk, pool.submit(_rebuild_graphs, chunk), pool) for chunk in chunks]
        except (cf.process.BrokenProcessPool, RuntimeError) as e:  # broken, or shut down meanwhile
            self._serial_from_now(pool, e)
            return [(jobs, _rebuild_graphs(jobs), None)]

    def _serial_from_now(self, pool, error) -> None:
        if self.workers > 1:
            log.warning("graph-rebuild worker processes failed (%s); this batcher builds in the main "
                        "process from now on", error)
        self.workers = 1
        _drop_pool(pool)

    def _collect(self, chunk, part, pool):
        if not isinstance(part, cf.Future):
            return part
        try:
            return part.result()
        except cf.CancelledError:  # the pool was shut down under this batch (shutdown_workers)
            return _rebuild_graphs(chunk)
        except cf.process.BrokenProcessPool as e:  # a worker died (killed, out of memory)
            self._serial_from_now(pool, e)
            return _rebuild_graphs(chunk)

    def _finish_batch(self, shares) -> jraph.GraphsTuple:
        built = []
        for targets, positions, parts in shares:
            graphs = [g for chunk, part, pool in parts for g in self._collect(chunk, part, pool)]
            built.append((graphs, targets, positions))
        budget = fit_budget(self.budgets,
                            max(sum(int(g.n_node[0]) for g in gs) for gs, _, _ in built),
                            max(sum(int(g.n_edge[0]) for g in gs) for gs, _, _ in built),
                            max(len(gs) for gs, _, _ in built))
        padded = []
        for graphs, targets, positions in built:
            host_targets = batch_host_targets(targets, budget.n_node, budget.n_graph) if targets else {}
            padded.append(attach_targets(pad_graphs(graphs, budget, positions=positions, template=self.graphs[0]),
                                         host_targets, GRAPH_LEVEL))
        if any(not t for _, t, _ in built):  # an empty device share: give it the same fields
            template = next(p for p, (_, t, _) in zip(padded, built) if t)
            padded = [p if t else _zero_fields_like(p, template) for p, (_, t, _) in zip(padded, built)]
        return stack_device_batches(padded)


def _zero_fields_like(batch, template):
    nodes, globals_ = dict(batch.nodes), dict(batch.globals)
    for name, v in template.nodes.items():
        if name.startswith(PREFIX):
            nodes[name] = np.zeros_like(v)
    for name, v in template.globals.items():
        if name.startswith(PREFIX):
            globals_[name] = np.zeros_like(v)
    return batch._replace(nodes=nodes, globals=globals_)


def attach_targets(batch: jraph.GraphsTuple, targets: dict, graph_level: Sequence[str]) -> jraph.GraphsTuple:
    """Stores denoising targets in a padded batch: fields named in `graph_level` per graph, the
    rest per node, each prefixed `denoise_` (read back by `targets_from_batch`)."""
    nodes, globals_ = dict(batch.nodes), dict(batch.globals)
    for name, value in targets.items():
        (globals_ if name in graph_level else nodes)[PREFIX + name] = value
    return batch._replace(nodes=nodes, globals=globals_)


def targets_from_batch(graph) -> dict:
    """The denoising targets a `RebuildingBatcher` stored in a (per-device) batch."""
    out = {}
    for field in (graph.nodes, graph.globals):
        for name, value in field.items():
            if name.startswith(PREFIX):
                out[name[len(PREFIX):]] = value
    return out
