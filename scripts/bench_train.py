"""Times the full jitted training step (forward, backward, optimiser update) of the training code.

    python scripts/bench_train.py                        # real data, 2 models x B 64/256 x 3 precisions
    python scripts/bench_train.py --synthetic            # JARVIS-like synthetic crystals instead
    python scripts/bench_train.py --data real synthetic  # both, in one process
    python scripts/bench_train.py --epoch                # input-pipeline check: one pre-training epoch
    python scripts/bench_train.py --small                # tiny model, few steps (CPU smoke test)
    options: --models finetune pretrain_mask30 (any configs/<name>.py; "finetune" = finetune_jarvis)
             --batch-sizes 64 256   --precision default highest bf16   --formulation edge node
             --steps 200 --warmup 10 --max-seconds 5 (per configuration)   --pool 20
             --time-budget 540 (s; no configuration starts past it)
             --num-devices 0 (all)   --runs 1 3 6 (runs trained together, vmapped)   --dump-npz PATH   --out scripts/results/bench_train_<tag>.json
             --tag TAG   --synthetic-count 4096   --synthetic-edges-per-atom 36 (0: the real builder's k = 12)

What is timed. Everything is the project's own code: `loop.make_objective`, `loop.make_batcher`
(GraphBatcher, the config's padding budgets), `loop.data_stats`, `make_optimizer`, `create_state`,
`make_train_step` (jit, donated state, shard_map over `make_mesh()`), `put_batch` /
`put_replicated`. A pool of `--pool` distinct batches (successive shuffled epochs of the training
split, full batches only, as a run draws them) is built on the host and put on the device first;
then the step runs cycling over the pool, `jax.block_until_ready(state)` closing each block of one
pass over the pool. Host work is therefore excluded from the "pure step" figures. The first call
on each padded shape (compilation + one step) is timed separately and reported as `compile_s`;
then `--warmup` steps; then up to ceil(steps / pool) timed blocks (fewer once `--max-seconds`
have passed and at least 3 blocks are done). Figures are the median block; the spread is
reported as min / max over blocks (and p10 / p90 of the per-step time).

Reported per (data, model, batch size, precision, formulation): `crystals_per_s` (real crystals),
`edges_per_s` (real directed edges processed; with `graph.merge_edges` fewer than the reference
graphs hold: `reference_edges_per_s`, `merged_edge_fraction`), `step_ms`, `tflops` (achieved, from the analytic count on
REAL nodes/edges below, i.e. model FLOPs as in MFU), `tflops_executed` (the same formula on the
PADDED sizes: what the device actually ran), their fraction of the H100/H200 dense peak of the
matching unit, XLA's own cost analysis (flops and bytes accessed, per step) for comparison,
padding waste (pool and whole epoch), peak device memory (`memory_stats()["peak_bytes_in_use"]`,
process-cumulative, so monotone over the run; None on CPU) and XLA's memory analysis of the
compiled step (argument + output + temp - alias bytes, largest padded shape), and the number of
compilations (jit cache entries) the step needed.

FLOP count (derived from dpf_jax/model/{matformer,layers,heads}.py; multiply-add = 2 FLOPs; only
matrix products are counted). C = channels (128), H = heads (4), R = rbf_bins (128), L = layers
(5), h = head hidden width (128), K = 95 type classes, F = fc width (128); N, E, G = nodes, edges
and graphs of a batch. MatformerConv has two exact formulations (MatformerEncoder.formulation;
the model's own default is timed unless --formulation names others):
  "edge" (the reference's order of operations):
    per edge:  L * 36HC^2  (lin_edge 2HC^2; lin_query/key/value on x_i and lin_key/value on
               x_j 10HC^2; lin_msg_update on [v_i|v_j|e] 18HC^2; msg_layer_0 6HC^2)
    per node:  L * (2HC^2 + 2C^2)  (lin_concate, lin_skip)
  "node" (lin_msg_update split in row blocks; value parts and q, k computed per node):
    per edge:  L * 14HC^2  (lin_edge 2HC^2, e @ W3 6HC^2, msg_layer_0 6HC^2)
    per node:  L * (20HC^2 + 2C^2)  (q, k, v 6HC^2; v @ W1, v @ W2 12HC^2; lin_concate 2HC^2;
               lin_skip 2C^2)
  both:      per edge rbf_1 2RC + rbf_3 2C^2; per step 2 * 101 * 92 * C (atom_embedding
             applied to the element table)
  regression head:  mean pool (one-hot matmul) 2 G_pad N_pad C per device share [counted as 2NC
                    on real sizes]; per graph fc 2CF + fc_out 2F
  type head:        per node 2CK
  position head:    per node 4Ch; per edge 2Rh + 2h^2 + 2h
  lattice head:     mean pool as above; per graph 2Ch + 12h
Training step: every matmul runs three times (forward, input gradient, weight gradient), except
those whose input does not depend on the parameters (the element-table embedding, rbf_1 and the
position head's lin_rbf, which read constant RBF features: no input gradient, 2x) and the
one-hot pooling (no weight: 2x). The elementwise work (LayerNorms over 3C, sigmoid gate,
products, segment sums: ~30 kFLOP per edge and layer, ~3% of the forward; XLA's own count came
out 3% above this one) and the optimiser update (~20 FLOP per parameter) are not counted.
Default model, training step: "edge" 35.55 MFLOP per edge + 2.46 MFLOP per node; "node" 13.93
MFLOP per edge + 20.15 MFLOP per node (type head +0.073 MFLOP per node). At the ~25 directed
edges per atom of the real graphs: ~0.89 ("edge") / ~0.37 ("node") GFLOP per atom.

`--dump-npz PATH` writes the exact batches each group timed (real part only, the device shares
of a batch concatenated; padding is implementation-specific) under keys
"<data>_<model>_bs<B>/<i>/<field>", fields: senders, receivers (int32 [E], indices into the
batch's N nodes, edges sorted by receiver within each crystal), source (int32 [E]: the atom the
edge's vector starts from; = senders unless equal atoms were merged), images (int32 [E, 3],
integer lattice offset of the receiver: vec = pos[r] + images @ lattice[g] - pos[source]),
edge_count (int32 [E]) and node_count (int32 [N]) of `graph.merge_edges` (see `dump_group`),
positions (float32 [N, 3], Cartesian Å), lattice (float32 [G, 3, 3], rows = lattice vectors),
atomic_numbers (int32 [N], before any masking), n_node, n_edge (int32 [G], n_edge counting the
edges as processed), target (float32 [G]); plus "<group>/<i>/budget" (int32 [3]: padded n_node,
n_edge, n_graph per device share) and "<group>/<i>/num_devices". For the reference edge list
itself, dump with `--set graph.merge_edges=none`.

`--epoch`: a whole pre-training epoch over the shipped corpus through the real input pipeline
(GraphBatcher.iterate in a `prefetch` thread, `prefetch_to_device`, the jitted step, metrics
drained every `log_every_steps` as train/loop.py does), wall clock from the start of the epoch
to the last step's completion / number of crystals, compared with the pure step throughput on
the very same batches put on the device beforehand (target: within 15%). Compilation of every
padded shape happens before the clock starts. Defaults in this mode: model pretrain_mask30,
batch 256, precision default.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import itertools
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # configs/ is a plain folder next to the package
    sys.path.insert(0, str(REPO))

if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # graph-building progress bars (read at tqdm import)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dpf_jax.cli import apply_config_override  # noqa: E402
from dpf_jax.data.batching import prefetch  # noqa: E402
from dpf_jax.data.dataset import GraphParams, build_graphs  # noqa: E402
from dpf_jax.data.graphs import build_crystal_graph, merge_equivalent_edges  # noqa: E402
from dpf_jax.data.pipeline import PreparedData, SplitData  # noqa: E402
from dpf_jax.data.records import Crystal  # noqa: E402
from dpf_jax.model.atom_features import cgcnn_feature_table  # noqa: E402
from dpf_jax.model.heads import NUM_TYPES  # noqa: E402
from dpf_jax.model.layers import resolve_edge_kernel  # noqa: E402
from dpf_jax.train import loop  # noqa: E402
from dpf_jax.train.objectives import describe_compute  # noqa: E402
from dpf_jax.train.optim import make_optimizer  # noqa: E402
from dpf_jax.train.parallel import (make_mesh, prefetch_to_device, put_batch, put_replicated,  # noqa: E402
                                    resolve_cuda_graphs, step_compiler_options)
from dpf_jax.train.step import create_state  # noqa: E402

log = logging.getLogger("bench_train")

MODEL_ALIASES = {"finetune": "finetune_jarvis"}
PRECISIONS = ("default", "highest", "bf16")

# Dense peak rates (TFLOP/s) of the unit each precision runs on; H100 SXM and H200 share the
# GH100 compute figures (NVIDIA datasheets, without sparsity).
PEAKS = {
    "h100": {"tf32": 494.7, "bf16": 989.4, "fp32": 66.9, "hbm_tb_s": 3.35},
    "h200": {"tf32": 494.7, "bf16": 989.4, "fp32": 66.9, "hbm_tb_s": 4.8},
}
PRECISION_UNIT = {"default": "tf32", "highest": "fp32", "bf16": "bf16"}

# JARVIS-like synthetic crystals (--synthetic).
SYNTH_MEDIAN_ATOMS = 8.0
SYNTH_LOG_SIGMA = 0.8  # lognormal: mean ~11 atoms, 99th percentile ~50
SYNTH_MAX_ATOMS = 140
SYNTH_VOLUME_PER_ATOM = 18.0  # Å^3
SYNTH_MIN_DISTANCE = 1.2  # Å, periodic images included
SYNTH_MAX_K = 48


# ----------------------------------------------------------------------------------- FLOPs

def model_formulation(model_cfg) -> str:
    """config.model.formulation if set, else the default of MatformerEncoder."""
    from dpf_jax.model.matformer import MatformerEncoder

    return model_cfg.get("formulation", None) or MatformerEncoder.formulation


def matmul_table(model_cfg, mode: str, heads: dict, formulation: str | None = None
                 ) -> list[tuple[str, str, float, int]]:
    """Every matrix product of one forward pass: (name, scaling, FLOP coefficient, train factor).

    scaling: "edge" | "node" | "graph" | "step" (constant) | "pool" (x G*N of a device share).
    train factor: how many times the product runs in a training step (3, or 2, see module doc).
    """
    C, H, R, L = model_cfg.channels, model_cfg.heads, model_cfg.rbf_bins, model_cfg.num_layers
    T, Fa = cgcnn_feature_table().shape
    h = F = 128  # head_hidden of DenoisingModel, fc_features of MatformerRegressor
    t = [("atom_embedding", "step", 2 * T * Fa * C, 2),
         ("rbf_1", "edge", 2 * R * C, 2),
         ("rbf_3", "edge", 2 * C * C, 3),
         ("lin_edge", "edge", L * 2 * H * C * C, 3)]
    formulation = formulation or model_formulation(model_cfg)
    if formulation == "node":  # lin_msg_update split: value parts per node (see MatformerConv)
        t += [("e@W3 (lin_msg_update)", "edge", L * 6 * H * C * C, 3),
              ("lin_query/key/value", "node", L * 6 * H * C * C, 3),
              ("v@W1, v@W2 (lin_msg_update)", "node", L * 12 * H * C * C, 3)]
    elif formulation == "edge":  # the reference's per-edge evaluation
        t += [("lin_query/key/value (x_i), key/value (x_j)", "edge", L * 10 * H * C * C, 3),
              ("lin_msg_update", "edge", L * 18 * H * C * C, 3)]
    else:
        raise ValueError(f"no FLOP model for formulation {formulation!r}")
    t += [("msg_layer_0", "edge", L * 6 * H * C * C, 3),
          ("lin_concate", "node", L * 2 * H * C * C, 3),
          ("lin_skip", "node", L * 2 * C * C, 3)]
    if mode == "finetune":
        t += [("mean_pool", "pool", 2 * C, 2), ("fc", "graph", 2 * C * F, 3), ("fc_out", "graph", 2 * F, 3)]
    else:
        if heads.get("types"):
            t += [("type_head", "node", 2 * C * NUM_TYPES, 3)]
        if heads.get("positions"):
            t += [("position_head lin_receiver/sender", "node", 4 * C * h, 3),
                  ("position_head lin_rbf", "edge", 2 * R * h, 2),
                  ("position_head hidden/out", "edge", 2 * h * h + 2 * h, 3)]
        if heads.get("lattice"):
            t += [("lattice_head mean_pool", "pool", 2 * C, 2),
                  ("lattice_head hidden/out", "graph", 2 * C * h + 12 * h, 3)]
    return t


def flop_coefficients(table) -> dict:
    """Per-node / per-edge / per-graph / per-step / pool coefficients, forward and train."""
    out = {"forward": {}, "train": {}}
    for _, scale, c, factor in table:
        out["forward"][scale] = out["forward"].get(scale, 0) + c
        out["train"][scale] = out["train"].get(scale, 0) + c * factor
    return out


def reference_edges(host_batch) -> int:
    """Edges of the reference graphs a (merged) host batch stands for: each edge's count, times
    its receiver's class size after "atoms" merging (only the class representative's edges are
    kept)."""
    if "count" not in host_batch.edges:
        return int(host_batch.edges["mask"].sum())
    count = host_batch.edges["count"].astype(np.int64)
    if "source" in host_batch.edges:
        count = count * np.take_along_axis(host_batch.nodes["count"], host_batch.receivers, axis=-1)
    return int(count.sum())


def batch_sizes_of(host_batch) -> dict:
    """Real and padded sizes of a device-stacked host batch (leading device axis)."""
    D = host_batch.n_node.shape[0]
    return {"devices": D,
            "real_nodes": int(host_batch.nodes["mask"].sum()),
            "real_edges": int(host_batch.edges["mask"].sum()),
            # edges of the unmerged (reference) graphs; = real_edges unless graph.merge_edges merged some
            "reference_edges": reference_edges(host_batch),
            "real_graphs": int(host_batch.globals["mask"].sum()),
            "pad_nodes": int(host_batch.nodes["mask"].size),
            "pad_edges": int(host_batch.edges["mask"].size),
            "pad_graphs": int(host_batch.globals["mask"].size)}


def step_flops(coef: dict, s: dict, padded: bool) -> float:
    """FLOPs of one training step on a batch of sizes `s` (see `batch_sizes_of`)."""
    if padded:
        n, e, g = s["pad_nodes"], s["pad_edges"], s["pad_graphs"]
        pool = (s["pad_graphs"] // s["devices"]) * (s["pad_nodes"] // s["devices"]) * s["devices"]
    else:
        n, e, g = s["real_nodes"], s["real_edges"], s["real_graphs"]
        pool = n  # a plain per-graph sum of the real nodes' features
    return (coef.get("edge", 0) * e + coef.get("node", 0) * n + coef.get("graph", 0) * g
            + coef.get("step", 0) * s["devices"] + coef.get("pool", 0) * pool)


# --------------------------------------------------------------------------------- configs

def make_config(name: str, args, batch_size: int, precision: str):
    module = importlib.import_module(f"configs.{MODEL_ALIASES.get(name, name)}")
    config = module.get_config()
    config.init_checkpoint = ""
    config.train.batch_size = batch_size
    config.train.progress_bar = False
    config.model.precision = precision
    path = Path(config.data.path)
    if not path.is_absolute() and not path.exists():
        config.data.path = str(REPO / path)
    if config.data.cache_dir and not Path(config.data.cache_dir).is_absolute():
        config.data.cache_dir = str(REPO / config.data.cache_dir)
    if args.small:
        config.model.num_layers = 2
        config.model.channels = 16
        config.model.heads = 2
        config.model.rbf_bins = 16
        config.data.max_records = args.max_records or 96
        config.data.cache_dir = ""
        config.data.num_workers = 1
        config.train.num_budget_levels = 1  # one compilation per configuration
    elif args.max_records:
        config.data.max_records = args.max_records
    for item in args.set or []:
        apply_config_override(config, item)
    return config


def model_label(name: str) -> str:
    return MODEL_ALIASES.get(name, name)


# ------------------------------------------------------------------------------ synthetic

def _periodic_min_distance(frac_new, frac, lattice, images) -> float:
    d = ((frac_new - frac)[:, None, :] + images[None]) @ lattice
    return float(np.sqrt(np.min(np.sum(d * d, axis=-1))))


def synthetic_crystals(count: int, seed: int = 0) -> list[Crystal]:
    """JARVIS-like random crystals: n ~ lognormal(median 8, sigma 0.8) clipped to 1..140 atoms,
    a cubic-ish cell (lengths x U(0.85, 1.15), shears up to 10%) of 18 Å^3 per atom, uniform
    fractional coordinates with every periodic pair > 1.2 Å apart, Z uniform in 1..83."""
    rng = np.random.default_rng(seed)
    images = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"), -1).reshape(-1, 3)
    self_images = images[np.any(images != 0, axis=1)]
    out = []
    while len(out) < count:
        n = int(np.clip(round(rng.lognormal(math.log(SYNTH_MEDIAN_ATOMS), SYNTH_LOG_SIGMA)), 1, SYNTH_MAX_ATOMS))
        volume = n * SYNTH_VOLUME_PER_ATOM
        lat = np.diag(rng.uniform(0.85, 1.15, 3))
        lat[1, 0], lat[2, 0], lat[2, 1] = rng.uniform(-0.1, 0.1, 3)
        lat *= (volume / abs(np.linalg.det(lat))) ** (1.0 / 3.0)
        if np.sqrt(np.min(np.sum((self_images @ lat) ** 2, -1))) < SYNTH_MIN_DISTANCE:
            continue
        frac = np.zeros((0, 3))
        tries = 0
        while len(frac) < n and tries < 200 * n:
            tries += 1
            x = rng.random(3)
            if len(frac) and _periodic_min_distance(x, frac, lat, images) < SYNTH_MIN_DISTANCE:
                continue
            frac = np.vstack([frac, x])
        if len(frac) < n:
            continue
        out.append(Crystal(f"synthetic-{len(out)}", lat, rng.integers(1, 84, n), frac))
    return out


def _edges_per_atom(crystals, k: int) -> float:
    gs = [build_crystal_graph(c, max_neighbors=k) for c in crystals]
    return sum(g.num_edges for g in gs) / sum(g.num_nodes for g in gs)


def choose_k(crystals, target: float) -> tuple[int, float]:
    """Smallest k-NN count whose real graphs give ~`target` directed edges per atom.

    The real builder (k = 12) gives ~25 per atom on every shipped dataset and on these random
    cells alike, whatever the density (k nearest neighbours do not depend on it); larger k is
    the only way to reach denser graphs with real geometry."""
    k, epa = 12, _edges_per_atom(crystals, 12)
    if not target or epa >= target:
        return k, epa
    prev = (k, epa)
    for k in range(13, SYNTH_MAX_K + 1):
        epa = _edges_per_atom(crystals, k)
        if epa >= target:
            return (k, epa) if epa - target <= target - prev[1] else prev
        prev = (k, epa)
    return prev


def synthetic_data(args) -> tuple[PreparedData, dict]:
    count = args.synthetic_count or (48 if args.small else 4096)
    t0 = time.perf_counter()
    crystals = synthetic_crystals(count, seed=args.seed)
    k, epa = choose_k(crystals[:128], args.synthetic_edges_per_atom)
    graphs, skipped = build_graphs(crystals, GraphParams(max_neighbors=k),
                                   workers=1 if args.small else None, progress=False)
    graphs = [g for g in graphs if g is not None]
    targets = np.random.default_rng(args.seed + 1).normal(size=len(graphs))
    nat = np.array([g.num_nodes for g in graphs])
    info = {"count": len(graphs), "skipped": len(skipped), "max_neighbors": k,
            "edges_per_atom": sum(g.num_edges for g in graphs) / int(nat.sum()),
            "edges_per_atom_target": args.synthetic_edges_per_atom,
            "atoms_mean": float(nat.mean()), "atoms_median": float(np.median(nat)),
            "atoms_max": int(nat.max()), "volume_per_atom": SYNTH_VOLUME_PER_ATOM,
            "lognormal_median": SYNTH_MEDIAN_ATOMS, "lognormal_sigma": SYNTH_LOG_SIGMA,
            "build_s": time.perf_counter() - t0}
    print(f"synthetic: {len(graphs)} crystals, k = {k} neighbours -> {info['edges_per_atom']:.1f} "
          f"directed edges/atom (target {args.synthetic_edges_per_atom}), mean {nat.mean():.1f} atoms, "
          f"built in {info['build_s']:.1f} s", flush=True)
    nan = lambda n: np.full(n, math.nan)  # noqa: E731
    splits = {"train": SplitData(graphs, targets), "val": SplitData([], nan(0)), "test": SplitData([], nan(0))}
    return PreparedData(splits, [], len(crystals), "synthetic"), info


# ---------------------------------------------------------------------------------- device

def device_info(mesh) -> dict:
    d = jax.devices()[0]
    info = {"platform": d.platform, "device_kind": d.device_kind, "num_devices": int(mesh.size),
            "visible_devices": len(jax.devices()), "jax": jax.__version__}
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    for mod in ("flax", "optax"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    stats = _memory_stats()
    if stats:
        info["bytes_limit"] = stats.get("bytes_limit")
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info


def _memory_stats() -> dict | None:
    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None


def peaks_for(kind: str) -> dict | None:
    k = kind.lower()
    for name, p in PEAKS.items():
        if name in k:
            return p
    return None


def _cost(compiled) -> dict:
    out = {}
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0] if ca else {}
        out["flops"] = float(ca.get("flops", float("nan")))
        out["bytes_accessed"] = float(ca.get("bytes accessed", float("nan")))
    except Exception:  # noqa: BLE001
        pass
    try:
        m = compiled.memory_analysis()
        out["memory_bytes"] = int(m.argument_size_in_bytes + m.output_size_in_bytes
                                  + m.temp_size_in_bytes - m.alias_size_in_bytes)
        out["temp_bytes"] = int(m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001
        pass
    return out


def shape_key(batch) -> tuple:
    return (int(batch.nodes["mask"].shape[-1]), int(batch.edges["mask"].shape[-1]),
            int(batch.globals["mask"].shape[-1]))


def _cache_size(fn) -> int | None:
    try:
        return int(fn._cache_size())
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------ data

class DataCache:
    """Prepared data per (data kind, config data fields), loaded once per process."""

    def __init__(self, args):
        self.args = args
        self.store = {}
        self.synthetic_info = None

    def get(self, kind: str, config) -> PreparedData:
        merge = loop._graph_params(config).merge_edges  # graph.merge_edges as the run resolves it
        if kind == "synthetic":
            if ("synthetic",) not in self.store:
                self.store[("synthetic",)], self.synthetic_info = synthetic_data(self.args)
            key = ("synthetic", merge)
            if key not in self.store:  # the same reference graphs, merged as this config's run would
                base = self.store[("synthetic",)]
                train = base.splits["train"]
                graphs = [merge_equivalent_edges(g, merge) for g in train.graphs]
                ref, kept = sum(g.num_reference_edges for g in graphs), sum(g.num_edges for g in graphs)
                print(f"synthetic, graph.merge_edges={merge!r}: {kept} of {ref} edges ({kept / ref:.1%})", flush=True)
                self.store[key] = dataclasses.replace(
                    base, splits={**base.splits, "train": dataclasses.replace(train, graphs=graphs)})
            return self.store[key]
        key = ("real", config.mode, config.data.path, config.data.task, config.data.max_records, merge)
        if key not in self.store:
            t0 = time.perf_counter()
            self.store[key] = loop.load_data(config)
            print(f"{self.store[key].summary()} (loaded in {time.perf_counter() - t0:.1f} s)", flush=True)
        return self.store[key]


def host_pool(batcher, config, size: int, drop: bool) -> list:
    """`size` distinct batches: successive shuffled epochs, as a run draws them."""
    pool, epoch = [], 0
    while len(pool) < size:
        n_before = len(pool)
        for b in batcher.iterate(config.seed, epoch, shuffle=True, drop_remainder=drop):
            pool.append(b)
            if len(pool) == size:
                break
        epoch += 1
        if len(pool) == n_before:
            raise ValueError("the training split yields no batch")
    return pool


def dump_group(dump: dict, group: str, pool) -> None:
    """The real part of each batch, device shares concatenated (node indices offset). The edges
    are those the step processed: with `graph.merge_edges` (on by default) each stands for
    `edge_count` reference edges of the same receiver, sender and length, and `n_edge` counts
    merged edges; after "atoms" merging only the edges into atoms with node_count > 0 are kept
    (each standing for its class of node_count atoms, weighted so in BatchNorm and the mean),
    senders are class representatives and `source` the real sender for the geometry. The model
    computes the same output from these fields (counts as weights) as from the reference
    graph; for the reference edge list itself, dump with `--set graph.merge_edges=none`."""
    for i, b in enumerate(pool):
        D = b.n_node.shape[0]
        parts = {k: [] for k in ("senders", "receivers", "source", "images", "edge_count", "node_count", "positions",
                                 "lattice", "atomic_numbers", "n_node", "n_edge", "target")}
        offset = 0
        for d in range(D):
            nm, em, gm = b.nodes["mask"][d], b.edges["mask"][d], b.globals["mask"][d]
            n_real = int(nm.sum())
            assert nm[:n_real].all() and em[:int(em.sum())].all() and gm[:int(gm.sum())].all()
            parts["senders"].append(b.senders[d][em] + offset)
            parts["receivers"].append(b.receivers[d][em] + offset)
            parts["images"].append(b.edges["images"][d][em])
            parts["source"].append(b.edges.get("source", b.senders)[d][em] + offset)
            parts["node_count"].append(b.nodes["count"][d][nm] if "count" in b.nodes else np.ones(n_real, np.int32))
            parts["edge_count"].append(b.edges["count"][d][em] if "count" in b.edges
                                       else np.ones(int(em.sum()), np.int32))
            parts["positions"].append(b.nodes["positions"][d][nm])
            parts["atomic_numbers"].append(b.nodes["species"][d][nm])
            parts["lattice"].append(b.globals["lattice"][d][gm])
            parts["n_node"].append(b.n_node[d][gm])
            parts["n_edge"].append(b.n_edge[d][gm])
            parts["target"].append(b.globals["target"][d][gm])
            offset += n_real
        for k, v in parts.items():
            dump[f"{group}/{i}/{k}"] = np.concatenate(v)
        dump[f"{group}/{i}/budget"] = np.array(shape_key(b), np.int32)
        dump[f"{group}/{i}/num_devices"] = np.array(D, np.int32)


# ------------------------------------------------------------------------------ benchmark

_INITIAL_STATES: dict = {}


def stack_runs(pool_host, runs: int) -> list[list]:
    """For timing `runs` runs trained together (`dpf_jax.train.multirun`): per pool entry, the
    `runs` batches stacked in one step — that batch and the next ones of the same padded shape
    (cyclically), since a stacked step needs one shape."""
    groups: dict = {}
    for b in pool_host:
        groups.setdefault(shape_key(b), []).append(b)
    out = []
    for b in pool_host:
        g = groups[shape_key(b)]
        j = next(i for i, x in enumerate(g) if x is b)
        out.append([g[(j + r) % len(g)] for r in range(runs)])
    return out


def compute_of(config, formulation: str | None) -> str:
    """What the timed step ran, as the run log states it (precision, edge kernel, fold), with a
    `--formulation` label ("node+pallas_gate_rows-16x8-sorted") applied to the config's model."""
    model = ml_collections.ConfigDict(config.model.to_dict())
    if formulation:
        form, _, kernel = formulation.partition("+")
        model.formulation = form
        if kernel:
            model.edge_kernel = kernel
    return describe_compute(model)


