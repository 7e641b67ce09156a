"""Tests of dpf_jax.tasks.perturb on real structures from data/*.jsonl.gz."""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pymatgen.core import Element, Lattice, Structure

from dpf_jax.data import geometry
from dpf_jax.data.batching import Budget, graph_to_jraph, pad_graphs, split_evenly
from dpf_jax.data.graphs import build_crystal_graph
from dpf_jax.data.records import Crystal
from dpf_jax.tasks import perturb as P

DATA = Path(__file__).resolve().parents[1] / "data"
ALL = P.PerturbConfig(mask_fraction=0.3, position_scale=0.3, lattice_scale=0.3)
BUDGET = Budget(256, 4096, 64)  # one padded shape for most tests (each shape is one jit compile)

# Jitted once per module: eager jnp compiles every op separately and is far slower on CPU.
PJ = jax.jit(P.perturb, static_argnames="cfg")
MASK = jax.jit(P.mask_atoms, static_argnums=2)
POS = jax.jit(P.perturb_positions, static_argnums=3)


@functools.lru_cache(maxsize=None)
def load(name: str, n: int) -> tuple[Crystal, ...]:
    out = []
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt") as f:
        for line in itertools.islice(f, n):
            r = json.loads(line)
            out.append(Crystal(id=r["id"], lattice=r["lattice"], numbers=[Element(s).Z for s in r["species"]],
                               frac_coords=r["frac_coords"]))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def real_graphs():
    """A mixed real set: JARVIS (small cells, 1-atom cells) and MP (up to 30 atoms)."""
    crystals = load("jarvis_dft3d", 24) + load("mp_megnet", 60)[36:60]
    return tuple(build_crystal_graph(c) for c in crystals)


def make_batch(graphs, first_index=0, budget=BUDGET):
    parts = [graph_to_jraph(g) for g in graphs]
    return jax.tree_util.tree_map(jnp.asarray, pad_graphs(parts, budget, first_index=first_index))


def structure_batch(crystals, first_index=0):
    """A padded batch without edges (for statistics over many atoms)."""
    b = P._host_batch(list(crystals), list(range(first_index, first_index + len(crystals))))
    return jax.tree_util.tree_map(jnp.asarray, b)


STATS_CFG = P.PerturbConfig(position_scale=0.3, lattice_scale=0.5)


@functools.lru_cache(maxsize=None)
def noise_statistics():
    """Position and lattice noise of 400 MP crystals (3462 atoms) under 40 keys."""
    batch = structure_batch(load("mp_megnet", 400))
    keys = jax.random.split(jax.random.PRNGKey(3), 40)
    outs, ts = jax.jit(jax.vmap(lambda k: P.perturb(k, batch, STATS_CFG)))(keys)
    return batch, jax.device_get(outs), jax.device_get(ts)


def node_slices(batch):
    n_node = np.asarray(batch.n_node)
    starts = np.concatenate([[0], np.cumsum(n_node)[:-1]])
    gmask = np.asarray(batch.globals["mask"])
    return [slice(int(s), int(s + n)) for s, n, m in zip(starts, n_node, gmask) if m]


def edge_vectors(batch):
    return np.asarray(geometry.edge_vectors(batch))


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_mask_exact_count(fraction):
    graphs = real_graphs()
    batch = make_batch(graphs)
    out, t = MASK(jax.random.PRNGKey(1), batch, fraction)
    species0 = np.asarray(batch.nodes["species"])
    species = np.asarray(out.nodes["species"])
    mask = np.asarray(t["mask"])
    assert mask.dtype == bool and t["species"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(t["species"]), species0)
    np.testing.assert_array_equal(species, np.where(mask, 0, species0))
    assert not mask[~np.asarray(batch.nodes["mask"])].any()
    for g, sl in zip(graphs, node_slices(batch)):
        n = g.num_nodes
        assert mask[sl].sum() == max(1, math.ceil(Fraction(str(fraction)) * n)), (g.crystal.id, n)


