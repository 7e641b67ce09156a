"""Padded edge counts that the compiler handles well (`train.budget_search`).

Why: XLA picks its fusions from the padded shapes, and some shapes compile to a program that
moves far more bytes. On one H200 (session 10, `scripts/results/h200_session10/`), the same real
B=256 pre-training batch (46,700 edges) padded to 48,128 edges took 22.7 ms per step and padded
to 49,152 edges 18.4 ms; over eleven edge budgets from 47,104 to 61,440 the step fell into two
classes, ~375 and ~470 ns per padded edge, and XLA's own count of bytes accessed told them apart
every time (~830 against ~1,000 KB per padded edge). The class does not follow from a simple
divisibility rule, so it is measured: for each padding budget of a batcher this compiles the
training step at a few edge counts at or above the budget's and keeps the one whose compiled
program accesses the fewest bytes. Padding never changes the numbers a step computes (padding
edges are masked), only its cost.

Cost: `candidates` compilations per budget level, once per run, before the first step (a
B=256 step compiles in ~10-20 s on a GPU; session 11, H200: 85-92 s for the 8 candidates of a
B=256 or B=1024 pre-training run, one after the other). `threads` > 1 compiles that many
candidates at once (lowering stays serial), and `compiler_options` apply to the candidate
compilations only, never to the program that trains: on a GPU `{"xla_gpu_autotune_level": 0}`
(no kernel autotuning) with 4 threads took 32 s and ranked the eight candidates in the same
order as the tuned programs (4 threads with autotuning: 92 s, no faster). The byte counts are
kept in a small JSON file (`train.budget_search_cache`, keyed by the lowered program and the
candidate compiler options), so a later run with the same program and shapes only lowers them
(a second or two each); with JAX's persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`)
the chosen shapes' compilation is not repeated either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from dpf_jax.data.batching import Budget

log = logging.getLogger(__name__)


def edge_candidates(n_edge: int, count: int, granule: int) -> list[int]:
    """`n_edge` itself, then the next `count - 1` multiples of `granule` above it."""
    out = [int(n_edge)]
    e = -(-int(n_edge) // granule) * granule
    while len(out) < count:
        if e > out[-1]:
            out.append(e)
        e += granule
    return out


def shaped_like(batch, n_node: int, n_edge: int):
    """Abstract arrays (`jax.ShapeDtypeStruct`, same dtypes and shardings) of `batch`, a padded
    device batch (`dpf_jax.data.batching` layout; leading run and/or device axes allowed),
    with its node axis resized to `n_node` and its edge axis to `n_edge`. Also a batch bundled
    for transfer (`dpf_jax.data.transfer`: only nodes, edges and globals, one array each)."""
    # the axes before the per-share ones: [runs,] devices
    lead = np.ndim(batch.n_node) - 1 if batch.n_node is not None else np.ndim(batch.globals["packed"]) - 2

    def resize(size):
        def one(x):
            if x is None:
                return None
            shape = tuple(x.shape[:lead]) + (size,) + tuple(x.shape[lead + 1:])
            return jax.ShapeDtypeStruct(shape, x.dtype, sharding=getattr(x, "sharding", None))
        return one

    same = lambda x: None if x is None else jax.ShapeDtypeStruct(  # noqa: E731
        x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    tm = jax.tree_util.tree_map
    return batch._replace(nodes=tm(resize(n_node), batch.nodes), edges=tm(resize(n_edge), batch.edges),
                          senders=resize(n_edge)(batch.senders), receivers=resize(n_edge)(batch.receivers),
                          globals=tm(same, batch.globals), n_node=same(batch.n_node), n_edge=same(batch.n_edge))


class ByteCountCache:
    """XLA byte counts of compiled programs, in a JSON file keyed by a hash of the lowered
    program and of everything its compilation depends on (backend, device kind, jax/jaxlib
    versions, XLA_FLAGS), so a repeated search (a restarted run, the next run of a sweep with the
    same shapes) lowers but does not compile. Writes are atomic (several processes may share the
    file; a lost race costs a recompilation, never a wrong count)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.counts = self._read()

    def _read(self) -> dict:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return {}

    @staticmethod
    def key(lowered_text: str, compiler_options: dict | None = None) -> str:
        import jaxlib

        device = jax.devices()[0]
        context = [jax.default_backend(), device.device_kind, jax.__version__,
                   getattr(jaxlib, "__version__", ""), os.environ.get("XLA_FLAGS", "")]
        if compiler_options:  # the key of a search without options is unchanged
            context.append(json.dumps(compiler_options, sort_keys=True))
        return hashlib.sha256("\n".join(context + [lowered_text]).encode()).hexdigest()

    def get(self, key: str) -> float | None:
        return self.counts.get(key)

    def put(self, key: str, value: float) -> None:
        self.counts = {**self._read(), **self.counts, key: value}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.counts, indent=0))
        os.replace(tmp, self.path)


