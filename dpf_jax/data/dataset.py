"""Dataset preparation: records → graphs, built once in parallel and cached on disk.

The cache key is a SHA-256 of the records as read (ids, lattices, species, coordinates) plus
the graph parameters and the builder version, so editing the file, taking another subset or
changing the cutoff rebuilds, and everything else reuses the cache (a second run starts in
seconds). Records that fail to parse or to build a graph are
skipped, counted and reported — never a crash halfway through an epoch.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from dpf_jax.data.graphs import MERGE_LEVELS, CrystalGraph, build_crystal_graph
from dpf_jax.data.readers import file_stem, structure_file_format
from dpf_jax.data.records import Crystal, CrystalError

log = logging.getLogger(__name__)

# Bump when build_crystal_graph changes its output, to invalidate old caches.
GRAPH_BUILDER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class GraphParams:
    """Keyword arguments of `build_crystal_graph` that a dataset's graphs are built with."""

    cutoff: float = 8.0
    max_neighbors: int = 12
    use_lattice: bool = True
    merge_edges: str = "none"  # `dpf_jax.data.graphs.MERGE_LEVELS`

    def key(self) -> str:
        merged = "" if self.merge_edges == "none" else f"-m{self.merge_edges}"
        return f"c{self.cutoff:g}-k{self.max_neighbors}-l{int(self.use_lattice)}{merged}-v{GRAPH_BUILDER_VERSION}"

    @classmethod
    def from_config(cls, graph_cfg, max_level: str = "atoms", reason: str = "") -> "GraphParams":
        """From a config's `graph` section. `graph.merge_edges`: "auto" (default) takes
        `max_level`, the most merging that is exact for the run (`MERGE_LEVELS` are ordered);
        a level beyond it is refused with `reason`. Configs from before the option: "auto"."""
        level = graph_cfg.get("merge_edges", "auto")
        if level == "auto":
            level = max_level
        if level not in MERGE_LEVELS:
            raise ValueError(f"graph.merge_edges must be 'auto' or one of {MERGE_LEVELS}, got {level!r}")
        if MERGE_LEVELS.index(level) > MERGE_LEVELS.index(max_level):
            raise ValueError(f"graph.merge_edges={level!r} would change this run's results: {reason}; use "
                             f"{max_level!r} (what 'auto' gives here) or less")
        return cls(cutoff=graph_cfg.cutoff, max_neighbors=graph_cfg.max_neighbors, use_lattice=graph_cfg.use_lattice,
                   merge_edges=level)


def records_digest(crystals: Sequence[Crystal]) -> str:
    """SHA-256 of the records' ids, lattices, atomic numbers and fractional coordinates."""
    h = hashlib.sha256()
    for c in crystals:
        h.update(c.id.encode())
        h.update(c.lattice.tobytes())
        h.update(c.numbers.tobytes())
        h.update(c.frac_coords.tobytes())
    return h.hexdigest()


def _build_one(args):
    crystal, params = args
    try:
        g = build_crystal_graph(crystal, **dataclasses.asdict(params))
        return (g.senders, g.receivers, g.images, g.counts, g.net, g.sources, g.node_counts), None
    except CrystalError as e:
        return None, e.reason
    except Exception as e:  # noqa: BLE001 - one bad structure must not stop the dataset
        return None, f"graph construction failed: {type(e).__name__}: {e}"


def skip_label(crystal: Crystal) -> str:
    """How a skipped record is named: a record read from its own structure file (CIF, POSCAR,
    extxyz) by that file's path, with the frame or block suffix of its id, as the readers name
    files they cannot parse; a record of a dataset file (JSON lines, JSON) by its id."""
    path = crystal.source[len("file:"):] if crystal.source.startswith("file:") else ""
    if not path or not structure_file_format(path):
        return crystal.id
    if path in crystal.id:
        return crystal.id
    stem = file_stem(path)
    if crystal.id == stem or crystal.id.startswith(stem + ":"):
        return path + crystal.id[len(stem):]
    return f"{path} ({crystal.id})"


def _build_chunk(chunk):
    return [_build_one(a) for a in chunk]


