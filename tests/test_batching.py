"""Padded batches: jraph calls we rely on, budgets, masks, device shares, order, prefetch."""

import itertools

import jraph
import numpy as np
import pytest

from conftest import DATA
from dpf_jax.data.batching import (NODE_COST_IN_EDGES, Budget, GraphBatcher, PackedGraphs, balanced_split,
                                   cheapest_buckets, choose_budgets, fit_budget, graph_to_jraph, pad_graphs, prefetch,
                                   split_evenly, spread_padding_loops)
from dpf_jax.data.graphs import build_crystal_graph
from dpf_jax.data.readers import load_dataset_records


@pytest.fixture(scope="module")
def jarvis_graphs():
    records = load_dataset_records(DATA / "jarvis_dft3d.jsonl.gz").records[:120]
    graphs = [build_crystal_graph(r) for r in records]
    return [graph_to_jraph(g, r.targets["formation_energy_peratom"]) for g, r in zip(graphs, records)]


def test_jraph_batch_and_pad_work_on_this_jax(jarvis_graphs):
    """The jraph functions we use (batch_np, pad_with_graphs, padding masks) on current JAX."""
    gs = jarvis_graphs[:5]
    batch = jraph.batch_np(gs)
    n, e = int(batch.n_node.sum()), int(batch.n_edge.sum())
    padded = jraph.pad_with_graphs(batch, n + 7, e + 11, 8)
    assert padded.n_node.shape == (8,) and int(padded.n_node.sum()) == n + 7
    mask = np.asarray(jraph.get_graph_padding_mask(padded))
    np.testing.assert_array_equal(mask, [True] * 5 + [False] * 3)
    node_mask = np.asarray(jraph.get_node_padding_mask(padded))
    assert node_mask.sum() == n and not node_mask[n:].any()


def test_pad_graphs_layout(jarvis_graphs):
    gs = jarvis_graphs[:4]
    n = sum(int(g.n_node[0]) for g in gs)
    e = sum(int(g.n_edge[0]) for g in gs)
    b = pad_graphs(gs, Budget(n + 5, e + 100, 7), first_index=10)
    assert b.nodes["mask"].sum() == n and b.edges["mask"].sum() == e and b.globals["mask"].sum() == 4
    # masks agree with jraph's own
    np.testing.assert_array_equal(b.nodes["mask"], np.asarray(jraph.get_node_padding_mask(b)))
    np.testing.assert_array_equal(b.edges["mask"], np.asarray(jraph.get_edge_padding_mask(b)))
    # node -> graph index matches n_node; edges stay within their own graph and sorted
    np.testing.assert_array_equal(np.bincount(b.nodes["graph"], minlength=7), b.n_node)
    assert np.all(np.diff(b.receivers) >= 0)
    real = b.edges["mask"]
    assert np.all(b.nodes["graph"][b.senders[real]] == b.nodes["graph"][b.receivers[real]])
    # padding graphs get an identity lattice, indices -1; real ones their position in the batch
    np.testing.assert_array_equal(b.globals["lattice"][4:], np.broadcast_to(np.eye(3), (3, 3, 3)))
    np.testing.assert_array_equal(b.globals["index"], [10, 11, 12, 13, -1, -1, -1])
    np.testing.assert_allclose(b.globals["target"][:4], [g.globals["target"][0] for g in gs])
    # padding edges: self-loops on the padding nodes (all in the padding graph), 100 over 5
    # nodes = 20 each, so no node takes all the padding updates of a scatter-add
    pad = ~real
    assert np.all(b.senders[pad] == b.receivers[pad]) and np.all(b.receivers[pad] >= n)
    np.testing.assert_array_equal(np.bincount(b.receivers[pad] - n), [20] * 5)
    assert np.all(b.nodes["graph"][b.receivers[pad]] == 4)
    # uneven counts: the sizes differ by at most one
    loops = spread_padding_loops(10, 13, 50, 57)
    assert np.all(np.diff(loops) >= 0) and sorted(np.bincount(loops - 10)) == [2, 2, 3]
    assert len(spread_padding_loops(10, 13, 50, 50)) == 0


