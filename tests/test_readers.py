"""Readers: structure files, JSON-lines, JARVIS and MP/MEGNet JSON, all to `Crystal` records.

Fixtures (tests/fixtures, built by make_fixtures.py) are converted from the shipped data/ files,
so each reader is checked against the original record it came from.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import math
import pathlib
import shutil
import sys
import warnings
import zipfile

import numpy as np
import pytest

from dpf_jax.data import readers
from dpf_jax.data.records import Crystal, CrystalError

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
FIX = ROOT / "tests" / "fixtures"
STRUCT = FIX / "structures"


def _shipped(name: str) -> dict[str, dict]:
    with gzip.open(DATA / name, "rt") as f:
        return {r["id"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def jarvis() -> dict[str, dict]:
    return _shipped("jarvis_dft3d.jsonl.gz")


@pytest.fixture(scope="module")
def mp() -> dict[str, dict]:
    return _shipped("mp_megnet.jsonl.gz")


def assert_same_structure(c: Crystal, rec: dict, atol: float = 1e-5) -> None:
    """Same cell (metric tensor: CIF keeps only lengths and angles, not the orientation) and the
    same atoms (any order, fractional coordinates modulo 1)."""
    lat = np.asarray(rec["lattice"])
    np.testing.assert_allclose(c.lattice @ c.lattice.T, lat @ lat.T, atol=atol * 10)
    want_z = readers.atomic_numbers(rec["species"])
    assert sorted(c.numbers.tolist()) == sorted(want_z.tolist())
    want = np.asarray(rec["frac_coords"])
    used = set()
    for z, f in zip(c.numbers, c.frac_coords):
        d = f - want
        d -= np.round(d)
        dist = np.linalg.norm(d @ np.asarray(rec["lattice"]), axis=1)
        match = [j for j in np.argsort(dist) if want_z[j] == z and j not in used and dist[j] < 1e-3]
        assert match, f"atom Z={z} at {f} not found in {rec['id']}"
        used.add(match[0])


# ------------------------------------------------------------------------------ structure files


def test_cif_matches_shipped_record(jarvis):
    c = readers.read_structure_file(STRUCT / "JVASP-10.cif")
    assert c.id == "JVASP-10"
    assert c.numbers.tolist() == [23, 34, 34]
    assert c.source.endswith("JVASP-10.cif")
    assert_same_structure(c, jarvis["JVASP-10"])


def test_poscar_files(jarvis, mp):
    c = readers.read_structure_file(STRUCT / "POSCAR-JVASP-19.vasp")
    assert c.id == "POSCAR-JVASP-19"
    assert_same_structure(c, jarvis["JVASP-19"])
    c = readers.read_structure_file(STRUCT / "POSCAR")
    assert c.id == "POSCAR"
    assert_same_structure(c, mp["mp-2"])


@pytest.mark.parametrize("keep, reason", [(-1, "file ends early: 4 atoms declared, 3 coordinate lines"),
                                          (8, "file ends early: 4 atoms declared, 0 coordinate lines"),
                                          (6, "file ends early: 6 lines, before the atom counts"),
                                          (3, "file ends early: 3 lines, before the atom counts")])
def test_a_poscar_cut_short_says_so(tmp_path, keep, reason):
    """A POSCAR truncated anywhere gets a reason naming what is missing, not pymatgen's
    "list index out of range"."""
    lines = (STRUCT / "POSCAR").read_text().splitlines()
    assert lines[5].split() and not lines[5].split()[0].isdigit() and sum(map(int, lines[6].split())) == 4
    cut = tmp_path / "cut.vasp"
    cut.write_text("\n".join(lines[:keep]) + "\n")
    with pytest.raises(CrystalError, match=f"could not parse POSCAR: {reason}"):
        readers.read_structure_file(cut)


def test_poscar_read_failures_stay_crystal_errors(tmp_path):
    """A bad line inside the atoms keeps pymatgen's reason (the file is long enough); a
    compressed POSCAR that cannot be read is a failure naming the file, not a crash."""
    lines = (STRUCT / "POSCAR").read_text().splitlines()
    bad = tmp_path / "bad.vasp"
    bad.write_text("\n".join(lines[:9] + ["0.5 0.5"] + lines[10:]) + "\n")
    with pytest.raises(CrystalError, match="could not parse POSCAR") as info:
        readers.read_structure_file(bad)
    assert "ends early" not in str(info.value)
    broken_gz = tmp_path / "POSCAR.gz"
    broken_gz.write_bytes(gzip.compress((STRUCT / "POSCAR").read_bytes())[:40])
    records, failures = readers.read_structure_files([broken_gz])
    assert not records and failures[0][0] == str(broken_gz) and "could not parse POSCAR" in failures[0][1]


def test_folder_files_with_other_names_are_listed_once_and_hidden_ones_never(tmp_path):
    shutil.copy(STRUCT / "JVASP-10.cif", tmp_path / "a.cif")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".DS_Store").write_text("x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("x")
    (tmp_path / "sub").mkdir()
    shutil.copy(STRUCT / "POSCAR", tmp_path / "sub" / "POSCAR")
    ignored = []
    files = readers.expand_structure_paths([tmp_path, tmp_path], recursive=True, ignored=ignored)
    assert files == [tmp_path / "a.cif", tmp_path / "sub" / "POSCAR"] and ignored == [tmp_path / "notes.txt"]
    assert readers.has_structure_files(tmp_path / "sub") and not readers.has_structure_files(tmp_path / ".git")


def test_a_cif_cut_before_its_atom_sites_says_so(tmp_path):
    text = (STRUCT / "JVASP-10.cif").read_text()
    cut = tmp_path / "cut.cif"
    cut.write_text(text[:text.index("_atom_site")])
    with pytest.raises(CrystalError, match=r"no atom-site coordinates .*a truncated file\?"):
        readers.read_structure_file(cut)


def _formula_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "_chemical_formula_sum" in r.getMessage()]


def _rbtao3_cif(mp, **kwargs) -> str:
    """mp-3033 (RbTaO3, 4 formula units in the MP cell) as pymatgen writes it: with symprec, the
    conventional cell (Z = 8) as 8 symmetry-distinct sites and `_chemical_formula_sum 'Rb8 Ta8 O24'`."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    rec = mp["mp-3033"]
    s = Structure(rec["lattice"], rec["species"], rec["frac_coords"])
    for old, new in kwargs.pop("replace_species", {}).items():
        s.replace_species({old: new})
    return str(CifWriter(s, **kwargs))


