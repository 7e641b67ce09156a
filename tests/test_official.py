"""corruption = "official" (the authors' released code): noise drawn once per structure,
all three corruptions, graph rebuilt, targets = clean frac coords / lattice / types."""

import json
import math

import jax
import numpy as np
import pytest

from conftest import DATA, tiny
from configs import finetune_jarvis, pretrain_official
from dpf_jax.data.batching import graph_to_jraph
from dpf_jax.data.graphs import build_crystal_graph
from dpf_jax.data.pipeline import PreparedData, SplitData
from dpf_jax.data.readers import load_dataset_records
from dpf_jax.tasks import perturb
from dpf_jax.tasks.official import OfficialBatcher, drop_single_atom_structures
from dpf_jax.tasks.rebuild import targets_from_batch
from dpf_jax.train import loop
from dpf_jax.train.checkpoint import load_raw_checkpoint
from dpf_jax.train.optim import make_optimizer
from dpf_jax.train.step import create_state

SEED = 7


@pytest.fixture(scope="module")
def records():
    recs = load_dataset_records(DATA / "pretrain.jsonl.gz").records
    multi = [r for r in recs[:400] if 2 <= r.num_atoms <= 40][:20]
    single = [r for r in recs if r.num_atoms == 1][:2]
    return multi, single


@pytest.fixture(scope="module")
def batcher(records):
    graphs = [build_crystal_graph(r) for r in records[0]]
    return graphs, OfficialBatcher(graphs, batch_size=8, num_devices=2, corruption_seed=SEED, progress=False)


def test_corruption_is_deterministic_per_seed_and_id(records):
    c = records[0][3]
    a, ta = perturb.perturb_official_host(SEED, c)
    b, tb = perturb.perturb_official_host(SEED, c)
    np.testing.assert_array_equal(a.numbers, b.numbers)
    np.testing.assert_array_equal(a.frac_coords, b.frac_coords)
    np.testing.assert_array_equal(a.lattice, b.lattice)
    other, _ = perturb.perturb_official_host(SEED + 1, c)
    assert not np.array_equal(a.frac_coords, other.frac_coords)
    renamed, _ = perturb.perturb_official_host(SEED, c.replace(id=c.id + "_copy"))
    assert not np.array_equal(a.frac_coords, renamed.frac_coords)


def test_corruption_amounts(records):
    for c in records[0]:
        noisy, t = perturb.perturb_official_host(SEED, c)
        n = c.num_atoms
        assert t["mask"].sum() == max(1, math.ceil(0.3 * n))  # exactly ⌈0.3 n⌉ atoms
        np.testing.assert_array_equal(noisy.numbers == 0, t["mask"])
        np.testing.assert_array_equal(t["species"], c.numbers)
        # the draws: frac noise and lattice noise in [0, 0.3), reproduced from the same stream
        rng = perturb.official_rng(SEED, c.id)
        rng.choice(n, size=int(t["mask"].sum()), replace=False)
        dfrac = rng.random((n, 3)) * 0.3
        dlat = rng.random((3, 3)) * 0.3
        assert dfrac.min() >= 0 and dfrac.max() < 0.3 and dlat.min() >= 0 and dlat.max() < 0.3
        np.testing.assert_allclose(noisy.frac_coords, (c.frac_coords + dfrac) % 1.0, atol=1e-12)
        assert noisy.frac_coords.min() >= 0 and noisy.frac_coords.max() < 1
        # wrapped displacement is the noise mod 1 (so within [0, 0.3) up to the wrap)
        assert np.all(((noisy.frac_coords - c.frac_coords) % 1.0 + 1e-9) % 1.0 < 0.3 + 1e-9)
        moved = noisy.lattice - c.lattice  # each lattice vector += U[0, 0.3)^3 Å
        np.testing.assert_allclose(moved, dlat, atol=1e-12)
        assert moved.min() >= 0 and moved.max() < 0.3


def test_batches_carry_clean_targets_and_rebuilt_graphs(batcher, records):
    graphs, ob = batcher
    crystals = records[0]
    for i, c in enumerate(crystals):
        noisy, t = perturb.perturb_official_host(SEED, c)
        # the stored graph is the k-NN graph of the corrupted crystal
        ref = graph_to_jraph(perturb.rebuild_topology(noisy, clean_numbers=c.numbers))
        for name in ("senders", "receivers", "n_edge"):
            np.testing.assert_array_equal(getattr(ob.graphs[i], name), getattr(ref, name))
        np.testing.assert_array_equal(ob.graphs[i].edges["images"], ref.edges["images"])
        np.testing.assert_array_equal(ob.graphs[i].nodes["species"], noisy.numbers)
        np.testing.assert_allclose(ob.graphs[i].nodes["positions"], noisy.cart_coords, atol=1e-5)
    # ... and so is its n_edge different from the clean graph's for most crystals
    assert sum(int(ob.graphs[i].n_edge[0]) != g.num_edges for i, g in enumerate(graphs)) > 0
    idx = np.array([5, 0, 11, 3, 7, 2, 9])  # 7 crystals over 2 devices (4 + 3)
    batch = ob.make_batch(idx)
    seen = []
    for d in range(2):
        share = jax.tree_util.tree_map(lambda x: x[d], batch)
        t = targets_from_batch(share)
        assert set(t) == {"species", "type_mask", "frac_coords", "lattice", "lattice_mask"}
        nm, gm = share.nodes["mask"], share.globals["mask"]
        assert t["frac_coords"].shape == (nm.shape[0], 3) and t["lattice"].shape == (gm.shape[0], 9)
        np.testing.assert_array_equal(t["lattice_mask"], gm)
        assert not t["type_mask"][~nm].any() and not t["frac_coords"][~nm].any()
        gidx = share.nodes["graph"]
        for g in np.flatnonzero(gm):
            c = crystals[idx[share.globals["index"][g]]]
            seen.append(c.id)
            atoms = (gidx == g) & nm
            np.testing.assert_array_equal(t["species"][atoms], c.numbers)
            np.testing.assert_allclose(t["frac_coords"][atoms], c.frac_coords, atol=1e-6)
            np.testing.assert_allclose(t["lattice"][g], c.lattice.reshape(9), atol=1e-5)
            assert t["type_mask"][atoms].sum() == max(1, math.ceil(0.3 * c.num_atoms))
            np.testing.assert_array_equal(share.nodes["species"][atoms] == 0, t["type_mask"][atoms])
    # every crystal once (shares are balanced by edge count, so not in idx order)
    assert sorted(seen) == sorted(crystals[i].id for i in idx)


