"""Readers that turn structure files and dataset files into `Crystal` records.

Everything here produces `dpf_jax.data.records.Crystal` objects (validated with
`validate_crystal`) and reports every structure it could not use by name and reason, instead of
crashing half-way through a file.

Single structures
  * `read_structure_file(path)` -> `Crystal` (CIF, POSCAR/CONTCAR/*.vasp, extxyz/xyz).
  * `read_structure_frames(path)` -> every structure of a file (multi-frame extxyz, multi-block CIF).
  * `read_structure_files(paths_or_folders)` -> `(records, failures)`; folders are expanded.
  * `crystal_from_pymatgen(structure)`, `crystal_from_ase(atoms)`, `make_crystal(...)`.

Datasets (all return a `DatasetRecords`: records, skipped `(id, reason)` pairs, counts)
  * `read_jsonl(path)` / `iter_jsonl(path)`: the gzip JSON-lines files of `data/` (see data/README.md).
  * `read_jarvis_json(path)`: the JARVIS figshare `dft_3d` JSON (also the JARVIS-format `megnet.json`),
    optionally with a jarvis-leaderboard split file `{"train": {id: value}, "val": ..., "test": ...}`.
  * `read_mp_json(path)`: Materials Project / MEGNet JSON (`mp.2018.6.1.json`): `material_id` plus a
    `structure` that is a CIF string or a pymatgen `Structure.as_dict()`.
  * `load_dataset_records(path)`: picks the right reader from the file name / content.

Selecting a task (`task="formation_energy_peratom"`) keeps only the records that belong to that
task's benchmark (those whose `split` names the task, where the dataset has splits) and have a
value for it; the record's `targets` and `split` are then reduced to that one task. `split="test"`
additionally keeps one side of the split. `transform="log10"` maps the task's target to log10 and
drops non-positive values (counted in `DatasetRecords.num_transform_dropped`), as MEGNet/Matformer
do for the MP bulk and shear moduli.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import gzip
import json
import logging
import math
import os
import pathlib
import warnings
import zipfile
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from dpf_jax.data.records import ELEMENT_SYMBOLS, Crystal, CrystalError, validate_crystal

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

SPLITS = ("train", "val", "test")
# Other spellings of the split names found in public split files.
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

# Target fields read by default (when neither `task` nor `tasks` is given) from the JSON formats.
JARVIS_DFT3D_TASKS = (
    "formation_energy_peratom",
    "optb88vdw_bandgap",
    "optb88vdw_total_energy",
    "ehull",
    "mbj_bandgap",
    "bulk_modulus_kv",
    "shear_modulus_gv",
)
# The JARVIS-format MEGNet dataset (`jarvis.db.figshare.data("megnet")`, used by Matformer).
JARVIS_MEGNET_TASKS = ("e_form", "gap pbe", "bulk modulus", "shear modulus")
# MEGNet's own `mp.2018.6.1.json` and the shipped `mp_megnet.jsonl.gz`.
MP_TASKS = ("formation_energy_per_atom", "band_gap", "K_VRH", "G_VRH")
KNOWN_TASKS = JARVIS_DFT3D_TASKS + JARVIS_MEGNET_TASKS + MP_TASKS

# Values that mean "no value" in the JSON datasets (JARVIS writes "na").
_MISSING_STRINGS = frozenset({"na", "n/a", "nan", "none", "null", ""})

# Fields of the JSON-lines format that are not targets.
_JSONL_RESERVED = frozenset({"id", "source", "lattice", "species", "frac_coords", "split"})


# --------------------------------------------------------------------------------------------
# Building records
# --------------------------------------------------------------------------------------------

_SYMBOL_TO_Z: dict[str, int] | None = None


def _symbol_table() -> dict[str, int]:
    global _SYMBOL_TO_Z
    if _SYMBOL_TO_Z is None:
        _SYMBOL_TO_Z = {sym: z for z, sym in enumerate(ELEMENT_SYMBOLS, start=1)}
    return _SYMBOL_TO_Z


def atomic_numbers(species: Sequence[Any], record: str = "?") -> np.ndarray:
    """Element symbols (or atomic numbers) -> int32 atomic numbers; `CrystalError` on unknown ones."""
    table = _symbol_table()
    out = np.empty(len(species), dtype=np.int32)
    for i, s in enumerate(species):
        if isinstance(s, (bool, np.bool_)):
            raise CrystalError(record, f"species {i} is {s!r}, not an element symbol")
        if isinstance(s, (int, np.integer)):
            out[i] = int(s)
            continue
        if not isinstance(s, str):
            raise CrystalError(record, f"species {i} is {s!r}, not an element symbol")
        z = table.get(s.strip())
        if z is None:
            raise CrystalError(record, f"unknown element symbol {s!r} (species {i})")
        out[i] = z
    return out


def make_crystal(
    id: str,
    lattice: Any,
    species: Sequence[Any],
    coords: Any,
    *,
    cartesian: bool = False,
    targets: Mapping[str, float] | None = None,
    split: Mapping[str, str] | None = None,
    source: str = "",
) -> Crystal:
    """Builds and validates a `Crystal` from plain lists; raises `CrystalError(id, reason)`.

    Args:
      lattice: 3x3, Å, rows are the lattice vectors.
      species: element symbols or atomic numbers, one per atom.
      coords: (n, 3) fractional coordinates, or Cartesian (Å) when `cartesian=True`.
      targets: task -> finite float.
      split: task -> "train" | "val" | "test".
    """
    rid = str(id)
    try:
        lat = np.asarray(lattice, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise CrystalError(rid, f"lattice is not a numeric 3x3 array ({e})") from None
    if lat.shape != (3, 3):
        raise CrystalError(rid, f"lattice must be 3x3, got shape {lat.shape}")
    if not np.all(np.isfinite(lat)):
        raise CrystalError(rid, "lattice contains non-finite values")
    if isinstance(species, (str, bytes)) or not hasattr(species, "__len__"):
        raise CrystalError(rid, f"species must be a list of element symbols, got {type(species).__name__}")
    numbers = atomic_numbers(species, rid)
    try:
        pos = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise CrystalError(rid, f"coordinates are not a numeric (n, 3) array ({e})") from None
    if pos.shape != (numbers.shape[0], 3):
        raise CrystalError(
            rid, f"coordinates must have shape ({numbers.shape[0]}, 3) for {numbers.shape[0]} species, got {pos.shape}"
        )
    if cartesian:
        try:
            pos = np.linalg.solve(lat.T, pos.T).T
        except np.linalg.LinAlgError:
            raise CrystalError(rid, "degenerate lattice (singular matrix)") from None
    crystal = Crystal(
        id=rid,
        lattice=lat,
        numbers=numbers,
        frac_coords=pos,
        targets=dict(targets or {}),
        split=dict(split or {}),
        source=source,
    )
    return validate_crystal(crystal)


def _check_split_values(split: Mapping[str, Any], record: str) -> dict[str, str]:
    out = {}
    for task, value in split.items():
        name = _SPLIT_ALIASES.get(str(value).strip().lower()) if isinstance(value, str) else None
        if name is None:
            raise CrystalError(record, f"split of task {task!r} is {value!r}, expected one of {SPLITS}")
        out[str(task)] = name
    return out


def crystal_from_pymatgen(
    structure: Any,
    id: str | None = None,
    *,
    targets: Mapping[str, float] | None = None,
    split: Mapping[str, str] | None = None,
    source: str = "pymatgen",
) -> Crystal:
    """A pymatgen `Structure` -> `Crystal`.

    Raises `CrystalError` for a `Molecule` (not periodic), a disordered structure (partial or mixed
    occupancy on a site) or dummy species. `id` defaults to the reduced formula.
    """
    rid = str(id) if id is not None else _pmg_name(structure)
    if not hasattr(structure, "lattice"):
        raise CrystalError(rid, f"not periodic: got a {type(structure).__name__} without a lattice")
    pbc = getattr(structure.lattice, "pbc", (True, True, True))
    if not all(pbc):
        raise CrystalError(rid, f"not periodic in all three directions (pbc={tuple(bool(p) for p in pbc)})")
    from pymatgen.core.periodic_table import DummySpecies, Element, Species

    numbers = np.empty(len(structure), dtype=np.int32)
    for i, site in enumerate(structure):
        if not site.is_ordered:
            raise CrystalError(
                rid,
                f"disordered structure: site {i} has partial/mixed occupancy {site.species.formula!r} "
                "(only fully ordered structures are supported; order it first, e.g. with "
                "pymatgen's OrderDisorderedStructureTransformation)",
            )
        sp = site.specie
        if isinstance(sp, DummySpecies) or not isinstance(sp, (Element, Species)):
            raise CrystalError(rid, f"site {i} holds {sp!s}, which is not a chemical element")
        numbers[i] = sp.Z
    if len(structure) == 0:
        raise CrystalError(rid, "structure has no atoms")
    crystal = Crystal(
        id=rid,
        lattice=np.asarray(structure.lattice.matrix, dtype=np.float64),
        numbers=numbers,
        frac_coords=np.asarray(structure.frac_coords, dtype=np.float64),
        targets=dict(targets or {}),
        split=dict(split or {}),
        source=source,
    )
    return validate_crystal(crystal)


def _pmg_name(structure: Any) -> str:
    try:
        return structure.composition.reduced_formula
    except Exception:  # noqa: BLE001 - only used to name the record
        return type(structure).__name__


def crystal_from_ase(
    atoms: Any,
    id: str | None = None,
    *,
    targets: Mapping[str, float] | None = None,
    split: Mapping[str, str] | None = None,
    source: str = "ase",
) -> Crystal:
    """An ASE `Atoms` -> `Crystal`.

    Raises `CrystalError` when the atoms are not periodic in all three directions, have no
    (or a degenerate) cell, or carry partial occupancies (`atoms.info["occupancy"]`, as ASE's CIF
    reader stores them). `id` defaults to the chemical formula.
    """
    rid = str(id) if id is not None else str(atoms.get_chemical_formula())
    pbc = np.asarray(atoms.pbc, dtype=bool).reshape(-1)
    if pbc.shape != (3,) or not pbc.all():
        raise CrystalError(
            rid, f"not periodic in all three directions (pbc={pbc.tolist()}); molecules, slabs and wires are not supported"
        )
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if cell.shape != (3, 3) or abs(float(np.linalg.det(cell))) < 1e-6:
        raise CrystalError(rid, "missing or degenerate unit cell")
    occupancy = atoms.info.get("occupancy") if hasattr(atoms, "info") else None
    if occupancy:
        for site, occ in dict(occupancy).items():
            values = list(occ.values()) if isinstance(occ, Mapping) else [occ]
            if len(values) != 1 or abs(float(values[0]) - 1.0) > 1e-6:
                raise CrystalError(rid, f"disordered structure: site {site} has partial/mixed occupancy {occ}")
    if len(atoms) == 0:
        raise CrystalError(rid, "structure has no atoms")
    crystal = Crystal(
        id=rid,
        lattice=cell,
        numbers=np.asarray(atoms.numbers, dtype=np.int32),
        frac_coords=np.asarray(atoms.get_scaled_positions(wrap=False), dtype=np.float64),
        targets=dict(targets or {}),
        split=dict(split or {}),
        source=source,
    )
    return validate_crystal(crystal)


# --------------------------------------------------------------------------------------------
# Structure files
# --------------------------------------------------------------------------------------------

STRUCTURE_SUFFIXES = {".cif": "cif", ".vasp": "poscar", ".poscar": "poscar", ".xyz": "extxyz", ".extxyz": "extxyz"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")


def _strip_compression(name: str) -> str:
    lower = name.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def structure_file_format(path: PathLike) -> str | None:
    """"cif", "poscar" or "extxyz" from a file name (case-insensitive, .gz/.bz2/.xz allowed), else None.

    Recognised: `*.cif`, `*.vasp`, `*.poscar`, `POSCAR*`, `CONTCAR*`, `*.xyz`, `*.extxyz`.
    """
    name = _strip_compression(pathlib.Path(path).name)
    lower = name.lower()
    if lower.startswith(("poscar", "contcar")):
        return "poscar"
    return STRUCTURE_SUFFIXES.get(pathlib.PurePath(lower).suffix)


def file_stem(path: PathLike) -> str:
    """The id a structure file's record gets (`POSCAR*` / `CONTCAR*` keep their whole name)."""
    name = _strip_compression(pathlib.Path(path).name)
    if name.lower().startswith(("poscar", "contcar")) and not pathlib.PurePath(name.lower()).suffix == ".vasp":
        return name
    return pathlib.PurePath(name).stem or name


