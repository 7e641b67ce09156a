"""Dataset preparation: parallel graph building, the on-disk cache, skipped records, splits."""

import gzip
import json
import re

import numpy as np
import pytest

from conftest import DATA
from dpf_jax.data.dataset import GraphParams, build_graphs, cached_graphs
from dpf_jax.data.graphs import build_crystal_graph
from dpf_jax.data.pipeline import prepare_labeled, prepare_unlabeled
from dpf_jax.data.readers import load_dataset_records


def _subset(tmp_path, n, corrupt=(), unsplit=(), name="subset"):
    """The first n JARVIS records as a new file; `corrupt` line numbers get an overlapping atom,
    `unsplit` line numbers lose their stored splits ("all": every record)."""
    lines = gzip.open(DATA / "jarvis_dft3d.jsonl.gz", "rt").read().splitlines()[:n]
    for k in corrupt:
        rec = json.loads(lines[k])
        rec["species"].append(rec["species"][0])
        rec["frac_coords"].append([x + 0.001 for x in rec["frac_coords"][0]])
        lines[k] = json.dumps(rec)
    for k in (range(n) if unsplit == "all" else unsplit):
        rec = json.loads(lines[k])
        rec.pop("split")
        lines[k] = json.dumps(rec)
    path = tmp_path / f"{name}.jsonl.gz"
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
    # merged graphs: their own entry per level, every merge field read back as built
    for level, entries in (("distance", 3), ("atoms", 4)):
        merged = GraphParams(merge_edges=level)
        built, _ = cached_graphs(records, path, merged, cache_dir=cache, workers=1, progress=False)
        assert len(list(cache.glob("*.npz"))) == entries
        loaded, _ = cached_graphs(records, path, merged, cache_dir=cache, workers=1, progress=False)
        assert sum(g.num_edges for g in built) < 0.6 * sum(g.num_edges for g in first)
        for a, b, ref in zip(built, loaded, first):
            for field in ("senders", "receivers", "images", "counts", "net", "sources", "node_counts"):
                x, y = getattr(a, field), getattr(b, field)
                assert (x is None) == (y is None), field
                if x is not None:
                    np.testing.assert_array_equal(x, y)
            assert level == "atoms" or a.num_reference_edges == ref.num_edges
    # a changed file → another cache entry (keyed by content hash)
    path = _subset(tmp_path, 59)  # same file name, other content
    recs2 = load_dataset_records(path).records
    cached_graphs(recs2, path, cache_dir=cache, workers=1, progress=False)
    assert len(list(cache.glob("*.npz"))) == 5


def test_graph_params_from_config_resolve_the_merge_level():
    """graph.merge_edges "auto": the most merging exact for the run (`max_level`); more is
    refused with the run's reason; old configs without the field: "auto"."""
    import ml_collections

    from configs import base

    g = base.get_config().graph
    why = "the position head sums edge vectors"
    assert GraphParams.from_config(g).merge_edges == "atoms"
    assert GraphParams.from_config(g, "mirror", why).merge_edges == "mirror"
    g.merge_edges = "none"
    assert GraphParams.from_config(g, "mirror", why) == GraphParams()
    g.merge_edges = "distance"
    with pytest.raises(ValueError, match="would change this run's results: the position head sums"):
        GraphParams.from_config(g, "mirror", why)
    assert GraphParams.from_config(g).merge_edges == "distance"
    g.merge_edges = "everything"
    with pytest.raises(ValueError, match="graph.merge_edges must be"):
        GraphParams.from_config(g)
    old = ml_collections.ConfigDict({"cutoff": 8.0, "max_neighbors": 12, "use_lattice": True})
    assert GraphParams.from_config(old, "distance", "per-atom outputs").merge_edges == "distance"


def test_bad_structures_are_skipped_counted_and_named(tmp_path):
    path = _subset(tmp_path, 40, corrupt=(3, 17))
    data = prepare_labeled(str(path), "formation_energy_peratom", cache_dir=None, workers=1, progress=False)
    assert len(data.skipped) == 2
    bad_ids = {rid for rid, _ in data.skipped}
    lines = gzip.open(path, "rt").read().splitlines()
    assert bad_ids == {json.loads(lines[3])["id"], json.loads(lines[17])["id"]}
    assert all("overlap" in reason for _, reason in data.skipped)
    total = sum(len(s) for s in data.splits.values())
    assert total == 38


