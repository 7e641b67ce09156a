"""Matformer encoder / regressor (dpf_jax.model) on real JARVIS structures.

Invariance tests (atom order, translation, unit-cell choice) build a plain radius graph with
pymatgen, whose own invariance is exact by construction, so they test the model alone (the
k-NN graph with lattice self-loops is not supercell-invariant by design: its lattice edges
are the cell vectors). The other tests use the package's `build_crystal_graph`.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from conftest import DATA
from dpf_jax.data.batching import Budget, graph_to_jraph, pad_graphs
from dpf_jax.data.graphs import CrystalGraph, build_crystal_graph
from dpf_jax.data.readers import iter_jsonl
from dpf_jax.data.records import Crystal
from dpf_jax.model.atom_features import cgcnn_feature_table
from dpf_jax.model.layers import MatformerConv
from dpf_jax.model.matformer import (REFERENCE_NUM_PARAMS, REFERENCE_NUM_PARAMS_PER_LAYER, MatformerEncoder,
                                     MatformerRegressor, count_params, params_from_torch_state_dict,
                                     params_to_torch_state_dict)

SMALL = dict(num_layers=2, channels=32, heads=2, precision="highest")
tree_map = jax.tree_util.tree_map


# ------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def crystals():
    """Small real crystals (2..8 atoms) from the shipped JARVIS file."""
    out = [c for c in itertools.islice(iter_jsonl(DATA / "jarvis_dft3d.jsonl.gz"), 80) if 2 <= c.num_atoms <= 8]
    assert len(out) >= 12
    return out[:12]


def radius_graph(c: Crystal, cutoff: float = 5.0) -> CrystalGraph:
    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice(c.lattice), c.numbers.tolist(), c.frac_coords)
    center, neighbor, offset, _ = s.get_neighbor_list(cutoff)
    # vec = pos[neighbor] + offset @ L - pos[center]: sender = center, receiver = neighbour
    key = np.concatenate([neighbor[:, None], center[:, None], np.rint(offset).astype(int)], 1)
    key = key[np.lexsort(key.T[::-1])]
    return CrystalGraph(c, key[:, 1].astype(np.int32), key[:, 0].astype(np.int32), key[:, 2:].astype(np.int32))


def unpadded_batch(graphs):
    b = jraph.batch_np([graph_to_jraph(g) for g in graphs])
    return b._replace(nodes={**b.nodes, "graph": np.repeat(np.arange(len(graphs), dtype=np.int32), b.n_node)})


def padded_batch(graphs, extra_nodes=5, extra_edges=40, extra_graphs=2):
    n = sum(g.num_nodes for g in graphs)
    e = sum(g.num_edges for g in graphs)
    return pad_graphs([graph_to_jraph(g) for g in graphs],
                      Budget(n + extra_nodes, e + extra_edges, len(graphs) + extra_graphs))


def to_device(b):
    return tree_map(jnp.asarray, b)


_NORMS = ("layer_norm", "msg_layer_1", "bn")


def np_variables(shapes, seed=0):
    """Random float32 variables for a tree of shapes (from `jax.eval_shape` of an init): kernels
    ~ U(+-1/sqrt(fan_in)) like PyTorch, and non-trivial norm scales / biases and running
    statistics, so tests exercise every parameter. Host numpy: no RNG kernels to compile."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            b = 1.0 / math.sqrt(s.shape[0])
            x = rng.uniform(-b, b, s.shape)
        elif name == "scale":
            x = 1.0 + 0.2 * rng.standard_normal(s.shape)
        elif name == "var":
            x = rng.uniform(0.5, 2.0, s.shape)
        else:  # bias, running mean
            x = 0.2 * rng.standard_normal(s.shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def model_variables(model, batch, seed=0):
    shapes = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b, train=False), to_device(batch))
    return np_variables(dict(shapes), seed)


@functools.partial(jax.jit, static_argnums=0)
def predict_eval(model, variables, batch):
    """(predictions [G], encoder node features [N, C]) in eval mode, one compilation per shape."""
    y, state = model.apply(variables, batch, train=False, mutable=["intermediates"],
                           capture_intermediates=lambda mdl, _: isinstance(mdl, MatformerEncoder))
    return y, state["intermediates"]["encoder"]["__call__"][0].nodes


# ------------------------------------------------------------------------ parameters, tables