def test_exact_count_integer_arithmetic():
    n = np.arange(0, 2001)
    for f in (0.15, 0.3, 0.5, 0.7):
        want = np.array([0] + [max(1, math.ceil(Fraction(str(f)) * k)) for k in n[1:]])
        np.testing.assert_array_equal(P.exact_count(n, f), want)
        np.testing.assert_array_equal(np.asarray(P.exact_count(jnp.asarray(n), f)), want)


def test_mask_selection_is_uniform():
    graphs = real_graphs()
    batch = make_batch(graphs)
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    masks = np.asarray(jax.jit(jax.vmap(lambda k: P.mask_atoms(k, batch, 0.3)[1]["mask"]))(keys))
    freq = masks.mean(0)
    for g, sl in zip(graphs, node_slices(batch)):
        n = g.num_nodes
        # each atom is masked with probability k/n; binomial sd <= 0.012 for 2000 draws
        np.testing.assert_allclose(freq[sl], math.ceil(Fraction(3, 10) * n) / n, atol=0.05)
    # joint: for a 4-atom crystal (2 masked) every one of the 6 pairs appears ~1/6 of the time
    g4, sl4 = next((g, sl) for g, sl in zip(graphs, node_slices(batch)) if g.num_nodes == 4)
    pairs = np.unique(masks[:, sl4], axis=0, return_counts=True)[1]
    assert len(pairs) == 6 and np.all(np.abs(pairs / 2000 - 1 / 6) < 0.04)


def test_position_noise_statistics():
    batch, outs, ts = noise_statistics()
    real = np.asarray(batch.nodes["mask"])
    scale = STATS_CFG.position_scale
    disp = np.asarray(ts["displacement"])  # [K, N, 3]
    np.testing.assert_array_equal(ts["position_mask"], np.broadcast_to(real, disp.shape[:2]))
    assert np.all(disp[:, ~real] == 0)
    samples = disp[:, real].reshape(-1, 3)
    assert samples.size > 300_000
    assert np.all(np.abs(samples.mean(0)) < 0.01 * scale)
    np.testing.assert_allclose(samples.std(0) / scale, 1.0, atol=0.01)
    # Gaussian, not just the right variance: 4th moment 3σ⁴, fraction beyond 2σ 4.55 %
    np.testing.assert_allclose(np.mean((samples / scale) ** 4), 3.0, atol=0.08)
    np.testing.assert_allclose(np.mean(np.abs(samples) > 2 * scale), 0.0455, atol=0.002)
    c = np.corrcoef(samples.T)
    assert np.all(np.abs(c[np.triu_indices(3, 1)]) < 0.01)
    # positions = (lattice-transformed clean positions) + displacement
    pos_no_noise = np.asarray(outs.nodes["positions"]) - disp
    graph_of = np.asarray(batch.nodes["graph"])
    lat0 = np.asarray(batch.globals["lattice"], np.float64)
    frac0 = np.einsum("ni,nij->nj", np.asarray(batch.nodes["positions"]), np.linalg.inv(lat0)[graph_of])
    for k in range(3):
        lat = np.asarray(outs.globals["lattice"][k], np.float64)
        frac = np.einsum("ni,nij->nj", pos_no_noise[k], np.linalg.inv(lat)[graph_of])
        np.testing.assert_allclose(frac[real], frac0[real], atol=2e-5)


def test_position_fraction_exact_count():
    graphs = real_graphs()
    batch = make_batch(graphs)
    out, t = POS(jax.random.PRNGKey(5), batch, 0.1, 0.5)
    mask = np.asarray(t["mask"])
    disp = np.asarray(t["displacement"])
    for g, sl in zip(graphs, node_slices(batch)):
        assert mask[sl].sum() == max(1, math.ceil(g.num_nodes / 2))
    assert np.all(disp[~mask] == 0) and np.all(np.linalg.norm(disp[mask], axis=1) > 0)
    pos0 = np.asarray(batch.nodes["positions"])
    np.testing.assert_array_equal(np.asarray(out.nodes["positions"])[~mask], pos0[~mask])