def _one_line(text: str, limit: int = 400) -> str:
    """Collapses whitespace/newlines so a reason fits one log line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _warning_text(caught: Sequence[warnings.WarningMessage]) -> str:
    msgs = []
    for w in caught:
        m = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        if m and m not in msgs:
            msgs.append(m)
    return "; ".join(msgs[:3])


# pymatgen's messages for a loop_ row of the wrong length (they name no loop or row; which one
# depends on the pymatgen version), and what they mean
_CIF_LOOP_ROW_ERRORS = ("is not a multiple of", "zip() argument")
_CIF_LOOP_ROW_HINT = "a loop_ has a row with more or fewer values than the loop has column names"
# the atom-site coordinate tags, one of which every CIF block with atoms has
_CIF_COORDINATE_TAGS = ("_atom_site_fract_x", "_atom_site_cartn_x")


def cif_formula_mismatch(formula_sum: Any, composition: Any, rtol: float = 1e-2) -> str | None:
    """Why a parsed structure's composition disagrees with its CIF's `_chemical_formula_sum`, else None.

    The formula may be per formula unit or per cell, so the parsed amounts (with occupancies) must
    be one common multiple k >= 1 of it, within `rtol`; hydrogen is left out when the structure
    has none (CIFs often omit H sites). A formula sum that does not parse ("?", odd syntax)
    gives None. A mismatch typically means a file cut short inside the atom-site loop.
    """
    from pymatgen.core import Composition, Element

    if not isinstance(formula_sum, str) or not formula_sum.strip():
        return None
    try:
        formula = Composition(formula_sum).element_composition
        parsed = Composition(composition).element_composition
    except Exception:  # noqa: BLE001 - unparseable formula (or dummy species): nothing to compare
        return None
    if not all(isinstance(el, Element) for el in (*formula, *parsed)):  # "Xx" parses as a dummy species
        return None
    want = {str(el): amt for el, amt in formula.items() if amt > 0}
    got = {str(el): amt for el, amt in parsed.items() if amt > 0}
    if "H" not in got:
        want.pop("H", None)
    if not want or not got:
        return None
    if set(want) == set(got):
        ratios = [got[el] / want[el] for el in want]
        if min(ratios) >= 1 - rtol and max(ratios) <= min(ratios) * (1 + rtol):
            return None
    return (
        f"parsed composition {parsed.formula} is not a whole multiple of _chemical_formula_sum "
        f"{formula_sum.strip()!r} (atom sites missing: a file cut short inside the atom list?)"
    )


def structures_from_cif_text(text: str, record: str) -> list[Any]:
    """All structures (data blocks) of a CIF string as pymatgen Structures, cell kept as given.

    Raises `CrystalError(record, reason)` when pymatgen cannot parse any structure; the reason
    includes pymatgen's own warnings (e.g. occupancy or symmetry problems). A structure whose
    composition disagrees with its block's `_chemical_formula_sum` (see `cif_formula_mismatch`)
    is still returned, with a logged warning naming `record`.
    """
    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parser = CifParser.from_str(text)
            structures = parser.parse_structures(primitive=False, on_error="raise")
        except Exception as e:  # noqa: BLE001 - pymatgen raises many types; report them all
            hint = _CIF_LOOP_ROW_HINT if any(key in str(e) for key in _CIF_LOOP_ROW_ERRORS) else ""
            if not any(tag in text.lower() for tag in _CIF_COORDINATE_TAGS):
                truncated = "the CIF has no atom-site coordinates (_atom_site_fract_x): a truncated file?"
                hint = "; ".join(part for part in (hint, truncated) if part)
            extra = "; ".join(part for part in (hint, _warning_text(caught)) if part)
            raise CrystalError(
                record, _one_line(f"could not parse CIF: {type(e).__name__}: {e}" + (f" ({extra})" if extra else ""))
            ) from None
    if not structures:
        raise CrystalError(record, "CIF holds no structure")
    blocks = list(parser.as_dict().values())
    if len(blocks) != len(structures):  # pymatgen skips blocks without atom sites
        blocks = [b for b in blocks if any(k.lower() in _CIF_COORDINATE_TAGS for k in b)]
    if len(blocks) == len(structures):
        for k, (block, structure) in enumerate(zip(blocks, structures)):
            formula_sum = next((v for key, v in block.items() if key.lower() == "_chemical_formula_sum"), None)
            # a disordered block is refused later anyway, and its formula sum is often nominal
            mismatch = structure.is_ordered and cif_formula_mismatch(formula_sum, structure.composition)
            if mismatch:
                logger.warning("%s%s: %s", record, f" (block {k})" if len(blocks) > 1 else "", mismatch)
    return structures


def _read_text(path: pathlib.Path) -> str:
    from monty.io import zopen

    with zopen(path, mode="rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def _read_cif(path: pathlib.Path, stem: str, source: str) -> list[Crystal]:
    structures = structures_from_cif_text(_read_text(path), str(path))
    many = len(structures) > 1
    out = []
    for k, s in enumerate(structures):
        rid = f"{stem}:{k}" if many else stem
        try:
            out.append(crystal_from_pymatgen(s, rid, source=source))
        except CrystalError as e:
            raise CrystalError(str(path), e.reason if not many else f"block {k}: {e.reason}") from None
    return out


def _poscar_too_short(text: str) -> str | None:
    """"file ends early: N atoms declared, M coordinate lines" for a POSCAR cut short (pymatgen
    says only "list index out of range"), else None. Layout: comment, scale, 3 lattice lines,
    [species], counts, [Selective dynamics], Direct|Cartesian, one line per atom."""
    lines = [line.split() for line in text.splitlines()]
    k = 5 if len(lines) > 5 and lines[5] and not lines[5][0].lstrip("+-").isdigit() else 4
    k += 1  # the counts line
    if len(lines) <= k:
        return f"file ends early: {len(lines)} lines, before the atom counts"
    try:
        n_atoms = sum(int(x) for x in lines[k])
    except ValueError:
        return None
    k += 1
    if k < len(lines) and lines[k] and lines[k][0][:1].lower() == "s":  # Selective dynamics
        k += 1
    rest = lines[k + 1:]
    while rest and not rest[-1]:  # trailing blank lines
        rest.pop()
    if len(rest) < n_atoms:  # fewer lines left than atoms: cut short (a bad line inside is pymatgen's to name)
        return f"file ends early: {n_atoms} atoms declared, {len(rest)} coordinate lines"
    return None


def _read_poscar(path: pathlib.Path, stem: str, source: str) -> list[Crystal]:
    from pymatgen.io.vasp import Poscar

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = None
        try:
            text = _read_text(path)
            poscar = Poscar.from_str(text, read_velocities=False)
        except Exception as e:  # noqa: BLE001
            reason = (text is not None and _poscar_too_short(text)) or f"{type(e).__name__}: {e}"
            raise CrystalError(str(path), _one_line(f"could not parse POSCAR: {reason}")) from None
    for w in caught:
        if "cannot be determined" in str(w.message):
            raise CrystalError(
                str(path), "POSCAR has no element symbols (VASP 4 format without a species line); add the species line"
            )
    try:
        return [crystal_from_pymatgen(poscar.structure, stem, source=source)]
    except CrystalError as e:
        raise CrystalError(str(path), e.reason) from None


def _read_extxyz(path: pathlib.Path, stem: str, source: str) -> list[Crystal]:
    try:
        import ase.io
    except ImportError:
        raise CrystalError(
            str(path), "reading extxyz files needs ASE, which is not installed: pip install ase (or dpf_jax[ase])"
        ) from None
    try:
        frames = ase.io.read(str(path), index=":", format="extxyz")
    except Exception as e:  # noqa: BLE001
        raise CrystalError(str(path), _one_line(f"could not parse extxyz: {type(e).__name__}: {e}")) from None
    if not frames:
        raise CrystalError(str(path), "extxyz file holds no frames")
    many = len(frames) > 1
    out = []
    for k, atoms in enumerate(frames):
        rid = f"{stem}:{k}" if many else stem
        try:
            out.append(crystal_from_ase(atoms, rid, source=source))
        except CrystalError as e:
            raise CrystalError(str(path), f"frame {k}: {e.reason}" if many else e.reason) from None
    return out


_FORMAT_READERS = {"cif": _read_cif, "poscar": _read_poscar, "extxyz": _read_extxyz}


def read_structure_frames(path: PathLike, *, fmt: str | None = None, id: str | None = None) -> list[Crystal]:
    """Every structure of one file: one per extxyz frame / CIF data block.

    Ids are the file stem (`id` overrides it), with ":k" appended when the file holds several
    structures. `fmt` ("cif", "poscar", "extxyz") overrides detection from the file name.
    Any failure raises `CrystalError(path, reason)`; a file is read completely or not at all.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise CrystalError(str(p), "no such file" if not p.exists() else "not a file")
    fmt = fmt or structure_file_format(p)
    if fmt is None:
        raise CrystalError(
            str(p),
            "unrecognised structure file name (expected *.cif, POSCAR*, CONTCAR*, *.vasp, *.xyz or *.extxyz; "
            "force a format with fmt= in Python or --format with `python -m dpf_jax.predict`)",
        )
    if fmt not in _FORMAT_READERS:
        raise CrystalError(str(p), f"unknown format {fmt!r}; expected one of {sorted(_FORMAT_READERS)}")
    return _FORMAT_READERS[fmt](p, id if id is not None else file_stem(p), f"file:{p}")