def test_a_cif_cut_inside_its_atom_sites_warns_naming_the_file(tmp_path, caplog):
    """A CIF cut at a line boundary inside the atom-site loop still parses (fewer atoms), so the
    composition is checked against `_chemical_formula_sum`: a warning, not a failure."""
    with caplog.at_level(logging.WARNING, logger="dpf_jax.data.readers"):
        assert len(readers.read_structure_file(STRUCT / "JVASP-10.cif").numbers) == 3
    assert not _formula_warnings(caplog)
    lines = (STRUCT / "JVASP-10.cif").read_text().splitlines()
    assert lines[-1].split()[0] == "Se" and "_chemical_formula_sum   'V1 Se2'" in lines
    cut = tmp_path / "cut.cif"
    cut.write_text("\n".join(lines[:-1]) + "\n")
    with caplog.at_level(logging.WARNING, logger="dpf_jax.data.readers"):
        records, failures = readers.read_structure_files([cut])
    assert not failures and records[0].numbers.tolist() == [23, 34]
    assert _formula_warnings(caplog) == [
        f"{cut}: parsed composition V1 Se1 is not a whole multiple of _chemical_formula_sum 'V1 Se2' "
        "(atom sites missing: a file cut short inside the atom list?)"
    ]


@pytest.mark.filterwarnings("ignore:Set OLD_ERROR_HANDLING:DeprecationWarning")  # spglib, through CifWriter(symprec=)
def test_cif_formula_sum_per_formula_unit_or_cell_with_symmetry(tmp_path, caplog, mp):
    """Z > 1: a formula sum per cell (as pymatgen writes it) or per formula unit (as ICSD/COD do)
    matches the cell built from the symmetry-distinct sites; dropping the last site (4 O atoms
    once expanded) does not, and a second data block is named by its index."""
    text = _rbtao3_cif(mp, symprec=0.1)
    assert "_chemical_formula_sum   'Rb8 Ta8 O24'" in text and "_cell_formula_units_Z   8" in text
    per_cell, per_unit, cut = tmp_path / "per_cell.cif", tmp_path / "per_unit.cif", tmp_path / "cut.cif"
    per_cell.write_text(text)
    per_unit.write_text(text.replace("'Rb8 Ta8 O24'", "'Rb Ta O3'"))
    lines = text.rstrip().splitlines()
    assert lines[-1].split()[:3] == ["O", "O7", "4"]
    cut.write_text("\n".join(lines[:-1]) + "\n")
    two_blocks = tmp_path / "two_blocks.cif"
    two_blocks.write_text(text + "\n".join(lines[1:-1]).replace("data_RbTaO3", "data_cut") + "\n")
    with caplog.at_level(logging.WARNING, logger="dpf_jax.data.readers"):
        for f in (per_cell, per_unit):
            assert len(readers.read_structure_file(f).numbers) == 40
        assert not _formula_warnings(caplog)
        assert len(readers.read_structure_file(cut).numbers) == 36
        assert [len(c.numbers) for c in readers.read_structure_frames(two_blocks)] == [40, 36]
    assert _formula_warnings(caplog) == [
        f"{cut}: parsed composition Rb8 Ta8 O20 is not a whole multiple of _chemical_formula_sum 'Rb8 Ta8 O24' "
        "(atom sites missing: a file cut short inside the atom list?)",
        f"{two_blocks} (block 1): parsed composition Rb8 Ta8 O20 is not a whole multiple of _chemical_formula_sum "
        "'Rb8 Ta8 O24' (atom sites missing: a file cut short inside the atom list?)",
    ]