def test_reader_and_graph_failures_are_logged_as_one_count(tmp_path, caplog):
    """A line the reader cannot parse and two structures whose graphs cannot be built (atoms
    overlap) are one warning with one count, followed by the records it names; the reader's own
    summary (it logs one when called alone) is not repeated."""
    import logging

    path = _subset(tmp_path, 40, corrupt=(3, 17))
    lines = gzip.open(path, "rt").read().splitlines()
    lines[25] = lines[25][:60]  # a line cut short
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="dpf_jax"):
        data = prepare_labeled(str(path), "formation_energy_peratom", cache_dir=None, workers=1, progress=False)
    assert len(data.skipped) == 3 and sum(len(s) for s in data.splits.values()) == 37
    assert data.summary().endswith("3 skipped")
    counts = [r.getMessage() for r in caplog.records if re.search(r"skipped \d+ of \d+|could not read", r.getMessage())]
    assert counts == [f"{path}: skipped 3 of 40 records"], counts
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("  skipped ")]
    assert len(named) == 3 and any("line 26" in m for m in named) and sum("overlap" in m for m in named) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpf_jax"):  # the reader alone still reports
        load_dataset_records(path)
    assert [r.getMessage()[:len(f"{path}: skipped 1 of 40 records")] for r in caplog.records] == \
        [f"{path}: skipped 1 of 40 records"]


def test_official_splits_and_log10_transform():
    data = prepare_labeled(str(DATA / "mp_megnet.jsonl.gz"), "K_VRH", transform="log10",
                           cache_dir=None, workers=2, progress=False)
    sizes = {k: len(v) for k, v in data.splits.items()}
    # 899/112/113 in the data README, less any non-positive moduli dropped by log10
    assert 890 <= sizes["train"] <= 899 and 105 <= sizes["val"] <= 112 and 105 <= sizes["test"] <= 113
    assert np.all(data.splits["train"].targets < 3.5) and np.all(data.splits["train"].targets > -1)


def test_records_without_stored_splits_are_split_by_a_hash_of_their_id(tmp_path):
    """No record stores a split for the task: every record with a value lands in train/val/test
    by its id alone, so a record keeps its split when the file is reordered or grows."""
    kw = dict(cache_dir=None, workers=1, progress=False)
    data = prepare_labeled(str(_subset(tmp_path, 200, unsplit="all")), "formation_energy_peratom", **kw)
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sum(sizes.values()) == 200 and not data.skipped
    assert 140 <= sizes["train"] <= 180 and 8 <= sizes["val"] <= 32 and 8 <= sizes["test"] <= 32, sizes
    bigger = prepare_labeled(str(_subset(tmp_path, 300, unsplit="all", name="bigger")), "formation_energy_peratom",
                             **kw)
    for split in ("train", "val", "test"):  # the first 200 records' targets keep their splits
        np.testing.assert_array_equal(bigger.splits[split].targets[:sizes[split]], data.splits[split].targets)
    other = prepare_labeled(str(_subset(tmp_path, 200, unsplit="all", name="other")), "formation_energy_peratom",
                            split_fractions=(0.3, 0.0), **kw)
    assert len(other.splits["test"]) == 0 and 40 <= len(other.splits["val"]) <= 80
    for bad in ((0.6, 0.5), (0.2,), (-0.1, 0.1)):  # refused before any graph is built
        with pytest.raises(ValueError, match=r"split fractions must be two numbers \(val, test\)"):
            prepare_labeled(str(tmp_path / "never_read.jsonl.gz"), "formation_energy_peratom",
                            split_fractions=bad, **kw)