def _pool_context():
    """fork where available: unlike spawn it does not re-run the user's __main__ script in
    every worker (a script without an `if __name__ == "__main__"` guard would recurse). The
    workers only run numpy code, never JAX, and the pool is started before the training loop
    initialises any accelerator."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def build_graphs(
    crystals: Sequence[Crystal],
    params: GraphParams = GraphParams(),
    workers: int | None = None,
    progress: bool = True,
    desc: str = "building graphs",
) -> tuple[list[CrystalGraph | None], list[tuple[str, str]]]:
    """Graphs of `crystals` (None where a structure fails) and the (id, reason) of failures."""
    workers = default_workers() if not workers else workers
    jobs = [(c, params) for c in crystals]
    results: list = []
    bar = tqdm(total=len(jobs), desc=desc, unit="crystal", disable=not progress, leave=False)
    if workers <= 1 or len(jobs) < 256:
        for job in jobs:
            results.append(_build_one(job))
            bar.update()
    else:
        chunk = max(16, min(256, math.ceil(len(jobs) / (workers * 8))))
        chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
        try:
            with cf.ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
                for res in pool.map(_build_chunk, chunks):
                    results.extend(res)
                    bar.update(len(res))
        except (cf.process.BrokenProcessPool, OSError) as e:
            log.warning("parallel graph building failed (%s); building serially", e)
            results = []
            bar.reset()
            for job in jobs:
                results.append(_build_one(job))
                bar.update()
    bar.close()
    graphs: list[CrystalGraph | None] = []
    skipped: list[tuple[str, str]] = []
    for c, (arrays, reason) in zip(crystals, results):
        if reason is not None:
            graphs.append(None)
            skipped.append((skip_label(c), reason))
        else:
            graphs.append(CrystalGraph(c, *arrays))
    return graphs, skipped


def _save_cache(path: Path, ids, graphs):
    n_edge = np.array([-1 if g is None else g.num_edges for g in graphs], np.int64)
    ok = [g for g in graphs if g is not None]
    cat = lambda name, shape: (np.concatenate([getattr(g, name) for g in ok]) if ok
                               else np.zeros(shape, np.int32))
    merged = {}
    if any(g.counts is not None for g in ok):  # merged graphs (GraphParams.merge_edges)
        merged["counts"] = np.concatenate([g.edge_counts() for g in ok])
        if all(g.has_net for g in ok):  # not after "distance" merging
            merged["net"] = np.concatenate([g.edge_net() for g in ok])
    if any(g.sources is not None for g in ok):  # "atoms" merging
        merged["sources"] = np.concatenate([g.edge_sources() for g in ok])
        merged["node_counts"] = np.concatenate([g.atom_counts() for g in ok])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.part")
    os.close(fd)
    with open(tmp, "wb") as f:
        np.savez(f, ids=np.array(ids, dtype=str), n_edge=n_edge, senders=cat("senders", (0,)),
                 receivers=cat("receivers", (0,)), images=cat("images", (0, 3)), **merged)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache


def _load_cache(path: Path, crystals: Sequence[Crystal]):
    with np.load(path) as z:
        ids, n_edge = z["ids"], z["n_edge"]
        if len(ids) != len(crystals) or any(i != c.id for i, c in zip(ids, crystals)):
            return None
        s, r, im = z["senders"], z["receivers"], z["images"]
        counts, net, sources, node_counts = (z[k] if k in z.files else None
                                             for k in ("counts", "net", "sources", "node_counts"))
    offsets = np.concatenate([[0], np.cumsum(np.maximum(n_edge, 0))])
    if node_counts is not None:  # "atoms" merging: per-atom counts of the graphs that were built
        node_offsets = np.cumsum([0] + [c.num_atoms if n >= 0 else 0 for c, n in zip(crystals, n_edge)])
        if node_counts.size != node_offsets[-1]:
            return None  # written for other records
    graphs = []
    for k, c in enumerate(crystals):
        if n_edge[k] < 0:
            graphs.append(None)
        else:
            a, b = offsets[k], offsets[k + 1]
            per_edge = [None if x is None else x[a:b] for x in (counts, net, sources)]
            nodes = None if node_counts is None else node_counts[node_offsets[k]:node_offsets[k + 1]]
            graphs.append(CrystalGraph(c, s[a:b], r[a:b], im[a:b], *per_edge, nodes))
    return graphs


def cached_graphs(
    crystals: Sequence[Crystal],
    source_file: str | os.PathLike,
    params: GraphParams = GraphParams(),
    cache_dir: str | os.PathLike | None = ".cache/graphs",
    workers: int | None = None,
    progress: bool = True,
) -> tuple[list[CrystalGraph | None], list[tuple[str, str]]]:
    """`build_graphs`, through an on-disk cache keyed by the file's hash and `params`."""
    if not cache_dir:
        return build_graphs(crystals, params, workers, progress)
    # Keyed by the records' content (ids, lattices, species, coordinates) as read, not only by the
    # file: a subset (max_records) or a change in how a reader orders atoms gets its own entry.
    digest = records_digest(crystals)[:16]
    path = Path(cache_dir) / f"{Path(source_file).name}.{digest}.n{len(crystals)}.{params.key()}.npz"
    reasons_path = path.with_suffix(".skipped.json")
    if path.exists():
        graphs = _load_cache(path, crystals)
        if graphs is not None:
            skipped = json.loads(reasons_path.read_text()) if reasons_path.exists() else []
            log.info("loaded %d cached graphs from %s", sum(g is not None for g in graphs), path)
            # stored by record index, named now: a moved folder reports its files where they are
            return graphs, [(skip_label(crystals[i]) if isinstance(i, int) else i, reason) for i, reason in skipped]
        log.warning("graph cache %s does not match the records; rebuilding", path)
    graphs, skipped = build_graphs(crystals, params, workers, progress,
                                   desc=f"graphs of {Path(source_file).name}")
    try:
        _save_cache(path, [c.id for c in crystals], graphs)
        failed = [i for i, g in enumerate(graphs) if g is None]  # build_graphs' skipped, in order
        reasons_path.write_text(json.dumps([[i, reason] for i, (_, reason) in zip(failed, skipped)]))
    except OSError as e:  # a read-only cache location is not fatal
        log.warning("could not write graph cache %s: %s", path, e)
    return graphs, skipped