def read_structure_file(
    path: PathLike, *, fmt: str | None = None, id: str | None = None, frame: int | None = None
) -> Crystal:
    """One structure from a CIF, POSCAR/CONTCAR/*.vasp or extxyz file; id = file stem (or `id`).

    A file holding several structures (multi-frame extxyz, multi-block CIF) needs `frame=k`
    (or use `read_structure_frames` / `read_structure_files`). Raises `CrystalError(path, reason)`.
    """
    crystals = read_structure_frames(path, fmt=fmt, id=id)
    if frame is None:
        if len(crystals) > 1:
            raise CrystalError(
                str(path), f"file holds {len(crystals)} structures; pass frame= or use read_structure_frames"
            )
        return crystals[0]
    if not -len(crystals) <= frame < len(crystals):
        raise CrystalError(str(path), f"frame {frame} out of range: file holds {len(crystals)} structures")
    return crystals[frame]


def _folder_files(folder: pathlib.Path, recursive: bool) -> list[pathlib.Path]:
    """The files of a folder (and, recursive, of its sub-folders), leaving out hidden entries
    (`.DS_Store`, `.git/`, ...), which are never structure files."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return [f for f in found if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)]


def has_structure_files(folder: PathLike, recursive: bool = True) -> bool:
    """Whether a folder (by default with its sub-folders) holds any file named like a structure file."""
    p = pathlib.Path(folder)
    return p.is_dir() and any(structure_file_format(f) for f in _folder_files(p, recursive))


def expand_structure_paths(paths_or_folders: PathLike | Iterable[PathLike], recursive: bool = False,
                           ignored: list[pathlib.Path] | None = None) -> list[pathlib.Path]:
    """Files named directly are kept (in the given order); folders are replaced by their recognised
    structure files (see `structure_file_format`), sorted by path. Missing paths are kept so the
    reader reports them. A file reached twice (named and inside a named folder, or two
    overlapping folders) is kept once, where it first appears. The files of a folder whose names
    are not structure-file names are left out and appended to `ignored` when it is given."""
    if isinstance(paths_or_folders, (str, os.PathLike)):
        paths_or_folders = [paths_or_folders]
    out: list[pathlib.Path] = []
    seen: set[str] = set()
    repeated = 0
    for item in paths_or_folders:
        p = pathlib.Path(item)
        if p.is_dir():
            found = _folder_files(p, recursive)
            files = sorted((f for f in found if structure_file_format(f)), key=str)
            if ignored is not None:
                listed = set(ignored)  # a folder given twice (or inside another) lists its files once
                ignored.extend(f for f in sorted(found, key=str) if not structure_file_format(f) and f not in listed)
        else:
            files = [p]
        for f in files:
            key = os.path.abspath(f)  # lexical: two names of one file (a symlink) are both read
            if key in seen:
                repeated += 1
                continue
            seen.add(key)
            out.append(f)
    if repeated:
        logger.warning("%d structure file(s) given more than once (directly and through a folder, "
                       "or in overlapping folders): each is read once", repeated)
    return out


def read_structure_files(
    paths_or_folders: PathLike | Iterable[PathLike],
    on_error: str = "skip",
    *,
    recursive: bool = False,
    fmt: str | None = None,
) -> tuple[list[Crystal], list[tuple[str, str]]]:
    """Reads many structure files; returns `(records, failures)` with `failures = [(path, reason)]`.

    Folders are expanded to their `*.cif`, `*.vasp`, `POSCAR*`, `CONTCAR*`, `*.xyz`, `*.extxyz`
    files (sorted; `recursive=True` descends into sub-folders). Multi-frame extxyz files give one
    record per frame (id "stem:frame"). `on_error="skip"` records unreadable files and goes on;
    `on_error="raise"` raises the first `CrystalError`. When two files give the same id (e.g.
    several `POSCAR`s in different folders) those records get their file path as id instead.
    `fmt` ("cif", "poscar", "extxyz") reads every file as that format (folders still list only
    files named like structure files).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    files = expand_structure_paths(paths_or_folders, recursive=recursive)
    per_file: list[tuple[pathlib.Path, list[Crystal]]] = []
    failures: list[tuple[str, str]] = []
    for f in files:
        try:
            per_file.append((f, read_structure_frames(f, fmt=fmt)))
        except CrystalError as e:
            if on_error == "raise":
                raise
            failures.append((str(f), e.reason))
    counts = collections.Counter(c.id for _, cs in per_file for c in cs)
    records: list[Crystal] = []
    for f, crystals in per_file:
        for c in crystals:
            if counts[c.id] > 1:
                suffix = c.id[len(file_stem(f)) :] if c.id.startswith(file_stem(f)) else ""
                c = c.replace(id=f"{f}{suffix}")
            records.append(c)
    if failures and not _SKIP_SUMMARY_DEFERRED.get():
        logger.warning("could not read %d of %d structure files (first: %s: %s)", len(failures), len(files), *failures[0])
    return records, failures


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DatasetRecords:
    """The records read from one dataset file, with what was left out and why.

    Attributes:
      records: the usable records, in file order.
      skipped: `(record id or "line N" / "entry N" / "row N", reason)` for every entry that could
        not be used (malformed, unreadable or missing structure).
      source_path: the file (or folder) read.
      num_entries: entries seen in the file (lines, list items, CSV rows, files).
      num_filtered: well-formed entries left out by the `task` / `split` selection.
      num_transform_dropped: entries dropped because `transform` is undefined for their target
        (e.g. non-positive values under "log10").
      task, split, transform: the selection that was applied.
    """

    records: list[Crystal]
    skipped: list[tuple[str, str]]
    source_path: str
    num_entries: int = 0
    num_filtered: int = 0
    num_transform_dropped: int = 0
    task: str | None = None
    split: str | None = None
    transform: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Crystal]:
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        """One line: how many records were read, filtered, dropped and skipped."""
        sel = ", ".join(f"{k}={v}" for k, v in (("task", self.task), ("split", self.split), ("transform", self.transform)) if v)
        text = f"{self.source_path}: {len(self.records)} records of {self.num_entries} entries"
        if sel:
            text += f" ({sel}; {self.num_filtered} not selected)"
        if self.num_transform_dropped:
            text += f", {self.num_transform_dropped} dropped by {self.transform}"
        if self.skipped:
            text += f", {len(self.skipped)} skipped (see .skipped)"
        return text