def test_lattice_noise_statistics():
    batch, outs, ts = noise_statistics()
    crystals = load("mp_megnet", 400)
    gmask = np.asarray(batch.globals["mask"])
    scale = STATS_CFG.lattice_scale
    clean = np.asarray(ts["lattice_params"])[:, gmask]
    noisy = np.asarray(ts["noisy_lattice_params"])[:, gmask]
    fallback = np.all(noisy == clean, axis=-1)
    assert fallback.mean() < 0.01
    z = ((noisy - clean) / scale)[~fallback]  # [samples, 6]
    assert z.shape[0] > 15_000
    np.testing.assert_allclose(z.std(0), 1.0, atol=0.03)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=0.03)
    # clean params are those of the input lattice (pymatgen)
    for g, c in enumerate(crystals[:50]):
        np.testing.assert_allclose(clean[0, g], Lattice(c.lattice).parameters, rtol=1e-5, atol=2e-4)
    # the new matrices have the noisy parameters
    new_lat = np.asarray(outs.globals["lattice"])
    np.testing.assert_allclose(P.lattice_params_np(new_lat[:, gmask]), noisy, rtol=1e-5, atol=2e-3)


def test_lattice_fallback_and_bounds():
    crystals = load("mp_megnet", 200) + load("pretrain", 200)
    batch = structure_batch(crystals)
    gmask = np.asarray(batch.globals["mask"])
    out, t = jax.jit(P.perturb_lattice)(jax.random.PRNGKey(11), batch, 40.0)  # absurd noise
    clean, noisy = np.asarray(t["lattice_params"]), np.asarray(t["noisy_params"])
    fallback = np.all(noisy == clean, axis=1) & gmask
    assert 0 < fallback.sum() < gmask.sum()
    lat0, lat = np.asarray(batch.globals["lattice"]), np.asarray(out.globals["lattice"])
    np.testing.assert_array_equal(lat[fallback], lat0[fallback])
    node_fb = fallback[np.asarray(batch.nodes["graph"])]
    np.testing.assert_array_equal(np.asarray(out.nodes["positions"])[node_fb],
                                  np.asarray(batch.nodes["positions"])[node_fb])
    ok = gmask & ~fallback
    assert np.all(noisy[ok, :3] >= np.maximum(0.5 * clean[ok, :3], 0.5) - 1e-6)
    assert np.all((noisy[ok, 3:] >= 1.0) & (noisy[ok, 3:] <= 179.0))
    f_noisy, f_clean = P._volume_factor(noisy, np), P._volume_factor(clean, np)
    assert np.all(f_noisy[ok] >= 0.25 * f_clean[ok] - 1e-6)
    assert np.all(np.abs(np.linalg.det(lat[ok])) > 0)
    # handedness preserved
    assert np.all(np.sign(np.linalg.det(lat[gmask])) == np.sign(np.linalg.det(lat0[gmask])))


def test_lattice_param_roundtrip_matches_pymatgen():
    lats = np.array([c.lattice for c in load("jarvis_dft3d", 300) + load("pretrain", 300)])
    p = P.lattice_params_np(lats)
    for L, q in zip(lats[:100], p[:100]):
        np.testing.assert_allclose(q, Lattice(L).parameters, rtol=1e-10, atol=1e-9)
    rebuilt = P.lattice_from_params_np(p)
    np.testing.assert_allclose(P.lattice_params_np(rebuilt), p, rtol=1e-9, atol=1e-7)
    for q, M in zip(p[:100], rebuilt[:100]):
        np.testing.assert_allclose(M, Lattice.from_parameters(*q).matrix, atol=1e-9)
    # jnp (float32) versions agree
    pj = np.asarray(P.lattice_params(jnp.asarray(lats, jnp.float32)))
    np.testing.assert_allclose(pj, p, rtol=1e-5, atol=3e-3)
    Mj = np.asarray(P.lattice_from_params(jnp.asarray(p, jnp.float32)))
    np.testing.assert_allclose(Mj, rebuilt, rtol=1e-4, atol=2e-4)
    # same volume up to sign
    np.testing.assert_allclose(np.abs(np.linalg.det(rebuilt)), np.abs(np.linalg.det(lats)), rtol=1e-8)