def build_run(config, data, mesh, pool_host, reuse_key=None, formulation=None, num_runs: int = 1,
              steps_per_call: int = 1):
    """State (packed as the step takes it), step (`loop.RunStep`), FLOP table, parameter count
    and model of the run, exactly as train/loop.py builds them (`edge_kernel_label` names the
    model's kernel for the batches timed).

    The initial state (float32 parameters, whatever the precision) is built once per
    `reuse_key` and copied for the other batch sizes and precisions: one `model.init`
    compilation per model instead of one per configuration."""
    objective = loop.make_objective(config)
    model = objective.make_model()
    if formulation:
        # same parameters, another exact evaluation order of MatformerConv (--formulation), and
        # "+<kernel>": that model.edge_kernel ("+xla", "+pallas_gate_rows-16x4", ...); without
        # one the config's own (base.py: "auto")
        form, _, kernel = formulation.partition("+")
        model = model.clone(encoder=model.encoder.clone(formulation=form, edge_kernel=kernel or model.encoder.edge_kernel))
    tx = make_optimizer(config.optim, 10_000)
    host_state = _INITIAL_STATES.get(reuse_key) if reuse_key is not None else None
    if host_state is None:
        stats = loop.data_stats(config, data)
        example = jax.tree_util.tree_map(lambda x: x[0], pool_host[0])
        host_state = jax.device_get(create_state(model, tx, example, config.seed, stats))
        if reuse_key is not None:
            _INITIAL_STATES[reuse_key] = host_state
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(host_state.params))
    if num_runs > 1:  # the same initial state for every run: timing only
        state = put_replicated(jax.tree_util.tree_map(lambda x: np.stack([x] * num_runs), host_state), mesh)
    else:
        state = put_replicated(host_state, mesh)
    # as train/loop.py and multirun.py: the step (`run.step`) takes the packed state, bundled
    # batches (`run.bundle` packs a host batch) and returns packed metrics (`run.unpack_metrics`)
    run = loop.build_run_step(config, objective, model, tx, mesh, state, lambda: pool_host[0],
                              num_runs=num_runs if num_runs > 1 else 0, steps_per_call=steps_per_call)
    state = run.pack(state)
    heads = getattr(objective, "enabled", {})
    table = matmul_table(config.model, config.mode, heads, getattr(getattr(model, "encoder", None), "formulation",
                                                                   None))
    return state, run, table, n_params, model