def _log10(value: float) -> float | None:
    return math.log10(value) if value > 0 else None


TRANSFORMS: dict[str, Callable[[float], float | None]] = {"log10": _log10}


def _check_selection(task: str | None, split: str | None, transform: Any) -> None:
    if split is not None:
        if task is None:
            raise ValueError("split= needs task=: splits are defined per task")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if transform is not None:
        if task is None:
            raise ValueError("transform= needs task=: it is applied to that task's target")
        if not callable(transform) and transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; expected one of {sorted(TRANSFORMS)} or a callable")


def _parse_target(value: Any, record: str, task: str) -> float | None:
    """A raw target value -> float, None when missing ("na", null); CrystalError when malformed."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in _MISSING_STRINGS:
            return None
        try:
            value = float(value)
        except ValueError:
            raise CrystalError(record, f"target {task!r} is not a number ({value!r})") from None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CrystalError(record, f"target {task!r} is not a number ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise CrystalError(record, f"target {task!r} is not finite ({value})")
    return value


@dataclasses.dataclass
class _Entry:
    """One raw dataset entry before conversion: cheap fields first, the structure built lazily."""

    rid: str
    raw_targets: Mapping[str, Any]
    split: Mapping[str, Any]
    build: Callable[[dict, dict], Crystal]  # (targets, split) -> Crystal, may raise CrystalError


class _BadEntry(Exception):
    def __init__(self, rid: str, reason: str):
        super().__init__(f"{rid}: {reason}")
        self.rid, self.reason = rid, reason


def _iter_selected(
    entries: Iterable[_Entry | _BadEntry],
    report: DatasetRecords,
    *,
    task: str | None,
    split: str | None,
    transform: Any,
    has_splits: bool,
    progress: bool = False,
    total: int | None = None,
) -> Iterator[Crystal]:
    """Applies the task/split/transform selection to raw entries, filling `report` as it goes."""
    fn = None
    if transform is not None:
        fn = transform if callable(transform) else TRANSFORMS[transform]
    if progress:
        from tqdm.auto import tqdm

        entries = tqdm(entries, total=total, desc=os.path.basename(report.source_path), unit="rec")
    for entry in entries:
        report.num_entries += 1
        if isinstance(entry, _BadEntry):
            report.skipped.append((entry.rid, entry.reason))
            continue
        try:
            if task is None:
                targets = {}
                for t, v in entry.raw_targets.items():
                    value = _parse_target(v, entry.rid, t)
                    if value is not None:
                        targets[t] = value
                split_map = _check_split_values(entry.split, entry.rid)
            else:
                if has_splits and task not in entry.split:
                    report.num_filtered += 1
                    continue
                value = _parse_target(entry.raw_targets.get(task), entry.rid, task)
                if value is None:
                    report.num_filtered += 1
                    continue
                split_map = _check_split_values({task: entry.split[task]}, entry.rid) if task in entry.split else {}
                if split is not None and split_map.get(task) != split:
                    report.num_filtered += 1
                    continue
                if fn is not None:
                    new = fn(value)
                    if new is None or not math.isfinite(new):
                        report.num_transform_dropped += 1
                        continue
                    value = float(new)
                targets = {task: value}
            yield entry.build(targets, split_map)
        except CrystalError as e:
            report.skipped.append((entry.rid, e.reason))


# True inside `skip_summary_deferred()`: the caller logs the skipped records itself
_SKIP_SUMMARY_DEFERRED = contextvars.ContextVar("dpf_jax_skip_summary_deferred", default=False)


@contextlib.contextmanager
def skip_summary_deferred():
    """Readers called inside still collect the records they skip (`.skipped`, failures) but log
    no summary of their own: for a caller that reports them in one count with later failures
    (the dataset pipeline: unreadable records and structures whose graph cannot be built)."""
    token = _SKIP_SUMMARY_DEFERRED.set(True)
    try:
        yield
    finally:
        _SKIP_SUMMARY_DEFERRED.reset(token)


def _log_report(report: DatasetRecords) -> None:
    if report.skipped and not _SKIP_SUMMARY_DEFERRED.get():
        shown = "; ".join(f"{rid}: {reason}" for rid, reason in report.skipped[:3])
        more = f" (+{len(report.skipped) - 3} more)" if len(report.skipped) > 3 else ""
        logger.warning(
            "%s: skipped %d of %d records: %s%s",
            report.source_path,
            len(report.skipped),
            report.num_entries,
            shown,
            more,
        )
    if report.num_transform_dropped:
        logger.info(
            "%s: dropped %d records whose %r target is outside the domain of %s",
            report.source_path,
            report.num_transform_dropped,
            report.task,
            report.transform,
        )


def _transform_name(transform: Any) -> str | None:
    if transform is None or isinstance(transform, str):
        return transform
    return getattr(transform, "__name__", repr(transform))


# ---------------------------------------------------------------- JSON lines (data/*.jsonl.gz)


def _open_binary(path: pathlib.Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


class DatasetFileError(ValueError):
    """A dataset file that cannot be read to its end (truncated download, corrupt archive).

    Raised rather than reported as one skipped record: the records after the damage are lost
    with no way to count them, and training on part of a dataset without knowing it would be
    worse than stopping."""


def _jsonl_entries(path: pathlib.Path) -> Iterator[_Entry | _BadEntry]:
    with _open_binary(path) as f:
        line_no = 0
        while True:
            try:
                line = f.readline()
            except (EOFError, OSError, zlib.error) as e:
                raise DatasetFileError(
                    f"{path}: file is truncated or corrupt after line {line_no} ({type(e).__name__}: {e}); "
                    "the rest of it cannot be read. Download or copy it again (a file that "
                    "dpf_jax.data.download fetched is re-fetched once deleted from its cache).") from None
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                yield _BadEntry(f"line {line_no}", f"malformed JSON: {e}")
                continue
            if not isinstance(obj, dict):
                yield _BadEntry(f"line {line_no}", f"expected a JSON object, got {type(obj).__name__}")
                continue
            rid = obj.get("id")
            rid = str(rid) if rid not in (None, "") else f"line {line_no}"
            missing = [k for k in ("lattice", "species", "frac_coords") if k not in obj]
            if missing:
                yield _BadEntry(rid, f"missing field(s) {missing}")
                continue
            split = obj.get("split") or {}
            if not isinstance(split, dict):
                yield _BadEntry(rid, f"'split' must be an object, got {type(split).__name__}")
                continue
            raw_targets = {
                k: v
                for k, v in obj.items()
                if k not in _JSONL_RESERVED and (v is None or isinstance(v, (int, float)) and not isinstance(v, bool))
            }
            # A task named in `split` is a target even if its value has an unexpected type.
            for t in split:
                if t in obj and t not in raw_targets:
                    raw_targets[t] = obj[t]
            source = str(obj.get("source") or f"file:{path.name}")

            def build(targets, split_map, obj=obj, rid=rid, source=source):
                return make_crystal(
                    rid, obj["lattice"], obj["species"], obj["frac_coords"], targets=targets, split=split_map, source=source
                )

            yield _Entry(rid, raw_targets, split, build)


def iter_jsonl(
    path: PathLike,
    task: str | None = None,
    split: str | None = None,
    transform: str | Callable | None = None,
    *,
    report: DatasetRecords | None = None,
) -> Iterator[Crystal]:
    """Streams the records of a (gzip) JSON-lines dataset file (format of `data/README.md`).

    Pass a `DatasetRecords` as `report` to collect skipped entries and counts while iterating
    (its `records` list is not filled). One warning summarising skipped entries is logged at the end.
    """
    _check_selection(task, split, transform)
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such dataset file")
    if report is None:
        report = DatasetRecords([], [], str(p))
    report.task, report.split, report.transform = task, split, _transform_name(transform)
    yield from _iter_selected(_jsonl_entries(p), report, task=task, split=split, transform=transform, has_splits=True)
    _log_report(report)


def read_jsonl(
    path: PathLike, task: str | None = None, split: str | None = None, transform: str | Callable | None = None
) -> DatasetRecords:
    """Reads a (gzip) JSON-lines dataset file (`data/*.jsonl.gz`) into a `DatasetRecords`.

    Each line is an object with `id`, `source`, `lattice` (3x3 Å, rows = vectors), `species`
    (symbols), `frac_coords`, target fields named by task (null = no value) and `split`
    (task -> train/val/test). With `task`, only records whose `split` names the task and whose
    target is non-null are kept, with `targets={task: value}`; `split` keeps one side. Malformed
    lines / records are skipped and listed in `.skipped` as `(id or "line N", reason)`; a file
    that cannot be read to its end (truncated or corrupt gzip) raises `DatasetFileError`.
    """
    report = DatasetRecords([], [], str(path))
    report.records = list(iter_jsonl(path, task, split, transform, report=report))
    return report


# ---------------------------------------------------------------- JSON (JARVIS figshare, MEGNet)


def load_json_file(path: PathLike, member: str | None = None) -> Any:
    """Loads JSON from `*.json`, `*.json.gz` or a zip archive (`member`, or its only `*.json` file)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                if member is None:
                    names = [n for n in zf.namelist() if n.lower().endswith(".json") and not n.startswith("__MACOSX")]
                    if len(names) != 1:
                        raise ValueError(
                            f"{p}: expected exactly one .json file in the zip archive, found {names or zf.namelist()}; pass member="
                        )
                    member = names[0]
                with zf.open(member) as f:
                    return json.load(f)
        with _open_binary(p) as f:
            return json.load(f)
    except (ValueError, EOFError, OSError, zlib.error, zipfile.BadZipFile, KeyError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(p)):
            raise
        raise ValueError(f"{p}: could not read JSON: {type(e).__name__}: {e}") from None