def _compile(lowered, compiler_options: dict | None = None):
    return lowered.compile(compiler_options) if compiler_options else lowered.compile()


def bytes_accessed(compiled) -> float:
    """XLA's count of the bytes a compiled program accesses (nan if the backend gives no cost
    analysis; older jax returns it as a one-element list)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (some backends/versions have none)
        return math.nan
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("bytes accessed", math.nan))


def compiled_bytes_many(step, state, abstract_batches: list, cache: ByteCountCache | None = None,
                        threads: int = 1, compiler_options: dict | None = None) -> list[float]:
    """`bytes_accessed` of the compiled `step(state, batch)` program for each abstract batch;
    looked up in / added to `cache` if given. Lowering is serial (tracing is Python); the
    compilations not in the cache run `threads` at a time."""
    lowered = [step.lower(state, b) for b in abstract_batches]
    keys = [cache.key(lo.as_text(), compiler_options) if cache is not None else None for lo in lowered]
    counts = [cache.get(k) if k is not None else None for k in keys]
    todo = [i for i, c in enumerate(counts) if c is None]
    count_of = lambda i: bytes_accessed(_compile(lowered[i], compiler_options))
    if threads > 1 and len(todo) > 1:
        with ThreadPoolExecutor(min(threads, len(todo))) as pool:
            found = list(pool.map(count_of, todo))
    else:
        found = [count_of(i) for i in todo]
    for i, count in zip(todo, found):
        counts[i] = count
        if keys[i] is not None and not math.isnan(count):
            cache.put(keys[i], count)
    return [float(c) for c in counts]


def search_budgets(budgets: list[Budget], costs_of, candidates: int = 4, granule: int = 1024
                   ) -> tuple[list[Budget], list[dict]]:
    """Each budget with its edge count replaced by the cheapest of `edge_candidates` under
    `costs_of([(n_node, n_edge), ...]) -> [cost, ...]` (called once with every candidate shape,
    so it may evaluate them concurrently); ties and unknown (nan) costs keep the smaller count.
    Returns the new budgets (sorted, duplicates merged) and one report row per original budget
    (costs by edge count, None where unknown: the rows go into results.json)."""
    if candidates < 1 or granule < 1:
        raise ValueError(f"budget search needs candidates >= 1 and granule >= 1, got {candidates}, {granule}")
    shapes = [(b.n_node, e) for b in budgets for e in edge_candidates(b.n_edge, candidates, granule)]
    cost = dict(zip(shapes, costs_of(shapes)))
    chosen, rows = [], []
    for b in budgets:
        costs = {e: cost[(b.n_node, e)] for e in edge_candidates(b.n_edge, candidates, granule)}
        known = {e: c for e, c in costs.items() if not math.isnan(c)}
        best = min(known, key=lambda e: (known[e], e)) if known else b.n_edge
        chosen.append(dataclasses.replace(b, n_edge=best))
        rows.append({"budget": [b.n_node, b.n_edge, b.n_graph], "chosen_n_edge": best,
                     "bytes_accessed": {str(e): (None if math.isnan(c) else c) for e, c in costs.items()}})
    return sorted(set(chosen)), rows


def tune_batcher(batcher, step, state, device_batch, candidates: int = 4, granule: int = 1024,
                 cache_path: str | os.PathLike | None = None, threads: int = 1,
                 compiler_options: dict | None = None) -> list[dict]:
    """Replaces `batcher.budgets` by the cheapest edge counts for `step` (see the module
    docstring); `device_batch` is any batch of this batcher as the step receives it (shapes
    and shardings are taken from it); `cache_path`: a `ByteCountCache` file; `threads`,
    `compiler_options`: see `compiled_bytes_many`. Logs and returns the report rows."""
    cache = ByteCountCache(cache_path) if cache_path else None
    costs_of = lambda shapes: compiled_bytes_many(
        step, state, [shaped_like(device_batch, n, e) for n, e in shapes], cache, threads, compiler_options)
    new, rows = search_budgets(list(batcher.budgets), costs_of, candidates, granule)
    for r in rows:
        n, e, _ = r["budget"]
        gb = {k: ("?" if v is None else f"{v / 1e9:.2f}") for k, v in r["bytes_accessed"].items()}
        log.info("padding budget %d nodes x %d edges -> %d edges (GB accessed per step by edge count: %s)",
                 n, e, r["chosen_n_edge"], ", ".join(f"{k}: {v}" for k, v in gb.items()))
    batcher.budgets = new
    return rows
