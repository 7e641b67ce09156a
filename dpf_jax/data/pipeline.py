"""From a dataset file to the graph lists a run trains on: records → cached graphs → splits.

Pure host-side code (numpy, no JAX). Every skipped record is counted and reported once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from dpf_jax.data.dataset import GraphParams, cached_graphs
from dpf_jax.data.graphs import CrystalGraph
from dpf_jax.data.readers import TRANSFORMS, load_dataset_records, skip_summary_deferred

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# Units and target transform of the benchmark tasks ("auto" in a config resolves through this).
# MP moduli are regressed as log10(GPa), as Matformer and MEGNet do.
TASK_UNITS_AND_TRANSFORM = {
    "formation_energy_peratom": ("eV/atom", ""),
    "optb88vdw_bandgap": ("eV", ""),
    "optb88vdw_total_energy": ("eV/atom", ""),
    "ehull": ("eV/atom", ""),
    "mbj_bandgap": ("eV", ""),
    "bulk_modulus_kv": ("GPa", ""),
    "shear_modulus_gv": ("GPa", ""),
    "formation_energy_per_atom": ("eV/atom", ""),
    "band_gap": ("eV", ""),
    "K_VRH": ("log10(GPa)", "log10"),
    "G_VRH": ("log10(GPa)", "log10"),
}


def task_units_and_transform(task: str, units: str = "auto", transform: str = "auto") -> tuple[str, str]:
    known_units, known_transform = TASK_UNITS_AND_TRANSFORM.get(task, ("", ""))
    return (known_units if units == "auto" else units,
            known_transform if transform == "auto" else transform)


@dataclasses.dataclass
class SplitData:
    """Graphs and raw targets of one split (targets NaN for unlabeled data)."""

    graphs: list[CrystalGraph]
    targets: np.ndarray

    def __len__(self):
        return len(self.graphs)

    @property
    def ids(self) -> list[str]:
        return [g.crystal.id for g in self.graphs]


@dataclasses.dataclass
class PreparedData:
    splits: dict[str, SplitData]
    skipped: list[tuple[str, str]]
    num_records: int
    source: str

    def summary(self) -> str:
        sizes = "/".join(str(len(self.splits.get(s, SplitData([], np.zeros(0))))) for s in SPLITS)
        return (f"{self.source}: {self.num_records} records, train/val/test {sizes}, "
                f"{len(self.skipped)} skipped")


def _report_skipped(skipped: Sequence[tuple[str, str]], total: int, source: str):
    if skipped:
        log.warning("%s: skipped %d of %d records", source, len(skipped), total)
        for rid, reason in skipped[:10]:
            log.warning("  skipped %s: %s", rid, reason)
        if len(skipped) > 10:
            log.warning("  ... and %d more (see skipped.json in the workdir)", len(skipped) - 10)


def _hash_fraction(seed: int, rid: str) -> float:
    h = hashlib.sha256(f"{seed}:{rid}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64


def load_graphs(path: str, params: GraphParams, cache_dir: str | None, workers: int | None,
                max_records: int = 0, progress: bool = True, sample: str = "first"):
    """All records of a dataset file with their graphs; failures collected in `skipped`.

    `max_records` keeps the first records ("first") or a fixed-seed random subset in file
    order ("random": for corpora stored source by source, where the first records would all
    come from one source).
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    with skip_summary_deferred():  # one count for reader and graph failures: _report_skipped
        data = load_dataset_records(path)
    records = data.records
    if max_records and max_records < len(records):
        if sample == "random":
            keep = np.sort(np.random.default_rng(0).choice(len(records), max_records, replace=False))
            records = [records[i] for i in keep]
        else:
            records = records[:max_records]
    graphs, failed = cached_graphs(records, path, params, cache_dir, workers, progress)
    skipped = list(data.skipped) + list(failed)
    pairs = [(r, g) for r, g in zip(records, graphs) if g is not None]
    return pairs, skipped, len(records) + len(data.skipped)


# labelled data without stored splits: the (val, test) shares of `hashed_split` (configs/base.py's
# data.split_fractions; also the fallback for run configs saved before that key)
DEFAULT_SPLIT_FRACTIONS = (0.1, 0.1)


def hashed_split(rid: str, val_fraction: float, test_fraction: float) -> str:
    """"train", "val" or "test" for a record id, by a hash of the id alone: stable as a dataset
    grows and the same for every run seed, so seeds and methods are compared on one split."""
    f = _hash_fraction("labelled-split", rid)
    return "val" if f < val_fraction else "test" if f < val_fraction + test_fraction else "train"


