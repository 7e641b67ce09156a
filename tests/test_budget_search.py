"""Padded-shape search (train.budget_search): padding never changes a step's result, the
abstract batches match real ones, and the cheapest compiled candidate is kept, also through
the training loop and the multi-run trainer."""

import json
import math

import jax
import numpy as np
import pytest

from conftest import DATA, tiny, train_setup
from configs import finetune_jarvis, pretrain_mask30
from dpf_jax.data.batching import Budget
from dpf_jax.train import budget_search, loop, multirun
from dpf_jax.train.parallel import put_batch, put_replicated
from dpf_jax.train.step import make_forward, make_train_step


def test_edge_candidates():
    assert budget_search.edge_candidates(46700, 4, 1024) == [46700, 47104, 48128, 49152]
    assert budget_search.edge_candidates(49152, 3, 1024) == [49152, 50176, 51200]
    assert budget_search.edge_candidates(512, 1, 1024) == [512]


def test_search_keeps_the_cheapest_edge_count_per_level():
    costs = {(64, 512): 9.0, (64, 1024): 7.0, (64, 1536): 7.0,  # tie: the smaller count wins
             (128, 2048): 5.0, (128, 2560): math.nan, (128, 3072): 6.0,  # nan: unknown, not cheapest
             (192, 4096): math.nan, (192, 4608): math.nan, (192, 5120): math.nan}
    budgets = [Budget(64, 512, 9), Budget(128, 2048, 9), Budget(192, 4096, 9)]
    asked = []
    costs_of = lambda shapes: asked.append(list(shapes)) or [costs[s] for s in shapes]
    new, rows = budget_search.search_budgets(budgets, costs_of, candidates=3, granule=512)
    assert len(asked) == 1 and len(asked[0]) == 3 * len(budgets)  # one call: may run them at once
    assert new == [Budget(64, 1024, 9), Budget(128, 2048, 9), Budget(192, 4096, 9)]
    assert [r["chosen_n_edge"] for r in rows] == [1024, 2048, 4096]
    assert rows[1]["bytes_accessed"] == {"2048": 5.0, "2560": None, "3072": 6.0}  # JSON-safe
    with pytest.raises(ValueError, match="candidates"):
        budget_search.search_budgets(budgets, lambda shapes: [0.0] * len(shapes), candidates=0)


def _pretrain_setup(num_devices, records=48, batch=16):
    config = tiny(pretrain_mask30.get_config(), records=records, batch=batch)
    config.data.path = str(DATA / "pretrain.jsonl.gz")
    config.pretrain.position_scale = 0.1  # every denoising head on
    config.pretrain.lattice_scale = 0.1
    t = train_setup(config, loop.load_data(config), num_devices)
    t.step = make_train_step(t.objective, t.model, t.tx, t.mesh)
    return t


def test_a_larger_padded_shape_changes_no_loss_or_gradient_on_4_devices():
    t = _pretrain_setup(4)
    mesh, batcher, state = t.mesh, t.batcher, t.state
    indices = batcher.epoch_order(0, 0, shuffle=True)[:batcher.batch_size]
    small = batcher.make_batch(indices)
    b = Budget(small.nodes["mask"].shape[-1], small.edges["mask"].shape[-1], small.globals["mask"].shape[-1])
    large = batcher.make_batch(indices, Budget(b.n_node + 64, b.n_edge + 1536, b.n_graph))
    assert large.edges["mask"].shape[-1] == b.n_edge + 1536
    grad_fn = jax.jit(jax.value_and_grad(make_forward(t.objective, t.model, mesh, train=True), has_aux=True))
    args = [put_replicated(x, mesh) for x in (state.params, state.batch_stats, state.stats)]
    out = {}
    for name, host in (("small", small), ("large", large)):
        (loss, (_, terms, _)), grads = grad_fn(*args, put_batch(host, mesh), jax.random.PRNGKey(3))
        out[name] = jax.device_get((loss, terms, grads))
    np.testing.assert_allclose(out["small"][0], out["large"][0], rtol=1e-5)
    for t in out["small"][1]:
        np.testing.assert_allclose(out["small"][1][t], out["large"][1][t], rtol=1e-5, atol=1e-7, err_msg=t)
    for a, c in zip(jax.tree_util.tree_leaves(out["small"][2]), jax.tree_util.tree_leaves(out["large"][2])):
        np.testing.assert_allclose(a, c, rtol=2e-4, atol=2e-6)


