"""Padded, fixed-shape `jraph.GraphsTuple` batches of crystal graphs.

Batch layout (every array numpy on the host; the training code adds a leading device axis):

  nodes   = {"species":   int32[N]   atomic number Z, 0 for padding (and for masked atoms),
             "positions": float32[N,3] Cartesian Å,
             "graph":     int32[N]   index of the node's graph in this batch,
             "mask":      bool[N]    True for real atoms,
             "count":     int32[N]   the atom's weight in BatchNorm statistics and per-crystal
                                     means: 1, or after "atoms" merging its class size (0 for
                                     atoms that only give positions); 0 for padding}
  edges   = {"images":    int32[E,3] integer image of the receiver (see graphs.py),
             "mask":      bool[E],
             "count":     int32[E]   reference edges this edge stands for (1 unless the graph
                                     was merged, `graphs.merge_equivalent_edges`; 0 for padding),
             "net":       int32[E]   its net count for vector sums over edges (same source;
                                     absent after "distance" merging, which has none),
             "source":    int32[E]   only after "atoms" merging: the atom the edge's vector
                                     starts from (the sender is its class representative)}
  globals = {"lattice":   float32[G,3,3] rows = lattice vectors (identity for padding graphs),
             "target":    float32[G] raw target (0 where absent),
             "index":     int32[G] position of the crystal in the global batch (-1: padding),
             "mask":      bool[G]}
  senders, receivers: int32[E]; n_node, n_edge: int32[G].

Padding follows `jraph.pad_with_graphs`: one padding graph holds every padding node and edge,
the remaining padding graphs are empty. Padding edges are zero-length self-loops spread evenly
over the padding nodes in non-decreasing order (jraph puts them all on the first padding node,
which makes every scatter-add over edges, the aggregation and the gathers' transposes, pile its
padding updates onto one row); edges stay sorted by receiver because padding indices exceed
every real index.

Budgets: a handful of (n_node, n_edge) levels per batch, chosen from the dataset's own size
distribution so that padding waste stays low while jit compiles only a few shapes; a batch
that exceeds every level gets a new, larger level (logged) instead of being dropped.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import queue
import threading
from collections.abc import Sequence
from typing import Iterator

import jraph
import numpy as np

from dpf_jax.data.graphs import CrystalGraph

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, order=True)
class Budget:
    """Padded sizes of one device's share of a batch (padding included)."""

    n_node: int
    n_edge: int
    n_graph: int


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def graph_to_jraph(graph: CrystalGraph, target: float | None = None) -> jraph.GraphsTuple:
    """One unpadded single-crystal GraphsTuple in the batch layout of this module."""
    c = graph.crystal
    n, e = graph.num_nodes, graph.num_edges
    if e > 1 and (np.diff(graph.receivers) < 0).any():
        # the model's segment sums and segment kernel take each receiver's edges as one run
        raise ValueError(f"{c.id}: edges are not sorted by receiver (build graphs with "
                         "dpf_jax.data.graphs.build_crystal_graph, which sorts them)")
    return jraph.GraphsTuple(
        nodes={
            "species": c.numbers.astype(np.int32),
            "positions": c.cart_coords.astype(np.float32),
            "graph": np.zeros(n, np.int32),
            "mask": np.ones(n, bool),
            "count": graph.atom_counts().astype(np.int32),
        },
        edges={"images": graph.images.astype(np.int32), "mask": np.ones(e, bool),
               "count": graph.edge_counts().astype(np.int32),
               **({"net": graph.edge_net().astype(np.int32)} if graph.has_net else {}),
               **({"source": graph.sources.astype(np.int32)} if graph.sources is not None else {})},
        senders=graph.senders.astype(np.int32),
        receivers=graph.receivers.astype(np.int32),
        globals={
            "lattice": c.lattice.astype(np.float32)[None],
            "target": np.array([0.0 if target is None else target], np.float32),
            "index": np.zeros(1, np.int32),
            "mask": np.ones(1, bool),
        },
        n_node=np.array([n], np.int32),
        n_edge=np.array([e], np.int32),
    )