def read_split_file(path: PathLike) -> tuple[dict[str, str], dict[str, Any]]:
    """A jarvis-leaderboard style split `{"train": {id: value}, "val": {...}, "test": {...}}`.

    Accepts `.json`, `.json.gz` and the leaderboard's `.json.zip`. Returns `(split_of, value_of)`:
    id -> "train"/"val"/"test" and id -> target value. Raises `ValueError` naming the file if it is
    not such a mapping or an id is in two splits.
    """
    data = load_json_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a split file must be a JSON object {{'train': {{id: value}}, ...}}, got {type(data).__name__}")
    split_of: dict[str, str] = {}
    value_of: dict[str, Any] = {}
    for key, members in data.items():
        name = _SPLIT_ALIASES.get(str(key).lower())
        if name is None:
            continue  # e.g. metadata keys
        if isinstance(members, list):
            members = {m: None for m in members}
        if not isinstance(members, dict):
            raise ValueError(f"{path}: split {key!r} must map ids to values, got {type(members).__name__}")
        for rid, value in members.items():
            rid = str(rid)
            if rid in split_of and split_of[rid] != name:
                raise ValueError(f"{path}: id {rid!r} is in both {split_of[rid]!r} and {name!r}")
            split_of[rid] = name
            value_of[rid] = value
    if not split_of:
        raise ValueError(f"{path}: no 'train'/'val'/'test' entries found (keys: {sorted(map(str, data))[:10]})")
    return split_of, value_of