def test_same_corruption_every_epoch_and_every_batcher(batcher, records):
    graphs, ob = batcher
    # the corrupted copy is fixed: two epochs (different orders) see identical crystals
    def by_id(epoch):
        out = {}
        for b in ob.iterate(seed=1, epoch=epoch, shuffle=True):
            for d in range(b.n_node.shape[0]):
                share = jax.tree_util.tree_map(lambda x: x[d], b)
                for g in np.flatnonzero(share.globals["mask"]):
                    atoms = (share.nodes["graph"] == g) & share.nodes["mask"]
                    out[int(share.n_edge[g]), share.nodes["species"][atoms].tobytes()] = \
                        share.nodes["positions"][atoms].tobytes()
        return out

    assert by_id(0) == by_id(1) and len(by_id(0)) == len(graphs)
    assert list(ob.epoch_order(1, 0, True)) != list(ob.epoch_order(1, 1, True))
    # a second batcher over a different subset and order gives each crystal the same corruption
    again = OfficialBatcher(graphs[::-1][:6], batch_size=4, num_devices=1, corruption_seed=SEED, progress=False)
    for j, g in enumerate(graphs[::-1][:6]):
        i = graphs.index(g)
        np.testing.assert_array_equal(again.graphs[j].nodes["positions"], ob.graphs[i].nodes["positions"])
        np.testing.assert_array_equal(again.targets[j]["type_mask"], ob.targets[i]["type_mask"])


def test_single_atom_structures_are_dropped(records, caplog):
    multi, single = records
    assert single, "the shipped corpus holds 1-atom structures"
    graphs = [build_crystal_graph(r) for r in multi[:4] + single]
    data = PreparedData(splits={"train": SplitData(graphs[:3] + graphs[4:5], np.full(4, np.nan)),
                                "val": SplitData([graphs[3]] + graphs[5:], np.full(len(graphs) - 4, np.nan))},
                        skipped=[], num_records=len(graphs), source="test")
    with caplog.at_level("INFO"):
        kept = drop_single_atom_structures(data)
    assert [len(s) for s in kept.splits.values()] == [3, 1]
    assert all(g.crystal.num_atoms >= 2 for s in kept.splits.values() for g in s.graphs)
    assert sorted(i for i, _ in kept.skipped) == sorted(r.id for r in single)
    assert f"dropped {len(single)} single-atom" in caplog.text


def test_unknown_corruption_is_refused():
    config = pretrain_official.get_config()
    config.pretrain.corruption = "offical"
    with pytest.raises(ValueError, match="corruption"):
        loop.make_objective(config)


def test_official_pretraining_end_to_end_and_finetuning_from_it(tmp_path):
    pre = tiny(pretrain_official.get_config(), records=64, epochs=2, batch=16)
    assert pre.pretrain.mask_fraction == 0 and pre.pretrain.corruption == "official"
    res = loop.train_and_evaluate(pre, str(tmp_path / "pre"))
    saved = json.loads((tmp_path / "pre" / "results.json").read_text())
    assert saved["steps"] == res["steps"] > 0
    for name in ("type_ce", "type_acc", "frac_l1", "lattice_l1"):
        assert np.isfinite(saved[f"val_{name}_final"]), (name, saved)
    assert np.isfinite(saved["best_val_loss"])
    assert "type_acc_most_frequent_element_baseline" in saved
    raw, _ = load_raw_checkpoint(tmp_path / "pre" / "checkpoints" / "latest")
    assert {"encoder", "type_head", "frac_head", "lattice9_head"} <= set(raw["params"])
    # fine-tuning starts from its encoder
    ft = tiny(finetune_jarvis.get_config(), records=48, epochs=1, batch=16)
    data = loop.load_data(ft)
    model = loop.make_objective(ft).make_model()
    batcher = loop.make_batcher(data.splits["train"], ft, 1)
    example = jax.tree_util.tree_map(lambda x: x[0], next(batcher.iterate(shuffle=False)))
    state = create_state(model, make_optimizer(ft.optim, 4), example, 0, loop.data_stats(ft, data))
    restored = loop.restore_encoder(state, str(tmp_path / "pre"))
    for a, b in zip(jax.tree_util.tree_leaves(restored.params["encoder"]),
                    jax.tree_util.tree_leaves(raw["params"]["encoder"])):
        np.testing.assert_array_equal(np.asarray(a), b)
