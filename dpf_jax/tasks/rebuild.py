"""Pre-training with the k-NN topology rebuilt from each perturbed structure (paper §5.3).

By default a perturbation keeps the clean structure's edges and the model recomputes their
geometry on device. With `pretrain.rebuild_topology=True` the input pipeline instead perturbs
each crystal on the host — with exactly the noise the device path would draw for the same step
key (`perturb_crystals_host`) — and builds the k-NN graph of the perturbed structure. The batch
then carries the denoising targets in fields prefixed `denoise_`, and the objective reads them
instead of perturbing again. Everything stays a pure function of (run key, step).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jraph
import numpy as np

from dpf_jax.data.batching import GraphBatcher, fit_budget, graph_to_jraph, pad_graphs, stack_device_batches
from dpf_jax.data.graphs import CrystalGraph
from dpf_jax.tasks.perturb import batch_host_targets, perturb_crystals_host, rebuild_topology

PREFIX = "denoise_"
GRAPH_LEVEL = ("lattice_params", "noisy_lattice_params", "lattice_mask")


class RebuildingBatcher(GraphBatcher):
    """A `GraphBatcher` whose batches are perturbed crystals with rebuilt graphs.

    `key_fn(epoch, batch_index)` gives the PRNG key of that batch (the training loop passes the
    key of the step that consumes it).
    """

    def __init__(self, graphs: Sequence[CrystalGraph], batch_size: int, num_devices: int,
                 perturb_cfg: dict, key_fn: Callable, graph_kwargs: dict | None = None, **kw):
        super().__init__([graph_to_jraph(g) for g in graphs], batch_size, num_devices, **kw)
        self.crystals = [g.crystal for g in graphs]
        self.perturb_cfg = dict(perturb_cfg)
        self.key_fn = key_fn
        self.graph_kwargs = dict(graph_kwargs or {})

    def iterate(self, seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_remainder: bool = False,
                start_batch: int = 0):
        order = self.epoch_order(seed, epoch, shuffle)
        for b in range(start_batch, self.num_batches(drop_remainder)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.make_perturbed_batch(idx, self.key_fn(epoch, b))

    def make_perturbed_batch(self, indices: Sequence[int], key) -> jraph.GraphsTuple:
        # shares balanced on the clean graphs' edge counts (perturbation changes them a little)
        indices = np.asarray(indices, np.int64)
        built = []
        for positions in self.share_positions(indices):
            crystals = [self.crystals[i] for i in indices[positions]]
            perturbed = perturb_crystals_host(key, crystals, self.perturb_cfg, indices=positions.tolist())
            graphs = [rebuild_topology(p, clean_numbers=c.numbers, **self.graph_kwargs)
                      for (p, _), c in zip(perturbed, crystals)]
            built.append(([graph_to_jraph(g) for g in graphs], [t for _, t in perturbed], positions))
        budget = fit_budget(self.budgets,
                            max(sum(int(g.n_node[0]) for g in gs) for gs, _, _ in built),
                            max(sum(int(g.n_edge[0]) for g in gs) for gs, _, _ in built),
                            max(len(gs) for gs, _, _ in built))
        padded = []
        for graphs, targets, positions in built:
            host_targets = batch_host_targets(targets, budget.n_node, budget.n_graph) if targets else {}
            padded.append(attach_targets(pad_graphs(graphs, budget, positions=positions), host_targets,
                                         GRAPH_LEVEL))
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