def _pad_graphs_with_jraph(graphs, budget, positions):
    """The layout spelled with `jraph.batch_np` + `jraph.pad_with_graphs` and the same fixes
    (how `pad_graphs` was written before it concatenated each field at once)."""
    batch = jraph.batch_np(list(graphs))
    n_node, n_edge = int(batch.n_node.sum()), int(batch.n_edge.sum())
    padded = jraph.pad_with_graphs(batch, budget.n_node, budget.n_edge, budget.n_graph)
    lattice = padded.globals["lattice"].copy()
    lattice[len(graphs):] = np.eye(3)
    index = np.full(budget.n_graph, -1, np.int32)
    index[:len(graphs)] = positions
    loops = spread_padding_loops(n_node, budget.n_node, n_edge, budget.n_edge)
    edges = padded.edges
    if "source" in edges:  # an index field ("atoms" merging): offset like the senders, padding loops
        offsets = np.repeat(np.cumsum(batch.n_node) - batch.n_node, batch.n_edge)
        edges = {**edges, "source": np.concatenate([edges["source"][:n_edge] + offsets, loops]).astype(np.int32)}
    return padded._replace(
        edges=edges,
        nodes={**padded.nodes, "graph": np.repeat(np.arange(budget.n_graph, dtype=np.int32), padded.n_node)},
        globals={**padded.globals, "lattice": lattice, "index": index},
        senders=np.concatenate([padded.senders[:n_edge], loops]), receivers=np.concatenate([padded.receivers[:n_edge],
                                                                                           loops]))


@pytest.mark.parametrize("merge", ["none", "distance", "atoms"])
def test_pad_graphs_equals_jraph_batch_and_pad(jarvis_graphs, merge):
    """Field by field, dtype included, the same batch as jraph's batch_np + pad_with_graphs, for
    shares of 1 to 60 crystals (merged graphs: their count / net fields too)."""
    from dpf_jax.data.graphs import merge_equivalent_edges
    from dpf_jax.data.readers import load_dataset_records

    gs = jarvis_graphs
    if merge != "none":
        records = load_dataset_records(DATA / "jarvis_dft3d.jsonl.gz").records[:60]
        gs = [graph_to_jraph(merge_equivalent_edges(build_crystal_graph(r), merge)) for r in records]
        assert any(int(g.edges["count"].max()) > 1 for g in gs)
        assert merge != "atoms" or any(int(g.nodes["count"].max()) > 1 for g in gs)
    rng = np.random.default_rng(0)
    for size in (1, 7, 60):
        share = [gs[i] for i in rng.choice(len(gs), size, replace=False)]
        n = sum(int(g.n_node[0]) for g in share)
        e = sum(int(g.n_edge[0]) for g in share)
        budget = Budget(n + 9, e + 77, size + 3)
        positions = rng.permutation(size).astype(np.int32)
        ours = pad_graphs(share, budget, positions=positions)
        ref = _pad_graphs_with_jraph(share, budget, positions)
        flat_ours, tree_ours = jax_tree_flatten(ours)
        flat_ref, tree_ref = jax_tree_flatten(ref)
        assert tree_ours == tree_ref
        for a, b in zip(flat_ours, flat_ref):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype or (a.dtype.kind == b.dtype.kind == "i"), (a.dtype, b.dtype)
    empty = pad_graphs([], Budget(4, 8, 2))
    assert empty.nodes["mask"].sum() == 0 and empty.edges["count"].sum() == 0 and list(empty.n_node) == [4, 0]