def test_parameter_count_and_reference_names(crystals):
    batch = to_device(padded_batch([build_crystal_graph(c) for c in crystals[:2]]))
    v = jax.eval_shape(lambda: MatformerRegressor().init(jax.random.PRNGKey(0), batch, train=False))
    # 2,782,849 take part in the reference forward pass; the reference module reports 2,880,641
    # because it also holds the unused edge_init / angle_init_layers (97,792 parameters).
    assert count_params(v["params"]) == REFERENCE_NUM_PARAMS == 2_782_849
    assert count_params(v["params"]["encoder"]["att_layers_3"]) == REFERENCE_NUM_PARAMS_PER_LAYER == 544_256
    assert sorted(v["params"]) == ["encoder", "fc", "fc_out"]
    assert sorted(v["params"]["encoder"]) == sorted(
        ["atom_embedding", "rbf_1", "rbf_3"] + [f"att_layers_{i}" for i in range(5)])
    v = tree_map(lambda s: np.random.default_rng(0).standard_normal(s.shape).astype(np.float32), v)
    sd = params_to_torch_state_dict(v)
    layer0 = sorted(k[len("att_layers.0."):] for k in sd if k.startswith("att_layers.0."))
    assert layer0 == sorted([
        "lin_key.weight", "lin_key.bias", "lin_query.weight", "lin_query.bias", "lin_value.weight",
        "lin_value.bias", "lin_edge.weight", "lin_skip.weight", "lin_skip.bias", "lin_concate.weight",
        "lin_concate.bias", "lin_msg_update.weight", "lin_msg_update.bias", "msg_layer.0.weight",
        "msg_layer.0.bias", "msg_layer.1.weight", "msg_layer.1.bias", "bn.weight", "bn.bias",
        "bn.running_mean", "bn.running_var", "layer_norm.weight", "layer_norm.bias"])
    assert sd["att_layers.0.lin_msg_update.weight"].shape == (384, 384)
    assert sd["att_layers.0.lin_edge.weight"].shape == (512, 128)  # torch: [out, in]
    assert {"fc.0.weight", "fc_out.weight", "rbf.1.weight", "rbf.3.weight", "atom_embedding.weight"} <= set(sd)
    sd["edge_init.weight"] = np.zeros((1, 1))  # unused reference modules are dropped
    sd["att_layers.0.bn.num_batches_tracked"] = np.zeros(())
    back = params_from_torch_state_dict(sd)
    assert jax.tree_util.tree_all(tree_map(np.array_equal, back, v))


def test_cgcnn_table():
    t = cgcnn_feature_table()
    assert t.shape == (101, 92) and t.dtype == np.float32
    assert not t[0].any() and t[1:].any(axis=1).all()
    import jarvis.core.specie as specie  # test dependency: the source of the table
    for z, sym in [(1, "H"), (14, "Si"), (83, "Bi"), (100, "Fm")]:
        np.testing.assert_array_equal(t[z], specie.get_node_attributes(sym, atom_features="cgcnn"))


# ------------------------------------------------------------- one layer vs a numpy reference

def _numpy_matformer_conv(p, x, edge_attr, senders, receivers, node_mask, edge_mask, heads, channels,
                          train, stats):
    """The reference MatformerConv forward, written independently, float64, loop over edges."""
    p = tree_map(lambda a: np.asarray(a, np.float64), p)
    H, C = heads, channels
    lin = lambda q, z: z @ q["kernel"] + (q["bias"] if "bias" in q else 0.0)  # noqa: E731

    def ln(z, q):
        mu = z.mean(-1, keepdims=True)
        var = ((z - mu) ** 2).mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

    n = x.shape[0]
    q = lin(p["lin_query"], x).reshape(n, H, C)
    k = lin(p["lin_key"], x).reshape(n, H, C)
    v = lin(p["lin_value"], x).reshape(n, H, C)
    agg = np.zeros((n, H, C))
    for e in range(len(senders)):
        if not edge_mask[e]:
            continue
        i, j = receivers[e], senders[e]
        ed = lin(p["lin_edge"], edge_attr[e]).reshape(H, C)
        query = np.concatenate([q[i], q[i], q[i]], -1)
        key = np.concatenate([k[i], k[j], ed], -1)
        alpha = query * key / math.sqrt(3 * C)
        out = lin(p["lin_msg_update"], np.concatenate([v[i], v[j], ed], -1))
        out = out * (1.0 / (1.0 + np.exp(-ln(alpha, p["layer_norm"]))))
        out = ln(lin(p["msg_layer_0"], out), p["msg_layer_1"])
        agg[i] += out
    out = lin(p["lin_concate"], agg.reshape(n, H * C))
    real = out[node_mask]
    if train:
        mean, var = real.mean(0), real.var(0)
        new_stats = {"mean": 0.1 * mean + 0.9 * stats["mean"],
                     "var": 0.1 * real.var(0, ddof=1) + 0.9 * stats["var"]}
    else:
        mean, var, new_stats = stats["mean"], stats["var"], stats
    out = (out - mean) / np.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    out = out / (1.0 + np.exp(-out))
    return out + lin(p["lin_skip"], x), new_stats


@pytest.mark.parametrize("formulation,edge_kernel,fold", [
    ("node", "xla", False), ("edge", "xla", False), ("node", "pallas", False), ("edge", "pallas", False),
    ("node", "pallas_node-16x4", False),
    # lin_edge folded into e @ W3 (model.fold_edge_weights) with every kernel that takes e @ W3 as input
    ("node", "xla", True), ("node", "xla_recompute", True), ("node", "pallas_gate_rows-16x8-sorted", True),
    ("node", "pallas", True), ("node", "pallas_gate_rows-16x8-sorted-runs", True),
    ("node", "pallas_gate_rows-16x8-sorted-sum", True), ("node", "pallas_gate_rows-16x8x4-sorted-runs-sum", True),
    ("node", "pallas_gate_rows-16x8x4-sorted-slots-slotsum", True),
    # session 28's default (e and e @ W3 as one matmul, the backward reading the forward's output), and
    # the joint input without the fold (e and e @ W3 concatenated)
    ("node", "pallas_gate_rows-16x8x4-keep-joint-mres-sorted-slots-slotsum", True),
    ("node", "pallas_gate_rows-16x8-joint-sorted", False),
    # session 29's kernel for budgets below 16,384 edges (the same flags, no slots)
    ("node", "pallas_gate_rows-16x8-keep-joint-mres-sorted", True)])