def test_cif_formula_sum_of_a_partially_occupied_structure(tmp_path, caplog, mp):
    """Occupancies count (Rb 0.5 + K 0.25 on the Rb sites: 'K1 Rb2', not one of each per site).
    A disordered file is refused for its disorder and not also warned about its formula (such
    formula sums are often nominal); the comparison itself still sees a cut file."""
    from pymatgen.io.cif import CifParser

    text = _rbtao3_cif(mp, replace_species={"Rb": {"Rb": 0.5, "K": 0.25}})
    assert "_chemical_formula_sum   'K1 Rb2 Ta4 O12'" in text
    full, cut = tmp_path / "partial.cif", tmp_path / "partial_cut.cif"
    full.write_text(text)
    lines = text.rstrip().splitlines()
    assert lines[-1].split()[0] == "Ta"
    cut.write_text("\n".join(lines[:-1]) + "\n")
    with caplog.at_level(logging.WARNING, logger="dpf_jax.data.readers"):
        for path in (full, cut):
            with pytest.raises(CrystalError, match="disordered structure"):
                readers.read_structure_file(path)
    assert not _formula_warnings(caplog)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compositions = [CifParser(str(p)).parse_structures(primitive=False)[0].composition for p in (full, cut)]
    assert readers.cif_formula_mismatch("K1 Rb2 Ta4 O12", compositions[0]) is None
    assert readers.cif_formula_mismatch("K1 Rb2 Ta4 O12", compositions[1]) == (
        "parsed composition K1 Rb2 Ta3 O12 is not a whole multiple of _chemical_formula_sum 'K1 Rb2 Ta4 O12' "
        "(atom sites missing: a file cut short inside the atom list?)")


@pytest.mark.parametrize(
    "formula_sum, parsed, mismatch",
    [
        ("V1 Se2", {"V": 1, "Se": 2}, False),
        ("V Se2", {"V": 2, "Se": 4}, False),  # per formula unit, Z = 2
        ("Ca Fe O2.5", {"Ca": 4, "Fe": 4, "O": 9.96}, False),  # within 1e-2
        ("C2 H6 O", {"C": 8, "O": 4}, False),  # H sites left out of the CIF
        ("Fe2 O3", {"Fe": 2, "O": 2}, True),
        ("Fe2 O3", {"Fe": 2}, True),  # an element missing
        ("Rb8 Ta8 O24", {"Rb": 4, "Ta": 4, "O": 12}, True),  # half the cell: k < 1
        ("C2 H6 O", {"C": 2, "H": 5, "O": 1}, True),  # H present, so it counts
        ("?", {"Fe": 1}, False),  # unparseable formula sums are ignored
        ("Xx2 O", {"O": 1}, False),
        (None, {"Fe": 1}, False),
    ],
)
def test_cif_formula_mismatch(formula_sum, parsed, mismatch):
    reason = readers.cif_formula_mismatch(formula_sum, parsed)
    assert (reason is not None) == mismatch
    if mismatch:
        assert reason.startswith("parsed composition ") and f"_chemical_formula_sum {formula_sum!r}" in reason
    assert readers.cif_formula_mismatch("Fe2 O3", {"Fe": 2, "O": 2}) == (
        "parsed composition Fe2 O2 is not a whole multiple of _chemical_formula_sum 'Fe2 O3' "
        "(atom sites missing: a file cut short inside the atom list?)"
    )