def test_shaped_like_matches_a_real_batch_of_that_shape_on_4_devices():
    t = _pretrain_setup(4)
    mesh, batcher = t.mesh, t.batcher
    indices = batcher.epoch_order(0, 0, shuffle=True)[:batcher.batch_size]
    dev = put_batch(batcher.make_batch(indices), mesh)
    g = dev.globals["mask"].shape[-1]
    real = put_batch(batcher.make_batch(indices, Budget(640, 9728, g)), mesh)
    abstract = budget_search.shaped_like(dev, 640, 9728)
    pairs = zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree_util.tree_leaves(real))
    for (path, a), r in pairs:
        assert (a.shape, a.dtype) == (r.shape, r.dtype), jax.tree_util.keystr(path)
        assert a.sharding == r.sharding, jax.tree_util.keystr(path)
    runs = budget_search.shaped_like(jax.tree_util.tree_map(lambda x: np.stack([x] * 3), dev), 640, 9728)
    assert runs.edges["mask"].shape == (3, 4, 9728) and runs.nodes["positions"].shape == (3, 4, 640, 3)


def test_tune_batcher_keeps_the_cheapest_compiled_candidate_and_caches_the_counts(tmp_path, monkeypatch):
    t = _pretrain_setup(1)
    mesh, batcher, step, state = t.mesh, t.batcher, t.step, put_replicated(t.state, t.mesh)
    before = list(batcher.budgets)
    dev = put_batch(next(batcher.iterate(shuffle=False)), mesh)
    compiles = []
    real_compile = budget_search._compile
    monkeypatch.setattr(budget_search, "_compile",
                        lambda lowered, options=None: compiles.append(options) or real_compile(lowered, options))
    cache = tmp_path / "counts.json"
    rows = budget_search.tune_batcher(batcher, step, state, dev, candidates=3, granule=512, cache_path=cache)
    assert len(rows) == len(before) and len(compiles) == 3 * len(before)
    for b, row in zip(before, rows):
        costs = {int(e): c for e, c in row["bytes_accessed"].items()}
        assert sorted(costs) == budget_search.edge_candidates(b.n_edge, 3, 512)
        assert all(math.isfinite(c) and c > 0 for c in costs.values())  # XLA's count, compiled here
        assert row["chosen_n_edge"] == min(costs, key=lambda e: (costs[e], e))
    assert batcher.budgets == sorted({Budget(b.n_node, r["chosen_n_edge"], b.n_graph) for b, r in zip(before, rows)})
    shapes = {b.edges["mask"].shape[-1] for b in batcher.iterate(seed=0, epoch=0)}
    assert shapes <= {b.n_edge for b in batcher.budgets}
    # one count per distinct (nodes, edges) shape: two levels' candidates may share shapes
    distinct = len({(b.n_node, e) for b in before for e in budget_search.edge_candidates(b.n_edge, 3, 512)})
    assert len(json.loads(cache.read_text())) == distinct
    # the same search again (a restarted run): every count from the file, nothing compiled
    batcher.budgets = list(before)
    again = budget_search.tune_batcher(batcher, step, state, dev, candidates=3, granule=512, cache_path=cache)
    assert again == rows and len(compiles) == 3 * len(before)
    # concurrent compilation, without the cache: the same counts and choices
    batcher.budgets = list(before)
    threaded = budget_search.tune_batcher(batcher, step, state, dev, candidates=3, granule=512, threads=3)
    assert threaded == rows and len(compiles) == 6 * len(before)
    # candidate-only compiler options are part of the cache key: compiled again, with the options
    batcher.budgets = list(before)
    options = {"xla_embed_ir_in_executable": False}
    budget_search.tune_batcher(batcher, step, state, dev, candidates=3, granule=512, cache_path=cache,
                               compiler_options=options)
    assert compiles[6 * len(before):] == [options] * (3 * len(before))
    assert len(json.loads(cache.read_text())) == 2 * distinct


def test_training_loop_and_multirun_search_budgets(tmp_path):
    config = tiny(finetune_jarvis.get_config(), records=64, epochs=1, batch=16)
    config.train.budget_search = 2
    config.train.budget_search_threads = 2
    config.train.budget_search_cache = str(tmp_path / "counts.json")
    res = loop.train_and_evaluate(config, str(tmp_path / "one"))
    rows = json.loads((tmp_path / "one" / "results.json").read_text())["budget_search"]
    assert rows == res["budget_search"] and all(len(r["bytes_accessed"]) == 2 for r in rows)
    assert all(r["chosen_n_edge"] >= r["budget"][1] for r in rows)
    runs = [(s, "", str(tmp_path / "multi" / f"seed{s}")) for s in (0, 1)]
    out = multirun.train_runs(config, runs)
    assert [r["budget_search"] for r in out][0] == out[1]["budget_search"]
    assert all(math.isfinite(r["test_mae_final"]) for r in out)