def edge_kernel_label(model, pool) -> str:
    """The run's `--formulation` label: the encoder's formulation and, unless it is "xla", "+" the
    edge kernel as it runs on this backend ("auto" resolved per padded budget of the batches in
    `pool`, as the encoder does; several joined by "/")."""
    encoder = getattr(model, "encoder", None)
    formulation = getattr(encoder, "formulation", None)
    kernel = "/".join(sorted({resolve_edge_kernel(
        getattr(encoder, "edge_kernel", "xla"), formulation, getattr(encoder, "channels", 128),
        getattr(encoder, "remat", "none"), budget=(g.nodes["mask"].shape[-1], g.senders.shape[-1]))
        for g in pool}))
    return formulation if kernel == "xla" else f"{formulation}+{kernel}"


def compile_shapes(train_step, state, dev_batches, host_batches):
    """First call on every distinct padded shape, timed (compilation + one step)."""
    compile_s, costs = {}, {}
    for dev, host in zip(dev_batches, host_batches):
        key = shape_key(host)
        if key in compile_s:
            continue
        t0 = time.perf_counter()
        state, _ = train_step(state, dev)
        jax.block_until_ready(state)
        compile_s[key] = time.perf_counter() - t0
        try:  # a cache hit of the executable jit just built: costs no compilation
            costs[key] = _cost(train_step.lower(state, dev).compile())
        except Exception as e:  # noqa: BLE001
            log.info("no cost analysis: %s", e)
            costs[key] = {}
    return state, compile_s, costs