def prepare_labeled(path: str, task: str, params: GraphParams = GraphParams(), transform: str = "",
                    cache_dir: str | None = ".cache/graphs", workers: int | None = None,
                    max_records: int = 0, progress: bool = True,
                    split_fractions: tuple[float, float] = DEFAULT_SPLIT_FRACTIONS) -> PreparedData:
    """Train/val/test graphs of `task`: each record's stored split (`split[task]`, the official
    one in the shipped data). If no record stores a split for the task, every record with a value
    is split by a hash of its id (`hashed_split`; `split_fractions` = the val and test shares),
    which is logged. If some records store one and others do not, the others are skipped and
    counted. Records without a value for the task (null where absent) are not the task's."""
    fractions = tuple(split_fractions)
    if (len(fractions) != 2 or not all(isinstance(x, (int, float)) for x in fractions)
            or not (0 <= fractions[0] and 0 <= fractions[1] and sum(fractions) < 1)):
        raise ValueError(f"split fractions must be two numbers (val, test), each >= 0, with a sum below 1; "
                         f"got {split_fractions!r} (data.split_fractions)")
    val_fraction, test_fraction = (float(x) for x in fractions)
    pairs, skipped, total = load_graphs(path, params, cache_dir, workers, max_records, progress)
    with_split = {t for r, _ in pairs for t in r.split}
    with_value = {t for r, _ in pairs for t in r.targets}
    if task not in with_split and task not in with_value:
        raise ValueError(f"task {task!r} not found in {path}: no record has a value or a split for it; "
                         f"targets there: {sorted(with_value)}")
    if transform and transform not in TRANSFORMS:
        raise ValueError(f"unknown target transform {transform!r}; expected '' or one of {sorted(TRANSFORMS)}")
    hashed = task not in with_split
    if hashed:
        log.info("%s: no record stores a split for task %r: split by a hash of the record id into "
                 "train/val/test %.0f/%.0f/%.0f%% (data.split_fractions)", path, task,
                 100 * (1 - val_fraction - test_fraction), 100 * val_fraction, 100 * test_fraction)
    apply = TRANSFORMS[transform] if transform else (lambda v: v)
    splits = {s: ([], []) for s in SPLITS}
    dropped = 0
    for r, g in pairs:
        if task not in r.targets:
            continue
        s = hashed_split(r.id, val_fraction, test_fraction) if hashed else r.split.get(task)
        if s is None:
            skipped.append((r.id, f"no split for task {task!r} (other records store one)"))
            continue
        value = apply(r.targets[task])  # None: invalid for the transform (log10 of a value <= 0)
        if value is None:
            dropped += 1
            continue
        if s not in splits:
            skipped.append((r.id, f"unknown split {s!r} for task {task!r}"))
            continue
        splits[s][0].append(g)
        splits[s][1].append(value)
    if dropped:
        log.warning("%s/%s: dropped %d records whose target is invalid for transform %r",
                    path, task, dropped, transform)
    _report_skipped(skipped, total, path)
    out = {s: SplitData(g, np.asarray(t, np.float64)) for s, (g, t) in splits.items()}
    if not out["train"].graphs:
        raise ValueError(f"task {task!r} in {path} has no training records")
    return PreparedData(out, skipped, total, f"{path}:{task}")


def prepare_unlabeled(path: str, params: GraphParams = GraphParams(), val_fraction: float = 0.05,
                      seed: int = 0, cache_dir: str | None = ".cache/graphs",
                      workers: int | None = None, max_records: int = 0, progress: bool = True) -> PreparedData:
    """A pre-training corpus split into train/val by a hash of (seed, id) — stable as it grows."""
    pairs, skipped, total = load_graphs(path, params, cache_dir, workers, max_records, progress, sample="random")
    train, val = [], []
    for r, g in pairs:
        (val if _hash_fraction(seed, r.id) < val_fraction else train).append(g)
    _report_skipped(skipped, total, path)
    if not train:
        raise ValueError(f"no usable structures in {path}")
    nan = lambda n: np.full(n, math.nan)
    splits = {"train": SplitData(train, nan(len(train))), "val": SplitData(val, nan(len(val))),
              "test": SplitData([], nan(0))}
    return PreparedData(splits, skipped, total, path)