def _entries_list(data: Any, path: PathLike) -> list:
    if isinstance(data, dict):
        if set(map(str, data)) & {"train", "val", "test"}:
            raise ValueError(f"{path}: this is a split file ({{'train': ...}}); pass it as split_file=")
        # pandas `to_json(orient="columns")` style: {field: {row: value}}
        if data and all(isinstance(v, dict) for v in data.values()):
            rows: dict[str, dict] = collections.defaultdict(dict)
            for field, column in data.items():
                for row, value in column.items():
                    rows[row][field] = value
            return list(rows.values())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def _pick_id_key(entries: list, candidates: Sequence[str]) -> str:
    for e in entries[:10]:
        if isinstance(e, dict):
            for k in candidates:
                if k in e:
                    return k
    return candidates[0]


def _target_fields(entries: list, tasks: Sequence[str] | str | None, reserved: set[str]) -> list[str] | None:
    if tasks == "all":
        return None
    if isinstance(tasks, str):
        return [tasks]
    if tasks is not None:
        return list(tasks)
    present = set()
    for e in entries[:200]:
        if isinstance(e, dict):
            present.update(k for k in e if k in KNOWN_TASKS)
    return [t for t in KNOWN_TASKS if t in present]


def _raw_targets(entry: dict, fields: list[str] | None, reserved: set[str]) -> dict[str, Any]:
    if fields is None:  # every numeric (or "na") top-level field
        return {
            k: v
            for k, v in entry.items()
            if k not in reserved
            and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) or (isinstance(v, str) and v.strip().lower() in _MISSING_STRINGS))
        }
    return {k: entry.get(k) for k in fields}


