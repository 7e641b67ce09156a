"""Batches bundled for the copy to the devices (dpf_jax.data.transfer): exact both ways."""

import jax
import jraph
import numpy as np
import pytest

from conftest import DATA, tiny
from configs import finetune_jarvis, pretrain_mask30
from dpf_jax.data.transfer import TransferPacking
from dpf_jax.train import loop
from dpf_jax.train.budget_search import shaped_like
from dpf_jax.train.parallel import make_mesh, put_batch


def _batches(config_module, path, n=3):
    config = tiny(config_module.get_config(), records=96, batch=16)
    config.data.path = str(DATA / path)
    data = loop.load_data(config)
    batcher = loop.make_batcher(data.splits["train"], config, 4)
    return list(batcher.iterate(seed=0, epoch=0, shuffle=True))[:n]


def _assert_same(a: jraph.GraphsTuple, b: jraph.GraphsTuple):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [jax.tree_util.keystr(k) for k, _ in la] == [jax.tree_util.keystr(k) for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(k)
        # bit for bit (NaN padding included): compare the bytes
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(k)


@pytest.mark.parametrize("config_module,path", [(pretrain_mask30, "pretrain.jsonl.gz"),
                                                (finetune_jarvis, "jarvis_dft3d.jsonl.gz")])
def test_bundle_round_trip_on_4_devices_is_exact(config_module, path):
    """Real batches (4 device shares) -> three int32 arrays -> sharded over 4 devices ->
    unpacked inside jit: every field back with its dtype, shape, bits and sharding axis."""
    batches = _batches(config_module, path)
    packing = TransferPacking(batches[0])
    mesh = make_mesh(4)
    unpack = jax.jit(packing.unpack)
    for host in batches:
        bundle = packing.pack(host)
        leaves = jax.tree_util.tree_leaves(bundle)
        assert len(leaves) == 3 and all(x.dtype == np.int32 for x in leaves)
        assert bundle.nodes["packed"].shape[:2] == host.nodes["mask"].shape
        assert bundle.edges["packed"].shape[:2] == host.senders.shape
        dev = put_batch(bundle, mesh)
        back = unpack(dev)
        assert len(back.senders.sharding.device_set) == 4
        _assert_same(jax.device_get(back), host)


def test_bundle_keeps_leading_axes_and_follows_budget_resizing():
    """Stacked batches (runs or steps: a leading axis before the devices) pack and unpack
    with the same layout; `shaped_like` resizes a bundle's node and edge axes."""
    batches = _batches(pretrain_mask30, "pretrain.jsonl.gz", n=2)
    # two different batches of one shape: the first, and the first with every field changed
    other = jax.tree_util.tree_map(lambda x: ~x if x.dtype == np.bool_ else x[..., ::-1] + 1, batches[0])
    stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), batches[0], other)
    packing = TransferPacking(batches[0])
    bundle = packing.pack(stacked)
    assert bundle.globals["packed"].shape[:3] == stacked.n_node.shape
    _assert_same(jax.device_get(jax.jit(packing.unpack)(bundle)), stacked)

    abstract = shaped_like(packing.pack(batches[0]), 300, 4000)
    assert abstract.nodes["packed"].shape[:2] == (4, 300)
    assert abstract.edges["packed"].shape[:2] == (4, 4000)
    assert abstract.globals["packed"].shape == packing.pack(batches[0]).globals["packed"].shape
    assert abstract.senders is None and abstract.n_node is None
    out = jax.eval_shape(packing.unpack, abstract)
    assert out.senders.shape == (4, 4000) and out.nodes["positions"].shape == (4, 300, 3)


def test_bundle_refuses_what_it_cannot_carry(caplog):
    batch = _batches(finetune_jarvis, "jarvis_dft3d.jsonl.gz", n=1)[0]
    with pytest.raises(TypeError, match="globals.target.*float64"):
        TransferPacking(batch._replace(globals={**batch.globals, "target": batch.globals["target"].astype(np.float64)}))
    packing = TransferPacking(batch)
    with pytest.raises(ValueError, match="differ from the packing layout"):
        packing.pack(batch._replace(edges={k: v for k, v in batch.edges.items() if k != "count"}))
    with pytest.raises(ValueError, match="nodes.positions"):
        packing.pack(batch._replace(nodes={**batch.nodes, "positions": batch.nodes["positions"][..., :2]}))
    # the training loop then sends the batches as they are, and says so
    config = finetune_jarvis.get_config()
    bad = batch._replace(globals={**batch.globals, "target": batch.globals["target"].astype(np.float64)})
    with caplog.at_level("WARNING"):
        assert loop.make_transfer_packing(config, lambda: bad) is None
    assert "batches go unpacked" in caplog.text
    assert isinstance(loop.make_transfer_packing(config, lambda: batch), TransferPacking)
    config.train.pack_batches = False
    assert loop.make_transfer_packing(config, lambda: batch) is None
