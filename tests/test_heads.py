"""Denoising heads (dpf_jax.model.heads) on real JARVIS crystals."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from conftest import DATA
from dpf_jax.data.batching import Budget, graph_to_jraph, pad_graphs
from dpf_jax.data.graphs import build_crystal_graph
from dpf_jax.data.readers import iter_jsonl
from dpf_jax.model.heads import NUM_TYPES, DenoisingModel
from dpf_jax.model.matformer import MatformerEncoder, MatformerRegressor

SMALL = dict(num_layers=2, channels=32, heads=2, precision="highest")
tree_map = jax.tree_util.tree_map


@pytest.fixture(scope="module")
def graphs():
    cs = [c for c in itertools.islice(iter_jsonl(DATA / "jarvis_dft3d.jsonl.gz"), 80) if 2 <= c.num_atoms <= 8]
    return [build_crystal_graph(c) for c in cs[:4]]


def padded(graphs, budget=None):
    n = sum(g.num_nodes for g in graphs)
    e = sum(g.num_edges for g in graphs)
    b = pad_graphs([graph_to_jraph(g) for g in graphs], budget or Budget(n + 5, e + 40, len(graphs) + 2))
    return tree_map(jnp.asarray, b)


def np_variables(model, batch, seed=0):
    """Random float32 variables shaped like `model.init` (PyTorch-like kernel scale, non-trivial
    norm parameters and running statistics), made on the host: no RNG kernels to compile."""
    shapes = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b, train=False), batch)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            x = rng.uniform(-1, 1, s.shape) / math.sqrt(s.shape[0])
        elif name == "scale":
            x = 1.0 + 0.2 * rng.standard_normal(s.shape)
        elif name == "var":
            x = rng.uniform(0.5, 2.0, s.shape)
        else:
            x = 0.2 * rng.standard_normal(s.shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


@functools.partial(jax.jit, static_argnums=0)
def apply_eval(model, variables, batch):
    return model.apply(variables, batch, train=False)


def test_outputs_and_param_tree(graphs):
    batch = padded(graphs)
    model = DenoisingModel(encoder=MatformerEncoder(**SMALL))
    variables = np_variables(model, batch)
    assert sorted(variables["params"]) == ["encoder", "lattice_head", "position_head", "type_head"]
    out, upd = jax.jit(lambda v: model.apply(v, batch, train=True, mutable=["batch_stats"]))(variables)
    n, g = batch.nodes["mask"].shape[0], batch.n_node.shape[0]
    assert out["type_logits"].shape == (n, NUM_TYPES) == (n, 95)
    assert out["displacement"].shape == (n, 3)
    assert out["lattice"].shape == (g, 6)
    assert all(v.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(v))) for v in out.values())
    # padding nodes only have padding edges: zero displacement
    np.testing.assert_array_equal(np.asarray(out["displacement"])[~np.asarray(batch.nodes["mask"])], 0.0)
    assert set(upd["batch_stats"]) == {"encoder"}

    # heads switched off own no parameters and give no output
    only_types = DenoisingModel(encoder=MatformerEncoder(**SMALL), positions=False, lattice=False)
    shapes = jax.eval_shape(lambda: only_types.init(jax.random.PRNGKey(0), batch, train=False))
    assert sorted(shapes["params"]) == ["encoder", "type_head"]
    assert list(apply_eval(only_types, {"params": {k: variables["params"][k] for k in ("encoder", "type_head")},
                                        "batch_stats": variables["batch_stats"]}, batch)) == ["type_logits"]


def test_encoder_transfers_to_regressor(graphs):
    """The pre-trained encoder subtree drops into MatformerRegressor unchanged."""
    batch = padded(graphs)
    enc = MatformerEncoder(**SMALL)
    pre = DenoisingModel(encoder=enc)
    reg = MatformerRegressor(encoder=enc)
    pre_vars = np_variables(pre, batch, seed=1)
    reg_vars = np_variables(reg, batch, seed=2)
    same = lambda a, b: jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(  # noqa: E731
        x.shape == y.shape for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert same(pre_vars["params"]["encoder"], reg_vars["params"]["encoder"])
    assert same(pre_vars["batch_stats"], reg_vars["batch_stats"])
    fine = {"params": {**reg_vars["params"], "encoder": pre_vars["params"]["encoder"]},
            "batch_stats": pre_vars["batch_stats"]}
    run = jax.jit(lambda v1, v2: (pre.apply(v1, batch, False, method=lambda m, b, t: m.encoder(b, t).nodes),
                                  reg.apply(v2, batch, False, method=lambda m, b, t: m.encoder(b, t).nodes),
                                  reg.apply(v2, batch, False, return_pooled=True)))
    nodes_pre, nodes_reg, (y, pooled) = run(pre_vars, fine)
    np.testing.assert_array_equal(np.asarray(nodes_pre), np.asarray(nodes_reg))
    # pooled = masked mean of node features per crystal (zeros for padding graphs)
    gi, m = np.asarray(batch.nodes["graph"]), np.asarray(batch.nodes["mask"])
    for k in range(len(graphs)):
        np.testing.assert_allclose(pooled[k], np.asarray(nodes_reg)[(gi == k) & m].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pooled)[len(graphs):], 0.0)
    assert y.shape == (batch.n_node.shape[0],)


def test_position_head_equivariance(graphs):
    """Rotating positions and lattice together rotates the displacement and leaves types and
    lattice outputs unchanged; a rigid translation of every atom changes nothing."""
    batch = padded(graphs)
    model = DenoisingModel(encoder=MatformerEncoder(**SMALL))
    variables = np_variables(model, batch, seed=3)
    rot = Rotation.random(random_state=7).as_matrix().astype(np.float32)  # row vectors: x -> x @ rot
    g_mask = np.asarray(batch.globals["mask"])

    def moved(pos, lattice):
        return batch._replace(nodes={**batch.nodes, "positions": jnp.asarray(pos, jnp.float32)},
                              globals={**batch.globals, "lattice": jnp.asarray(lattice, jnp.float32)})

    pos, lat = np.asarray(batch.nodes["positions"], np.float64), np.asarray(batch.globals["lattice"], np.float64)
    lat_rot = lat.copy()
    lat_rot[g_mask] = lat[g_mask] @ rot
    ref = apply_eval(model, variables, batch)
    rotated = apply_eval(model, variables, moved(pos @ rot, lat_rot))
    shifted = apply_eval(model, variables, moved(pos + np.array([0.37, -1.2, 2.5]), lat))
    m = np.asarray(batch.nodes["mask"])
    d0 = np.asarray(ref["displacement"])[m]
    assert np.abs(d0).max() > 1e-3  # not trivially zero
    np.testing.assert_allclose(np.asarray(rotated["displacement"])[m], d0 @ rot, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(shifted["displacement"])[m], d0, rtol=1e-4, atol=1e-4)
    for key, rows in (("type_logits", m), ("lattice", g_mask)):
        for other in (rotated, shifted):
            np.testing.assert_allclose(np.asarray(other[key])[rows], np.asarray(ref[key])[rows], rtol=1e-4, atol=1e-4)


def test_heads_independent_of_padding(graphs):
    model = DenoisingModel(encoder=MatformerEncoder(**SMALL))
    small, large = padded(graphs), padded(graphs, Budget(100, 2048, 9))
    variables = np_variables(model, small, seed=4)
    a, b = apply_eval(model, variables, small), apply_eval(model, variables, large)
    n = sum(g.num_nodes for g in graphs)
    for key in ("type_logits", "displacement"):
        np.testing.assert_allclose(np.asarray(a[key])[:n], np.asarray(b[key])[:n], rtol=1e-4, atol=3e-5)
    np.testing.assert_allclose(np.asarray(a["lattice"])[:4], np.asarray(b["lattice"])[:4], rtol=1e-4, atol=3e-5)


def test_bfloat16_heads(graphs):
    batch = padded(graphs)
    f32 = DenoisingModel(encoder=MatformerEncoder(**SMALL))
    bf16 = DenoisingModel(encoder=MatformerEncoder(**{**SMALL, "precision": None}, dtype=jnp.bfloat16))
    variables = np_variables(f32, batch, seed=5)
    a, b = apply_eval(f32, variables, batch), apply_eval(bf16, variables, batch)
    m = np.asarray(batch.nodes["mask"])
    for key in ("type_logits", "displacement"):
        x, y = np.asarray(a[key])[m], np.asarray(b[key])[m]
        assert b[key].dtype == jnp.float32 and np.all(np.isfinite(y))
        assert np.linalg.norm(x - y) / np.linalg.norm(x) < 5e-2, key


def test_mirror_merged_edges_under_perturbation():
    """Pre-training with position and lattice noise on "mirror"-merged graphs gives the reference
    graphs' outputs (type logits, displacement, lattice), each crystal perturbed identically
    (the noise is keyed by node and graph, not by edge). "distance" merging, refused for such
    runs, would not: equal lengths stop being equal once atoms move."""
    from dpf_jax.tasks.perturb import perturb

    cs = [c for c in itertools.islice(iter_jsonl(DATA / "jarvis_dft3d.jsonl.gz"), 80) if 1 <= c.num_atoms <= 6][:8]
    model = DenoisingModel(encoder=MatformerEncoder(**SMALL))
    cfg = {"mask_fraction": 0.3, "position_scale": 0.1, "position_fraction": 1.0, "lattice_scale": 0.05}
    key = jax.random.PRNGKey(7)
    out = {}
    for level in ("none", "mirror"):
        batch, _ = perturb(key, padded([build_crystal_graph(c, merge_edges=level) for c in cs]), cfg)
        if level == "none":
            variables = np_variables(model, batch)
        out[level] = apply_eval(model, variables, batch)
    for name in ("type_logits", "displacement", "lattice"):
        np.testing.assert_allclose(out["mirror"][name], out["none"][name], rtol=1e-4, atol=1e-5, err_msg=name)
    # merged atoms have no per-atom outputs: refused by every denoising model
    with pytest.raises(ValueError, match="merged by equal atoms"):
        apply_eval(model, variables, perturb(key, padded([build_crystal_graph(c, merge_edges="atoms") for c in cs]),
                                             cfg)[0])
    # "distance" merging is refused by the position head (its merged edges carry no net count) ...
    with pytest.raises(ValueError, match="position head sums edge vectors"):
        apply_eval(model, variables, perturb(key, padded([build_crystal_graph(c, merge_edges="distance")
                                                          for c in cs]), cfg)[0])
    # ... and would not be exact for the encoder either: equal lengths stop being equal once atoms move
    enc = MatformerRegressor(encoder=MatformerEncoder(**SMALL))
    enc_vars = np_variables(enc, padded([build_crystal_graph(c) for c in cs]))
    y = {level: apply_eval(enc, enc_vars, perturb(key, padded([build_crystal_graph(c, merge_edges=level) for c in cs]),
                                                  cfg)[0]) for level in ("none", "mirror", "distance")}
    np.testing.assert_allclose(y["mirror"], y["none"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(y["distance"], y["none"], rtol=1e-3, atol=1e-4)