def test_extxyz_frames(jarvis, mp):
    frames = readers.read_structure_frames(STRUCT / "two_frames.extxyz")
    assert [c.id for c in frames] == ["two_frames:0", "two_frames:1"]
    assert_same_structure(frames[0], mp["mp-8"])
    assert_same_structure(frames[1], jarvis["JVASP-311"])
    with pytest.raises(CrystalError, match="holds 2 structures"):
        readers.read_structure_file(STRUCT / "two_frames.extxyz")
    assert readers.read_structure_file(STRUCT / "two_frames.extxyz", frame=1).id == "two_frames:1"
    with pytest.raises(CrystalError, match="out of range"):
        readers.read_structure_file(STRUCT / "two_frames.extxyz", frame=2)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("molecule.xyz", "not periodic"),
        ("disordered.cif", "disordered structure"),
        ("broken.cif", "could not parse CIF"),
        ("vasp4_nospecies.vasp", "no element symbols"),
        ("notes.txt", "unrecognised structure file name"),
        ("does_not_exist.cif", "no such file"),
    ],
)
def test_bad_structure_files_name_file_and_reason(name, reason):
    with pytest.raises(CrystalError, match=reason) as info:
        readers.read_structure_file(STRUCT / name)
    assert info.value.record == str(STRUCT / name)
    assert name in str(info.value)


@pytest.mark.parametrize("old, new", [("  Se  Se2  1  0.33333300", "  Se  Se2  0.33333300"),  # atom-site row short
                                      ("  1  'x, y, z'", "  1  'x, y, z'  2")])  # symmetry row long
def test_cif_loop_with_a_wrong_row_says_so(tmp_path, old, new):
    """pymatgen's own messages for a loop_ row of the wrong length ("zip() argument 2 is longer
    than argument 1" here; "len(items)=5 is not a multiple of n=2" with other pymatgen versions)
    name no loop or row: the error adds what they mean."""
    text = (STRUCT / "JVASP-10.cif").read_text()
    assert old in text
    text = text.replace(old, new)
    bad = tmp_path / "short_row.cif"
    bad.write_text(text)
    with pytest.raises(CrystalError, match="could not parse CIF: .*a loop_ has a row with more or fewer values"):
        readers.read_structure_file(bad)


def test_forced_format():
    c = readers.read_structure_file(STRUCT / "JVASP-10.cif", fmt="cif", id="custom")
    assert c.id == "custom"
    with pytest.raises(CrystalError, match="unknown format"):
        readers.read_structure_file(STRUCT / "JVASP-10.cif", fmt="pdb")


def test_gzipped_structure_file(tmp_path, jarvis):
    gz = tmp_path / "JVASP-10.cif.gz"
    gz.write_bytes(gzip.compress((STRUCT / "JVASP-10.cif").read_bytes()))
    assert readers.structure_file_format(gz) == "cif"
    c = readers.read_structure_file(gz)
    assert c.id == "JVASP-10"
    assert_same_structure(c, jarvis["JVASP-10"])


def test_structure_file_format_names():
    f = readers.structure_file_format
    assert f("a/POSCAR") == f("CONTCAR_relaxed") == f("x.vasp") == f("POSCAR-JVASP-1.vasp") == "poscar"
    assert f("x.CIF") == f("y.cif") == "cif"
    assert f("t.xyz") == f("t.extxyz") == "extxyz"
    assert f("notes.txt") is None and f("data.json") is None


def test_read_structure_files_folder():
    records, failures = readers.read_structure_files(STRUCT)
    assert [c.id for c in records] == [
        "JVASP-10",
        "POSCAR",
        "POSCAR-JVASP-19",
        "two_frames:0",
        "two_frames:1",
    ]
    failed = dict(failures)
    assert sorted(pathlib.Path(p).name for p in failed) == [
        "broken.cif",
        "disordered.cif",
        "molecule.xyz",
        "vasp4_nospecies.vasp",
    ]
    assert "not periodic" in failed[str(STRUCT / "molecule.xyz")]
    assert all(reason for reason in failed.values())


def test_read_structure_files_recursive_duplicate_ids_and_order():
    records, _ = readers.read_structure_files([STRUCT], recursive=True)
    ids = [c.id for c in records]
    # two files called POSCAR: both get their path as id
    assert str(STRUCT / "POSCAR") in ids and str(STRUCT / "sub" / "POSCAR") in ids
    assert "POSCAR" not in ids
    again, _ = readers.read_structure_files([STRUCT], recursive=True)
    assert ids == [c.id for c in again]  # deterministic