def test_conv_matches_numpy_reference(crystals, formulation, edge_kernel, fold):
    graphs = [build_crystal_graph(c) for c in crystals[:3]]
    b = padded_batch(graphs)
    H, C, n_edge_feat = 2, 16, 24
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b.nodes["mask"].shape[0], C)).astype(np.float32)
    edge_attr = rng.standard_normal((b.senders.shape[0], n_edge_feat)).astype(np.float32)
    conv = MatformerConv(channels=C, heads=H, precision="highest", formulation=formulation, edge_kernel=edge_kernel,
                         fold_edge_weights=fold)
    args = (jnp.asarray(x), jnp.asarray(edge_attr), jnp.asarray(b.senders), jnp.asarray(b.receivers),
            jnp.asarray(b.nodes["mask"]), jnp.asarray(b.edges["mask"]))
    variables = np_variables(dict(jax.eval_shape(lambda: conv.init(jax.random.PRNGKey(0), *args, train=False))), 3)
    stats = variables["batch_stats"]

    @jax.jit
    def run(variables):
        y_train, upd = conv.apply(variables, *args, train=True, mutable=["batch_stats"])
        return y_train, upd["batch_stats"]["bn"], conv.apply(variables, *args, train=False)

    y_train, stats_train, y_eval = run(variables)
    m = b.nodes["mask"]
    for train, got, got_stats in ((True, y_train, stats_train), (False, y_eval, stats["bn"])):
        want, want_stats = _numpy_matformer_conv(
            variables["params"], x.astype(np.float64), edge_attr.astype(np.float64), b.senders, b.receivers,
            m, b.edges["mask"], H, C, train, tree_map(np.asarray, stats["bn"]))
        np.testing.assert_allclose(np.asarray(got)[m], want[m], rtol=2e-4, atol=2e-4)
        for name in ("mean", "var"):
            np.testing.assert_allclose(np.asarray(got_stats[name]), want_stats[name], rtol=1e-4, atol=1e-5)