def _apply_split_file(
    rid: str, raw_targets: dict, task: str | None, split_of: dict | None, value_of: dict | None
) -> tuple[dict, dict]:
    if split_of is None or task is None:
        return raw_targets, {}
    if rid not in split_of:
        return raw_targets, {}
    raw_targets = dict(raw_targets)
    if value_of.get(rid) is not None:
        raw_targets[task] = value_of[rid]  # the benchmark's value is the target
    return raw_targets, {task: split_of[rid]}


def _jarvis_entries(
    data: list, path: pathlib.Path, id_key: str, fields, split_of, value_of, task, source: str
) -> Iterator[_Entry | _BadEntry]:
    reserved = {id_key, "atoms"}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            yield _BadEntry(f"entry {i}", f"expected an object, got {type(entry).__name__}")
            continue
        rid = entry.get(id_key)
        rid = str(rid) if rid not in (None, "") else f"entry {i}"
        atoms = entry.get("atoms")
        if not isinstance(atoms, dict):
            yield _BadEntry(rid, "missing or malformed 'atoms' object")
            continue
        missing = [k for k in ("lattice_mat", "coords", "elements") if k not in atoms]
        if missing:
            yield _BadEntry(rid, f"'atoms' lacks {missing}")
            continue
        raw, split_map = _apply_split_file(rid, _raw_targets(entry, fields, reserved), task, split_of, value_of)

        def build(targets, split, atoms=atoms, rid=rid):
            return make_crystal(
                rid,
                atoms["lattice_mat"],
                atoms["elements"],
                atoms["coords"],
                cartesian=bool(atoms.get("cartesian", False)),
                targets=targets,
                split=split,
                source=source,
            )

        yield _Entry(rid, raw, split_map, build)


def _mp_structure(structure: Any, rid: str) -> Any:
    from pymatgen.core import Structure

    if isinstance(structure, str):
        structures = structures_from_cif_text(structure, rid)
        if len(structures) > 1:
            raise CrystalError(rid, f"CIF string holds {len(structures)} structures, expected one")
        return structures[0]
    if isinstance(structure, dict):
        if "lattice" not in structure or "sites" not in structure:
            raise CrystalError(rid, "structure dict lacks 'lattice'/'sites' (expected pymatgen Structure.as_dict())")
        try:
            return Structure.from_dict(structure)
        except Exception as e:  # noqa: BLE001
            raise CrystalError(
                rid, _one_line(f"could not build pymatgen Structure from dict: {type(e).__name__}: {e}")
            ) from None
    raise CrystalError(rid, f"'structure' must be a CIF string or a pymatgen Structure dict, got {type(structure).__name__}")


def _mp_entries(
    data: list, path: pathlib.Path, id_key: str, fields, split_of, value_of, task, source: str
) -> Iterator[_Entry | _BadEntry]:
    reserved = {id_key, "structure"}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            yield _BadEntry(f"entry {i}", f"expected an object, got {type(entry).__name__}")
            continue
        rid = entry.get(id_key)
        rid = str(rid) if rid not in (None, "") else f"entry {i}"
        if "structure" not in entry:
            yield _BadEntry(rid, "missing 'structure'")
            continue
        raw, split_map = _apply_split_file(rid, _raw_targets(entry, fields, reserved), task, split_of, value_of)

        def build(targets, split, structure=entry["structure"], rid=rid):
            return crystal_from_pymatgen(_mp_structure(structure, rid), rid, targets=targets, split=split, source=source)

        yield _Entry(rid, raw, split_map, build)


def _read_json_dataset(
    kind: str,
    path: PathLike,
    task: str | None,
    split: str | None,
    transform: Any,
    split_file: PathLike | None,
    tasks: Sequence[str] | str | None,
    id_key: str | None,
    source: str | None,
    member: str | None,
    progress: bool,
    data: Any = None,
) -> DatasetRecords:
    _check_selection(task, split, transform)
    if split_file is not None and task is None:
        raise ValueError("split_file= needs task=: a leaderboard split file belongs to one task")
    if split is not None and split_file is None:
        raise ValueError(f"{path}: this format carries no split; pass split_file= (a jarvis-leaderboard split json)")
    p = pathlib.Path(path)
    entries = _entries_list(load_json_file(p, member) if data is None else data, p)
    split_of = value_of = None
    if split_file is not None:
        split_of, value_of = read_split_file(split_file)
    if kind == "jarvis":
        id_key = id_key or _pick_id_key(entries, ("jid", "id", "material_id"))
        fields = _target_fields(entries, tasks if task is None else [task], {id_key, "atoms"})
        gen = _jarvis_entries(entries, p, id_key, fields, split_of, value_of, task, source or f"jarvis:{p.name}")
    else:
        id_key = id_key or _pick_id_key(entries, ("material_id", "mp_id", "id", "task_id"))
        fields = _target_fields(entries, tasks if task is None else [task], {id_key, "structure"})
        gen = _mp_entries(entries, p, id_key, fields, split_of, value_of, task, source or f"mp:{p.name}")
    report = DatasetRecords([], [], str(p), task=task, split=split, transform=_transform_name(transform))
    report.records = list(
        _iter_selected(
            gen,
            report,
            task=task,
            split=split,
            transform=transform,
            has_splits=split_file is not None,
            progress=progress,
            total=len(entries),
        )
    )
    _log_report(report)
    return report