def test_a_file_given_twice_is_read_once(caplog):
    """A folder and a file inside it (or overlapping folders): each file once, first place kept."""
    with caplog.at_level(logging.WARNING):
        files = readers.expand_structure_paths([STRUCT / "POSCAR", STRUCT, STRUCT / "sub" / ".." / "POSCAR"])
    assert files[0] == STRUCT / "POSCAR" and len(files) == len(set(f.resolve() for f in files))
    assert [f.name for f in files].count("POSCAR") == 1
    assert "2 structure file(s) given more than once" in caplog.text
    records, _ = readers.read_structure_files([STRUCT, STRUCT / "JVASP-10.cif"])
    assert [c.id for c in records].count("JVASP-10") == 1


def test_a_symlinked_structure_file_is_read_under_both_names(tmp_path):
    (tmp_path / "a.cif").write_bytes((STRUCT / "JVASP-10.cif").read_bytes())
    (tmp_path / "b.cif").symlink_to(tmp_path / "a.cif")
    assert [f.name for f in readers.expand_structure_paths(tmp_path)] == ["a.cif", "b.cif"]


def test_read_structure_files_explicit_paths_and_errors(tmp_path):
    records, failures = readers.read_structure_files(
        [STRUCT / "POSCAR-JVASP-19.vasp", STRUCT / "JVASP-10.cif", tmp_path / "missing.cif"]
    )
    assert [c.id for c in records] == ["POSCAR-JVASP-19", "JVASP-10"]  # given order kept
    assert failures == [(str(tmp_path / "missing.cif"), "no such file")]
    with pytest.raises(CrystalError, match="not periodic"):
        readers.read_structure_files([STRUCT / "molecule.xyz"], on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        readers.read_structure_files([STRUCT], on_error="ignore")


def test_extxyz_without_ase_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ase", None)
    monkeypatch.setitem(sys.modules, "ase.io", None)
    with pytest.raises(CrystalError, match="needs ASE"):
        readers.read_structure_file(STRUCT / "two_frames.extxyz")
    # CIF and POSCAR do not need ASE
    assert readers.read_structure_file(STRUCT / "JVASP-10.cif").id == "JVASP-10"


# ------------------------------------------------------------------------- in-memory structures


def test_crystal_from_pymatgen(mp):
    from pymatgen.core import Lattice, Molecule, Structure

    rec = mp["mp-8"]
    s = Structure(rec["lattice"], rec["species"], rec["frac_coords"])
    c = readers.crystal_from_pymatgen(s, "mp-8", targets={"K_VRH": rec["K_VRH"]})
    assert_same_structure(c, rec)
    assert c.targets == {"K_VRH": rec["K_VRH"]}
    assert readers.crystal_from_pymatgen(s).id == "Re"  # default id: reduced formula

    oxidised = s.copy()
    oxidised.add_oxidation_state_by_element({"Re": 0})
    assert readers.crystal_from_pymatgen(oxidised, "ox").numbers.tolist() == [75, 75]

    disordered = s.copy()
    disordered.replace(0, {"Re": 0.5, "W": 0.5})
    with pytest.raises(CrystalError, match="disordered"):
        readers.crystal_from_pymatgen(disordered, "mp-8-disordered")
    molecule = Molecule(rec["species"], np.asarray(rec["frac_coords"]) @ np.asarray(rec["lattice"]))
    with pytest.raises(CrystalError, match="not periodic"):
        readers.crystal_from_pymatgen(molecule, "mol")
    dummy = Structure(Lattice(rec["lattice"]), ["X0+", "Re"], rec["frac_coords"])
    with pytest.raises(CrystalError, match="not a chemical element"):
        readers.crystal_from_pymatgen(dummy, "dummy")


def test_crystal_from_ase(jarvis):
    import ase

    rec = jarvis["JVASP-311"]
    atoms = ase.Atoms(rec["species"], scaled_positions=rec["frac_coords"], cell=rec["lattice"], pbc=True)
    c = readers.crystal_from_ase(atoms, "JVASP-311", split={"ehull": "train"})
    assert_same_structure(c, rec)
    assert c.split == {"ehull": "train"}
    slab = atoms.copy()
    slab.pbc = [True, True, False]
    with pytest.raises(CrystalError, match=r"pbc=\[True, True, False\]"):
        readers.crystal_from_ase(slab, "slab")
    partial = atoms.copy()
    partial.info["occupancy"] = {"0": {"Ti": 0.5}, "1": {"Ti": 1.0}, "2": {"O": 1.0}}
    with pytest.raises(CrystalError, match="partial/mixed occupancy"):
        readers.crystal_from_ase(partial, "partial")


def test_make_crystal_errors(jarvis):
    rec = jarvis["JVASP-10"]
    ok = readers.make_crystal("x", rec["lattice"], rec["species"], rec["frac_coords"])
    assert ok.numbers.tolist() == [23, 34, 34]
    cart = np.asarray(rec["frac_coords"]) @ np.asarray(rec["lattice"])
    c = readers.make_crystal("x", rec["lattice"], rec["species"], cart, cartesian=True)
    np.testing.assert_allclose(c.frac_coords, rec["frac_coords"], atol=1e-12)
    with pytest.raises(CrystalError, match="unknown element symbol 'Q'"):
        readers.make_crystal("x", rec["lattice"], ["V", "Q", "Se"], rec["frac_coords"])
    with pytest.raises(CrystalError, match="lattice must be 3x3"):
        readers.make_crystal("x", rec["lattice"][:2], rec["species"], rec["frac_coords"])
    with pytest.raises(CrystalError, match="not a numeric"):
        readers.make_crystal("x", [[1, 2], [3], [4, 5, 6]], rec["species"], rec["frac_coords"])
    with pytest.raises(CrystalError, match="degenerate"):
        readers.make_crystal("x", [[1, 0, 0], [2, 0, 0], [0, 0, 1]], rec["species"], rec["frac_coords"])


# ------------------------------------------------------------------------------------ JSON lines


def test_read_shipped_jsonl_counts_match_readme():
    d = readers.read_jsonl(DATA / "jarvis_dft3d.jsonl.gz")
    assert len(d) == d.num_entries == 940 and not d.skipped
    d = readers.read_jsonl(DATA / "jarvis_dft3d.jsonl.gz", task="ehull")
    assert len(d) == 929 and d.num_filtered == 11
    assert all(dict(c.targets).keys() == {"ehull"} and dict(c.split).keys() == {"ehull"} for c in d)
    assert collections.Counter(c.split["ehull"] for c in d) == {"train": 752, "val": 92, "test": 85}
    test = readers.read_jsonl(DATA / "jarvis_dft3d.jsonl.gz", task="ehull", split="test")
    assert len(test) == 85 and test.num_filtered == 940 - 85


def test_jsonl_log10_transform(mp):
    d = readers.read_jsonl(DATA / "mp_megnet.jsonl.gz", task="K_VRH", transform="log10")
    assert len(d) == 1124 and d.num_transform_dropped == 0
    c = d.records[0]
    assert c.targets["K_VRH"] == pytest.approx(math.log10(mp[c.id]["K_VRH"]))
    # JARVIS shear moduli include non-positive values: dropped and counted, not skipped
    d = readers.read_jsonl(DATA / "jarvis_dft3d.jsonl.gz", task="shear_modulus_gv", transform="log10")
    assert d.num_transform_dropped == 10 and len(d) == 871 and not d.skipped
    assert "10 dropped by log10" in d.summary()


def test_jsonl_bad_records_are_skipped_and_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="dpf_jax.data.readers"):
        d = readers.read_jsonl(FIX / "bad_records.jsonl.gz")
    assert [c.id for c in d] == ["JVASP-10", "JVASP-19"]
    assert d.num_entries == 7  # the blank line is not an entry
    skipped = dict(d.skipped)
    assert list(skipped) == ["line 2", "JVASP-311", "JVASP-7669", "JVASP-7851", "JVASP-122903"]
    assert "malformed JSON" in skipped["line 2"]
    assert "unknown element symbol 'Xx'" in skipped["JVASP-311"]
    assert "non-finite" in skipped["JVASP-7669"]
    assert "(5, 3)" in skipped["JVASP-7851"]
    assert "formation_energy_peratom" in skipped["JVASP-122903"] and "not finite" in skipped["JVASP-122903"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 5 of 7 records" in warnings[0].getMessage()


def test_jsonl_task_ignores_bad_values_of_other_tasks():
    d = readers.read_jsonl(FIX / "bad_records.jsonl.gz", task="optb88vdw_bandgap")
    # JVASP-122903's infinite formation energy does not matter for the band gap task
    assert [c.id for c in d] == ["JVASP-10", "JVASP-122903", "JVASP-19"]
    assert len(d.skipped) == 4


def test_iter_jsonl_streams_with_report():
    report = readers.DatasetRecords([], [], "")
    ids = [c.id for c in readers.iter_jsonl(FIX / "bad_records.jsonl.gz", report=report)]
    assert ids == ["JVASP-10", "JVASP-19"] and len(report.skipped) == 5 and report.num_entries == 7


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    """A cut .jsonl.gz (a broken download) stops with the file and the last line read, instead
    of counting as one skipped record while the rest of the dataset silently goes missing."""
    raw = (DATA / "jarvis_dft3d.jsonl.gz").read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(readers.DatasetFileError, match=r"cut\.jsonl\.gz: file is truncated or corrupt after line \d+"):
        readers.read_jsonl(cut)
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(raw[:5000] + bytes(len(raw) - 5000))  # zeros after the first blocks
    with pytest.raises(readers.DatasetFileError, match="corrupt"):
        readers.read_jsonl(corrupt)


def test_selection_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="split= needs task="):
        readers.read_jsonl(FIX / "bad_records.jsonl.gz", split="test")
    with pytest.raises(ValueError, match="split must be one of"):
        readers.read_jsonl(FIX / "bad_records.jsonl.gz", task="ehull", split="validation")
    with pytest.raises(ValueError, match="unknown transform"):
        readers.read_jsonl(FIX / "bad_records.jsonl.gz", task="ehull", transform="sqrt")
    with pytest.raises(FileNotFoundError, match="missing.jsonl.gz"):
        readers.read_jsonl(tmp_path / "missing.jsonl.gz")