def _dot_shapes(jaxpr) -> set:
    """(lhs shape, rhs shape) of every dot_general in a jaxpr, nested jaxprs included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add((tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape)))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= _dot_shapes(inner)
    return found


def test_folded_edge_weights_give_the_same_gradients(crystals):
    """model.fold_edge_weights: e @ W3 computed from edge_attr ([E, K] @ [K, H, 3C], the folded
    weight) instead of from e ([E, H, C] @ [C, 3C]); the layer's outputs and its gradients with
    respect to every parameter and to edge_attr are those of the unfolded layer."""
    graphs = [build_crystal_graph(c) for c in crystals[:3]]
    b = padded_batch(graphs)
    H, C, K = 2, 16, 24
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((b.nodes["mask"].shape[0], C)), jnp.float32)
    edge_attr = jnp.asarray(rng.standard_normal((b.senders.shape[0], K)), jnp.float32)
    rest = tuple(jnp.asarray(a) for a in (b.senders, b.receivers, b.nodes["mask"], b.edges["mask"]))
    convs = {fold: MatformerConv(channels=C, heads=H, precision="highest", fold_edge_weights=fold) for fold in (0, 1)}
    params = convs[0].init(jax.random.PRNGKey(0), x, edge_attr, *rest, train=False)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        convs[1].init(jax.random.PRNGKey(0), x, edge_attr, *rest, train=False))

    def loss(variables, edge_attr, conv):
        y, _ = conv.apply(variables, x, edge_attr, *rest, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.where(rest[2][:, None], y, 0.0) ** 2)

    E = edge_attr.shape[0]
    for fold, conv in convs.items():
        dots = _dot_shapes(jax.make_jaxpr(lambda v: loss(v, edge_attr, conv))(params).jaxpr)
        assert (((E, K), (K, H, 3 * C)) in dots) == bool(fold), dots
    (l0, g0), (l1, g1) = (jax.value_and_grad(loss, argnums=(0, 1))(params, edge_attr, convs[f]) for f in (0, 1))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for a, b_ in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(b_), np.asarray(a), rtol=2e-4, atol=2e-5)
    from configs import finetune_jarvis
    from dpf_jax.train.objectives import describe_compute

    cfg = finetune_jarvis.get_config().model  # "auto": folded wherever the layer computes e @ W3
    assert cfg.fold_edge_weights == "auto" and describe_compute(cfg).endswith(", lin_edge folded into e @ W3")
    cfg.fold_edge_weights = "False"  # the run log says what runs (a string: as from the command line)
    assert "folded" not in describe_compute(cfg)
    cfg.fold_edge_weights, cfg.edge_kernel = "auto", "pallas_node"  # e @ W3 inside that kernel: not folded
    assert "folded" not in describe_compute(cfg)
    cfg.fold_edge_weights = "yes"
    with pytest.raises(ValueError, match="fold_edge_weights must be one of"):
        describe_compute(cfg)
    with pytest.raises(ValueError, match="fold_edge_weights needs formulation 'node'"):
        MatformerConv(channels=C, heads=H, formulation="edge", fold_edge_weights=True).init(
            jax.random.PRNGKey(0), x, edge_attr, *rest, train=False)
    # how each setting resolves: "auto" folds where the layer computes e @ W3 itself
    from dpf_jax.model.layers import resolve_fold_edge_weights

    for fold, formulation, kernel, want in (
            ("auto", "node", "xla", True), ("AUTO", "node", "pallas_gate_rows-16x8-sorted", True),
            ("auto", "node", "pallas_node-16x4", False), ("auto", "edge", "xla", False),
            (True, "node", "xla", True), ("true", "node", "pallas", True), (1, "node", "xla", True),
            (np.bool_(False), "node", "xla", False), ("False", "edge", "xla", False), (0, "edge", "pallas", False)):
        assert resolve_fold_edge_weights(fold, formulation, kernel) is want, (fold, formulation, kernel)
    for bad in ("yes", 2, None, 0.5):
        with pytest.raises(ValueError, match="must be one of"):
            resolve_fold_edge_weights(bad, "node", "xla")
    with pytest.raises(ValueError, match="needs formulation 'node'"):
        resolve_fold_edge_weights("true", "node", "pallas_node")
    conv = MatformerConv(channels=C, heads=H, precision="highest", fold_edge_weights="auto")  # node + xla
    dots = _dot_shapes(jax.make_jaxpr(lambda v: loss(v, edge_attr, conv))(params).jaxpr)
    assert ((E, K), (K, H, 3 * C)) in dots, dots


def test_regressor_matches_numpy_reference(crystals):
    """Whole forward pass (CGCNN embedding, RBF edge MLP, conv, masked mean, fc, fc_out), eval
    mode, against float64 numpy on host-side geometry."""
    graphs = [build_crystal_graph(c) for c in crystals[:3]]
    b = padded_batch(graphs)
    H, C = 2, 8
    model = MatformerRegressor(encoder=MatformerEncoder(num_layers=1, channels=C, heads=H, precision="highest"),
                               fc_features=8)
    variables = model_variables(model, b, seed=5)
    got = np.asarray(jax.jit(lambda v, bb: model.apply(v, bb, train=False))(variables, to_device(b)))

    p = tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    enc = p["encoder"]
    lin = lambda q, z: z @ q["kernel"] + q["bias"]  # noqa: E731
    n_real, e_real = sum(g.num_nodes for g in graphs), sum(g.num_edges for g in graphs)
    x = lin(enc["atom_embedding"], cgcnn_feature_table()[b.nodes["species"][:n_real]].astype(np.float64))
    d = np.linalg.norm(np.concatenate([g.edge_vectors() for g in graphs]), axis=1)
    mu = np.linspace(0.0, 8.0, 128)
    rbf = np.exp(-(d[:, None] - mu) ** 2 / (mu[1] - mu[0]))
    ea = lin(enc["rbf_3"], np.log1p(np.exp(lin(enc["rbf_1"], rbf))))
    x, _ = _numpy_matformer_conv(enc["att_layers_0"], x, ea, b.senders[:e_real], b.receivers[:e_real],
                                 np.ones(n_real, bool), np.ones(e_real, bool), H, C, False,
                                 tree_map(np.asarray, variables["batch_stats"]["encoder"]["att_layers_0"]["bn"]))
    graph_of = b.nodes["graph"][:n_real]
    pooled = np.stack([x[graph_of == k].mean(0) for k in range(len(graphs))])
    h = lin(p["fc"], pooled)
    want = lin(p["fc_out"], h / (1 + np.exp(-h)))[:, 0]
    np.testing.assert_allclose(got[:len(graphs)], want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- invariances

def _supercell(c: Crystal) -> Crystal:
    f = np.concatenate([c.frac_coords, c.frac_coords + [1.0, 0.0, 0.0]]) / [2.0, 1.0, 1.0]
    lat = c.lattice * np.array([[2.0], [1.0], [1.0]])
    return c.replace(lattice=lat, numbers=np.tile(c.numbers, 2), frac_coords=f)


def _other_cell(c: Crystal) -> Crystal:
    m = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, -1.0, 1.0]])  # unimodular
    return c.replace(lattice=m @ c.lattice, frac_coords=c.frac_coords @ np.linalg.inv(m))


def test_invariances(crystals):
    """Eval mode (running BatchNorm statistics): atom order, rigid translation (atoms wrapped
    back into the cell, so images change) and the choice of cell (2x1x1 supercell, unimodular
    change of basis) leave predictions unchanged and permute / copy node features."""
    cs = crystals[:4]
    rng = np.random.default_rng(0)
    perms = [rng.permutation(c.num_atoms) for c in cs]
    variants = {
        "base": cs,
        "permuted": [c.replace(numbers=c.numbers[p], frac_coords=c.frac_coords[p]) for c, p in zip(cs, perms)],
        "translated": [c.replace(frac_coords=np.mod(c.frac_coords + rng.uniform(size=3), 1.0)) for c in cs],
        "supercell": [_supercell(c) for c in cs],
        "other_cell": [_other_cell(c) for c in cs],
    }
    graphs = {k: [radius_graph(c) for c in v] for k, v in variants.items()}
    budget = Budget(max(sum(g.num_nodes for g in v) for v in graphs.values()) + 1,
                    max(sum(g.num_edges for g in v) for v in graphs.values()), len(cs) + 1)
    batches = {k: to_device(pad_graphs([graph_to_jraph(g) for g in v], budget)) for k, v in graphs.items()}
    model = MatformerRegressor(encoder=MatformerEncoder(**SMALL))
    variables = model_variables(model, batches["base"])
    out = {k: tree_map(np.asarray, predict_eval(model, variables, b)) for k, b in batches.items()}

    y0, nodes0 = out["base"][0][:4], out["base"][1]
    assert np.std(y0) > 1e-3  # distinct crystals give distinct predictions
    for k in ("permuted", "translated", "supercell", "other_cell"):
        np.testing.assert_allclose(out[k][0][:4], y0, rtol=1e-5, atol=1e-5, err_msg=k)
    offsets = np.cumsum([0] + [c.num_atoms for c in cs])
    for c, p, o in zip(cs, perms, offsets):
        np.testing.assert_allclose(out["permuted"][1][o:o + c.num_atoms], nodes0[o:o + c.num_atoms][p],
                                   rtol=1e-4, atol=1e-4)
    n0 = cs[0].num_atoms  # the supercell's second copy of crystal 0 = crystal 0
    np.testing.assert_allclose(out["supercell"][1][n0:2 * n0], nodes0[:n0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ padding

def _train_apply(model, variables, batch):
    def loss_fn(params):
        y, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch, train=True,
                             mutable=["batch_stats"])
        mask = batch.globals["mask"]
        return jnp.sum(jnp.where(mask, (y - 1.0) ** 2, 0.0)), (y, upd)

    (_, (y, upd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    return y, upd["batch_stats"], grads


train_apply = jax.jit(_train_apply, static_argnums=0)


def test_padding_does_not_leak(crystals):
    """Unpadded and two differently padded batches: same predictions, BN statistics, gradients."""
    graphs = [build_crystal_graph(c) for c in crystals[:4]]
    model = MatformerRegressor(encoder=MatformerEncoder(**SMALL))
    variables = model_variables(model, padded_batch(graphs))
    results = [train_apply(model, variables, to_device(b)) for b in (
        unpadded_batch(graphs), padded_batch(graphs, 1, 0, 1), padded_batch(graphs, 70, 900, 4))]
    y_ref, stats_ref, grads_ref = results[0]
    assert y_ref.shape == (4,)
    for y, stats, grads in results[1:]:
        np.testing.assert_allclose(np.asarray(y[:4]), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
        tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, stats_ref)
        tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), grads, grads_ref)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(results[2][2]))


@pytest.mark.parametrize("stats", ["two_pass", "gathered"])
def test_cross_device_batchnorm_statistics(crystals, stats):
    """BatchNorm with `axis_name`, run on two shares under `vmap` and under `shard_map` (two
    fake CPU devices), equals BatchNorm over the whole global batch on one device (two-pass
    statistics there), with either way of summing the statistics."""
    graphs = [build_crystal_graph(c) for c in crystals[:4]]
    budget = Budget(32, 1024, 4)
    shares = [pad_graphs([graph_to_jraph(g) for g in part], budget) for part in (graphs[:2], graphs[2:])]
    whole = to_device(pad_graphs([graph_to_jraph(g) for g in graphs], Budget(64, 2048, 8)))
    single = MatformerRegressor(encoder=MatformerEncoder(**SMALL))
    mapped = MatformerRegressor(encoder=MatformerEncoder(**SMALL, axis_name="batch", batch_norm_stats=stats))
    variables = model_variables(single, shares[0])
    y_ref, stats_ref, grads_ref = train_apply(single, variables, whole)
    y_ref = np.asarray(y_ref)

    def local(b):
        y, upd = mapped.apply(variables, b, train=True, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    if stats == "two_pass":  # "gathered" is for shard_map (the training step), not vmap's named axes
        stacked = to_device(tree_map(lambda *xs: np.stack(xs), *shares))
        y, bn_stats = jax.jit(jax.vmap(local, axis_name="batch"))(stacked)
        np.testing.assert_allclose(np.asarray(y[:, :2]).reshape(-1), y_ref[:4], rtol=1e-5, atol=1e-6)
        for i in range(2):
            tree_map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6), bn_stats, stats_ref)

    assert len(jax.devices()) >= 2, "tests/conftest.py sets 4 fake CPU devices"
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
    from dpf_jax.train.parallel import shard_map  # jax.shard_map, or the experimental one
    folded = to_device(tree_map(lambda *xs: np.concatenate(xs), *shares))  # each shard keeps local indices
    f = jax.jit(shard_map(local, mesh, in_specs=(P("batch"),), out_specs=(P("batch"), P())))
    y, bn_stats = f(folded)
    np.testing.assert_allclose(np.asarray(y)[[0, 1, 4, 5]], y_ref[:4], rtol=1e-5, atol=1e-6)
    tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), bn_stats, stats_ref)


def _batchnorm_loss(bn, x, mask, weights, ra_mean, axis_name=None):
    """Σ w * BN(x) over real rows (summed over `axis_name` too) and the new running statistics."""
    variables = {"params": {"scale": jnp.linspace(0.5, 1.5, x.shape[1]), "bias": jnp.full((x.shape[1],), 0.1)},
                 "batch_stats": {"mean": ra_mean, "var": jnp.ones((x.shape[1],))}}

    def loss(x):
        y, upd = bn.apply(variables, x, mask, True, mutable=["batch_stats"])
        total = jnp.sum(jnp.where(mask[:, None], weights * y, 0.0))
        return (jax.lax.psum(total, axis_name) if axis_name else total), upd["batch_stats"]

    (value, stats), grad = jax.value_and_grad(loss, has_aux=True)(x)
    return value, stats, grad


def test_gathered_batchnorm_equals_two_pass():
    """"gathered" statistics (each device's count, mean and squared deviations, all-gathered once
    and combined) give the same outputs, running statistics and input gradients as "two_pass"
    on one device, for features whose mean is 30 standard deviations from zero and a share of
    padding rows, on one device and spread unevenly over four fake devices (one with no real row)."""
    from jax.sharding import Mesh, PartitionSpec as P

    from dpf_jax.model.layers import MaskedBatchNorm
    from dpf_jax.train.parallel import shard_map

    rng = np.random.default_rng(0)
    rows, channels = 64, 8
    x = (rng.normal(size=(rows, channels)) * 0.5 + np.linspace(-15.0, 15.0, channels)).astype(np.float32)
    mask = rng.random(rows) < np.repeat([0.9, 0.5, 0.0, 0.8], rows // 4)  # device 2: padding only
    weights = rng.normal(size=(rows, channels)).astype(np.float32)
    ra_mean = rng.normal(size=channels).astype(np.float32)
    ref = _batchnorm_loss(MaskedBatchNorm(stats="two_pass"), x, mask, weights, ra_mean)
    one = _batchnorm_loss(MaskedBatchNorm(stats="gathered"), x, mask, weights, ra_mean)

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    spread = jax.jit(shard_map(
        functools.partial(_batchnorm_loss, MaskedBatchNorm(stats="gathered", axis_name="data"), axis_name="data"),
        mesh, in_specs=(P("data"), P("data"), P("data"), P()), out_specs=(P(), P(), P("data"))))
    four = spread(x, mask, weights, ra_mean)
    for got in (one, four):
        np.testing.assert_allclose(got[0], ref[0], atol=1e-4)  # a sum of 400 terms of size ~1
        tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got[1], ref[1])
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(ref[2])).max() > 0.1  # gradients are not trivially zero
    with pytest.raises(ValueError, match="two_pass"):
        _batchnorm_loss(MaskedBatchNorm(stats="one_pass"), x, mask, weights, ra_mean)


# --------------------------------------------------------------------------- dtype, misc

def test_bfloat16_close_to_float32(crystals):
    graphs = [build_crystal_graph(c) for c in crystals[:4]]
    batch = to_device(padded_batch(graphs))
    f32 = MatformerEncoder(num_layers=3, channels=64, heads=4)
    bf16 = MatformerEncoder(num_layers=3, channels=64, heads=4, dtype=jnp.bfloat16)
    variables = model_variables(f32, padded_batch(graphs))
    run = jax.jit(lambda v: (f32.apply(v, batch, train=False), bf16.apply(v, batch, train=False)))
    out32, out16 = run(variables)
    assert out16.nodes.dtype == jnp.float32
    assert jax.tree_util.tree_all(tree_map(lambda p: p.dtype == jnp.float32, variables["params"]))
    m = np.asarray(batch.nodes["mask"])
    a, b = np.asarray(out32.nodes)[m], np.asarray(out16.nodes)[m]
    assert np.all(np.isfinite(b))
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < rel < 3e-2, rel
    np.testing.assert_array_equal(out16.edge_len, out32.edge_len)  # geometry stays float32


def test_flax_init_and_masked_species(crystals):
    """Flax init gives PyTorch-style bounds, BN running stats (0, 1); species 0 (a masked
    atom) is embedded from the all-zero "unknown" row, i.e. as the atom_embedding bias."""
    graphs = [build_crystal_graph(c) for c in crystals[:2]]
    b = padded_batch(graphs)
    species = b.nodes["species"].copy()
    species[0] = 0
    masked = to_device(b._replace(nodes={**b.nodes, "species": species}))
    enc = MatformerEncoder(num_layers=1, channels=8, heads=2)
    v = jax.jit(enc.init, static_argnames="train")(jax.random.PRNGKey(0), masked, train=False)
    for path, leaf in jax.tree_util.tree_flatten_with_path(v["params"])[0]:
        name, parent = path[-1].key, path[-2].key
        if name == "kernel":
            bound = 1 / math.sqrt(leaf.shape[0])
            assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.5 * bound, path
        elif parent in _NORMS:
            np.testing.assert_array_equal(leaf, 1.0 if name == "scale" else 0.0)
    bn = v["batch_stats"]["att_layers_0"]["bn"]
    np.testing.assert_array_equal(bn["mean"], 0.0)
    np.testing.assert_array_equal(bn["var"], 1.0)
    enc0 = MatformerEncoder(num_layers=0, channels=8)
    v0 = {"params": {k: v["params"][k] for k in ("atom_embedding", "rbf_1", "rbf_3")}}
    out = jax.jit(lambda v: enc0.apply(v, masked, train=False))(v0)
    np.testing.assert_allclose(np.asarray(out.nodes[0]), np.asarray(v["params"]["atom_embedding"]["bias"]),
                               rtol=1e-6)


def test_full_model_train_step_and_gradients(crystals):
    """The full-size model on real graphs: finite outputs and gradients w.r.t. params,
    positions and lattice (padding included); BatchNorm statistics move in train mode."""
    graphs = [build_crystal_graph(c) for c in crystals[:6]]
    batch = to_device(padded_batch(graphs))
    model = MatformerRegressor()
    variables = model_variables(model, padded_batch(graphs))

    @jax.jit
    def step(variables, pos, lattice):
        def loss_fn(params, pos, lattice):
            b = batch._replace(nodes={**batch.nodes, "positions": pos}, globals={**batch.globals, "lattice": lattice})
            y, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, b, train=True,
                                 mutable=["batch_stats"])
            return jnp.sum(jnp.where(b.globals["mask"], y ** 2, 0.0)), (y, upd)
        return jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(variables["params"], pos, lattice)

    (loss, (y, upd)), grads = step(variables, batch.nodes["positions"], batch.globals["lattice"])
    assert y.shape == (batch.n_node.shape[0],) and np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(np.asarray(grads[1])).max() > 0  # forces flow back into positions
    before = variables["batch_stats"]["encoder"]["att_layers_0"]["bn"]["mean"]
    after = upd["batch_stats"]["encoder"]["att_layers_0"]["bn"]["mean"]
    assert not np.allclose(before, after)


@pytest.mark.parametrize("remat", ["layer", "dots", "gate", "gate_lean", "stats"])
def test_remat_changes_nothing_but_memory_and_speed(crystals, remat):
    """`model.remat` recomputes each layer in the backward: same parameter tree (checkpoints
    interchangeable), same loss, gradients and BatchNorm running statistics as without it."""
    graphs = [build_crystal_graph(c) for c in crystals[:4]]
    batch = to_device(padded_batch(graphs))
    plain = MatformerRegressor(encoder=MatformerEncoder(**SMALL))
    rematted = MatformerRegressor(encoder=MatformerEncoder(**SMALL, remat=remat))
    variables = model_variables(plain, padded_batch(graphs))
    shapes = jax.eval_shape(lambda b: rematted.init(jax.random.PRNGKey(0), b, train=False), batch)
    assert tree_map(jnp.shape, dict(shapes)) == tree_map(jnp.shape, variables)

    def loss_and_grads(model):
        def loss_fn(params):
            y, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch, train=True,
                                 mutable=["batch_stats"])
            return jnp.sum(jnp.where(batch.globals["mask"], y ** 2, 0.0)), upd
        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])

    (loss_a, upd_a), grads_a = loss_and_grads(plain)
    (loss_b, upd_b), grads_b = loss_and_grads(rematted)
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-6)
    # tolerance: summation order, on the scale of the whole gradient (some leaves, e.g. biases
    # right before a BatchNorm, are zero up to rounding)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree_util.tree_leaves(grads_a))
    for a, b in zip(jax.tree_util.tree_leaves(grads_a), jax.tree_util.tree_leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4 * scale)
    for a, b in zip(jax.tree_util.tree_leaves(upd_a), jax.tree_util.tree_leaves(upd_b)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(grads_b))
    with pytest.raises(ValueError, match="model.remat"):
        MatformerEncoder(**SMALL, remat="everything").init(jax.random.PRNGKey(0), batch, train=False)


# ------------------------------------------------------------------------------ merged edges

@pytest.mark.parametrize("formulation", ["node", "edge"])
def test_merged_edges_give_the_same_model(crystals, formulation):
    """Graphs with equal edges merged (`graph.merge_edges`: "mirror", "distance") and equal
    atoms merged ("atoms": BatchNorm statistics and the per-crystal mean weighted by class
    sizes) give the reference graph's predictions (train and eval mode), BatchNorm statistics
    and parameter gradients, up to float32 rounding, with 30-70% fewer edges."""
    model = MatformerRegressor(encoder=MatformerEncoder(**SMALL, formulation=formulation))
    ref_graphs = [build_crystal_graph(c) for c in crystals]
    batches = {level: to_device(padded_batch([build_crystal_graph(c, merge_edges=level) for c in crystals]))
               for level in ("none", "mirror", "distance", "atoms")}
    variables = model_variables(model, batches["none"])

    def loss(params, batch):
        y, upd = model.apply({**variables, "params": params}, batch, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.where(batch.globals["mask"], y, 0.0) ** 2), (y, upd["batch_stats"])

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l0, (y0, bs0)), g0 = grad_fn(variables["params"], batches["none"])
    e0 = sum(g.num_edges for g in ref_graphs)
    for level in ("mirror", "distance", "atoms"):
        b = batches[level]
        assert int(b.edges["mask"].sum()) < 0.8 * e0
        assert int(b.edges["count"].sum()) == e0 if level != "atoms" else int(b.nodes["count"].max()) > 1
        (l1, (y1, bs1)), g1 = grad_fn(variables["params"], b)
        np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5, err_msg=level)
        np.testing.assert_allclose(l1, l0, rtol=1e-5, err_msg=level)
        tree_map(lambda a, b_: np.testing.assert_allclose(a, b_, rtol=2e-4, atol=1e-6, err_msg=level), g1, g0)
        tree_map(lambda a, b_: np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6, err_msg=level), bs1, bs0)
        np.testing.assert_allclose(predict_eval(model, variables, b)[0], predict_eval(model, variables,
                                   batches["none"])[0], rtol=1e-5, atol=1e-5, err_msg=level)
    # the counts matter: the same merged batch read as plain edges (count 1) is another model
    plain = batches["distance"]._replace(edges={**batches["distance"].edges,
                                                "count": batches["distance"].edges["mask"].astype(jnp.int32)})
    y_plain = grad_fn(variables["params"], plain)[0][1][0]
    assert not np.allclose(y_plain, y0, rtol=1e-3, atol=1e-3)
    # and so do the atom counts: unweighted, the merged atoms' BatchNorm statistics and means differ
    b = batches["atoms"]
    unweighted = b._replace(nodes={**b.nodes, "count": b.nodes["mask"].astype(jnp.int32)})
    y_unweighted = grad_fn(variables["params"], unweighted)[0][1][0]
    assert not np.allclose(y_unweighted, y0, rtol=1e-3, atol=1e-3)


def _pallas_call_names(jaxpr) -> list:
    """The names of every pallas_call in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            info = eqn.params.get("name_and_src_info", eqn.params.get("name"))
            found.append(str(getattr(info, "name", info)).split(" ")[0])
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _pallas_call_names(inner)
    return found


