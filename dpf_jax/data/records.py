"""The one crystal record type every reader produces and every later stage consumes.

A `Crystal` is immutable: its arrays are read-only and its mappings are frozen, so a record
can be shared between threads, cached and hashed into a dataset fingerprint without copies.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Mapping

import numpy as np

# Element symbols by atomic number (index Z-1); kept here so reading the JSON-lines datasets
# needs no pymatgen (the GPU image lacks it).
ELEMENT_SYMBOLS = (
    "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S",
    "Cl", "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga",
    "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd",
    "Ag", "Cd", "In", "Sn", "Sb", "Te", "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm",
    "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os",
    "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa",
    "U", "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg",
    "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og",
)

# Largest atomic number we accept. The CGCNN feature table covers Z = 1..100.
MAX_ATOMIC_NUMBER = 100


class CrystalError(ValueError):
    """A structure that cannot be used, with the record (file or id) it came from and why."""

    def __init__(self, record: str, reason: str):
        self.record = str(record)
        self.reason = str(reason)
        super().__init__(f"{self.record}: {self.reason}")


@dataclasses.dataclass(frozen=True, eq=False)
class Crystal:
    """One periodic crystal.

    Attributes:
      id: a name that identifies the record in messages (JARVIS id, mp id, file path, ...).
      lattice: (3, 3) float64, Å; rows are the lattice vectors a, b, c.
      numbers: (n,) int32 atomic numbers Z (1..100).
      frac_coords: (n, 3) float64 fractional coordinates (not necessarily wrapped).
      targets: task name -> float value (absent when the record has no value for the task).
      split: task name -> "train" | "val" | "test" (official split where the dataset has one).
      source: where the record came from (dataset or file), for provenance only.
    """

    id: str
    lattice: np.ndarray
    numbers: np.ndarray
    frac_coords: np.ndarray
    targets: Mapping[str, float] = dataclasses.field(default_factory=dict)
    split: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        def frozen(a, dtype):
            a = np.array(a, dtype=dtype, copy=True)
            a.setflags(write=False)
            return a

        object.__setattr__(self, "id", str(self.id))
        object.__setattr__(self, "lattice", frozen(self.lattice, np.float64))
        object.__setattr__(self, "numbers", frozen(self.numbers, np.int32).reshape(-1))
        object.__setattr__(self, "frac_coords", frozen(self.frac_coords, np.float64))
        object.__setattr__(
            self, "targets", types.MappingProxyType({str(k): float(v) for k, v in dict(self.targets).items()})
        )
        object.__setattr__(self, "split", types.MappingProxyType({str(k): str(v) for k, v in dict(self.split).items()}))

    def __reduce__(self):  # mapping proxies do not pickle; worker processes need records
        return (Crystal, (self.id, self.lattice, self.numbers, self.frac_coords, dict(self.targets),
                          dict(self.split), self.source))

    @property
    def num_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def cart_coords(self) -> np.ndarray:
        """(n, 3) Cartesian positions in Å."""
        return self.frac_coords @ self.lattice

    def replace(self, **changes) -> "Crystal":
        return dataclasses.replace(self, **changes)


def validate_crystal(crystal: Crystal) -> Crystal:
    """Checks shapes, finiteness, elements and cell volume; raises `CrystalError` naming the record.

    Distance checks (overlapping atoms, isolated atoms) need a neighbour search and live in
    `dpf_jax.data.graphs.build_crystal_graph`.
    """
    rid = crystal.id
    n = crystal.numbers.shape[0]
    if n == 0:
        raise CrystalError(rid, "structure has no atoms")
    if crystal.lattice.shape != (3, 3):
        raise CrystalError(rid, f"lattice must be 3x3, got shape {crystal.lattice.shape}")
    if crystal.frac_coords.shape != (n, 3):
        raise CrystalError(rid, f"frac_coords must be ({n}, 3), got shape {crystal.frac_coords.shape}")
    if not np.all(np.isfinite(crystal.lattice)):
        raise CrystalError(rid, "lattice contains non-finite values")
    if not np.all(np.isfinite(crystal.frac_coords)):
        raise CrystalError(rid, "fractional coordinates contain non-finite values")
    volume = abs(float(np.linalg.det(crystal.lattice)))
    lengths = np.linalg.norm(crystal.lattice, axis=1)
    if not volume > 1e-3 * max(float(np.prod(lengths)), 1e-12) or volume < 1e-6:
        raise CrystalError(rid, f"degenerate lattice (volume {volume:.3g} Å^3)")
    bad = (crystal.numbers < 1) | (crystal.numbers > MAX_ATOMIC_NUMBER)
    if np.any(bad):
        raise CrystalError(rid, f"unknown element with atomic number {int(crystal.numbers[bad][0])}")
    for task, value in crystal.targets.items():
        if not math.isfinite(value):
            raise CrystalError(rid, f"target {task!r} is not finite ({value})")
    return crystal
