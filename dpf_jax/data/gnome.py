"""Loader for the GNoME stable-materials release (google-deepmind/materials_discovery).

Release layout (public bucket `gs://gdm_materials_discovery/gnome_data/`, also over HTTPS at
`https://storage.googleapis.com/gdm_materials_discovery/gnome_data/<file>`), as documented in the
repository's DATASET.md and read by its scripts/notebooks:

* `stable_materials_summary.csv`: one row per material. The first column is an unnamed pandas
  index; the named columns include "Composition", "MaterialId", "Reduced Formula", "Elements",
  "NSites", "Volume", "Density", "Point Group", "Space Group", "Space Group Number",
  "Crystal System", "Corrected Energy", "Formation Energy Per Atom",
  "Decomposition Energy Per Atom", "Dimensionality Cheon", "Bandgap", "Is Train", and the
  "Decomposition Energy Per Atom All/Relative/MP/MP OQMD" variants.
* `by_id.zip`: one CIF per material at `by_id/<MaterialId>.CIF` (also `by_composition.zip`
  and `by_reduced_formula.zip`, not used here).

Assumptions (not checkable offline, documented so they can be revisited): the CIFs are ordered,
one structure per file, and the cell is used as written (no primitive reduction). Members are
matched by file stem, case-insensitively in the extension, anywhere in the archive, so an archive
re-packed without the `by_id/` folder, or an extracted folder, works too. The data are licensed
CC BY-NC 4.0 by Google DeepMind (the code of that repository is Apache 2.0): check the terms
before using them.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import zipfile
from typing import Iterator, Mapping, Sequence

from dpf_jax.data.readers import (
    DatasetRecords,
    _log_report,
    _one_line,
    crystal_from_pymatgen,
    structures_from_cif_text,
)
from dpf_jax.data.records import CrystalError

GNOME_BASE_URL = "https://storage.googleapis.com/gdm_materials_discovery/gnome_data"
SUMMARY_FILE = "stable_materials_summary.csv"
BY_ID_ARCHIVE = "by_id.zip"
SOURCE = "gnome:stable_materials"

# Useful numeric columns of the summary, keyed by the task name they get in `Crystal.targets`
# when passed as `targets=GNOME_TARGET_COLUMNS` (or a subset of it).
GNOME_TARGET_COLUMNS = {
    "formation_energy_per_atom": "Formation Energy Per Atom",
    "decomposition_energy_per_atom": "Decomposition Energy Per Atom",
    "bandgap": "Bandgap",
}


class _CifSource:
    """Finds `<MaterialId>.CIF` in a zip archive or a folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._index: dict[str, str] = {}
        if self.path.is_dir():
            self._dirs = [d for d in (self.path / "by_id", self.path) if d.is_dir()]
        elif zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
            for name in self._zip.namelist():
                base = name.rsplit("/", 1)[-1]
                if base.lower().endswith(".cif") and not name.startswith("__MACOSX"):
                    self._index.setdefault(base[:-4], name)
            if not self._index:
                raise ValueError(f"{self.path}: zip archive holds no .CIF files")
        elif self.path.exists():
            raise ValueError(f"{self.path}: expected the GNoME by_id.zip archive or a folder of CIFs")
        else:
            raise FileNotFoundError(f"{self.path}: no such archive or folder")

    def where(self, material_id: str) -> str:
        if self._zip is not None:
            return f"{self.path}:by_id/{material_id}.CIF"
        return str(self._dirs[0] / f"{material_id}.CIF") if self._dirs else str(self.path)

    def read(self, material_id: str) -> str | None:
        if self._zip is not None:
            name = self._index.get(material_id)
            return None if name is None else self._zip.read(name).decode("utf-8", errors="replace")
        for d in self._dirs:
            for ext in (".CIF", ".cif"):
                f = d / f"{material_id}{ext}"
                if f.is_file():
                    return f.read_text(encoding="utf-8", errors="replace")
        return None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def iter_gnome_summary(summary_csv: str | os.PathLike) -> Iterator[dict[str, str]]:
    """Streams the rows of `stable_materials_summary.csv` as dicts (column name -> text).

    Raises `ValueError` naming the file if it has no "MaterialId" column.
    """
    p = pathlib.Path(summary_csv)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such summary CSV")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "MaterialId" not in reader.fieldnames:
            raise ValueError(f"{p}: not a GNoME summary CSV: no 'MaterialId' column (columns: {reader.fieldnames})")
        yield from reader