def test_records_missing_a_split_among_split_ones_are_skipped_and_counted(tmp_path):
    path = _subset(tmp_path, 60, unsplit=(4, 9, 33))
    data = prepare_labeled(str(path), "formation_energy_peratom", cache_dir=None, workers=1, progress=False)
    lines = gzip.open(path, "rt").read().splitlines()
    assert sorted(rid for rid, _ in data.skipped) == sorted(json.loads(lines[k])["id"] for k in (4, 9, 33))
    assert all("no split for task 'formation_energy_peratom'" in reason for _, reason in data.skipped)
    assert sum(len(s) for s in data.splits.values()) == 57


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match=r"not found .*no record has a value or a split for it; targets there: "
                                         r"\[.*'formation_energy_peratom'"):
        prepare_labeled(str(DATA / "jarvis_dft3d.jsonl.gz"), "no_such_task", cache_dir=None,
                        max_records=20, progress=False)


def test_unlabeled_split_is_stable():
    a = prepare_unlabeled(str(DATA / "pretrain.jsonl.gz"), max_records=200, cache_dir=None,
                          workers=1, progress=False, seed=0, val_fraction=0.1)
    b = prepare_unlabeled(str(DATA / "pretrain.jsonl.gz"), max_records=200, cache_dir=None,
                          workers=1, progress=False, seed=0, val_fraction=0.1)
    assert a.splits["val"].ids == b.splits["val"].ids
    assert 5 <= len(a.splits["val"]) <= 40 and len(a.splits["train"]) + len(a.splits["val"]) == 200


def test_skipped_files_of_a_structure_folder_are_named_by_path(tmp_path):
    """In a folder of structure files, a file that does not parse and one whose atoms overlap
    (found when its graph is built) are both reported by their path, so skipped.json points
    at the files to fix; the good file is kept."""
    import shutil

    from pymatgen.core import Lattice, Structure

    from dpf_jax.data.pipeline import load_graphs

    fixtures = DATA.parent / "tests" / "fixtures" / "structures"
    shutil.copy(fixtures / "JVASP-10.cif", tmp_path / "good.cif")
    shutil.copy(fixtures / "broken.cif", tmp_path / "broken.cif")
    overlap = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.005, 0, 0]])
    overlap.to(filename=str(tmp_path / "POSCAR_overlap"), fmt="poscar")
    folder = tmp_path / "cifs"
    folder.mkdir()
    for f in ("good.cif", "broken.cif", "POSCAR_overlap"):
        (tmp_path / f).rename(folder / f)
    cache = tmp_path / "cache"
    for run in range(2):  # built, then a moved copy of the folder through the cache
        pairs, skipped, total = load_graphs(str(folder), GraphParams(), str(cache), 1, progress=False)
        assert [r.id for r, _ in pairs] == ["good"] and total == 3
        labels = dict(skipped)
        assert set(labels) == {str(folder / "broken.cif"), str(folder / "POSCAR_overlap")}, skipped
        assert "overlap" in labels[str(folder / "POSCAR_overlap")]
        if run == 0:  # same folder name elsewhere: the same cache entry
            shutil.copytree(folder, tmp_path / "elsewhere" / "cifs")
            folder = tmp_path / "elsewhere" / "cifs"
    assert len(list(cache.glob("*.npz"))) == 1  # the second load came from the cache


def test_skip_label_names_structure_files_by_path_and_dataset_records_by_id():
    from dpf_jax.data.dataset import skip_label

    rec = load_dataset_records(DATA / "jarvis_dft3d.jsonl.gz").records[0]
    cases = [("file:/d/x.cif", "x", "/d/x.cif"), ("file:/d/t.extxyz", "t:1", "/d/t.extxyz:1"),
             ("file:/d/POSCAR", "POSCAR", "/d/POSCAR"), ("file:/d/POSCAR", "/d/POSCAR", "/d/POSCAR"),
             ("file:/d/x.cif", "mine", "/d/x.cif (mine)"),
             ("file:/d/set.jsonl.gz", "JVASP-1", "JVASP-1"),  # a dataset file's record: its id
             ("jarvis_dft3d", "JVASP-1", "JVASP-1")]
    for source, rid, label in cases:
        assert skip_label(rec.replace(id=rid, source=source)) == label, (source, rid)