@pytest.mark.parametrize("merge", ["none", "distance", "atoms"])
def test_packed_graphs_pad_equals_pad_graphs(jarvis_graphs, merge):
    """The batchers' gather path (PackedGraphs.pad) gives pad_graphs' batch exactly, field by
    field and dtype by dtype, for every layout; indexing gives back each crystal's arrays."""
    from dpf_jax.data.graphs import merge_equivalent_edges

    gs = jarvis_graphs
    if merge != "none":
        records = load_dataset_records(DATA / "jarvis_dft3d.jsonl.gz").records[:60]
        gs = [graph_to_jraph(merge_equivalent_edges(build_crystal_graph(r), merge)) for r in records]
    packed = PackedGraphs(gs)
    assert len(packed) == len(gs)
    for i in (0, 5, len(gs) - 1, -1):  # views, equal to the graphs packed
        for a, b in zip(jax_tree_flatten(packed[i])[0], jax_tree_flatten(gs[i])[0]):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
    with pytest.raises(IndexError):
        packed[len(gs)]
    with pytest.raises(ValueError, match="read-only"):  # a view written to would change the dataset
        packed[0].nodes["positions"][0, 0] = 1.0
    rng = np.random.default_rng(1)
    for size in (0, 1, 7, 60):
        idx = rng.choice(len(gs), size, replace=False)
        n = int(sum(int(gs[i].n_node[0]) for i in idx))
        e = int(sum(int(gs[i].n_edge[0]) for i in idx))
        budget = Budget(n + 9, e + 77, size + 3)
        positions = rng.permutation(size).astype(np.int32)
        ours = packed.pad(idx, budget, positions)
        ref = pad_graphs([gs[i] for i in idx], budget, positions=positions, template=gs[0])
        assert_same_batch(ours, ref)
    with pytest.raises(ValueError, match="exceeds"):
        packed.pad([0, 1], Budget(3, 10, 6))
    with pytest.raises(ValueError, match="one layout"):
        PackedGraphs([gs[0], gs[0]._replace(edges={**gs[0].edges, "extra": gs[0].edges["mask"]})])


@pytest.mark.parametrize("merge", ["none", "atoms"])
def test_pad_shares_equals_stacked_pad_graphs(jarvis_graphs, merge, monkeypatch):
    """All device shares padded in one gather per field (PackedGraphs.pad_shares, what
    GraphBatcher.make_batch runs) give the stack of pad_graphs' per-share batches exactly: shares
    of different sizes, an empty share (the last partial batch on many devices), merged layouts
    with per-edge counts and "source" indices."""
    from dpf_jax.data.batching import stack_device_batches
    from dpf_jax.data.graphs import merge_equivalent_edges

    gs = jarvis_graphs
    if merge != "none":
        records = load_dataset_records(DATA / "jarvis_dft3d.jsonl.gz").records[:60]
        gs = [graph_to_jraph(merge_equivalent_edges(build_crystal_graph(r), merge)) for r in records]
    packed = PackedGraphs(gs)
    rng = np.random.default_rng(3)
    for sizes in ((5, 7, 0, 6), (1,), (9, 9)):
        chosen = rng.choice(len(gs), sum(sizes), replace=False)
        shares = np.split(chosen, np.cumsum(sizes)[:-1])
        positions = np.split(rng.permutation(sum(sizes)).astype(np.int32), np.cumsum(sizes)[:-1])
        n = max(int(packed.n_node[s].sum()) for s in shares)
        e = max(int(packed.n_edge[s].sum()) for s in shares)
        budget = Budget(n + 5, e + 40, max(sizes) + 2)
        ours = packed.pad_shares(shares, budget, positions)
        ref = stack_device_batches([pad_graphs([gs[i] for i in s], budget, positions=p, template=gs[0])
                                    for s, p in zip(shares, positions)])
        assert_same_batch(ours, ref)
    with pytest.raises(ValueError, match="exceeds"):
        packed.pad_shares([[0], [1, 2]], Budget(int(packed.n_node[[1, 2]].sum()), 10**6, 8), [[0], [1, 2]])
    # the batcher takes this path; a subclass that adds fields per share keeps the per-share one
    batcher = GraphBatcher(gs, batch_size=24, num_devices=4, seed=0)
    idx = batcher.epoch_order(0, 0, True)[:24]

    class PerShare(GraphBatcher):
        def pad_share(self, share, budget, positions):
            return super().pad_share(share, budget, positions)

    slow = PerShare(gs, batch_size=24, num_devices=4, budgets=batcher.budgets)
    calls = []
    original = PackedGraphs.pad_shares

    def counting(self, *args):
        calls.append(len(args[0]))
        return original(self, *args)

    monkeypatch.setattr(PackedGraphs, "pad_shares", counting)
    fast_batch, slow_batch = batcher.make_batch(idx), slow.make_batch(idx)
    assert calls == [4, 1, 1, 1, 1]  # four shares at once, then one by one
    assert_same_batch(fast_batch, slow_batch)
    # negative indices count from the end, as for `packed[i]`; out of range is an error
    small = Budget(int(packed.n_node[-1]) + 2, int(packed.n_edge[-1]) + 8, 3)
    assert_same_batch(packed.pad([-1], small), pad_graphs([gs[-1]], small, template=gs[0]))
    with pytest.raises(IndexError):
        packed.pad([len(gs)], budget)


