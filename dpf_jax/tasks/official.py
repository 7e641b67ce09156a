"""Pre-training data of the authors' released code: `config.pretrain.corruption = "official"`.

The paper's equations (`corruption = "paper"`, the default) draw fresh Gaussian noise every
step on device. zjuKeLiu/DPF (`matformer/data.py`, `get_train_val_loaders(pre_train=True)`)
instead corrupts every structure ONCE, at preprocessing, and trains on that fixed corrupted
copy for every epoch (../shared/DESIGN.md §4, last paragraph):

* all three corruptions together: mask ⌈0.3·n⌉ atoms (≥ 1) to the unknown token (Z = 0, the
  reference's "X"); fractional coordinates += U[0, 0.3)³, wrapped mod 1; each lattice vector
  += U[0, 0.3)³ Å (`dpf_jax.tasks.perturb.perturb_official_host`);
* the k-NN graph rebuilt from the corrupted cell (`perturb.rebuild_topology`);
* targets: the clean fractional coordinates (per atom, 3 numbers, as stored: not wrapped), the
  clean lattice matrix (per crystal, 9 numbers, row-major, Å) and the clean types;
* structures with fewer than 2 atoms are dropped (`drop_single_atom_structures`, logged).

Our noise is a deterministic function of (run seed, crystal id) (`perturb.official_rng`), not
of the reference's unseeded global RNG, so a run is reproducible and a crystal gets the same
corruption whichever split, batch or device it lands in.

Deliberate differences from the reference, kept on purpose: the atom input stays our CGCNN
embedding (masked atoms use its all-zero "unknown" row) where the reference feeds a 119-way
one-hot including "X"; the type head stays our 95-way classifier (class Z − 1) where the
reference has a 119-way one. The losses are those of the reference: CE over masked atoms +
L1 over coordinates + L1 over lattice matrices, unweighted (`OfficialDenoisingObjective`).

`OfficialBatcher` precomputes every corrupted crystal, its rebuilt graph and its targets in
`__init__` (in worker processes when asked; a progress bar), then emits padded device-stacked
batches exactly like `GraphBatcher`, with the targets in fields prefixed `denoise_` (as
`dpf_jax.tasks.rebuild`; read them with `rebuild.targets_from_batch`):

  nodes["denoise_species"]      int32 [N]     clean Z (0 on padding)
  nodes["denoise_type_mask"]    bool  [N]     masked atoms
  nodes["denoise_frac_coords"]  f32   [N, 3]  clean fractional coordinates
  globals["denoise_lattice"]    f32   [G, 9]  clean lattice matrix, row-major
  globals["denoise_lattice_mask"] bool [G]    real crystals
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import math
import multiprocessing
from typing import Sequence

import jraph
import numpy as np
from tqdm.auto import tqdm

from dpf_jax.data.batching import GraphBatcher, graph_to_jraph
from dpf_jax.data.graphs import CrystalGraph
from dpf_jax.data.records import Crystal
from dpf_jax.tasks.perturb import (OFFICIAL_LATTICE_NOISE, OFFICIAL_MASK_RATIO, OFFICIAL_POSITION_NOISE,
                                   official_keeps, perturb_official_host, rebuild_topology)
from dpf_jax.tasks.rebuild import attach_targets

log = logging.getLogger(__name__)

NODE_TARGETS = ("species", "type_mask", "frac_coords")
GRAPH_TARGETS = ("lattice", "lattice_mask")
SINGLE_ATOM_REASON = "fewer than 2 atoms: dropped from pre-training as by the authors' code (corruption='official')"
# a corrupted cell whose graph cannot be built (never seen on the shipped data) is drawn again
# with the seed shifted by this much per attempt: still a pure function of (seed, id)
RETRY_SEED_STRIDE = 1_000_003
MAX_ATTEMPTS = 5
# below this many crystals, corrupt serially (~1 ms per crystal; spawning workers costs seconds)
PARALLEL_MIN_CRYSTALS = 2048


def drop_single_atom_structures(data):
    """The reference's pre-training filter (`official_keeps`: ≥ 2 atoms) on a `PreparedData`:
    returns a copy without 1-atom structures, which are added to `skipped` and counted in the log."""
    splits, dropped = {}, []
    for name, split in data.splits.items():
        keep = [official_keeps(g.crystal) for g in split.graphs]
        dropped += [(g.crystal.id, SINGLE_ATOM_REASON) for g, k in zip(split.graphs, keep) if not k]
        splits[name] = dataclasses.replace(split, graphs=[g for g, k in zip(split.graphs, keep) if k],
                                           targets=np.asarray(split.targets)[np.asarray(keep, bool)]
                                           if len(keep) else np.asarray(split.targets))
    log.info("corruption='official': dropped %d single-atom structure(s) from pre-training "
             "(the authors' filter)", len(dropped))
    return dataclasses.replace(data, splits=splits, skipped=list(data.skipped) + dropped)


def corrupt_and_rebuild(seed: int, crystal: Crystal, graph_kwargs: dict | None = None,
                        mask_ratio: float = OFFICIAL_MASK_RATIO, position_noise: float = OFFICIAL_POSITION_NOISE,
                        lattice_noise: float = OFFICIAL_LATTICE_NOISE) -> tuple[CrystalGraph, dict, int]:
    """(graph of the corrupted crystal, float32/int targets, attempts used) of one crystal.

    A pure function of (seed, crystal.id) and the crystal. If the corrupted cell's graph cannot
    be built, the corruption is drawn again with seed + k·RETRY_SEED_STRIDE (k = 1, 2, ...).
    """
    graph_kwargs = dict(graph_kwargs or {})
    error = None
    for attempt in range(MAX_ATTEMPTS):
        corrupted, t = perturb_official_host(seed + attempt * RETRY_SEED_STRIDE, crystal, mask_ratio,
                                             position_noise, lattice_noise)
        try:
            graph = rebuild_topology(corrupted, clean_numbers=crystal.numbers, **graph_kwargs)
        except Exception as e:  # noqa: BLE001 - redraw, then report with the crystal's id
            error = e
            continue
        targets = {"species": t["species"].astype(np.int32), "type_mask": t["mask"].astype(bool),
                   "frac_coords": t["frac_coords"].astype(np.float32),
                   "lattice": t["lattice"].astype(np.float32), "lattice_mask": np.bool_(True)}
        return graph, targets, attempt + 1
    raise RuntimeError(f"{crystal.id}: no buildable graph after {MAX_ATTEMPTS} official corruptions "
                       f"({type(error).__name__}: {error})")


def _work(args):
    seed, crystals, graph_kwargs, noise = args
    out = []
    for c in crystals:
        g, t, attempts = corrupt_and_rebuild(seed, c, graph_kwargs, *noise)
        out.append((g, t, attempts))
    return out


def precompute(crystals: Sequence[Crystal], seed: int, graph_kwargs: dict | None = None,
               workers: int = 1, progress: bool = True,
               noise: tuple[float, float, float] = (OFFICIAL_MASK_RATIO, OFFICIAL_POSITION_NOISE,
                                                    OFFICIAL_LATTICE_NOISE),
               desc: str = "official corruption") -> tuple[list[CrystalGraph], list[dict]]:
    """`corrupt_and_rebuild` of every crystal (same order), in `workers` processes if > 1.

    Worker processes are *spawned* (not forked): this runs after JAX has started its threads,
    and forking a multithreaded process can deadlock. They run numpy code only.
    """
    crystals = list(crystals)
    jobs_args = (seed, graph_kwargs, tuple(noise))
    results: list = []
    bar = tqdm(total=len(crystals), desc=desc, unit="crystal", disable=not progress, leave=False)
    if workers <= 1 or len(crystals) < PARALLEL_MIN_CRYSTALS:
        for c in crystals:
            results.append(corrupt_and_rebuild(seed, c, graph_kwargs, *noise))
            bar.update()
    else:
        size = max(16, min(512, math.ceil(len(crystals) / (workers * 8))))
        chunks = [crystals[i:i + size] for i in range(0, len(crystals), size)]
        jobs = [(jobs_args[0], ch, jobs_args[1], jobs_args[2]) for ch in chunks]
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for res in pool.map(_work, jobs):
                results.extend(res)
                bar.update(len(res))
    bar.close()
    redrawn = sum(a > 1 for _, _, a in results)
    if redrawn:
        log.warning("%s: %d crystal(s) needed a fresh draw (graph of the first corrupted cell failed)",
                    desc, redrawn)
    return [g for g, _, _ in results], [t for _, t, _ in results]


class OfficialBatcher(GraphBatcher):
    """A `GraphBatcher` over the once-corrupted crystals of the authors' code (module doc).

    `graphs`: the clean `CrystalGraph`s (their crystals are corrupted here, deterministically
    per (corruption_seed, crystal id): the loop passes `config.seed`); drop 1-atom structures first with `drop_single_atom_structures`).
    Batches, epoch orders and padding budgets work as in `GraphBatcher`; every epoch sees the
    SAME corrupted copy of each crystal.
    """

    def __init__(self, graphs: Sequence[CrystalGraph], batch_size: int, num_devices: int, corruption_seed: int,
                 graph_kwargs: dict | None = None, workers: int = 1, progress: bool = True,
                 noise: tuple[float, float, float] = (OFFICIAL_MASK_RATIO, OFFICIAL_POSITION_NOISE,
                                                      OFFICIAL_LATTICE_NOISE), **kw):
        single = sum(not official_keeps(g.crystal) for g in graphs)
        if single:
            log.warning("OfficialBatcher: %d structure(s) with fewer than 2 atoms kept; the authors' "
                        "code drops them (drop_single_atom_structures)", single)
        self.corruption_seed = int(corruption_seed)
        corrupted, self.targets = precompute([g.crystal for g in graphs], self.corruption_seed, graph_kwargs,
                                             workers, progress, noise)
        self.crystals = [g.crystal for g in corrupted]  # the corrupted crystals (masked Z = 0)
        super().__init__([graph_to_jraph(g) for g in corrupted], batch_size, num_devices, **kw)

    def pad_share(self, share, budget, positions) -> jraph.GraphsTuple:
        batch = super().pad_share(share, budget, positions)
        fields = batch_targets([self.targets[i] for i in share], budget.n_node, budget.n_graph)
        return attach_targets(batch, fields, GRAPH_TARGETS)


def batch_targets(targets: Sequence[dict], n_node: int, n_graph: int) -> dict[str, np.ndarray]:
    """Per-crystal official targets in the padded node / graph layout of `pad_graphs` (crystal
    order, zeros / False on padding); all fields present even for an empty device share."""
    def cat(name, size, shape, dtype, per_graph):
        vals = [np.asarray(t[name], dtype) for t in targets]
        real = (np.stack(vals) if per_graph else np.concatenate(vals)) if vals else np.zeros((0,) + shape, dtype)
        out = np.zeros((size,) + shape, dtype)
        out[:real.shape[0]] = real
        return out

    return {"species": cat("species", n_node, (), np.int32, False),
            "type_mask": cat("type_mask", n_node, (), bool, False),
            "frac_coords": cat("frac_coords", n_node, (3,), np.float32, False),
            "lattice": cat("lattice", n_graph, (9,), np.float32, True),
            "lattice_mask": cat("lattice_mask", n_graph, (), bool, True)}
