"""GNoME loader on a tiny release-layout fixture (summary CSV + by_id.zip of CIFs) built from
shipped structures by tests/fixtures/make_fixtures.py."""

from __future__ import annotations

import csv
import gzip
import io
import json
import pathlib
import zipfile

import numpy as np
import pytest

from dpf_jax.data import download, gnome, readers

FIX = pathlib.Path(__file__).resolve().parent / "fixtures" / "gnome"
DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
SUMMARY = FIX / "stable_materials_summary.csv"
ARCHIVE = FIX / "by_id.zip"
IDS = ["perov5-1", "carbon24-C-101088-6894-23", "ase-dcdft-Ag4", "mp-10003", "mp-10"]


@pytest.fixture(scope="module")
def shipped() -> dict[str, dict]:
    out = {}
    for name in ("pretrain.jsonl.gz", "mp_megnet.jsonl.gz"):
        with gzip.open(DATA / name, "rt") as f:
            for line in f:
                if any(f'"id":"{i}"' in line for i in IDS):
                    rec = json.loads(line)
                    out.setdefault(rec["id"], rec)
    return out


def _check_against_shipped(d, shipped):
    for c in d:
        rec = shipped[c.id]
        lat = np.asarray(rec["lattice"])
        np.testing.assert_allclose(c.lattice @ c.lattice.T, lat @ lat.T, atol=1e-4)
        assert sorted(c.numbers.tolist()) == sorted(readers.atomic_numbers(rec["species"]).tolist())
        assert c.num_atoms == len(rec["species"])
        assert c.source == gnome.SOURCE


def test_read_gnome_zip(shipped):
    d = gnome.read_gnome(SUMMARY, ARCHIVE)
    assert [c.id for c in d] == IDS
    assert d.num_entries == 6
    assert d.skipped == [("mp-17", f"no structure file {ARCHIVE}:by_id/mp-17.CIF")]
    assert all(not c.targets and not c.split for c in d)  # unlabeled
    _check_against_shipped(d, shipped)


def test_read_gnome_folder_layouts(tmp_path, shipped):
    with zipfile.ZipFile(ARCHIVE) as zf:
        zf.extractall(tmp_path / "release")  # -> release/by_id/<id>.CIF
    d = gnome.read_gnome(SUMMARY, tmp_path / "release")
    assert [c.id for c in d] == IDS and [s for s, _ in d.skipped] == ["mp-17"]
    d = gnome.read_gnome(SUMMARY, tmp_path / "release" / "by_id")  # the CIF folder itself
    assert [c.id for c in d] == IDS
    _check_against_shipped(d, shipped)


def test_limit_and_targets():
    d = gnome.read_gnome(SUMMARY, ARCHIVE, limit=2)
    assert [c.id for c in d] == IDS[:2]
    d = gnome.read_gnome(SUMMARY, ARCHIVE, targets=gnome.GNOME_TARGET_COLUMNS)
    by_id = {c.id: dict(c.targets) for c in d}
    assert by_id["mp-10"] == {"formation_energy_per_atom": pytest.approx(0.1074050600000005)}
    assert by_id["perov5-1"] == {}
    d = gnome.read_gnome(SUMMARY, ARCHIVE, targets=["Formation Energy Per Atom"])
    assert {c.id: dict(c.targets) for c in d}["mp-10"] == {"Formation Energy Per Atom": pytest.approx(0.10740506)}
    with pytest.raises(ValueError, match="limit"):
        gnome.read_gnome(SUMMARY, ARCHIVE, limit=-1)


def test_bad_rows_are_skipped_with_reasons(tmp_path):
    rows = list(csv.DictReader(SUMMARY.open()))
    rows[0]["NSites"] = "7.0"  # perov5-1 has 5 sites
    rows[1]["MaterialId"] = ""
    rows[2]["Formation Energy Per Atom"] = "abc"
    path = tmp_path / "summary.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    d = gnome.read_gnome(path, ARCHIVE, targets=gnome.GNOME_TARGET_COLUMNS)
    assert [c.id for c in d] == ["mp-10003", "mp-10"]
    skipped = dict(d.skipped)
    assert "NSites=7.0" in skipped["perov5-1"]
    assert skipped["row 2"] == "empty MaterialId"
    assert "not a number ('abc')" in skipped["ase-dcdft-Ag4"]
    assert "no structure file" in skipped["mp-17"]


def test_input_errors(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("id,formula\n1,Si\n")
    with pytest.raises(ValueError, match="no 'MaterialId' column"):
        gnome.read_gnome(bad, ARCHIVE)
    with pytest.raises(FileNotFoundError, match="missing.zip"):
        gnome.read_gnome(SUMMARY, tmp_path / "missing.zip")
    with pytest.raises(ValueError, match="by_id.zip archive or a folder"):
        gnome.read_gnome(SUMMARY, bad)


def test_load_public_gnome_offline(tmp_path, monkeypatch):
    files = {download.DATASETS["gnome_summary"].url: SUMMARY, download.DATASETS["gnome_by_id"].url: ARCHIVE}
    calls = []

    def opener(url, timeout):
        calls.append(url)
        return io.BytesIO(files[url].read_bytes())

    with pytest.warns(UserWarning, match="no sha256 known"):
        d = download.load_public_dataset("gnome", cache_dir=tmp_path, opener=opener, progress=False, limit=3)
    assert [c.id for c in d] == IDS[:3] and len(calls) == 2


def test_load_dataset_records_gnome_layouts(tmp_path):
    d = readers.load_dataset_records(FIX)  # folder with the CSV and by_id.zip
    assert [c.id for c in d] == IDS
    d = readers.load_dataset_records(SUMMARY, limit=1)
    assert [c.id for c in d] == IDS[:1]
    with pytest.raises(ValueError, match="GNoME has no task"):
        readers.load_dataset_records(FIX, task="bandgap")
