"""On-device edge geometry (dpf_jax.data.geometry) against the host convention, on real crystals."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpf_jax.data.batching import Budget, graph_to_jraph, pad_graphs
from dpf_jax.data.geometry import edge_geometry, edge_lengths, edge_vectors
from dpf_jax.data.graphs import build_crystal_graph
from dpf_jax.data.readers import iter_jsonl
from conftest import DATA


@pytest.fixture(scope="module")
def graphs():
    crystals = list(itertools.islice(iter_jsonl(DATA / "jarvis_dft3d.jsonl.gz"), 12))
    return [build_crystal_graph(c) for c in crystals]


def _batch(graphs, budget=None):
    n = sum(g.num_nodes for g in graphs)
    e = sum(g.num_edges for g in graphs)
    budget = budget or Budget(n + 7, e + 33, len(graphs) + 2)
    return pad_graphs([graph_to_jraph(g) for g in graphs], budget)


def test_edge_vectors_match_host_convention(graphs):
    batch = _batch(graphs)
    vec, length = jax.jit(edge_geometry)(jax.tree_util.tree_map(jnp.asarray, batch))
    want = np.concatenate([g.edge_vectors() for g in graphs])
    e = want.shape[0]
    np.testing.assert_allclose(np.asarray(vec[:e]), want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(length[:e]), np.linalg.norm(want, axis=1), atol=2e-5, rtol=1e-5)
    # padding edges: zero self-loops, length 1.0
    assert not batch.edges["mask"][e:].any()
    np.testing.assert_array_equal(np.asarray(vec[e:]), 0.0)
    np.testing.assert_array_equal(np.asarray(length[e:]), 1.0)


def test_geometry_follows_positions_and_lattice(graphs):
    """Strained lattice + moved atoms (fixed images) give the exact new vectors."""
    g = graphs[3]
    batch = jax.tree_util.tree_map(jnp.asarray, _batch([g]))
    rng = np.random.default_rng(0)
    strain = np.eye(3) + 0.05 * rng.standard_normal((3, 3))
    lat = g.crystal.lattice @ strain
    frac = g.crystal.frac_coords + 0.02 * rng.standard_normal(g.crystal.frac_coords.shape)
    pos = np.zeros(batch.nodes["positions"].shape)
    pos[:g.num_nodes] = frac @ lat
    lattice = np.asarray(batch.globals["lattice"]).copy()
    lattice[0] = lat
    moved = batch._replace(nodes={**batch.nodes, "positions": jnp.asarray(pos, jnp.float32)},
                           globals={**batch.globals, "lattice": jnp.asarray(lattice, jnp.float32)})
    vec = np.asarray(edge_vectors(moved))[:g.num_edges]
    want = (frac[g.receivers] + g.images - frac[g.senders]) @ lat
    np.testing.assert_allclose(vec, want, atol=3e-5)


def test_lengths_gradients_finite_on_padding(graphs):
    batch = jax.tree_util.tree_map(jnp.asarray, _batch(graphs[:4]))
    mask = batch.edges["mask"]

    def loss(pos, lattice):
        b = batch._replace(nodes={**batch.nodes, "positions": pos}, globals={**batch.globals, "lattice": lattice})
        _, length = edge_geometry(b)
        return jnp.sum(jnp.where(mask, length, 0.0)) + jnp.sum(length)  # padding lengths enter too

    gp, gl = jax.grad(loss, argnums=(0, 1))(batch.nodes["positions"], batch.globals["lattice"])
    assert np.all(np.isfinite(np.asarray(gp))) and np.all(np.isfinite(np.asarray(gl)))
    # padding nodes / graphs receive zero gradient
    node_mask = np.asarray(batch.nodes["mask"])
    np.testing.assert_array_equal(np.asarray(gp)[~node_mask], 0.0)
    np.testing.assert_array_equal(np.asarray(gl)[~np.asarray(batch.globals["mask"])], 0.0)


def test_length_gradient_is_unit_vector():
    vec = jnp.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1e-9, 0.0, 0.0]])
    mask = jnp.array([True, False, True])
    g = jax.jacrev(lambda v: edge_lengths(v, mask))(vec)
    np.testing.assert_allclose(np.asarray(g[0, 0]), [0.6, 0.8, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(g[1]), 0.0)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(edge_lengths(vec, mask)), [5.0, 1.0, 1e-6], rtol=1e-6)