# ------------------------------------------------------------------------------- JARVIS JSON


def test_jarvis_json_matches_shipped(jarvis):
    d = readers.read_jarvis_json(FIX / "jarvis_dft3d_sample.json")
    assert [c.id for c in d] == ["JVASP-10", "JVASP-19", "JVASP-311", "JVASP-7669", "JVASP-122903"]
    for c in d:
        assert_same_structure(c, jarvis[c.id])  # JVASP-19 is stored with Cartesian coordinates
        want = {t: v for t, v in jarvis[c.id].items() if t in readers.JARVIS_DFT3D_TASKS and v is not None}
        assert dict(c.targets) == pytest.approx(want)
        assert c.split == {}
    assert "mbj_bandgap" not in d[3].targets  # "na" -> no value


def test_jarvis_json_task_and_leaderboard_split(jarvis):
    d = readers.read_jarvis_json(FIX / "jarvis_dft3d_sample.json", task="ehull")
    assert [c.id for c in d] == ["JVASP-10", "JVASP-19", "JVASP-311", "JVASP-7669"]
    for split_file in (FIX / "dft_3d_formation_energy_peratom.json", FIX / "dft_3d_formation_energy_peratom.json.zip"):
        d = readers.read_jarvis_json(
            FIX / "jarvis_dft3d_sample.json", task="formation_energy_peratom", split_file=split_file
        )
        assert len(d) == 5
        for c in d:
            assert c.split == {"formation_energy_peratom": jarvis[c.id]["split"]["formation_energy_peratom"]}
        test = readers.read_jarvis_json(
            FIX / "jarvis_dft3d_sample.json", task="formation_energy_peratom", split="test", split_file=split_file
        )
        assert [c.id for c in test] == ["JVASP-19"]
    with pytest.raises(ValueError, match="split_file"):
        readers.read_jarvis_json(FIX / "jarvis_dft3d_sample.json", task="ehull", split="test")
    with pytest.raises(ValueError, match="split_file= needs task="):
        readers.read_jarvis_json(FIX / "jarvis_dft3d_sample.json", split_file=FIX / "dft_3d_formation_energy_peratom.json")


