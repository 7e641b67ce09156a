"""Topology rebuilt after noise: host-perturbed batches carry the device path's exact noise."""

import jax
import numpy as np

from conftest import DATA, tiny
from configs import pretrain_pos10
from dpf_jax.data.batching import GraphBatcher, graph_to_jraph
from dpf_jax.data.graphs import build_crystal_graph
from dpf_jax.data.readers import load_dataset_records
from dpf_jax.tasks import perturb, rebuild
from dpf_jax.tasks.rebuild import RebuildingBatcher, targets_from_batch
from dpf_jax.train import loop
from dpf_jax.train.checkpoint import load_raw_checkpoint

CFG = {"mask_fraction": 0.3, "position_scale": 0.3, "position_fraction": 1.0, "lattice_scale": 0.3}


def _graphs(n=24):
    records = load_dataset_records(DATA / "jarvis_dft3d.jsonl.gz").records[:n]
    return [build_crystal_graph(r) for r in records]


def test_rebuilt_batch_has_the_device_noise_and_the_perturbed_graph():
    graphs = _graphs()
    key = jax.random.PRNGKey(11)
    rb = RebuildingBatcher(graphs, batch_size=8, num_devices=2, perturb_cfg=CFG, key_fn=lambda e, b: key)
    plain = GraphBatcher([graph_to_jraph(g) for g in graphs], batch_size=8, num_devices=2)
    idx = np.arange(8)
    host = rb.make_perturbed_batch(idx, key)
    clean = plain.make_batch(idx)
    for d in range(2):
        share = jax.tree_util.tree_map(lambda x: x[d], clean)
        dev_graph, dev_targets = perturb.perturb(key, share, CFG)
        host_share = jax.tree_util.tree_map(lambda x: x[d], host)
        host_targets = targets_from_batch(host_share)
        nm, hm = np.asarray(share.nodes["mask"]), host_share.nodes["mask"]
        # same atoms masked, same displacement noise, same clean lattice parameters
        np.testing.assert_array_equal(np.asarray(dev_targets["type_mask"])[nm], host_targets["type_mask"][hm])
        np.testing.assert_array_equal(np.asarray(dev_targets["species"])[nm], host_targets["species"][hm])
        np.testing.assert_allclose(np.asarray(dev_targets["displacement"])[nm],
                                   host_targets["displacement"][hm], atol=1e-6)
        gm = np.asarray(share.globals["mask"])
        np.testing.assert_allclose(np.asarray(dev_targets["lattice_params"])[gm],
                                   host_targets["lattice_params"][gm], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(dev_graph.nodes["positions"])[nm],
                                   host_share.nodes["positions"][hm], atol=2e-4)
    # the edges are those of the perturbed structure, not of the clean one
    first = jax.tree_util.tree_map(lambda x: x[0], host)
    assert not np.array_equal(first.n_edge, jax.tree_util.tree_map(lambda x: x[0], clean).n_edge)


def test_rebuilding_is_a_pure_function_of_the_key():
    graphs = _graphs(12)
    rb = RebuildingBatcher(graphs, batch_size=4, num_devices=1, perturb_cfg=CFG,
                           key_fn=lambda e, b: jax.random.fold_in(jax.random.PRNGKey(3), 10 * e + b))
    a = list(rb.iterate(seed=1, epoch=2))
    b = list(rb.iterate(seed=1, epoch=2))
    for x, y in zip(a, b):
        for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
            np.testing.assert_array_equal(u, v)


def test_worker_processes_give_the_same_batches():
    """The graph builds in a process pool (a few batches ahead) change nothing in the batches:
    21 crystals in batches of 10 over 2 devices (chunks of 2, 2, 1; a last batch of 1 with an empty
    device share), resumed mid-epoch; then killed workers (the batcher carries on in-process,
    same batches) and the shared pool shut down mid-epoch."""
    graphs = _graphs(21)
    key_fn = lambda e, b: jax.random.fold_in(jax.random.PRNGKey(5), 10 * e + b)  # noqa: E731
    make = lambda w: RebuildingBatcher(graphs, batch_size=10, num_devices=2, perturb_cfg=CFG,  # noqa: E731
                                       key_fn=key_fn, workers=w)

    def same(xs, ys):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert x.nodes.keys() == y.nodes.keys() and x.globals.keys() == y.globals.keys()
            for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
                np.testing.assert_array_equal(u, v)

    serial = list(make(1).iterate(seed=1, epoch=0))
    assert len(serial) == 3
    try:
        pooled = make(3)
        same(serial[1:], list(pooled.iterate(seed=1, epoch=0, start_batch=1)))
        assert 3 in rebuild._POOLS and pooled.workers == 3
        # the workers die (killed, out of memory): the batcher notices at its next submission or
        # result, warns, and builds in this process from then on
        for proc in list(rebuild._POOLS[3]._processes.values()):
            proc.kill()
            proc.join(10)
        same(serial, list(pooled.iterate(seed=1, epoch=0)))
        assert pooled.workers == 1 and 3 not in rebuild._POOLS
        # the shared pool shut down with batches possibly in flight: their builds are redone here
        other = make(3)
        it = other.iterate(seed=1, epoch=0)
        first = next(it)
        rebuild.shutdown_workers()
        same(serial, [first] + list(it))
    finally:
        rebuild.shutdown_workers()


def test_rebuilt_topology_pretraining_resumes_exactly_with_worker_processes(tmp_path):
    """The loop's rebuilding pipeline (graphs built in 2 processes, batches ahead): a run killed
    mid-epoch and resumed ends with the parameters of the uninterrupted run."""
    config = tiny(pretrain_pos10.get_config(), records=80, epochs=2, batch=16)
    config.pretrain.rebuild_topology = True
    config.data.num_workers = 2
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    config.train.max_steps = 5
    assert loop.train_and_evaluate(config, str(tmp_path / "resumed")) == {"stopped_at_step": 5}
    config.train.max_steps = 0
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed["steps"] == straight["steps"] > 5
    params = [load_raw_checkpoint(str(tmp_path / run / "checkpoints" / "latest"))[0]["params"]
              for run in ("straight", "resumed")]
    for a, b in zip(*(jax.tree_util.tree_leaves(p) for p in params)):
        np.testing.assert_array_equal(a, b)