def test_auto_edge_kernel_follows_the_padded_budget(crystals, monkeypatch):
    """model.edge_kernel = "auto" on an NVIDIA GPU (forced here; only traced, not run) chooses per
    compiled budget: below AUTO_SUM_MIN_EDGES edges (lowered here to fit small crystals) the row
    backward with two segment kernels and XLA's LayerNorm and sums; above it, sparse or dense, the
    slot backward (the segment kernel adding the receivers' slots and the senders' edges) and the
    slot message-sum pair (its segment kernel adding the slots)."""
    from dpf_jax.model import layers

    monkeypatch.setattr(layers, "_on_nvidia_gpu", lambda: True)
    graphs = [radius_graph(c) for c in crystals[:4]]
    n = sum(g.num_nodes for g in graphs)
    e = sum(g.num_edges for g in graphs)
    model = MatformerRegressor(encoder=MatformerEncoder(**{**SMALL, "channels": 16}, edge_kernel="auto"))
    batches = {"sparse": padded_batch(graphs, extra_nodes=max(e // 10 - n, 5)),
               "dense": padded_batch(graphs, extra_edges=max(25 * (n + 5) - e, 40))}
    batches["small"] = batches["sparse"]
    names = {}
    for kind, batch in batches.items():
        monkeypatch.setattr(layers, "AUTO_SUM_MIN_EDGES", batch.senders.shape[0] + (kind == "small"))
        variables = model_variables(model, batch)
        loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, to_device(batch), train=True,  # noqa: E731
                                             mutable=["batch_stats"])[0] ** 2)
        names[kind] = _pallas_call_names(jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr)
    n_layers = SMALL["num_layers"]
    for kind in ("sparse", "dense"):
        assert names[kind].count("edge_gate_rows_bwd_slots") == n_layers and "edge_gate_rows_bwd" not in names[kind]
        assert names[kind].count("segment_rows") == 3 * n_layers
        assert names[kind].count("message_sum_slots_fwd") == names[kind].count("message_sum_slots_bwd") == n_layers
    assert names["small"].count("edge_gate_rows_bwd") == n_layers and "edge_gate_rows_bwd_slots" not in names["small"]
    assert names["small"].count("segment_rows") == 2 * n_layers
    assert not [name for name in names["small"] if name.startswith("message_sum")]