def test_jarvis_figshare_zip_and_bad_entries(tmp_path):
    entries = json.loads((FIX / "jarvis_dft3d_sample.json").read_text())
    entries[1]["atoms"]["elements"][0] = "Tx"
    del entries[2]["atoms"]["lattice_mat"]
    entries[3]["ehull"] = float("nan")
    entries.append("not an entry")
    path = tmp_path / "jdft_3d-test.json.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("jdft_3d-test.json", json.dumps(entries))
    d = readers.read_jarvis_json(path)
    assert [c.id for c in d] == ["JVASP-10", "JVASP-122903"]
    skipped = dict(d.skipped)
    assert "unknown element symbol 'Tx'" in skipped["JVASP-19"]
    assert "lattice_mat" in skipped["JVASP-311"]
    assert "'ehull' is not finite" in skipped["JVASP-7669"]
    assert "entry 5" in skipped
    # with another task, the NaN ehull of JVASP-7669 does not matter
    d = readers.read_jarvis_json(path, task="optb88vdw_bandgap")
    assert [c.id for c in d] == ["JVASP-10", "JVASP-7669", "JVASP-122903"]


def test_jarvis_tasks_all(jarvis):
    d = readers.read_jarvis_json(FIX / "jarvis_dft3d_sample.json", tasks="all")
    assert set(d[0].targets) == set(readers.JARVIS_DFT3D_TASKS)  # "formula" (text) is not a target
    d = readers.read_jarvis_json(FIX / "jarvis_dft3d_sample.json", tasks=["ehull"])
    assert all(set(c.targets) <= {"ehull"} for c in d)