def _row_targets(row: Mapping[str, str], targets: Mapping[str, str], rid: str) -> dict[str, float]:
    out = {}
    for task, column in targets.items():
        if column not in row:
            raise CrystalError(rid, f"summary has no column {column!r} (for target {task!r})")
        text = (row[column] or "").strip()
        if not text or text.lower() in ("nan", "na", "none"):
            continue
        try:
            value = float(text)
        except ValueError:
            raise CrystalError(rid, f"column {column!r} is not a number ({text!r})") from None
        if not math.isfinite(value):
            raise CrystalError(rid, f"column {column!r} is not finite ({text})")
        out[task] = value
    return out


def read_gnome(
    summary_csv: str | os.PathLike,
    structures_zip_or_dir: str | os.PathLike,
    limit: int | None = None,
    *,
    targets: Mapping[str, str] | Sequence[str] | None = None,
    progress: bool = False,
) -> DatasetRecords:
    """Reads the GNoME stable materials as `Crystal` records (id = MaterialId).

    Args:
      summary_csv: `stable_materials_summary.csv`; rows are read in file order.
      structures_zip_or_dir: `by_id.zip` (members `by_id/<MaterialId>.CIF`) or a folder holding
        those CIFs (directly or in a `by_id/` sub-folder).
      limit: stop after this many records (None = all).
      targets: None (default) for unlabeled records (pre-training); else summary columns to read
        as targets, either a mapping task -> column (e.g. `GNOME_TARGET_COLUMNS`) or column names
        used as task names. Empty cells mean no value.
      progress: show a tqdm progress bar.

    Rows whose CIF is missing or unreadable, disordered, or disagrees with the row's "NSites" are
    skipped and listed in `.skipped` as `(MaterialId or "row N", reason)`; one warning sums them up.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if targets is None:
        target_map: dict[str, str] = {}
    elif isinstance(targets, Mapping):
        target_map = dict(targets)
    else:
        target_map = {str(c): str(c) for c in ([targets] if isinstance(targets, str) else targets)}
    rows = iter_gnome_summary(summary_csv)
    source = _CifSource(structures_zip_or_dir)
    report = DatasetRecords([], [], str(summary_csv))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=limit, desc="GNoME", unit="rec")
    try:
        for row_no, row in enumerate(rows, start=1):
            if limit is not None and len(report.records) >= limit:
                break
            report.num_entries += 1
            mid = (row.get("MaterialId") or "").strip()
            if not mid:
                report.skipped.append((f"row {row_no}", "empty MaterialId"))
                continue
            try:
                text = source.read(mid)
                if text is None:
                    raise CrystalError(mid, f"no structure file {source.where(mid)}")
                structures = structures_from_cif_text(text, mid)
                if len(structures) != 1:
                    raise CrystalError(mid, f"CIF holds {len(structures)} structures, expected one")
                structure = structures[0]
                nsites = (row.get("NSites") or "").strip()
                if nsites:
                    try:
                        expected = float(nsites)
                    except ValueError:
                        expected = None
                    if expected is not None and expected != len(structure):
                        raise CrystalError(mid, f"CIF has {len(structure)} sites but the summary says NSites={nsites}")
                crystal = crystal_from_pymatgen(
                    structure, mid, targets=_row_targets(row, target_map, mid), source=SOURCE
                )
            except CrystalError as e:
                report.skipped.append((mid, _one_line(e.reason)))
                continue
            report.records.append(crystal)
            if bar is not None:
                bar.update(1)
    finally:
        source.close()
        if bar is not None:
            bar.close()
    _log_report(report)
    return report