def assert_same_batch(ours, ref):
    """Same tree, and every array equal with the same dtype."""
    flat_ours, tree_ours = jax_tree_flatten(ours)
    flat_ref, tree_ref = jax_tree_flatten(ref)
    assert tree_ours == tree_ref
    for a, b in zip(flat_ours, flat_ref):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype, (a.dtype, b.dtype)


def jax_tree_flatten(tree):
    import jax

    return jax.tree_util.tree_flatten(tree)


def test_budget_too_small_is_an_error(jarvis_graphs):
    with pytest.raises(ValueError, match="exceeds"):
        pad_graphs(jarvis_graphs[:4], Budget(3, 10, 6))


def test_budgets_fit_every_batch_and_grow_for_outliers(jarvis_graphs):
    n_node = np.array([int(g.n_node[0]) for g in jarvis_graphs])
    n_edge = np.array([int(g.n_edge[0]) for g in jarvis_graphs])
    budgets = choose_budgets(n_node, n_edge, graphs_per_device=16, num_levels=3)
    assert 1 <= len(budgets) <= 3 and all(b.n_graph == 17 for b in budgets)
    # the biggest single crystal always fits one budget
    assert budgets[-1].n_node > n_node.max() and budgets[-1].n_edge >= n_edge.max()
    # a share larger than every budget gets a new, larger one instead of being dropped
    top = budgets[-1]
    big = fit_budget(budgets, top.n_node * 3, top.n_edge * 3, 16)
    assert big.n_node > top.n_node * 3 and big.n_edge >= top.n_edge * 3 and big in budgets