def spread_padding_loops(n_node: int, n_node_padded: int, n_edge: int, n_edge_padded: int) -> np.ndarray:
    """Node index of each padding edge's self-loop: the padding nodes n_node..n_node_padded-1
    in turn, in non-decreasing order, as evenly as the counts allow."""
    n_pad_nodes, n_pad_edges = n_node_padded - n_node, n_edge_padded - n_edge
    if n_pad_edges and n_pad_nodes < 1:
        raise ValueError("padding edges need at least one padding node")
    return (n_node + np.arange(n_pad_edges, dtype=np.int64) * n_pad_nodes // max(n_pad_edges, 1)).astype(np.int32)


def _concat_padded(parts: Sequence[np.ndarray], n: int, size: int) -> np.ndarray:
    """The arrays `parts` (n rows together) one after the other, then zeros up to `size` rows
    (dtype promoted over the parts, as np.concatenate would)."""
    out = np.empty((size,) + parts[0].shape[1:], np.result_type(*parts))
    np.concatenate(parts, axis=0, out=out[:n])
    out[n:] = 0
    return out


def _check_fits(n_graph: int, n_node: int, n_edge: int, budget: Budget) -> None:
    """Raises unless a share of these sizes fits `budget` with at least one padding graph."""
    if n_graph >= budget.n_graph:
        raise ValueError(f"{n_graph} graphs do not fit a budget of {budget.n_graph} (one is padding)")
    if n_node >= budget.n_node or n_edge > budget.n_edge:
        raise ValueError(f"batch of {n_node} nodes / {n_edge} edges exceeds {budget}")


def _padded_graphs_tuple(nodes, edges, glob, senders, receivers, n_node_g, n_edge_g, budget: Budget,
                         index) -> jraph.GraphsTuple:
    """The padded batch from its fields, padded already: adds jraph's padding graphs (one holds
    every padding node and edge, the others are empty), the node -> graph index, identity
    lattices on the padding graphs and globals["index"] (`index`, then -1 on padding)."""
    n_real = n_node_g.size
    pad_n = np.zeros(budget.n_graph - n_real, np.int32)
    pad_e = pad_n.copy()
    pad_n[0], pad_e[0] = budget.n_node - int(n_node_g.sum()), budget.n_edge - int(n_edge_g.sum())
    n_node_all = np.concatenate([n_node_g.astype(np.int32), pad_n])
    n_edge_all = np.concatenate([n_edge_g.astype(np.int32), pad_e])
    nodes["graph"] = np.repeat(np.arange(budget.n_graph, dtype=np.int32), n_node_all)
    glob["lattice"][n_real:] = np.eye(3, dtype=glob["lattice"].dtype)  # lattice inverses stay finite
    glob["index"] = np.full(budget.n_graph, -1, np.int32)
    glob["index"][:len(index)] = index
    return jraph.GraphsTuple(nodes=nodes, edges=edges, globals=glob, senders=senders, receivers=receivers,
                             n_node=n_node_all, n_edge=n_edge_all)


def pad_graphs(graphs: Sequence[jraph.GraphsTuple], budget: Budget, first_index: int = 0,
               positions: Sequence[int] | None = None, template: jraph.GraphsTuple | None = None
               ) -> jraph.GraphsTuple:
    """Concatenates single-crystal graphs and pads them to `budget` with `jraph` padding.

    globals["index"] is each graph's position in the global batch: `positions` if given, else
    `first_index`, `first_index + 1`, ... (-1 on padding graphs). An empty list gives an
    all-padding batch with the fields (and dtypes) of `template`, a graph of the same dataset
    (default: this module's layout, unmerged).

    The layout is that of `jraph.batch_np` + `jraph.pad_with_graphs` (tested against them),
    written as one concatenation per field: those two walk every graph's every field in Python,
    which made them ~80% of the host's batching time (tests/test_batching.py).
    """
    n_graph = len(graphs)
    if not graphs:  # an empty device share (last partial batch on many devices)
        if template is None:
            template = jraph.GraphsTuple(
                nodes={"species": np.zeros(0, np.int32), "positions": np.zeros((0, 3), np.float32),
                       "graph": np.zeros(0, np.int32), "mask": np.zeros(0, bool), "count": np.zeros(0, np.int32)},
                edges={"images": np.zeros((0, 3), np.int32), "mask": np.zeros(0, bool),
                       "count": np.zeros(0, np.int32), "net": np.zeros(0, np.int32)},
                senders=np.zeros(0, np.int32), receivers=np.zeros(0, np.int32),
                globals={"lattice": np.zeros((0, 3, 3), np.float32), "target": np.zeros(0, np.float32),
                         "index": np.zeros(0, np.int32), "mask": np.zeros(0, bool)},
                n_node=np.zeros(0, np.int32), n_edge=np.zeros(0, np.int32))
        graphs = [jraph.GraphsTuple(*(None if x is None else {k: v[:0] for k, v in x.items()} if isinstance(x, dict)
                                      else np.asarray(x)[:0] for x in template))]
    n_node_g = np.concatenate([g.n_node for g in graphs]).astype(np.int32)
    n_edge_g = np.concatenate([g.n_edge for g in graphs]).astype(np.int32)
    n_node, n_edge = int(n_node_g.sum()), int(n_edge_g.sum())
    n_real_graphs = n_node_g.size
    _check_fits(n_real_graphs, n_node, n_edge, budget)
    # each GraphsTuple's first node index in the batch, repeated over its edges
    if len(graphs) == n_real_graphs:  # single-crystal GraphsTuples (the batchers' case)
        node_sizes, edge_sizes = n_node_g, n_edge_g
    else:
        node_sizes = np.array([int(np.sum(g.n_node)) for g in graphs])
        edge_sizes = np.array([int(np.sum(g.n_edge)) for g in graphs])
    node_offsets = np.cumsum(node_sizes) - node_sizes
    edge_offsets = np.repeat(node_offsets, edge_sizes).astype(np.int32)
    loops = spread_padding_loops(n_node, budget.n_node, n_edge, budget.n_edge)
    senders = np.concatenate([np.concatenate([g.senders for g in graphs]).astype(np.int32) + edge_offsets, loops])
    receivers = np.concatenate([np.concatenate([g.receivers for g in graphs]).astype(np.int32) + edge_offsets, loops])
    nodes = {k: _concat_padded([g.nodes[k] for g in graphs], n_node, budget.n_node) for k in graphs[0].nodes}
    edges = {k: _concat_padded([g.edges[k] for g in graphs], n_edge, budget.n_edge) for k in graphs[0].edges}
    if "source" in edges:  # node indices, like the senders
        edges["source"][:n_edge] += edge_offsets
        edges["source"][n_edge:] = loops
    glob = {k: _concat_padded([g.globals[k] for g in graphs], n_real_graphs, budget.n_graph) for k in graphs[0].globals}
    index = np.arange(first_index, first_index + n_graph) if positions is None else np.asarray(positions, np.int32)
    return _padded_graphs_tuple(nodes, edges, glob, senders, receivers, n_node_g, n_edge_g, budget, index)


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]), without the loop."""
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths  # where each range starts in the output
    return np.arange(total, dtype=np.int64) + np.repeat(starts - first, lengths)


class PackedGraphs(Sequence):
    """Single-crystal GraphsTuples stored as one array per field (crystals one after another).

    Padding a batch is then one gather per field (`pad_shares`), instead of concatenating a
    few hundred small arrays per field: 3-4x less host time per batch
    (scripts/results/bench_batching.json), and (what mattered on a GPU) that much less time the
    batching thread holds the GIL that the training loop's copies and dispatch wait for.
    Indexing gives each crystal's GraphsTuple as read-only views into the packed arrays, so the
    packed copy replaces the per-crystal arrays rather than doubling them. Each table ends with
    one zero row after the last crystal's: the source of padding rows (`pad_shares`).
    """

    def __init__(self, graphs: Sequence[jraph.GraphsTuple]):
        if not graphs:
            raise ValueError("no graphs to pack")
        first = graphs[0]
        self.n_node = np.array([int(np.sum(g.n_node)) for g in graphs], np.int64)
        self.n_edge = np.array([int(np.sum(g.n_edge)) for g in graphs], np.int64)
        if any(np.size(g.n_node) != 1 for g in graphs):
            raise ValueError("PackedGraphs holds single-crystal GraphsTuples (n_node of length 1)")
        for i, g in enumerate(graphs):
            for part in ("nodes", "edges", "globals"):
                if set(getattr(g, part)) != set(getattr(first, part)):
                    raise ValueError(f"graph {i} has {part} fields {sorted(getattr(g, part))}, graph 0 "
                                     f"{sorted(getattr(first, part))}: one dataset, one layout")
        self.node_start = np.cumsum(self.n_node) - self.n_node
        self.edge_start = np.cumsum(self.n_edge) - self.n_edge
        # the zero rows' indices in the node, edge and graph tables
        self._zero_rows = int(self.n_node.sum()), int(self.n_edge.sum()), len(graphs)

        def cat(get):  # every crystal's rows, then one zero row: the source of every padding row (`pad_shares`)
            parts = [np.asarray(get(g)) for g in graphs]
            return np.concatenate(parts + [np.zeros((1,) + parts[0].shape[1:], parts[0].dtype)])

        self.nodes = {k: cat(lambda g: g.nodes[k]) for k in first.nodes}
        self.edges = {k: cat(lambda g: g.edges[k]) for k in first.edges}
        self.globals = {k: cat(lambda g: g.globals[k]) for k in first.globals}
        self.senders, self.receivers = cat(lambda g: g.senders), cat(lambda g: g.receivers)
        # within each crystal, edges sorted by receiver (see graph_to_jraph): a drop only where a crystal starts
        drops = np.flatnonzero(np.diff(self.receivers[:-1]) < 0) + 1
        bad = drops[~np.isin(drops, self.edge_start)]
        if bad.size:
            i = int(np.searchsorted(self.edge_start, bad[0], side="right") - 1)
            raise ValueError(f"graph {i}: edges are not sorted by receiver (build graphs with "
                             "dpf_jax.data.graphs.build_crystal_graph and graph_to_jraph)")
        for a in (*self.nodes.values(), *self.edges.values(), *self.globals.values(), self.senders,
                  self.receivers, self.n_node, self.n_edge):
            a.flags.writeable = False  # shared by every view `__getitem__` hands out

    def __len__(self) -> int:
        return self.n_node.size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices; IndexError past the end
        ns, ne = slice(self.node_start[i], self.node_start[i] + self.n_node[i]), \
            slice(self.edge_start[i], self.edge_start[i] + self.n_edge[i])
        return jraph.GraphsTuple(
            nodes={k: v[ns] for k, v in self.nodes.items()}, edges={k: v[ne] for k, v in self.edges.items()},
            globals={k: v[i:i + 1] for k, v in self.globals.items()},
            senders=self.senders[ne], receivers=self.receivers[ne],
            n_node=self.n_node[i:i + 1].astype(np.int32), n_edge=self.n_edge[i:i + 1].astype(np.int32))

    def pad(self, indices: Sequence[int], budget: Budget, positions: Sequence[int] | None = None
            ) -> jraph.GraphsTuple:
        """`pad_graphs([self[i] for i in indices], budget, positions=positions)`, as gathers."""
        import jax  # tree utilities only; no device work

        idx = np.asarray(indices, np.int64).reshape(-1)
        batch = self.pad_shares([idx], budget, [np.arange(idx.size) if positions is None else positions])
        return jax.tree_util.tree_map(lambda x: x[0], batch)

    def pad_shares(self, shares: Sequence[Sequence[int]], budget: Budget, positions: Sequence[Sequence[int]]
                   ) -> jraph.GraphsTuple:
        """`stack_device_batches([self.pad(s, budget, p) for s, p in zip(shares, positions)])`,
        with one gather per field for all the shares together.

        Every destination row of the [devices, budget] arrays names its source row, and padding
        rows name the tables' zero row, so a gather writes real and padding rows at once: no
        per-share arrays, zero fills or stacking. The host's batching thread shares the GIL
        with the thread that queues the training steps, and on four GPUs that thread is the
        pipeline's limit (PERF_NOTES.md, session 23), so the per-call overhead counts.
        """
        idx = [np.asarray(s, np.int64).reshape(-1) for s in shares]
        D, (Nb, Eb, Gb) = len(idx), (budget.n_node, budget.n_edge, budget.n_graph)
        every = np.concatenate(idx)
        if every.size and (every.min() < -len(self) or every.max() >= len(self)):
            raise IndexError(f"crystal index out of range for {len(self)} crystals")
        every = np.where(every < 0, every + len(self), every)  # as numpy (and `self[i]`) index
        n_node_g, n_edge_g = self.n_node[every], self.n_edge[every]
        counts = np.array([i.size for i in idx])  # crystals per share
        share_of = np.repeat(np.arange(D), counts)  # each crystal's share
        n_node_s = np.bincount(share_of, n_node_g, D).astype(np.int64)
        n_edge_s = np.bincount(share_of, n_edge_g, D).astype(np.int64)
        for d in range(D):
            _check_fits(int(counts[d]), int(n_node_s[d]), int(n_edge_s[d]), budget)
        # destination rows (flat over [D, budget]) of every real node / edge, and their sources
        zero_node, zero_edge, zero_graph = self._zero_rows
        node_src = np.full(D * Nb, zero_node, np.int64)
        edge_src = np.full(D * Eb, zero_edge, np.int64)
        graph_src = np.full(D * Gb, zero_graph, np.int64)
        node_src[_concat_ranges(np.arange(D) * Nb, n_node_s)] = _concat_ranges(self.node_start[every], n_node_g)
        real_edges = _concat_ranges(np.arange(D) * Eb, n_edge_s)
        edge_src[real_edges] = _concat_ranges(self.edge_start[every], n_edge_g)
        graph_src[_concat_ranges(np.arange(D) * Gb, counts)] = every
        # endpoints: crystal-local node index + the crystal's first node in its share; a padding
        # edge's local index is 0 (the zero row) + its self-loop's node
        first_node = np.cumsum(n_node_g) - n_node_g  # over all shares together ...
        first_node -= np.repeat(np.cumsum(n_node_s) - n_node_s, counts)  # ... then within each share
        shift = np.empty((D, Eb), np.int32)
        shift.reshape(-1)[real_edges] = np.repeat(first_node, n_edge_g)
        for d in range(D):
            shift[d, n_edge_s[d]:] = spread_padding_loops(int(n_node_s[d]), Nb, int(n_edge_s[d]), Eb)

        def take(table, src, rows):
            return np.take(table, src, axis=0).reshape((D, rows) + table.shape[1:])

        def endpoints(local):
            return take(local, edge_src, Eb).astype(np.int32) + shift

        # nodes["graph"] and globals["index"] are written below, not gathered
        nodes = {k: None if k == "graph" else take(v, node_src, Nb) for k, v in self.nodes.items()}
        edges = {k: endpoints(v) if k == "source" else take(v, edge_src, Eb)
                 for k, v in self.edges.items()}  # "source": node indices, like the senders
        glob = {k: None if k == "index" else take(v, graph_src, Gb) for k, v in self.globals.items()}
        # jraph's padding graphs: the first holds every padding node and edge, the others are empty
        n_node_all, n_edge_all = np.zeros((D, Gb), np.int32), np.zeros((D, Gb), np.int32)
        real_graphs = graph_src < zero_graph
        n_node_all.reshape(-1)[real_graphs] = n_node_g
        n_edge_all.reshape(-1)[real_graphs] = n_edge_g
        n_node_all[np.arange(D), counts] = Nb - n_node_s
        n_edge_all[np.arange(D), counts] = Eb - n_edge_s
        nodes["graph"] = np.tile(np.arange(Gb, dtype=np.int32), D).repeat(n_node_all.reshape(-1)).reshape(D, Nb)
        index = np.full((D, Gb), -1, np.int32)
        for d in range(D):
            glob["lattice"][d, counts[d]:] = np.eye(3, dtype=glob["lattice"].dtype)  # inverses stay finite
            index[d, :counts[d]] = positions[d]
        glob["index"] = index
        return jraph.GraphsTuple(nodes=nodes, edges=edges, globals=glob, senders=endpoints(self.senders),
                                 receivers=endpoints(self.receivers), n_node=n_node_all, n_edge=n_edge_all)


def stack_device_batches(batches: Sequence[jraph.GraphsTuple]) -> jraph.GraphsTuple:
    """Stacks equally padded per-device batches along a new leading device axis."""
    import jax  # tree utilities only; no device work

    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)


BUDGET_PLACEMENTS = ("cost", "quantile")  # train.budget_placement
# A padded node costs the step about as much as 1.5 padded edges (per node and layer ~1.34
# MFLOP of Dense layers and 9 gathered table rows; per edge ~0.95 MFLOP; MatformerConv's
# docstring): the weight of nodes in the padded size that the "cost" placement minimises.
NODE_COST_IN_EDGES = 1.5


def choose_budgets(
    n_nodes: np.ndarray,
    n_edges: np.ndarray,
    graphs_per_device: int,
    num_levels: int = 2,
    num_samples: int = 512,
    seed: int = 0,
    node_multiple: int = 64,
    edge_multiple: int = 512,
    num_devices: int = 1,
    placement: str = "cost",
) -> list[Budget]:
    """Picks up to `num_levels` padding budgets from random batches of this dataset.

    `num_samples` global batches are drawn and split as `balanced_split` splits them; the
    largest device share of each is what its budget must hold. The last level is the largest
    simulated share plus 5% (and always holds the biggest single crystal). The others:
    "cost" (default): chosen among the shares' joint (nodes, edges) quantiles so that the mean
    padded size (edges + `NODE_COST_IN_EDGES` x nodes) over the simulated batches is smallest
    (exact dynamic programming over the candidates); "quantile" (up to session 21): level k at
    the k/num_levels quantile. Padding waste of B=256 synthetic JARVIS-like batches with two
    levels: ~11% (quantile); more levels lower it further (four by cost: ~2-4%, eight: ~1-2%;
    README, padding).
    """
    if placement not in BUDGET_PLACEMENTS:
        raise ValueError(f"budget placement must be one of {BUDGET_PLACEMENTS}, got {placement!r}")
    if num_levels < 1:
        raise ValueError(f"need at least one padding budget level, got {num_levels}")
    n_nodes = np.asarray(n_nodes, np.int64)
    n_edges = np.asarray(n_edges, np.int64)
    if n_nodes.size == 0:
        raise ValueError("cannot choose padding budgets for an empty dataset")
    g = min(graphs_per_device * num_devices, n_nodes.size)
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(n_nodes.size, size=g, replace=False) for _ in range(num_samples)])
    if num_devices == 1:
        tot_n, tot_e = n_nodes[idx].sum(1), n_edges[idx].sum(1)
    else:
        shares = [[batch[pos] for pos in balanced_split(n_edges[batch], num_devices)] for batch in idx]
        tot_n = np.array([max(n_nodes[s].sum() for s in sh) for sh in shares])
        tot_e = np.array([max(n_edges[s].sum() for s in sh) for sh in shares])

    def budget(bn, be) -> Budget:
        # a single crystal must always fit alone
        bn = max(bn, n_nodes.max()) + 1
        be = max(be, n_edges.max())
        return Budget(_round_up(bn, node_multiple), _round_up(be, edge_multiple), graphs_per_device + 1)

    top = budget(tot_n.max() * 1.05, tot_e.max() * 1.05)
    if placement == "quantile":
        levels = [budget(np.quantile(tot_n, k / num_levels), np.quantile(tot_e, k / num_levels))
                  for k in range(1, num_levels)]
    else:
        levels = _cheapest_levels(tot_n, tot_e, top, num_levels - 1, budget)
    return sorted(set(levels) | {top})


def _cheapest_levels(tot_n: np.ndarray, tot_e: np.ndarray, top: Budget, count: int, budget) -> list[Budget]:
    """At most `count` budgets below `top` that minimise the mean padded cost of the simulated
    shares (`tot_n`, `tot_e`), each share padded to the smallest chosen budget holding it.

    Candidates are the shares' (nodes, edges) quantiles at the same q (rounded by `budget`),
    non-decreasing in both sizes, so "the first candidate holding a share" is one index per
    share and the choice is a 1-D bucketing (`cheapest_buckets`)."""
    if count < 1:
        return []
    cands = sorted({budget(np.quantile(tot_n, q), np.quantile(tot_e, q)) for q in np.linspace(0.02, 1.0, 50)})
    cands = [b for b in cands if b.n_node <= top.n_node and b.n_edge <= top.n_edge and b != top] + [top]
    cost = np.array([b.n_edge + NODE_COST_IN_EDGES * b.n_node for b in cands])
    fits = (tot_n[:, None] < np.array([b.n_node for b in cands])[None]) & \
        (tot_e[:, None] <= np.array([b.n_edge for b in cands])[None])
    first = np.argmax(fits, axis=1)  # the top holds every share
    return [cands[c] for c in cheapest_buckets(cost, first, count)]


def cheapest_buckets(cost: Sequence[float], first: Sequence[int], count: int) -> list[int]:
    """Indices c_1 < ... < c_m (m <= `count`, all below the last index, which is always taken)
    minimising sum over items i of cost[the smallest taken index >= first[i]]: `cost` of the
    candidates (non-decreasing), `first[i]` the first candidate item i fits in.

    Dynamic programming, O(count x K^2) for K candidates: best[c] = (least cost of the items with
    first <= c, taken indices) when c is the largest index taken so far."""
    cost = np.asarray(cost, np.float64)
    k = len(cost) - 1  # the last candidate holds every item and is always taken
    below = np.cumsum(np.bincount(np.asarray(first, np.int64), minlength=k + 1))  # items with first <= c
    total = int(below[-1])
    answer = (total * cost[k], [])  # the last candidate alone
    best = {c: (below[c] * cost[c], [c]) for c in range(k)}
    for taken in range(1, min(count, k) + 1):
        for c, (v, chosen) in best.items():
            if v + (total - below[c]) * cost[k] < answer[0]:
                answer = (v + (total - below[c]) * cost[k], chosen)
        if taken == count:
            break
        best = {c: min(((v + (below[c] - below[p]) * cost[c], chosen + [c]) for p, (v, chosen) in best.items()
                        if p < c), key=lambda t: t[0])
                for c in range(k) if any(p < c for p in best)}
    return answer[1]


def fit_budget(budgets: list[Budget], n_node: int, n_edge: int, n_graph: int) -> Budget:
    """The smallest budget holding a share of this size; a new one (logged) if none does."""
    for b in budgets:
        if n_node < b.n_node and n_edge <= b.n_edge and n_graph < b.n_graph:
            return b
    top = budgets[-1] if budgets else Budget(64, 512, n_graph + 1)
    new = Budget(
        max(top.n_node, _round_up((n_node + 1) * 1.25, 64)),
        max(top.n_edge, _round_up(n_edge * 1.25, 512)),
        max(top.n_graph, n_graph + 1),
    )
    log.warning("batch of %d nodes / %d edges exceeds every padding budget; adding %s "
                "(one more jit compilation)", n_node, n_edge, new)
    budgets.append(new)
    budgets.sort()
    return new


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """Contiguous, near-equal chunks (sizes differ by at most one)."""
    n = len(items)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(items[bounds[i]:bounds[i + 1]]) for i in range(parts)]


def balanced_split(weights: Sequence[float], parts: int) -> list[np.ndarray]:
    """Positions 0..n-1 split into `parts` shares of near-equal count (as `split_evenly`) and
    near-equal total weight: heaviest first, each to the lightest share with room left.

    Each device's share is padded to the budget of the largest share, so with plain contiguous
    chunks the padding grows with the device count (the largest of N small sums is further
    above their mean); balanced shares keep it near the one-device figure. Positions inside a
    share are sorted, and one share is the identity.
    """
    w = np.asarray(weights, np.float64)
    room = [len(c) for c in split_evenly(range(len(w)), parts)]
    order = np.argsort(-w, kind="stable")
    # a heap of (load, share) over the shares with room: the lightest, lowest-numbered first
    # (pure Python: ~1 ms for 1,024 crystals, on the host batching path)
    heap = [(0.0, d) for d in range(parts) if room[d]]
    out: list[list[int]] = [[] for _ in range(parts)]
    for pos, weight in zip(order.tolist(), w[order].tolist()):
        load, d = heapq.heappop(heap)
        out[d].append(pos)
        if len(out[d]) < room[d]:
            heapq.heappush(heap, (load + weight, d))
    return [np.sort(np.asarray(o, np.int64)) for o in out]


class GraphBatcher:
    """Turns a list of single-crystal GraphsTuples into padded, device-stacked batches.

    Each global batch holds `batch_size` crystals split over `num_devices` shares of near-equal
    count and (with `balance`, the default) near-equal edge count (`balanced_split`); each
    share is padded to the same budget, so the result has a leading axis of `num_devices`.
    Every crystal keeps its position in the global batch in globals["index"] (perturbation
    noise and prediction order depend on it, never on the device that got the crystal).
    """

    def __init__(self, graphs: Sequence[jraph.GraphsTuple], batch_size: int, num_devices: int = 1,
                 budgets: list[Budget] | None = None, num_levels: int = 2, seed: int = 0,
                 balance: bool = True, budget_placement: str = "cost"):
        if batch_size % num_devices:
            raise ValueError(f"batch size {batch_size} is not divisible by {num_devices} devices")
        if not graphs:
            raise ValueError("no graphs to batch")
        self.graphs = graphs if isinstance(graphs, PackedGraphs) else PackedGraphs(graphs)
        self.batch_size = batch_size
        self.num_devices = num_devices
        self.per_device = batch_size // num_devices
        self.n_node, self.n_edge = self.graphs.n_node, self.graphs.n_edge
        self.balance = bool(balance)
        self.budgets = list(budgets) if budgets else choose_budgets(
            self.n_node, self.n_edge, self.per_device, num_levels=num_levels, seed=seed,
            num_devices=num_devices if self.balance else 1, placement=budget_placement)

    def __len__(self) -> int:
        return len(self.graphs)

    def num_batches(self, drop_remainder: bool = False) -> int:
        n = len(self.graphs)
        return n // self.batch_size if drop_remainder else -(-n // self.batch_size)

    def epoch_order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        """The crystal order of one epoch: a pure function of (seed, epoch)."""
        order = np.arange(len(self.graphs))
        if shuffle:
            np.random.default_rng([seed, epoch]).shuffle(order)
        return order

    def share_positions(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Positions (in `indices`, the global batch) of each device's crystals."""
        if self.balance and self.num_devices > 1:
            return balanced_split(self.n_edge[np.asarray(indices, np.int64)], self.num_devices)
        return [np.asarray(c, np.int64) for c in split_evenly(range(len(indices)), self.num_devices)]

    def shares(self, indices: Sequence[int]) -> list[list[int]]:
        """The crystals (dataset indices) of each device's share of this global batch."""
        indices = np.asarray(indices, np.int64)
        return [indices[p].tolist() for p in self.share_positions(indices)]

    def share_budget(self, shares: Sequence[Sequence[int]]) -> Budget:
        """The padding budget that holds the largest of these device shares."""
        return fit_budget(self.budgets, max(int(self.n_node[s].sum()) for s in shares),
                          max(int(self.n_edge[s].sum()) for s in shares), max(len(s) for s in shares))

    def pad_share(self, share: Sequence[int], budget: Budget, positions: Sequence[int]) -> jraph.GraphsTuple:
        """One device's padded share: crystals `share` at global-batch `positions` (subclasses
        add fields, e.g. denoising targets)."""
        return self.graphs.pad(share, budget, positions)

    def make_batch(self, indices: Sequence[int], budget: Budget | None = None) -> jraph.GraphsTuple:
        """The padded batch of these crystals (to `budget` if given, else the smallest fitting)."""
        indices = np.asarray(indices, np.int64)
        positions = self.share_positions(indices)
        shares = [indices[p].tolist() for p in positions]
        budget = budget or self.share_budget(shares)
        # the shares' fields as one gather each, unless the class pads shares its own way
        # (an override on an instance, which nothing does, would be missed)
        if type(self).pad_share is _PLAIN_PAD_SHARE:
            return self.graphs.pad_shares(shares, budget, positions)
        return stack_device_batches([self.pad_share(s, budget, p) for s, p in zip(shares, positions)])

    def iterate(self, seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_remainder: bool = False,
                start_batch: int = 0) -> Iterator[jraph.GraphsTuple]:
        """Batches of one epoch, starting at batch `start_batch` (for exact resumption)."""
        order = self.epoch_order(seed, epoch, shuffle)
        for b in range(start_batch, self.num_batches(drop_remainder)):
            yield self.make_batch(order[b * self.batch_size:(b + 1) * self.batch_size])

    def padding_waste(self, seed: int = 0, epochs: int = 1) -> dict:
        """Fraction of padded node and edge slots over the first `epochs` shuffled epochs (one
        epoch of a small set is few batches; many give the expected padding), and how many of
        the budgets (padded shapes, one compilation each) their batches use (for benchmarks and logs)."""
        real_n = real_e = tot_n = tot_e = 0
        used = set()
        for epoch in range(epochs):
            order = self.epoch_order(seed, epoch, True)
            for b in range(self.num_batches()):
                idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                budget = self.share_budget(self.shares(idx))
                used.add(budget)
                real_n += int(self.n_node[idx].sum())
                real_e += int(self.n_edge[idx].sum())
                tot_n += budget.n_node * self.num_devices
                tot_e += budget.n_edge * self.num_devices
        return {"node_padding": 1 - real_n / tot_n, "edge_padding": 1 - real_e / tot_e, "budgets_used": len(used)}


# GraphBatcher's own pad_share, as defined: a batcher whose class pads shares another way (a
# subclass adding fields, or a benchmark patching the class) takes the per-share path
_PLAIN_PAD_SHARE = GraphBatcher.pad_share


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Runs `iterator` on a background thread, keeping up to `size` items ready.

    Exceptions raised by the producer are re-raised in the consumer.
    """
    q: queue.Queue = queue.Queue(maxsize=size)
    sentinel = object()
    stop = threading.Event()

    def put(item) -> bool:
        """Queue `item` unless the consumer has stopped (then False): never blocks for good."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def producer():
        try:
            for item in iterator:
                if not put(item):
                    return
            put(sentinel)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # drop what is queued (device batches, with prefetch_to_device) and let the thread end
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