def search_budgets(config, batcher, run, state, example, mesh, runs: int = 1) -> list[dict]:
    """`train.budget_search`, as train/loop.py runs it before the first step (no-op when 0):
    the batcher's padded edge counts replaced; report rows."""
    if not config.train.get("budget_search", 0):
        return []
    if runs > 1:
        example = jax.tree_util.tree_map(lambda x: np.stack([x] * runs), example)
    t0 = time.perf_counter()
    rows = loop.maybe_tune_budgets(config, batcher, run.step, state, lambda: run.bundle(example), mesh,
                                   run_axis=runs > 1)
    print(f"  budget search: {[r['budget'][1] for r in rows]} -> {[r['chosen_n_edge'] for r in rows]}"
          f" padded edges ({time.perf_counter() - t0:.1f} s)", flush=True)
    return rows


def bench_one(args, data_kind, name, batch_size, precision, mesh, cache, dump, formulation=None,
              runs: int = 1) -> dict:
    # --steps-per-dispatch K: K batches of one padded shape stacked like K runs' batches, but
    # trained one after the other inside one call (lax.scan): times per training step below
    # (parse_args allows K > 1 only with --runs 1)
    per_call = args.steps_per_dispatch
    stacked = max(runs, per_call)
    config = make_config(name, args, batch_size, precision)
    data = cache.get(data_kind, config)
    D = mesh.size
    batcher = loop.make_batcher(data.splits["train"], config, D)
    drop = len(batcher) >= batch_size
    pool_size = args.pool or (3 if args.small else 20)
    pool_host = host_pool(batcher, config, pool_size, drop)

    print(f"{data_kind} {model_label(name)} B={batch_size} {precision} {formulation or ''}"
          f"{f' x{runs} runs' if runs > 1 else ''}{f' {per_call} steps per call' if per_call > 1 else ''}: "
          "compiling and timing...", flush=True)
    state, run, table, n_params, model = build_run(
        config, data, mesh, pool_host, reuse_key=(data_kind, name, mesh.size), formulation=formulation,
        num_runs=runs, steps_per_call=per_call)
    train_step = run.step
    budget_rows = search_budgets(config, batcher, run, state, pool_host[0], mesh, stacked)
    if budget_rows:
        pool_host = host_pool(batcher, config, pool_size, drop)
    formulation = edge_kernel_label(model, pool_host)  # the batches as timed
    group = f"{data_kind}_{model_label(name)}_bs{batch_size}"
    if dump is not None and not any(k.startswith(group + "/") for k in dump):
        dump_group(dump, group, pool_host)
    coef = flop_coefficients(table)["train"]
    members = stack_runs(pool_host, stacked) if stacked > 1 else [[b] for b in pool_host]
    pool_step = [jax.tree_util.tree_map(lambda *x: np.stack(x), *m) if stacked > 1 else m[0] for m in members]
    member_sizes = [[batch_sizes_of(b) for b in m] for m in members]
    sizes = [{k: sum(s[k] for s in ms) for k in ms[0]} for ms in member_sizes]  # all runs of a step
    pool_dev = [put_batch(run.bundle(b), mesh, run_axis=stacked > 1) for b in pool_step]
    jax.block_until_ready(pool_dev)

    state, compile_s, costs = compile_shapes(train_step, state, pool_dev, pool_step)
    for i in range(args.warmup if args.warmup is not None else (2 if args.small else 10)):
        state, _ = train_step(state, pool_dev[i % len(pool_dev)])
    jax.block_until_ready(state)

    steps = args.steps or (6 if args.small else 200)
    max_blocks = max(1, -(-steps // len(pool_dev)))
    times = []
    t_timed = time.perf_counter()
    while len(times) < max_blocks:
        t0 = time.perf_counter()
        for dev in pool_dev:
            state, _ = train_step(state, dev)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        if args.max_seconds and len(times) >= 3 and time.perf_counter() - t_timed > args.max_seconds:
            break  # slow configurations: at least 3 blocks, then stop at the time cap
    blocks = len(times)
    mem = _memory_stats()
    n_compiled = _cache_size(train_step)

    # per-pass totals over the pool
    P = len(pool_dev)
    S = P * per_call  # training steps per pass over the pool
    tot = {k: sum(s[k] for s in sizes) for k in sizes[0] if k != "devices"}
    flops_real = sum(step_flops(coef, s, padded=False) for ms in member_sizes for s in ms)
    flops_pad = sum(step_flops(coef, s, padded=True) for ms in member_sizes for s in ms)
    # XLA's cost analysis counts a loop body once: a K-step call (lax.scan) is counted as one step
    xla_flops = per_call * sum(costs.get(shape_key(b), {}).get("flops", math.nan) for b in pool_step)
    xla_bytes = per_call * sum(costs.get(shape_key(b), {}).get("bytes_accessed", math.nan) for b in pool_step)
    t_med = statistics.median(times)
    per_step = [t / S for t in times]
    peaks = peaks_for(jax.devices()[0].device_kind)
    unit = PRECISION_UNIT[precision]
    cuda_graphs = config.train.get("cuda_graphs", "auto")
    res = {
        "data": data_kind, "model": model_label(name), "mode": config.mode, "batch_size": batch_size,
        "precision": precision, "formulation": formulation, "num_devices": D, "num_parameters": n_params,
        "compute": compute_of(config, formulation),  # as the run log states it (kernel, fold)
        "runs": runs,  # runs trained together in one step (crystals/s counts all of them)
        "steps_per_dispatch": per_call,  # steps per jitted call (lax.scan); step_ms is per step
        # settings that changed the step's cost after session 5's timings
        "optim_flatten": bool(config.optim.get("flatten", False)),
        "pack_state": bool(config.train.get("pack_state", False)),
        "pack_batches": bool(config.train.get("pack_batches", False)),
        "pack_metrics": bool(config.train.get("pack_metrics", False)),
        "balance_shares": bool(config.train.get("balance_shares", True)),
        "remat": config.model.get("remat", "none"),
        # train.cuda_graphs as it ran, and the jitted step's XLA options ({}: XLA's defaults)
        "cuda_graphs": resolve_cuda_graphs(cuda_graphs, mesh, batch_size),
        "xla_step_options": step_compiler_options(cuda_graphs, mesh, batch_size),
        "budget_search": budget_rows,
        "crystals_per_s": tot["real_graphs"] / t_med,
        "crystals_per_s_per_run": tot["real_graphs"] / t_med / runs,
        "crystals_per_s_min": tot["real_graphs"] / max(times),
        "crystals_per_s_max": tot["real_graphs"] / min(times),
        "edges_per_s": tot["real_edges"] / t_med,
        "padded_edges_per_s": tot["pad_edges"] / t_med,
        # graph.merge_edges: edges processed (real_edges) vs the reference graphs' edges they stand for
        "merge_edges": loop._graph_params(config).merge_edges,
        "reference_edges_per_s": tot["reference_edges"] / t_med,
        "reference_edges_per_atom": tot["reference_edges"] / tot["real_nodes"],
        "merged_edge_fraction": tot["real_edges"] / tot["reference_edges"],
        "step_ms": 1e3 * t_med / S, "step_ms_min": 1e3 * min(times) / S, "step_ms_max": 1e3 * max(times) / S,
        "step_ms_p10": 1e3 * float(np.percentile(per_step, 10)),
        "step_ms_p90": 1e3 * float(np.percentile(per_step, 90)),
        "timed_steps": blocks * S, "blocks": blocks, "pool": P,
        "tflops": flops_real / t_med / 1e12, "tflops_executed": flops_pad / t_med / 1e12,
        "gflop_per_step": flops_real / S / 1e9, "gflop_per_step_executed": flops_pad / S / 1e9,
        "xla_gflop_per_step": xla_flops / S / 1e9, "xla_tflops": xla_flops / t_med / 1e12,
        "xla_gb_accessed_per_step": xla_bytes / S / 1e9, "xla_tb_per_s": xla_bytes / t_med / 1e12,
        "peak_unit": unit,
        "peak_fraction": (flops_real / t_med / 1e12 / peaks[unit]) if peaks else None,
        "peak_fraction_executed": (flops_pad / t_med / 1e12 / peaks[unit]) if peaks else None,
        "mean_real_nodes": tot["real_nodes"] / S, "mean_real_edges": tot["real_edges"] / S,
        "edges_per_atom": tot["real_edges"] / tot["real_nodes"],
        "node_padding": 1 - tot["real_nodes"] / tot["pad_nodes"],
        "edge_padding": 1 - tot["real_edges"] / tot["pad_edges"],
        "graph_padding": 1 - tot["real_graphs"] / tot["pad_graphs"],
        "budgets": sorted({shape_key(b) for b in pool_step}),
        "compile_s": {f"{k[0]}x{k[1]}x{k[2]}": v for k, v in compile_s.items()},
        "compile_s_total": sum(compile_s.values()),
        "jit_cache_entries": n_compiled,
        "peak_bytes_in_use": (mem or {}).get("peak_bytes_in_use"),
        "bytes_in_use": (mem or {}).get("bytes_in_use"),
        "xla_step_memory_bytes": max((c.get("memory_bytes", 0) for c in costs.values()), default=None),
    }
    res.update({f"epoch_{k}": v for k, v in batcher.padding_waste(config.seed).items()})
    res["flops_per_step_coefficients"] = coef
    if args.trace:  # device time by kernel over one pass of the pool (after the timing: no effect on it)
        if str(REPO / "scripts") not in sys.path:
            sys.path.insert(0, str(REPO / "scripts"))
        import profile_step  # scripts/, next to this file

        def one_pass():
            s = state
            for dev in pool_dev:
                s, _ = train_step(s, dev)
            return s

        hlo = None
        try:
            # the first padded shape's program names the kernels: the pool's other shapes compile
            # to programs whose fusions may share a name, so a kernel's "source" is approximate
            hlo = "\n".join(train_step.lower(state, d).compile().as_text() for d in pool_dev[:1])
            res["trace"] = profile_step.trace_kernels(one_pass, hlo, S, args.trace)
            print(profile_step.format_kernels(res["trace"]), flush=True)
        except Exception as e:  # noqa: BLE001 - the timing stands without the trace
            res["trace"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if args.dump_hlo and hlo:  # that program, to read the kernels' fusions against
            form = str(res["formulation"] or "config").replace("+", "_")
            out = Path(args.dump_hlo) / f"{data_kind}_{name}_B{batch_size}_{precision}_{D}dev_{form}.hlo"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(hlo)
            res["hlo_file"] = str(out)
    if peaks:
        res["floor_ms_compute_xla"] = 1e3 * (xla_flops / S) / (peaks[unit] * 1e12)
        res["floor_ms_bytes_xla"] = 1e3 * (xla_bytes / S) / (peaks["hbm_tb_s"] * 1e12)
    return res


# ---------------------------------------------------------------------------------- epoch

def epoch_one(args, name, batch_size, precision, mesh, cache, formulation=None) -> dict:
    config = make_config(name, args, batch_size, precision)
    data = cache.get("synthetic" if args.data == ["synthetic"] else "real", config)
    D = mesh.size
    train_b = loop.make_batcher(data.splits["train"], config, D)
    drop = len(train_b) >= batch_size
    epoch = 0
    t0 = time.perf_counter()
    host = list(train_b.iterate(config.seed, epoch, shuffle=True, drop_remainder=drop))
    host_s = time.perf_counter() - t0
    state, run, table, n_params, model = build_run(config, data, mesh, host, formulation=formulation)
    train_step = run.step
    budget_rows = search_budgets(config, train_b, run, state, host[0], mesh)
    if budget_rows:  # the epoch as the searched budgets pad it
        t0 = time.perf_counter()
        host = list(train_b.iterate(config.seed, epoch, shuffle=True, drop_remainder=drop))
        host_s = time.perf_counter() - t0
    formulation = edge_kernel_label(model, host)
    coef = flop_coefficients(table)["train"]
    n_crystals = sum(int(b.globals["mask"].sum()) for b in host)
    flops_real = sum(step_flops(coef, batch_sizes_of(b), padded=False) for b in host)

    pipeline_batcher = train_b
    if args.epoch_batching == "per_share":  # the sessions 17-22 host batching, for comparison
        if str(REPO / "scripts") not in sys.path:
            sys.path.insert(0, str(REPO / "scripts"))
        import bench_batching  # scripts/, next to this file

        pipeline_batcher = bench_batching.per_share(train_b)
    bundled = [run.bundle(b) for b in host]
    devs = [put_batch(b, mesh) for b in bundled]
    prebuilt = bundled if args.epoch_prebuilt else None  # --epoch-prebuilt: the pipeline's host batches
    del bundled
    jax.block_until_ready(devs)
    state, compile_s, _ = compile_shapes(train_step, state, devs, host)
    log_every = max(1, config.train.log_every_steps)
    in_flight = config.train.get("steps_in_flight", 2)
    repeats = args.epoch_repeats or (2 if args.small else 3)
    if args.epoch_gc_freeze:
        gc.collect()
        gc.freeze()
    switch_interval = sys.getswitchinterval()
    if args.epoch_switch_interval:
        sys.setswitchinterval(args.epoch_switch_interval)

    def pipeline_epoch(state):
        """One epoch as train/loop.py runs it; also the main thread's seconds in each phase:
        next_batch (waiting for a batch on the device: batching and the copy to the device run
        in two background threads, `prefetch` and `prefetch_to_device`),
        dispatch (queuing the step), wait (for the step `in_flight` back: the device is the
        limit) and drain (metrics to the host)."""
        pending, sums, step_ms = [], {}, []
        phases = dict.fromkeys(("next_batch", "dispatch", "wait", "drain"), 0.0)
        gc_before = [g["collections"] for g in gc.get_stats()]
        t_start = time.perf_counter()
        t_first = None
        order = dict(seed=config.seed, epoch=epoch, shuffle=True, drop_remainder=drop)
        if args.epoch_prebuilt:  # diagnostic: no batching thread, only the device copies
            batches = iter(prebuilt)
        else:
            batches = prefetch(map(run.bundle, pipeline_batcher.iterate(**order)), config.train.prefetch)
        device_batches = iter(prefetch_to_device(batches, mesh, config.train.prefetch))
        for i in itertools.count():
            t0 = time.perf_counter()
            dev = next(device_batches, None)
            t1 = time.perf_counter()
            phases["next_batch"] += t1 - t0
            if dev is None:
                break
            if t_first is None:
                t_first = t1
            state, m = train_step(state, dev)
            pending.append((i, m))
            t2 = time.perf_counter()
            loop.wait_for_older_steps(pending, in_flight)  # as train/loop.py
            t3 = time.perf_counter()
            if len(pending) >= log_every:
                # as train/loop.py: never wait on the newest steps
                loop._drain(pending, sums, keep=2, unpack=run.unpack_metrics)
            phases["dispatch"] += t2 - t1
            phases["wait"] += t3 - t2
            t4 = time.perf_counter()
            phases["drain"] += t4 - t3
            step_ms.append(1e3 * (t4 - t0))
        loop._drain(pending, sums, unpack=run.unpack_metrics)
        jax.block_until_ready(state)
        t_end = time.perf_counter()
        # spikes (a garbage collection, a recompile) versus a uniform slowdown of every step
        shape = {"step_ms_median": statistics.median(step_ms), "step_ms_max": max(step_ms),
                 "gc_collections": [g["collections"] - b for g, b in zip(gc.get_stats(), gc_before)]}
        return state, t_end - t_start, t_end - t_first, phases, shape

    def pure_epoch(state):
        """The steps alone, on batches already on the device; also the median time the main
        thread spends queuing one step (the host's share of the step, whoever feeds it)."""
        dispatch = []
        t_start = time.perf_counter()
        for dev in devs:
            t0 = time.perf_counter()
            state, _ = train_step(state, dev)
            dispatch.append(time.perf_counter() - t0)
        jax.block_until_ready(state)
        return state, time.perf_counter() - t_start, 1e3 * statistics.median(dispatch)

    # the host's own cost of queuing one step: called with the device idle (the previous step
    # finished), so the call cannot wait for the device
    idle_dispatch = []
    for dev in devs[:12]:
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state, _ = train_step(state, dev)
        idle_dispatch.append(1e3 * (time.perf_counter() - t0))
    jax.block_until_ready(state)
    pipe, pipe_from_first, pure, phases, shapes, pure_dispatch = [], [], [], [], [], []
    try:
        for _ in range(repeats):  # interleaved, so drifts of the device clock hit both alike
            state, t_all, t_first, ph, shape = pipeline_epoch(state)
            pipe.append(t_all)
            pipe_from_first.append(t_first)
            phases.append(ph)
            shapes.append(shape)
            state, t, d = pure_epoch(state)
            pure.append(t)
            pure_dispatch.append(d)
    finally:  # the next configuration of this process runs with Python's settings again
        sys.setswitchinterval(switch_interval)
        if args.epoch_gc_freeze:
            gc.unfreeze()
    mem = _memory_stats()
    res = {
        "data": "synthetic" if args.data == ["synthetic"] else "real", "model": model_label(name),
        "batch_size": batch_size, "precision": precision, "formulation": formulation, "num_devices": D,
        "compute": compute_of(config, formulation),
        "gc_frozen": bool(args.epoch_gc_freeze), "prebuilt_batches": bool(args.epoch_prebuilt),
        "epoch_batching": args.epoch_batching,
        "switch_interval_s": args.epoch_switch_interval or switch_interval,
        "pack_state": bool(config.train.get("pack_state", False)),
        "pack_batches": bool(config.train.get("pack_batches", False)),
        "pack_metrics": bool(config.train.get("pack_metrics", False)),
        "steps": len(host), "crystals": n_crystals, "repeats": repeats,
        "crystals_per_s_pipeline": n_crystals / statistics.median(pipe),
        "crystals_per_s_pipeline_from_first_batch": n_crystals / statistics.median(pipe_from_first),
        "crystals_per_s_pure_step": n_crystals / statistics.median(pure),
        "pipeline_epoch_s": pipe, "pipeline_epoch_s_from_first_batch": pipe_from_first, "pure_epoch_s": pure,
        # the main thread's time per step in each phase of the pipeline epochs: each phase's
        # median over the repeats, and every repeat's (a drift from one epoch to the next shows)
        "pipeline_host_ms_per_step": {k: 1e3 * statistics.median(p[k] for p in phases) / len(host)
                                      for k in phases[0]},
        "pipeline_host_ms_per_step_by_repeat": [{k: 1e3 * v / len(host) for k, v in p.items()} for p in phases],
        "pipeline_step_shape_by_repeat": shapes,
        "pure_dispatch_ms_median_by_repeat": pure_dispatch,
        "idle_dispatch_ms_median": statistics.median(idle_dispatch),
        "host_batches_per_s": len(host) / host_s, "host_crystals_per_s": n_crystals / host_s,
        "tflops_pure": flops_real / statistics.median(pure) / 1e12,
        "compile_s": {f"{k[0]}x{k[1]}x{k[2]}": v for k, v in compile_s.items()},
        "jit_cache_entries": _cache_size(train_step),
        "peak_bytes_in_use": (mem or {}).get("peak_bytes_in_use"),
        "budget_search": budget_rows,
    }
    res["pipeline_over_pure"] = res["crystals_per_s_pipeline"] / res["crystals_per_s_pure_step"]
    res["within_15_percent"] = bool(res["pipeline_over_pure"] >= 0.85)
    return res


# ------------------------------------------------------------------------------------ main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help="finetune (= finetune_jarvis), pretrain_mask30, or any configs/<name>")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="global batch sizes")
    p.add_argument("--precision", nargs="+", default=None, choices=PRECISIONS,
                   help="config.model.precision values to time")
    p.add_argument("--synthetic", action="store_true", help="JARVIS-like synthetic crystals (= --data synthetic)")
    p.add_argument("--data", nargs="+", default=None, choices=("real", "synthetic"))
    p.add_argument("--steps", type=int, default=None, help="timed steps (rounded up to whole pool passes)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compilation")
    p.add_argument("--pool", type=int, default=None, help="distinct batches on the device")
    p.add_argument("--trace", type=int, default=0, metavar="TOP",
                   help="after timing, trace one pass over the pool with jax.profiler and report the TOP "
                        "kernels by device time per step (the JSON's 'trace'; GPU)")
    p.add_argument("--dump-hlo", default=None, metavar="DIR",
                   help="with --trace: write each traced step's optimised HLO text (its first padded shape) "
                        "into DIR, one file per data, model, batch size, precision, device count and formulation")
    p.add_argument("--max-seconds", type=float, default=5.0,
                   help="stop timing a configuration after this long (at least 3 pool passes; 0: no cap)")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="start no configuration past this many seconds (0: none); the JSON is rewritten "
                        "after every configuration, so a run cut short keeps its results")
    p.add_argument("--epoch-repeats", type=int, default=0,
                   help="with --epoch: pipeline and pure epochs timed, interleaved (default 3; 2 with --small)")
    p.add_argument("--epoch-switch-interval", type=float, default=None,
                   help="with --epoch: sys.setswitchinterval (s) during the timed epochs (Python's default "
                        "0.005: how long a thread that wants the GIL waits before the holder must drop it)")
    p.add_argument("--epoch-prebuilt", action="store_true",
                   help="with --epoch: a diagnostic, not the loop's pipeline: the epoch's batches are built and "
                        "bundled before the timed epochs, so only the copy to the devices runs in a background "
                        "thread (how much the batching thread costs the main thread)")
    p.add_argument("--epoch-batching", choices=("default", "per_share"), default="default",
                   help="with --epoch: how the pipeline's thread pads batches: the library's one gather per field "
                        "for all device shares (default), or the sessions 17-22 per-share gathers and stacking")
    p.add_argument("--epoch-gc-freeze", action="store_true",
                   help="with --epoch: gc.freeze() the objects alive after compiling, so Python's cyclic "
                        "collector does not walk them during the timed epochs")
    p.add_argument("--formulation", nargs="+", default=None,
                   help="MatformerConv formulation(s) to time: edge, node (default: the model's own), "
                        "each with the config's model.edge_kernel ('auto') unless '+<kernel>' names one: "
                        "'node+xla' (jax.numpy), 'node+pallas_gate_rows-16x4' (that kernel and tile: edges x "
                        "warps), 'node+pallas', 'node+xla_recompute' (the recomputing jax.numpy gate)")
    p.add_argument("--num-devices", nargs="+", type=int, default=[0],
                   help="device counts to time, each over the first N visible devices (0: every visible "
                        "device); with several, the JSON also gets the scaling efficiency "
                        "throughput(N) / (N x throughput(1))")
    p.add_argument("--steps-per-dispatch", type=int, default=1, metavar="K",
                   help="K training steps per jitted call (lax.scan over K equally padded batches; "
                        "make_train_step(steps_per_call=K)): the host's per-call cost paid once per K steps")
    p.add_argument("--runs", nargs="+", type=int, default=[1],
                   help="runs trained together in one vmapped step (dpf_jax.train.multirun); 1 = a plain run")
    p.add_argument("--max-records", type=int, default=0, help="cap on dataset records (0: all)")
    p.add_argument("--synthetic-count", type=int, default=0)
    p.add_argument("--synthetic-edges-per-atom", type=float, default=36.0,
                   help="target directed edges per atom (0: the real builder's k = 12, ~25/atom)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic crystals")
    p.add_argument("--dump-npz", default=None, help="write the timed batches here")
    p.add_argument("--out", default=None, help="JSON results (default scripts/results/bench_train_<tag>.json)")
    p.add_argument("--tag", default=None)
    p.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                   help="config fields for every timed configuration, e.g. train.balance_shares=False "
                        "optim.flatten=False (recorded in the JSON's args)")
    p.add_argument("--epoch", action="store_true", help="input-pipeline check over a whole epoch")
    p.add_argument("--small", action="store_true", help="tiny model, few steps (CPU smoke test)")
    args = p.parse_args(argv)
    for f in args.formulation or []:
        form, _, kernel = f.partition("+")
        if form not in ("edge", "node") or not (kernel in ("", "xla", "xla_recompute") or kernel.startswith("pallas")):
            p.error(f"--formulation {f!r}: edge or node, optionally +xla_recompute, +pallas or "
                    "+pallas-<block>x<warps>")
    if args.synthetic:
        args.data = ["synthetic"]
    args.data = args.data or ["real"]
    if args.steps_per_dispatch < 1 or (args.steps_per_dispatch > 1 and (args.epoch or args.runs != [1])):
        p.error("--steps-per-dispatch K: K >= 1, and K > 1 times single-run steps (not --epoch, not --runs)")
    if args.epoch:
        args.models = args.models or ["pretrain_mask30"]
        args.batch_sizes = args.batch_sizes or ([16] if args.small else [256])
        args.precision = args.precision or ["default"]
    else:
        args.models = args.models or ["finetune", "pretrain_mask30"]
        args.batch_sizes = args.batch_sizes or ([8] if args.small else [64, 256])
        args.precision = args.precision or list(PRECISIONS)
    return args


def _json_safe(x):
    """NaN / inf -> None (strict JSON), numpy scalars and arrays -> Python."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "tolist"):
        return _json_safe(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(results, epochs):
    if results:
        print("\n{:9s} {:16s} {:>4s} {:8s} {:16s} {:>8s} {:>9s} {:>7s} {:>7s} {:>6s} {:>9s} {:>9s} {:>8s} {:>7s}".format(
            "data", "model", "B", "prec", "form", "step_ms", "cryst/s", "Medge/s", "TFLOP/s", "%peak",
            "pad n/e", "xla TB/s", "compile", "peakGB"))
        for r in results:
            pf = r["peak_fraction"]
            print("{:9s} {:16s} {:>4d} {:8s} {:16s} {:>8s} {:>9s} {:>7s} {:>7s} {:>6s} {:>9s} {:>9s} {:>8s} {:>7s}".format(
                r["data"], (r["model"] if r.get("runs", 1) == 1 else f"{r['model'][:12]} x{r['runs']}")[:16],
                r["batch_size"], r["precision"], str(r["formulation"])[:16],
                _fmt(r["step_ms"], ".2f"),
                _fmt(r["crystals_per_s"], ".0f"), _fmt(r["edges_per_s"] / 1e6, ".2f"), _fmt(r["tflops"], ".2f"),
                _fmt(None if pf is None else 100 * pf, ".1f"),
                f"{100 * r['node_padding']:.0f}/{100 * r['edge_padding']:.0f}%", _fmt(r["xla_tb_per_s"], ".2f"),
                _fmt(r["compile_s_total"], ".1f") + "s",
                _fmt(None if r["peak_bytes_in_use"] is None else r["peak_bytes_in_use"] / 1e9, ".2f")))
    for e in epochs:
        print(f"\nepoch ({e['data']} {e['model']} B={e['batch_size']} {e['precision']}, {e['steps']} steps, "
              f"{e['crystals']} crystals): pipeline {e['crystals_per_s_pipeline']:.0f} crystals/s "
              f"(from first batch {e['crystals_per_s_pipeline_from_first_batch']:.0f}), pure step "
              f"{e['crystals_per_s_pure_step']:.0f} crystals/s -> {100 * e['pipeline_over_pure']:.1f}% "
              f"({'within' if e['within_15_percent'] else 'NOT within'} 15%); host batching alone "
              f"{e['host_crystals_per_s']:.0f} crystals/s")


def scaling_table(results: list[dict]) -> list[dict]:
    """Scaling efficiency throughput(N) / (N x throughput(1)) of every configuration timed on 1 and
    N > 1 devices (same data, model, global batch, precision, formulation, runs)."""
    def key(r):
        return (r["data"], r["model"], r["batch_size"], r["precision"], r["formulation"], r.get("runs", 1))

    single = {key(r): r["crystals_per_s"] for r in results if r["num_devices"] == 1}
    rows = []
    for r in results:
        if r["num_devices"] > 1 and key(r) in single:
            rows.append({"data": r["data"], "model": r["model"], "batch_size": r["batch_size"],
                         "precision": r["precision"], "formulation": r["formulation"],
                         "num_devices": r["num_devices"], "crystals_per_s": r["crystals_per_s"],
                         "crystals_per_s_1": single[key(r)],
                         "efficiency": r["crystals_per_s"] / (r["num_devices"] * single[key(r)])})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    _INITIAL_STATES.clear()  # initial states are reused within one run only
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    cache = DataCache(args)
    # all data first: graph building forks worker processes, which must happen before JAX
    # starts its backends (as train/loop.py does)
    for data_kind in (["synthetic" if args.data == ["synthetic"] else "real"] if args.epoch else args.data):
        for name in args.models:
            cache.get(data_kind, make_config(name, args, args.batch_sizes[0], args.precision[0]))
    meshes = {n: make_mesh(n or None) for n in args.num_devices}
    dev = device_info(max(meshes.values(), key=lambda m: m.size))
    print(f"device: {dev['device_kind']} x{dev['visible_devices']} ({dev['platform']}), jax {dev['jax']}; "
          f"timing on {' / '.join(str(m.size) for m in meshes.values())} device(s)", flush=True)
    dump = {} if args.dump_npz else None
    results, epochs, failures, skipped = [], [], [], []

    tables = {}
    for name in args.models:
        config = make_config(name, args, args.batch_sizes[0], "default")
        tables[model_label(name)] = {f: [list(row) for row in matmul_table(
            config.model, config.mode, getattr(loop.make_objective(config), "enabled", {}), f)]
            for f in ("edge", "node")}
    kind = dev["device_kind"].lower()
    chip = next((c for c in PEAKS if c in kind), dev["platform"])
    tag = args.tag or "_".join(filter(None, [chip,
                                             "synthetic" if args.data == ["synthetic"] else None,
                                             "epoch" if args.epoch else None, "small" if args.small else None]))
    path = Path(args.out) if args.out else REPO / "scripts" / "results" / f"bench_train_{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write_out() -> dict:  # after every configuration: a killed run keeps what it measured
        out = {
            "device": dev,
            "args": dict(vars(args)),
            "flop_model": {
                "description": "analytic matmul FLOPs per training step (see scripts/bench_train.py docstring): "
                               "sum over matmuls of coefficient x (nodes | edges | graphs | 1 | G*N per device) "
                               "x train factor (3, or 2 where no input gradient / no weight); tflops uses real "
                               "sizes, tflops_executed padded sizes",
                "peaks_tflops": PEAKS,
                "precision_unit": PRECISION_UNIT,
                "matmuls": tables,
                "matmul_columns": ["name", "scales with", "forward FLOP coefficient", "train factor"],
            },
            "synthetic": cache.synthetic_info,
            "results": results,
            "epoch": epochs,
            "failures": failures,
            "skipped_for_time": skipped,
            "scaling": scaling_table(results),
            "wall_s": time.perf_counter() - t_start,
        }
        out = _json_safe(out)
        path.write_text(json.dumps(out, indent=1, default=str))
        return out

    forms = args.formulation or [None]
    datas = [None] if args.epoch else args.data
    jobs = [(d, n, b, p, f, r, m) for m in meshes.values() for d in datas for n in args.models
            for b in args.batch_sizes for p in args.precision for f in forms
            for r in ([1] if args.epoch else args.runs)]
    last = 0.0
    for i, (data_kind, name, bs, prec, form, runs, mesh) in enumerate(jobs):
        elapsed = time.perf_counter() - t_start
        if args.time_budget and i and elapsed + last > args.time_budget:
            skipped.extend({"data": d, "model": model_label(n), "batch_size": b, "precision": p,
                            "formulation": f, "runs": r, "num_devices": m.size}
                           for d, n, b, p, f, r, m in jobs[i:])
            print(f"time budget of {args.time_budget:.0f} s reached after {elapsed:.0f} s: skipping the "
                  f"{len(jobs) - i} remaining configuration(s)", flush=True)
            break
        t_job = time.perf_counter()
        try:
            if args.epoch:
                e = epoch_one(args, name, bs, prec, mesh, cache, form)
                epochs.append(e)
                print(f"epoch {e['model']} B={bs} {prec} {e['formulation']}: "
                      f"pipeline/pure = {100 * e['pipeline_over_pure']:.1f}%; main thread per step: "
                      + ", ".join(f"{k} {v:.2f} ms" for k, v in e["pipeline_host_ms_per_step"].items()),
                      flush=True)
            else:
                r = bench_one(args, data_kind, name, bs, prec, mesh, cache, dump, form, runs)
                results.append(r)
                print(f"{data_kind} {r['model']}{f' x{runs} runs' if runs > 1 else ''} B={bs} {prec} "
                      f"{r['formulation']}: {r['step_ms']:.2f} ms/step "
                      f"[{r['step_ms_min']:.2f}-{r['step_ms_max']:.2f}], {r['crystals_per_s']:.0f} crystals/s, "
                      f"{r['tflops']:.2f} TFLOP/s, compile {r['compile_s_total']:.1f} s "
                      f"({len(r['compile_s'])} shapes), {time.perf_counter() - t_job:.0f} s in all", flush=True)
        except Exception as ex:  # noqa: BLE001 - e.g. out of memory: report, go on
            if args.small:
                raise
            failures.append({"data": data_kind, "model": model_label(name), "batch_size": bs,
                             "precision": prec, "formulation": form, "error": f"{type(ex).__name__}: {ex}"[:2000]})
            print(f"FAILED {data_kind} {name} B={bs} {prec}: {type(ex).__name__}: {ex}", flush=True)
        last = time.perf_counter() - t_job
        write_out()

    out = write_out()
    if dump is not None:
        Path(args.dump_npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.dump_npz, **dump)
        print(f"wrote {len(dump)} arrays to {args.dump_npz}", flush=True)
    print_table(results, epochs)
    for row in out["scaling"]:
        print(f"scaling {row['data']} {row['model']} B={row['batch_size']} {row['precision']}: "
              f"{row['num_devices']} devices {row['crystals_per_s']:.0f} crystals/s = "
              f"{100 * row['efficiency']:.1f}% of {row['num_devices']} x {row['crystals_per_s_1']:.0f}")
    print(f"\nwrote {path} ({out['wall_s']:.0f} s)", flush=True)
    return out


if __name__ == "__main__":
    main()