def read_jarvis_json(
    path: PathLike,
    task: str | None = None,
    split: str | None = None,
    transform: str | Callable | None = None,
    *,
    split_file: PathLike | None = None,
    tasks: Sequence[str] | str | None = None,
    id_key: str | None = None,
    source: str | None = None,
    member: str | None = None,
    progress: bool = False,
) -> DatasetRecords:
    """Reads a JARVIS JSON dataset (figshare `dft_3d`, `.json` or the figshare `.json.zip`).

    Entries: `{"jid": ..., "atoms": {"lattice_mat", "coords", "elements", "cartesian"}, <property>:
    value or "na", ...}`. The JARVIS-format MEGNet set (`megnet.json`, id key "id", fields
    "e_form", "gap pbe", "bulk modulus", "shear modulus") reads the same way.

    Args:
      task: keep only entries with a value for this field (and in `split_file`, if given);
        targets become `{task: value}`.
      split: "train"/"val"/"test"; needs `split_file`.
      transform: e.g. "log10", applied to the task's target (non-positive values dropped, counted).
      split_file: jarvis-leaderboard split `{"train": {jid: value}, "val": ..., "test": ...}` for
        `task`; entries not in it are left out, and its value is used as the target.
      tasks: without `task`, the fields read as targets: default the known JARVIS/MEGNet tasks
        present in the file (`KNOWN_TASKS`); "all" = every numeric top-level field.
      id_key: the id field (default: "jid", else "id").
      progress: show a tqdm progress bar.
    """
    return _read_json_dataset(
        "jarvis", path, task, split, transform, split_file, tasks, id_key, source, member, progress
    )


def read_mp_json(
    path: PathLike,
    task: str | None = None,
    split: str | None = None,
    transform: str | Callable | None = None,
    *,
    split_file: PathLike | None = None,
    tasks: Sequence[str] | str | None = None,
    id_key: str | None = None,
    source: str | None = None,
    member: str | None = None,
    progress: bool = False,
) -> DatasetRecords:
    """Reads a Materials Project / MEGNet JSON dataset (e.g. MEGNet's `mp.2018.6.1.json[.zip]`).

    Entries: `{"material_id": "mp-...", "structure": <CIF string or pymatgen Structure dict>,
    "formation_energy_per_atom": ..., "band_gap": ..., "K_VRH": ..., "G_VRH": ...}`. Arguments as
    in `read_jarvis_json` (id key default "material_id"). Values are taken as stored: apply
    `transform="log10"` yourself if the moduli are raw GPa.
    """
    return _read_json_dataset("mp", path, task, split, transform, split_file, tasks, id_key, source, member, progress)


def _json_kind(entries: list, path: PathLike) -> str:
    for e in entries[:10]:
        if isinstance(e, dict):
            if "atoms" in e:
                return "jarvis"
            if "structure" in e:
                return "mp"
    raise ValueError(
        f"{path}: cannot tell the JSON format: expected entries with 'atoms' (JARVIS) or 'structure' (Materials Project)"
    )


def load_dataset_records(
    path: PathLike,
    task: str | None = None,
    split: str | None = None,
    transform: str | Callable | None = None,
    *,
    format: str | None = None,
    **kwargs: Any,
) -> DatasetRecords:
    """Reads any supported dataset into a `DatasetRecords`, picking the reader from the file.

    Formats: "jsonl" (`*.jsonl`, `*.jsonl.gz`: the shipped `data/` files), "jarvis" / "mp" (JSON
    list, `.json`, `.json.gz` or `.json.zip`, told apart by an "atoms" or "structure" field),
    "gnome" (a GNoME release folder holding `stable_materials_summary.csv` and `by_id.zip` or
    `by_id/`, or that CSV itself; `structures=` names the archive if elsewhere), "structures" (a
    folder or a structure file: CIF/POSCAR/extxyz). The last two carry no split, so no `task`
    (GNoME targets come from `targets=`, see `dpf_jax.data.gnome.read_gnome`).
    Extra keyword arguments go to the chosen reader (e.g. `split_file=`, `tasks=`, `progress=`,
    `limit=`).
    """
    p = pathlib.Path(path)
    name = p.name.lower()
    if format is None:
        if (p.is_dir() and (p / "stable_materials_summary.csv").is_file()) or name == "stable_materials_summary.csv":
            format = "gnome"
        elif p.is_dir() or structure_file_format(p):
            format = "structures"
        elif name.endswith((".jsonl", ".jsonl.gz")):
            format = "jsonl"
        elif name.endswith((".json", ".json.gz", ".zip")):
            format = "json"
        else:
            raise ValueError(f"{p}: cannot tell the dataset format from the file name; pass format=")
    if format == "jsonl":
        if kwargs:
            raise TypeError(f"read_jsonl takes no extra arguments, got {sorted(kwargs)}")
        return read_jsonl(p, task, split, transform)
    if format == "gnome":
        from dpf_jax.data import gnome

        if task is not None or split is not None or transform is not None:
            raise ValueError(f"{p}: GNoME has no task/split; pass targets= (summary columns) instead")
        folder = p if p.is_dir() else p.parent
        summary = folder / gnome.SUMMARY_FILE if p.is_dir() else p
        structures = kwargs.pop("structures", None)
        if structures is None:
            structures = next(
                (c for c in (folder / gnome.BY_ID_ARCHIVE, folder / "by_id") if c.exists()), folder / gnome.BY_ID_ARCHIVE
            )
        return gnome.read_gnome(summary, structures, **kwargs)
    if format == "structures":
        _check_selection(task, split, transform)
        if task is not None:
            raise ValueError(f"{p}: structure files carry no targets, so task= cannot be used")
        records, failures = read_structure_files(p, **kwargs)
        return DatasetRecords(records, failures, str(p), num_entries=len(records) + len(failures))
    if format in ("json", "jarvis", "mp"):
        options = {k: kwargs.pop(k, None) for k in ("split_file", "tasks", "id_key", "source", "member")}
        progress = bool(kwargs.pop("progress", False))
        if kwargs:
            raise TypeError(f"unexpected keyword arguments for a JSON dataset: {sorted(kwargs)}")
        data = None
        if format == "json":
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such dataset file")
            data = load_json_file(p, options["member"])
            format = _json_kind(_entries_list(data, p), p)
        return _read_json_dataset(
            format,
            p,
            task,
            split,
            transform,
            options["split_file"],
            options["tasks"],
            options["id_key"],
            options["source"],
            options["member"],
            progress,
            data=data,
        )
    raise ValueError(f"unknown dataset format {format!r}; expected jsonl, jarvis, mp, json, gnome or structures")