def test_cheapest_buckets_match_brute_force():
    """The budget levels' dynamic programme against every choice of levels, on random costs."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(1, 9))
        cost, first = np.sort(rng.uniform(1, 10, k)), rng.integers(0, k, int(rng.integers(1, 40)))
        count = int(rng.integers(1, 4))

        def total(chosen):
            taken = sorted(chosen) + [k - 1]
            return sum(cost[min(t for t in taken if t >= f)] for f in first)

        got = cheapest_buckets(cost, first, count)
        assert len(got) <= count and all(0 <= c < k - 1 for c in got) and got == sorted(set(got))
        brute = min(total(c) for m in range(count + 1) for c in itertools.combinations(range(k - 1), m))
        assert total(got) == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_cost_placed_budgets_pad_real_batches_less_than_quantiles(jarvis_graphs, levels):
    """train.budget_placement="cost" against the quantile levels (the placement up to session 21),
    on batches drawn with another seed than the budgets were: every batch fits, and the padded
    size (edges + NODE_COST_IN_EDGES x nodes) is smaller on average."""
    n_node = np.array([int(g.n_node[0]) for g in jarvis_graphs])
    n_edge = np.array([int(g.n_edge[0]) for g in jarvis_graphs])
    rng = np.random.default_rng(123)
    batches = [rng.choice(len(n_node), size=16, replace=False) for _ in range(2000)]

    def mean_padded(budgets):
        count = len(budgets)  # fit_budget adds a budget for a batch that fits none: none may
        sizes = [fit_budget(budgets, int(n_node[b].sum()), int(n_edge[b].sum()), 16) for b in batches]
        assert len(budgets) == count
        return np.mean([b.n_edge + NODE_COST_IN_EDGES * b.n_node for b in sizes])

    # finer rounding than the batcher's (64 nodes, 512 edges), which would merge levels this small
    kw = dict(graphs_per_device=16, num_levels=levels, node_multiple=8, edge_multiple=64)
    cost, quantile = choose_budgets(n_node, n_edge, **kw), choose_budgets(n_node, n_edge, placement="quantile", **kw)
    assert 1 <= len(cost) <= levels
    assert mean_padded(cost) < mean_padded(quantile), (cost, quantile)
    with pytest.raises(ValueError, match="budget placement must be one of"):
        choose_budgets(n_node, n_edge, graphs_per_device=8, placement="median")


def test_batcher_covers_every_crystal_once_per_epoch_on_4_devices(jarvis_graphs):
    batcher = GraphBatcher(jarvis_graphs, batch_size=32, num_devices=4, seed=3)
    seen = []
    for b in batcher.iterate(seed=3, epoch=1, shuffle=True):
        assert b.nodes["species"].shape[0] == 4  # leading device axis
        for d in range(4):
            m = b.globals["mask"][d]
            seen.extend(b.globals["target"][d][m].tolist())
    assert len(seen) == len(jarvis_graphs)  # the last partial batch is kept
    np.testing.assert_allclose(sorted(seen), sorted(float(g.globals["target"][0]) for g in jarvis_graphs))


def test_epoch_order_is_a_pure_function_of_seed_and_epoch(jarvis_graphs):
    b = GraphBatcher(jarvis_graphs, batch_size=16)
    np.testing.assert_array_equal(b.epoch_order(7, 2, True), b.epoch_order(7, 2, True))
    assert not np.array_equal(b.epoch_order(7, 2, True), b.epoch_order(7, 3, True))
    # resuming at batch k gives the same batches as the uninterrupted epoch from k on
    full = list(b.iterate(seed=7, epoch=2))
    resumed = list(b.iterate(seed=7, epoch=2, start_batch=3))
    for x, y in zip(full[3:], resumed):
        np.testing.assert_array_equal(x.nodes["positions"], y.nodes["positions"])


def test_balanced_split_against_brute_force():
    """Every position once, share sizes as split_evenly's, and the largest share within one
    crystal of the best equal-count split (brute force over all splits of 8 into 4+4)."""
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(20):
        w = rng.integers(5, 400, size=8)
        shares = balanced_split(w, 2)
        assert sorted(np.concatenate(shares).tolist()) == list(range(8))
        assert [len(s) for s in shares] == [4, 4] and all((np.diff(s) > 0).all() for s in shares)
        best = min(max(w[list(c)].sum(), w.sum() - w[list(c)].sum()) for c in itertools.combinations(range(8), 4))
        assert best <= max(w[s].sum() for s in shares) <= best + w.max()
    # uneven counts and more parts than items
    assert [len(s) for s in balanced_split(np.ones(10), 4)] == [len(c) for c in split_evenly(range(10), 4)]
    assert sum(len(s) for s in balanced_split([3.0, 1.0], 4)) == 2
    np.testing.assert_array_equal(balanced_split([5, 1, 9], 1)[0], [0, 1, 2])  # one share: identity


def test_balanced_shares_pad_less_and_keep_global_positions(jarvis_graphs):
    """On real crystals, 4 balanced shares need a smaller budget than 4 contiguous ones, and
    each crystal keeps its global-batch position in globals["index"] (noise and prediction
    order depend on it), whichever device gets it."""
    kw = dict(batch_size=32, num_devices=4, seed=0)
    balanced, plain = GraphBatcher(jarvis_graphs, **kw), GraphBatcher(jarvis_graphs, balance=False, **kw)
    assert balanced.padding_waste()["edge_padding"] < plain.padding_waste()["edge_padding"]
    order = balanced.epoch_order(1, 0, True)
    big = lambda sh: max(int(balanced.n_edge[s].sum()) for s in sh)  # noqa: E731 - largest share's edges
    largest = {"balanced": 0, "contiguous": 0}
    for b in range(balanced.num_batches()):
        idx = order[b * 32:(b + 1) * 32]
        largest["balanced"] += big(balanced.shares(idx))
        largest["contiguous"] += big(split_evenly(list(idx), 4))
        batch = balanced.make_batch(idx)
        for d in range(4):
            m = batch.globals["mask"][d]
            pos = batch.globals["index"][d][m]
            np.testing.assert_allclose(batch.globals["target"][d][m],
                                       [float(jarvis_graphs[i].globals["target"][0]) for i in idx[pos]])
    assert largest["balanced"] < largest["contiguous"]  # over the epoch (greedy is not optimal per batch)
    # one device: the batch is the crystals in order, as without balancing
    one = GraphBatcher(jarvis_graphs, batch_size=32, seed=0).make_batch(order[:32])
    np.testing.assert_array_equal(one.globals["index"][0][:32], np.arange(32))


@pytest.mark.parametrize("num_devices", [1, 2])
def test_padding_waste_over_epochs_counts_the_padded_slots_of_the_batches(jarvis_graphs, num_devices):
    """padding_waste(seed, epochs) is the padded share of the node and edge slots of exactly the
    batches `iterate` makes in those epochs, counted here from the batches themselves."""
    batcher = GraphBatcher(jarvis_graphs, batch_size=16, num_devices=num_devices, seed=0, num_levels=3)
    slots = real = np.zeros(2)
    for epoch in range(3):
        for batch in batcher.iterate(seed=5, epoch=epoch):
            counts = np.stack([np.asarray(batch.n_node), np.asarray(batch.n_edge)])  # [2, (devices,) graphs]
            mask = np.asarray(batch.globals["mask"]) > 0
            slots = slots + counts.reshape(2, -1).sum(1)
            real = real + (counts * mask).reshape(2, -1).sum(1)
    waste = batcher.padding_waste(seed=5, epochs=3)
    np.testing.assert_allclose([waste["node_padding"], waste["edge_padding"]], 1 - real / slots, rtol=1e-12)
    assert waste != batcher.padding_waste(seed=5, epochs=1)  # other epochs, other batches


def test_split_evenly():
    assert sorted(len(p) for p in split_evenly(list(range(10)), 4)) == [2, 2, 3, 3]
    assert sum(split_evenly(list(range(10)), 4), []) == list(range(10))
    assert sum(split_evenly(list(range(3)), 4), []) == [0, 1, 2]


def test_prefetch_passes_items_and_errors():
    assert list(prefetch(iter(range(5)), 2)) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise RuntimeError("bad record")

    with pytest.raises(RuntimeError, match="bad record"):
        list(prefetch(broken(), 2))


@pytest.mark.parametrize("n_items", [3, 1000])
def test_prefetch_thread_ends_when_the_consumer_stops_early(n_items):
    """Stopping after one item ends the producer thread, whether the source is exhausted while
    the queue is full (the sentinel cannot be queued) or still has items."""
    import threading

    import time

    before = threading.active_count()
    it = prefetch(iter(range(n_items)), 2)
    assert next(it) == 0
    time.sleep(0.2)  # the producer fills the queue (3 items: then waits to queue the end marker)
    it.close()
    assert threading.active_count() == before

    def failing():
        yield 0
        yield 1
        yield 2
        raise RuntimeError("never seen: the consumer stopped first")

    it = prefetch(failing(), 2)
    next(it)
    time.sleep(0.2)
    it.close()
    assert threading.active_count() == before


def test_edges_not_sorted_by_receiver_are_refused():
    """The model sums each receiver's edges as one run (segment sums, the segment kernel), so a
    graph whose edges are not sorted by receiver is an error naming the crystal, not wrong sums."""
    import dataclasses

    record = load_dataset_records(DATA / "jarvis_dft3d.jsonl.gz").records[0]
    graph = build_crystal_graph(record)
    assert (np.diff(graph.receivers) >= 0).all()  # as built
    flipped = dataclasses.replace(graph, senders=graph.senders[::-1], receivers=graph.receivers[::-1],
                                  images=graph.images[::-1])
    with pytest.raises(ValueError, match=f"{record.id}: edges are not sorted by receiver"):
        graph_to_jraph(flipped)
    # a GraphsTuple made elsewhere, packed for batching: the crystal is named by its position
    graphs = [graph_to_jraph(graph), graph_to_jraph(graph)]
    PackedGraphs(graphs)  # sorted within each crystal (receivers drop where the second starts)
    graphs[1] = graphs[1]._replace(receivers=graphs[1].receivers[::-1], senders=graphs[1].senders[::-1])
    with pytest.raises(ValueError, match="graph 1: edges are not sorted by receiver"):
        PackedGraphs(graphs)
