"""Dataset preparation: parallel graph building, the on-disk cache, skipped records, splits."""

import gzip
import json

import numpy as np
import pytest

from conftest import DATA
from dpf_jax.data.dataset import GraphParams, build_graphs, cached_graphs
from dpf_jax.data.graphs import build_crystal_graph
from dpf_jax.data.pipeline import prepare_labeled, prepare_unlabeled
from dpf_jax.data.readers import load_dataset_records


def _subset(tmp_path, n, corrupt=()):
    """The first n JARVIS records as a new file; `corrupt` line numbers get an overlapping atom."""
    lines = gzip.open(DATA / "jarvis_dft3d.jsonl.gz", "rt").read().splitlines()[:n]
    for k in corrupt:
        rec = json.loads(lines[k])
        rec["species"].append(rec["species"][0])
        rec["frac_coords"].append([x + 0.001 for x in rec["frac_coords"][0]])
        lines[k] = json.dumps(rec)
    path = tmp_path / "subset.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_parallel_build_equals_serial():
    records = load_dataset_records(DATA / "jarvis_dft3d.jsonl.gz").records[:300]
    parallel, skipped = build_graphs(records, workers=2, progress=False)
    assert not skipped
    for r, g in zip(records[::37], parallel[::37]):
        ref = build_crystal_graph(r)
        np.testing.assert_array_equal(g.senders, ref.senders)
        np.testing.assert_array_equal(g.receivers, ref.receivers)
        np.testing.assert_array_equal(g.images, ref.images)


def test_cache_roundtrip_and_key(tmp_path):
    path = _subset(tmp_path, 60)
    records = load_dataset_records(path).records
    cache = tmp_path / "cache"
    first, _ = cached_graphs(records, path, cache_dir=cache, workers=1, progress=False)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    second, _ = cached_graphs(records, path, cache_dir=cache, workers=1, progress=False)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.senders, b.senders)
    # other graph parameters → another cache entry
    cached_graphs(records, path, GraphParams(cutoff=6.0), cache_dir=cache, workers=1, progress=False)
    assert len(list(cache.glob("*.npz"))) == 2
    # merged graphs: their own entry, counts and net counts read back as built
    merged = GraphParams(merge_edges="distance")
    built, _ = cached_graphs(records, path, merged, cache_dir=cache, workers=1, progress=False)
    assert len(list(cache.glob("*.npz"))) == 3
    loaded, _ = cached_graphs(records, path, merged, cache_dir=cache, workers=1, progress=False)
    assert sum(g.num_edges for g in built) < 0.6 * sum(g.num_edges for g in first)
    for a, b, ref in zip(built, loaded, first):
        for field in ("senders", "receivers", "images", "counts", "net"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert a.num_reference_edges == ref.num_edges
    # a changed file → another cache entry (keyed by content hash)
    path = _subset(tmp_path, 59)  # same file name, other content
    recs2 = load_dataset_records(path).records
    cached_graphs(recs2, path, cache_dir=cache, workers=1, progress=False)
    assert len(list(cache.glob("*.npz"))) == 4


def test_graph_params_from_config_resolve_the_merge_level():
    """graph.merge_edges "auto": by distance unless a reason blocks it (then "mirror"); an
    explicit "distance" is refused with that reason; old configs without the field: "auto"."""
    import ml_collections

    from configs import base

    g = base.get_config().graph
    why = "the position head sums edge vectors"
    assert GraphParams.from_config(g).merge_edges == "distance"
    assert GraphParams.from_config(g, why).merge_edges == "mirror"
    g.merge_edges = "none"
    assert GraphParams.from_config(g, why) == GraphParams()
    g.merge_edges = "distance"
    with pytest.raises(ValueError, match="would change this run's results: the position head sums"):
        GraphParams.from_config(g, why)
    g.merge_edges = "everything"
    with pytest.raises(ValueError, match="graph.merge_edges must be"):
        GraphParams.from_config(g)
    old = ml_collections.ConfigDict({"cutoff": 8.0, "max_neighbors": 12, "use_lattice": True})
    assert GraphParams.from_config(old).merge_edges == "distance"