# ------------------------------------------------------------------------------ MP / MEGNet JSON


def test_mp_json_cif_and_dict_structures(mp):
    d = readers.read_mp_json(FIX / "mp_megnet_sample.json")
    assert [c.id for c in d] == ["mp-2", "mp-8", "mp-13", "mp-10", "mp-17"]
    for c in d:  # the first three are CIF strings, the last two Structure dicts
        assert_same_structure(c, mp[c.id])
        want = {t: mp[c.id][t] for t in readers.MP_TASKS if mp[c.id][t] is not None}
        assert dict(c.targets) == pytest.approx(want)
    d = readers.read_mp_json(FIX / "mp_megnet_sample.json", task="K_VRH", transform="log10")
    assert [c.id for c in d] == ["mp-2", "mp-8", "mp-13"]
    assert d[0].targets["K_VRH"] == pytest.approx(math.log10(mp["mp-2"]["K_VRH"]))
    # band gaps of metals are 0: log10 drops them with a count
    d = readers.read_mp_json(FIX / "mp_megnet_sample.json", task="band_gap", transform="log10")
    assert [c.id for c in d] == ["mp-13"] and d.num_transform_dropped == 4


def test_mp_json_bad_structures(tmp_path):
    entries = json.loads((FIX / "mp_megnet_sample.json").read_text())
    entries[0]["structure"] = entries[0]["structure"][:200]  # truncated CIF
    entries[1]["structure"] = 42
    del entries[2]["structure"]
    entries[3]["structure"] = {"sites": []}
    path = tmp_path / "mp.json"
    path.write_text(json.dumps(entries))
    d = readers.read_mp_json(path)
    assert [c.id for c in d] == ["mp-17"]
    skipped = dict(d.skipped)
    assert "could not parse CIF" in skipped["mp-2"]
    assert "CIF string or a pymatgen Structure dict" in skipped["mp-8"]
    assert "missing 'structure'" in skipped["mp-13"]
    assert "lacks 'lattice'" in skipped["mp-10"]


# ------------------------------------------------------------------------ load_dataset_records


def test_load_dataset_records_dispatch(tmp_path):
    d = readers.load_dataset_records(DATA / "mp_megnet.jsonl.gz", task="G_VRH", split="val", transform="log10")
    assert len(d) == 112 and d.transform == "log10" and d.source_path.endswith("mp_megnet.jsonl.gz")
    assert len(readers.load_dataset_records(FIX / "jarvis_dft3d_sample.json")) == 5
    assert len(readers.load_dataset_records(FIX / "mp_megnet_sample.json", task="band_gap")) == 5
    d = readers.load_dataset_records(STRUCT)
    assert len(d) == 5 and len(d.skipped) == 4 and d.num_entries == 9
    gz = tmp_path / "mp.json.gz"
    gz.write_bytes(gzip.compress((FIX / "mp_megnet_sample.json").read_bytes()))
    assert len(readers.load_dataset_records(gz)) == 5
    with pytest.raises(ValueError, match="split file"):
        readers.load_dataset_records(FIX / "dft_3d_formation_energy_peratom.json")
    other = tmp_path / "table.csv"
    other.write_text("id,value\nJVASP-10,1.0\n")
    with pytest.raises(ValueError, match="cannot tell"):
        readers.load_dataset_records(other)
    with pytest.raises(ValueError, match="structure files carry no targets"):
        readers.load_dataset_records(STRUCT, task="ehull")
    with pytest.raises(TypeError, match="unexpected keyword"):
        readers.load_dataset_records(FIX / "mp_megnet_sample.json", nonsense=1)


def test_split_file_errors(tmp_path):
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": {"JVASP-10": 1.0}, "test": {"JVASP-10": 1.0}}))
    with pytest.raises(ValueError, match="both 'train' and 'test'"):
        readers.read_split_file(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must be a JSON object"):
        readers.read_split_file(bad)
    split_of, value_of = readers.read_split_file(FIX / "dft_3d_formation_energy_peratom.json.zip")
    assert split_of["JVASP-19"] == "test" and value_of["JVASP-19"] == pytest.approx(-0.36794)
