"""Tests of dpf_jax.tasks.losses against hand-computed numpy on real-derived inputs."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pymatgen.core import Element, Lattice

from dpf_jax.tasks import losses as L

DATA = Path(__file__).resolve().parents[1] / "data"


def records(name: str, n: int):
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


@pytest.fixture(scope="module")
def jarvis():
    return records("jarvis_dft3d", 40)


def test_regression_errors(jarvis):
    # targets: formation energies of 16 JARVIS crystals; "predictions": their total energies
    # scaled down (a real-valued, crystal-dependent stand-in), the last 4 entries are padding.
    target = np.array([r["formation_energy_peratom"] for r in jarvis[:16]], np.float32)
    pred = np.array([0.2 * r["optb88vdw_total_energy"] for r in jarvis[:16]], np.float32)
    mask = np.arange(16) < 12
    pred_bad = pred.copy()
    pred_bad[~mask] = [np.nan, np.inf, -np.inf, 1e30]
    s, c = L.regression_sq_error(pred_bad, target, mask)
    d = (pred - target)[mask].astype(np.float64)
    np.testing.assert_allclose(float(s), np.sum(d**2), rtol=1e-5)
    assert float(c) == 12
    s, c = L.regression_abs_error(pred_bad, target, mask)
    np.testing.assert_allclose(float(s), np.sum(np.abs(d)), rtol=1e-5)
    assert float(c) == 12
    # [G, k] predictions: the mask covers whole rows and the count is per scalar
    t2 = np.stack([target, np.array([r["optb88vdw_bandgap"] for r in jarvis[:16]], np.float32)], 1)
    p2 = t2 + np.array([[0.1, -0.3]], np.float32)
    s, c = L.regression_sq_error(p2, t2, mask)
    np.testing.assert_allclose(float(s), 12 * (0.01 + 0.09), rtol=1e-5)
    assert float(c) == 24
    # gradient: finite, zero on padding rows even where the prediction is NaN
    g = jax.grad(lambda p: L.regression_sq_error(p, target, mask)[0])(jnp.asarray(pred_bad))
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)
    np.testing.assert_allclose(g[mask], 2 * d, rtol=1e-5)


def test_sum_count_pairs_combine_across_shares(jarvis):
    """psum(sum) / psum(count) over shares equals the mean of the whole batch."""
    target = np.array([r["formation_energy_peratom"] for r in jarvis], np.float32)
    pred = np.array([0.1 * r["ehull"] if r["ehull"] is not None else 0.0 for r in jarvis], np.float32)
    mask = np.ones(len(jarvis), bool)
    s_all, c_all = L.regression_abs_error(pred, target, mask)
    # uneven shares, each padded with garbage to a common size of 32
    parts = [(0, 7), (7, 40)]
    tot_s = tot_c = 0.0
    for a, b in parts:
        n = b - a
        pp = np.full(33, np.nan, np.float32)
        tt = np.zeros(33, np.float32)
        mm = np.zeros(33, bool)
        pp[:n], tt[:n], mm[:n] = pred[a:b], target[a:b], True
        s, c = L.regression_abs_error(pp, tt, mm)
        tot_s += float(s)
        tot_c += float(c)
    np.testing.assert_allclose(tot_s / tot_c, float(s_all) / float(c_all), rtol=1e-6)
    np.testing.assert_allclose(tot_s / tot_c, np.mean(np.abs(pred - target)), rtol=1e-5)


def test_masked_type_loss(jarvis):
    species = np.array([Element(s).Z for r in jarvis[:12] for s in r["species"]], np.int32)
    n = species.size
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, 95)).astype(np.float32)
    # make the model right on every third atom
    right = np.arange(n) % 3 == 0
    logits[right, species[right] - 1] += 10.0
    mask = np.arange(n) % 2 == 0
    logits_bad = logits.copy()
    logits_bad[~mask] = np.nan
    ce, count, correct = L.masked_type_loss(logits_bad, species, mask)
    lg = logits.astype(np.float64)
    logp = lg - np.log(np.sum(np.exp(lg - lg.max(1, keepdims=True)), 1, keepdims=True)) - lg.max(1, keepdims=True)
    nll = -logp[np.arange(n), species - 1]
    np.testing.assert_allclose(float(ce), nll[mask].sum(), rtol=1e-5)
    assert float(count) == mask.sum()
    assert float(correct) == np.sum(mask & (logits.argmax(1) == species - 1))
    assert float(correct) >= np.sum(mask & right)
    # out-of-range Z (0 = unknown, > 95) is left out
    sp2 = species.copy()
    sp2[0], sp2[2] = 0, 99
    ce2, count2, _ = L.masked_type_loss(logits, sp2, mask)
    assert float(count2) == mask.sum() - 2
    np.testing.assert_allclose(float(ce2), nll[mask].sum() - nll[0] - nll[2], rtol=1e-5)
    g = np.asarray(jax.grad(lambda x: L.masked_type_loss(x, species, mask)[0])(jnp.asarray(logits_bad)))
    assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)


def test_position_loss():
    from dpf_jax.data.batching import Budget, graph_to_jraph, pad_graphs
    from dpf_jax.data.graphs import build_crystal_graph
    from dpf_jax.data.records import Crystal
    from dpf_jax.tasks.perturb import PerturbConfig, perturb

    recs = records("mp_megnet", 6)
    crystals = [Crystal(id=r["id"], lattice=r["lattice"], numbers=[Element(s).Z for s in r["species"]],
                        frac_coords=r["frac_coords"]) for r in recs]
    batch = pad_graphs([graph_to_jraph(build_crystal_graph(c)) for c in crystals], Budget(128, 4096, 8))
    _, t = jax.jit(perturb, static_argnames="cfg")(jax.random.PRNGKey(0), batch,
                                                  cfg=PerturbConfig(position_scale=0.3, position_fraction=0.5))
    disp, mask = np.asarray(t["displacement"]), np.asarray(t["position_mask"])
    pred = 0.5 * disp + np.asarray(batch.nodes["positions"]) * 0.01  # an imperfect "prediction"
    pred_bad = pred.copy()
    pred_bad[~np.asarray(batch.nodes["mask"])] = np.inf
    s, c = L.position_loss(pred_bad, disp, mask)
    want = np.sum(np.sum((pred - disp).astype(np.float64) ** 2, axis=1)[mask])
    np.testing.assert_allclose(float(s), want, rtol=1e-5)
    assert float(c) == mask.sum() and 0 < mask.sum() < np.asarray(batch.nodes["mask"]).sum()


def test_lattice_loss_and_stats(jarvis):
    lats = [np.array(r["lattice"]) for r in jarvis]
    mean, std = L.lattice_param_stats(lats)
    params = np.array([Lattice(l).parameters for l in lats])
    np.testing.assert_allclose(mean, params.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, params.std(0), rtol=1e-5)
    assert mean.dtype == np.float32 and mean.shape == (6,)
    # constant parameters (all-cubic set) get the floor, not a zero std
    _, std_c = L.lattice_param_stats([np.eye(3) * 4.0, np.eye(3) * 5.0])
    assert np.all(std_c[3:] == 1e-3) and std_c[0] == pytest.approx(0.5)

    clean = params[:10].astype(np.float32)
    pred = ((clean - mean) / std + np.linspace(-1, 1, 60).reshape(10, 6)).astype(np.float32)
    mask = np.arange(10) < 7
    pred_bad = pred.copy()
    pred_bad[~mask] = np.nan
    clean_pad = clean.copy()
    clean_pad[~mask] = [1, 1, 1, 90, 90, 90]  # padding graphs carry the identity lattice
    s, c = L.lattice_loss(pred_bad, clean_pad, mask, mean, std)
    z = (clean.astype(np.float64) - mean) / std
    want = np.sum((pred.astype(np.float64) - z)[mask] ** 2)
    np.testing.assert_allclose(float(s), want, rtol=1e-5)
    assert float(c) == 7 * 6
    np.testing.assert_allclose(np.asarray(L.denormalise_lattice_params(z, mean, std)), clean, rtol=1e-5)
    with pytest.raises(ValueError):
        L.lattice_param_stats([])


def test_jit_and_traced():
    f = jax.jit(lambda p, t, m: (L.regression_sq_error(p, t, m), L.position_loss(p[:, None] * jnp.ones(3), t[:, None] * jnp.ones(3), m)))
    p = jnp.array([1.0, 2.0, 3.0])
    t = jnp.array([1.5, 2.0, 0.0])
    m = jnp.array([True, True, False])
    (s, c), (s2, c2) = f(p, t, m)
    assert float(s) == pytest.approx(0.25) and float(c) == 2
    assert float(s2) == pytest.approx(0.75) and float(c2) == 2