def _pymatgen_check(batch_out, graphs):
    """Edge vectors recomputed on device vs pymatgen on the perturbed structures."""
    vec = edge_vectors(batch_out)
    pos = np.asarray(batch_out.nodes["positions"], np.float64)
    lat = np.asarray(batch_out.globals["lattice"], np.float64)
    snd, rcv = np.asarray(batch_out.senders), np.asarray(batch_out.receivers)
    img = np.asarray(batch_out.edges["images"])
    n0 = e0 = 0
    for g, graph in enumerate(graphs):
        n, e = graph.num_nodes, graph.num_edges
        s = Structure(Lattice(lat[g]), ["H"] * n, pos[n0:n0 + n], coords_are_cartesian=True)  # species irrelevant
        es, er, ei = snd[e0:e0 + e] - n0, rcv[e0:e0 + e] - n0, img[e0:e0 + e]
        np.testing.assert_array_equal(es, graph.senders)
        want = s.lattice.get_cartesian_coords(s.frac_coords[er] + ei - s.frac_coords[es])
        np.testing.assert_allclose(vec[e0:e0 + e], want, atol=2e-4)
        for k in range(0, e, max(1, e // 8)):  # a few distances through pymatgen's own API
            d = s.get_distance(int(es[k]), int(er[k]), jimage=ei[k])
            assert abs(np.linalg.norm(vec[e0 + k]) - d) < 2e-4
        n0 += n
        e0 += e


def test_edge_vectors_match_pymatgen_after_perturbation():
    graphs = real_graphs()
    batch = make_batch(graphs)
    out, t = PJ(jax.random.PRNGKey(2), batch, cfg=ALL)
    _pymatgen_check(out, graphs)
    # and the geometry really changed, consistently with the targets:
    vec0, vec = edge_vectors(batch), edge_vectors(out)
    real = np.asarray(batch.edges["mask"])
    assert np.abs(vec - vec0)[real].max() > 0.05
    # clean structure in the noisy cell = positions - displacement: its edges have the clean
    # lengths scaled by the lattice change only (fractional coordinates are the clean ones)
    clean_in_noisy = out._replace(nodes={**out.nodes, "positions": out.nodes["positions"] - t["displacement"]})
    lat0 = np.asarray(batch.globals["lattice"], np.float64)
    lat1 = np.asarray(out.globals["lattice"], np.float64)
    graph_of = np.asarray(batch.nodes["graph"])[np.asarray(batch.senders)]
    frac_vec = np.einsum("ei,eij->ej", vec0, np.linalg.inv(lat0)[graph_of])
    want = np.einsum("ei,eij->ej", frac_vec, lat1[graph_of])
    np.testing.assert_allclose(edge_vectors(clean_in_noisy)[real], want[real], atol=2e-4)


def test_padding_untouched():
    graphs = real_graphs()
    batch = make_batch(graphs)
    out, t = PJ(jax.random.PRNGKey(4), batch, cfg=ALL)
    nmask = ~np.asarray(batch.nodes["mask"])
    gmask = ~np.asarray(batch.globals["mask"])
    assert nmask.sum() > 0 and gmask.sum() > 1
    for k in batch.nodes:
        np.testing.assert_array_equal(np.asarray(out.nodes[k])[nmask], np.asarray(batch.nodes[k])[nmask])
    for k in batch.globals:
        np.testing.assert_array_equal(np.asarray(out.globals[k])[gmask], np.asarray(batch.globals[k])[gmask])
    for k in batch.edges:
        np.testing.assert_array_equal(np.asarray(out.edges[k]), np.asarray(batch.edges[k]))
    for f in ("senders", "receivers", "n_node", "n_edge"):
        np.testing.assert_array_equal(np.asarray(getattr(out, f)), np.asarray(getattr(batch, f)))
    assert not np.asarray(t["type_mask"])[nmask].any()
    assert not np.asarray(t["position_mask"])[nmask].any()
    assert np.all(np.asarray(t["displacement"])[nmask] == 0)
    assert not np.asarray(t["lattice_mask"])[gmask].any()
    # every real crystal got a perturbation
    assert np.asarray(t["type_mask"]).sum() >= len(graphs)


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_determinism_and_key_dependence():
    batch = make_batch(real_graphs())
    r1 = PJ(jax.random.PRNGKey(9), batch, cfg=ALL)
    r2 = PJ(jax.random.PRNGKey(9), batch, cfg=ALL)
    assert _tree_equal(r1, r2)
    r4 = PJ(jax.random.PRNGKey(10), batch, cfg=ALL)
    assert not np.array_equal(np.asarray(r1[1]["type_mask"]), np.asarray(r4[1]["type_mask"]))
    assert not np.array_equal(np.asarray(r1[1]["displacement"]), np.asarray(r4[1]["displacement"]))
    assert not np.array_equal(np.asarray(r1[1]["noisy_lattice_params"]), np.asarray(r4[1]["noisy_lattice_params"]))
    # streams are independent: disabling masking does not change the position or lattice noise
    r5 = PJ(jax.random.PRNGKey(9), batch, cfg=P.PerturbConfig(position_scale=0.3, lattice_scale=0.3))
    for k in ("displacement", "noisy_lattice_params"):
        np.testing.assert_array_equal(np.asarray(r5[1][k]), np.asarray(r1[1][k]))
    assert set(r5[1]) == {"displacement", "position_mask", "lattice_params", "noisy_lattice_params", "lattice_mask"}
    out, t = P.perturb(jax.random.PRNGKey(9), batch, {"mask_fraction": None, "position_scale": 0})
    assert t == {} and _tree_equal(out, batch)


def test_typed_keys_and_hash_blocks():
    hi, lo = jnp.arange(5, dtype=jnp.int32), jnp.arange(5, dtype=jnp.uint32) * 8
    raw = P.hash_blocks(jax.random.PRNGKey(9), hi, lo)
    typed = P.hash_blocks(jax.random.key(9), hi, lo)
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(typed))
    assert raw.shape == (5, 2) and raw.dtype == jnp.uint32
    assert len(np.unique(np.asarray(raw))) == 10
    # domain-separated from jax.random's own use of the key: fold_in(key, d) hashes (0, d)
    fold = jax.random.fold_in(jax.random.PRNGKey(9), 8)
    assert not np.any(np.all(np.asarray(raw) == np.asarray(fold), axis=1))
    with pytest.raises(ValueError):
        P.hash_blocks(jax.random.split(jax.random.PRNGKey(0), 2), hi, lo)


def test_jit():
    batch = make_batch(real_graphs())
    key = jax.random.PRNGKey(12)
    # static-config jit (used throughout this module) and a closure over a plain dict agree
    a = PJ(key, batch, cfg=ALL)
    closure = jax.jit(lambda k, g: P.perturb(k, g, {"mask_fraction": 0.3, "position_scale": 0.3,
                                                    "lattice_scale": 0.3}))
    b = closure(key, batch)
    assert _tree_equal(a, b)
    assert set(a[1]) == {"species", "type_mask", "displacement", "position_mask", "lattice_params",
                         "noisy_lattice_params", "lattice_mask"}
    # a traced scale works too (one compile for every scale)
    f = jax.jit(lambda k, g, s: P.perturb_positions(k, g, s))
    d1 = f(key, batch, 0.1)[1]["displacement"]
    d2 = f(key, batch, 0.2)[1]["displacement"]
    np.testing.assert_allclose(2 * np.asarray(d1), np.asarray(d2), rtol=1e-6)


def test_device_count_independence():
    graphs = real_graphs()
    key = jax.random.PRNGKey(21)
    whole = make_batch(graphs, 0)
    out1, t1 = PJ(key, whole, cfg=ALL)
    # two shares of the same global batch, padded to a common (different) budget
    shares = split_evenly(list(range(len(graphs))), 2)
    budget2 = Budget(128, 2048, len(graphs) // 2 + 2)
    per_crystal = []
    for sh in shares:
        b = make_batch([graphs[i] for i in sh], sh[0], budget2)
        per_crystal.append((b, *PJ(key, b, cfg=ALL)))

    def crystal_view(batch, out, t, g, n0):
        n = int(batch.n_node[g])
        sl = slice(n0, n0 + n)
        return dict(pos=np.asarray(out.nodes["positions"][sl]), species=np.asarray(out.nodes["species"][sl]),
                    lat=np.asarray(out.globals["lattice"][g]), disp=np.asarray(t["displacement"][sl]),
                    tmask=np.asarray(t["type_mask"][sl]), noisy=np.asarray(t["noisy_lattice_params"][g]))

    n0_whole = np.concatenate([[0], np.cumsum(np.asarray(whole.n_node))])
    checked = 0
    for sh, (b, out, t) in zip(shares, per_crystal):
        n0s = np.concatenate([[0], np.cumsum(np.asarray(b.n_node))])
        for local, gi in enumerate(sh):
            a = crystal_view(whole, out1, t1, gi, n0_whole[gi])
            c = crystal_view(b, out, t, local, n0s[local])
            for k in a:
                np.testing.assert_array_equal(a[k], c[k], err_msg=f"crystal {gi} field {k}")
            checked += 1
    assert checked == len(graphs)
    # without the "index" convention (positions in the share) the noise would differ
    no_index = make_batch([graphs[i] for i in shares[1]], 0, budget2)
    _, t_bad = PJ(key, no_index, cfg=ALL)
    assert not np.array_equal(np.asarray(t_bad["noisy_lattice_params"][0]),
                              np.asarray(t1["noisy_lattice_params"][shares[1][0]]))


def test_host_perturbation_matches_device():
    graphs = real_graphs()
    crystals = [g.crystal for g in graphs]
    key = jax.random.PRNGKey(33)
    first = 5
    batch = make_batch(graphs, first)
    out, t = PJ(key, batch, cfg=ALL)
    host = P.perturb_crystals_host(key, crystals, ALL, indices=range(first, first + len(crystals)))
    single = P.perturb_crystal_host(key, crystals[3], ALL, index=first + 3)
    slices = node_slices(batch)
    for g, ((c, ht), sl) in enumerate(zip(host, slices)):
        np.testing.assert_allclose(c.cart_coords, np.asarray(out.nodes["positions"][sl]), atol=1e-5)
        np.testing.assert_allclose(c.lattice, np.asarray(out.globals["lattice"][g]), atol=1e-6)
        np.testing.assert_array_equal(c.numbers, np.asarray(out.nodes["species"][sl]))
        np.testing.assert_array_equal(ht["type_mask"], np.asarray(t["type_mask"][sl]))
        np.testing.assert_array_equal(ht["species"], crystals[g].numbers)
        np.testing.assert_allclose(ht["displacement"], np.asarray(t["displacement"][sl]), atol=1e-7)
        np.testing.assert_allclose(ht["noisy_lattice_params"], np.asarray(t["noisy_lattice_params"][g]), rtol=1e-6, atol=1e-6)
        assert ht["lattice_mask"].shape == () and bool(ht["lattice_mask"])
    np.testing.assert_allclose(single[0].cart_coords, host[3][0].cart_coords, atol=1e-6)
    # an int seed means PRNGKey(seed)
    a = P.perturb_crystal_host(33, crystals[0], ALL, index=first)
    np.testing.assert_allclose(a[0].cart_coords, host[0][0].cart_coords, atol=1e-6)
    # host targets batch into the pad_graphs layout (compared on real atoms / crystals)
    n_nodes, n_graphs = int(batch.nodes["mask"].shape[0]), int(batch.n_node.shape[0])
    bt = P.batch_host_targets([h[1] for h in host], n_nodes, n_graphs)
    real_n, real_g = np.asarray(batch.nodes["mask"]), np.asarray(batch.globals["mask"])
    for k, v in t.items():
        v = np.asarray(v)
        real = real_g if v.shape[0] == n_graphs else real_n
        assert bt[k].shape == v.shape and bt[k].dtype == v.dtype, k
        np.testing.assert_allclose(bt[k][real], v[real], rtol=1e-6, atol=1e-6, err_msg=k)
        assert not np.any(bt[k][~real])


def test_rebuilt_topology_is_knn_of_perturbed_structure():
    graphs = real_graphs()
    crystals = [g.crystal for g in graphs]
    host = P.perturb_crystals_host(jax.random.PRNGKey(8), crystals, ALL)  # same shape: no recompile
    rebuilt = [P.rebuild_topology(c, ht["species"]) for c, ht in host]
    changed = 0
    for (c, ht), g_new, g_old in zip(host, rebuilt, graphs):
        assert g_new.crystal is c and (c.numbers == 0).sum() == ht["type_mask"].sum()
        # k-NN property on the perturbed structure, checked with pymatgen's neighbour list
        s = Structure(Lattice(c.lattice), ht["species"].tolist(), c.frac_coords)
        ci, pi, images, dist = s.get_neighbor_list(12.0)
        edges = set(zip(g_new.senders.tolist(), g_new.receivers.tolist(), map(tuple, g_new.images.tolist())))
        for i in range(c.num_atoms):
            sel = (ci == i) & (dist > 0.15)
            d = np.sort(dist[sel])
            assert d.size >= 12
            kth = d[11]
            for j, im, dd in zip(pi[sel], images[sel], dist[sel]):
                if dd < kth - 1e-6:
                    assert (i, int(j), tuple(int(x) for x in im)) in edges
        changed += (g_new.num_edges != g_old.num_edges) or not np.array_equal(g_new.images, g_old.images)
    assert changed > 0  # noise does change k-NN topologies
    # the rebuilt graphs batch and their device geometry matches pymatgen
    batch = make_batch(rebuilt)
    _pymatgen_check(batch, [P.rebuild_topology(c, ht["species"]) for c, ht in host])


def test_official_variant():
    crystals = load("jarvis_dft3d", 40)
    for c in crystals:
        a_c, a_t = P.perturb_official_host(7, c)
        b_c, b_t = P.perturb_official_host(7, c)
        np.testing.assert_array_equal(a_c.frac_coords, b_c.frac_coords)
        np.testing.assert_array_equal(a_c.lattice, b_c.lattice)
        np.testing.assert_array_equal(a_t["mask"], b_t["mask"])
        n = c.num_atoms
        assert a_t["mask"].sum() == min(n, max(1, math.ceil(n * 0.3)))
        np.testing.assert_array_equal(a_c.numbers, np.where(a_t["mask"], 0, c.numbers))
        np.testing.assert_array_equal(a_t["species"], c.numbers)
        np.testing.assert_array_equal(a_t["frac_coords"], c.frac_coords)
        np.testing.assert_array_equal(a_t["lattice"], c.lattice.reshape(9))
        assert np.all((a_c.frac_coords >= 0) & (a_c.frac_coords < 1))
        shift = (a_c.frac_coords - c.frac_coords) % 1.0
        assert np.all(shift < 0.3 + 1e-9)
        dl = a_c.lattice - c.lattice
        assert np.all((dl >= 0) & (dl < 0.3))
        c2, _ = P.perturb_official_host(8, c)
        assert not np.array_equal(c2.lattice, a_c.lattice)
    assert not P.official_keeps(next(c for c in crystals if c.num_atoms == 1))
    g = P.rebuild_topology(*P.perturb_official_host(7, crystals[1])[:1])
    assert g.num_edges > 0 and (g.crystal.numbers == 0).any()
