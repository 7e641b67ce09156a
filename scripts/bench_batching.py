"""Host batching: time per padded batch, and how often consecutive batches share a padded shape.

    python scripts/bench_batching.py [--config pretrain_mask30] [--batch-sizes 256 1024]
        [--devices 1 4] [--group 4] [--out scripts/results/bench_batching.json]

For each (global batch, device count): the median time to build one padded, device-stacked
batch over an epoch of the training split, with the packed arrays `GraphBatcher` uses
(`PackedGraphs.pad_shares`, one gather per field for all the device shares), with each share
gathered on its own and the shares stacked (`PackedGraphs.pad`, sessions 17-22) and with the
per-crystal concatenation before that (`pad_graphs` over the share's GraphsTuples), on one
core of this machine; the time to bundle
a batch into three arrays for the copy to the devices (`TransferPacking.pack`, `train.pack_batches`,
on the same batching thread in training); and the padded
shapes of the epoch's batches: how many steps would fall in full groups of `--group` consecutive
equally padded batches (what K steps per jitted call, `make_train_step(steps_per_call=K)`,
needs without reordering the epoch).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # configs/ is a plain folder next to the package
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from dpf_jax.data import batching  # noqa: E402
from dpf_jax.data.batching import pad_graphs  # noqa: E402
from dpf_jax.data.transfer import TransferPacking  # noqa: E402
from dpf_jax.train import loop  # noqa: E402


def epoch_ms_per_batch(batcher, repeats: int) -> float:
    """Median over `repeats` epochs of the mean time per batch (seed 0, epoch 0, shuffled)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(1 for _ in batcher.iterate(0, 0, shuffle=True, drop_remainder=True))
        times.append(1e3 * (time.perf_counter() - t0) / max(n, 1))
    return statistics.median(times)


def bundle_ms_per_batch(batcher, repeats: int) -> float:
    """Median over `repeats` passes of the mean time to bundle one of the epoch's batches."""
    batches = list(batcher.iterate(0, 0, shuffle=True, drop_remainder=True))
    packing = TransferPacking(batches[0])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            packing.pack(b)
        times.append(1e3 * (time.perf_counter() - t0) / len(batches))
    return statistics.median(times)


class PatchedBatcher:
    """The same batcher with another way to pad each device share (`pad_share(batcher, share,
    budget, positions)`), the shares then stacked: for the paths `GraphBatcher` replaced."""

    def __init__(self, batcher, pad_share):
        self.b, self.pad_share = batcher, pad_share

    def iterate(self, *a, **kw):
        original = type(self.b).pad_share
        try:
            type(self.b).pad_share = self.pad_share
            yield from self.b.iterate(*a, **kw)
        finally:
            type(self.b).pad_share = original


def concatenating(batcher) -> PatchedBatcher:
    """Each share by concatenating its crystals' arrays (`pad_graphs`, the path before session 17's
    `PackedGraphs`)."""
    graphs = [batcher.graphs[i] for i in range(len(batcher.graphs))]
    return PatchedBatcher(batcher, lambda s, share, budget, positions: pad_graphs(
        [graphs[i] for i in share], budget, positions=positions, template=graphs[0]))


def session22_pad(packed, indices, budget, positions):
    """`PackedGraphs.pad` as it was in sessions 17-22 (copied from that code): one share, one
    gather per field into freshly zeroed arrays."""
    def take_padded(table, rows, size):
        out = np.empty((size,) + table.shape[1:], table.dtype)
        np.take(table, rows, axis=0, out=out[:rows.size])
        out[rows.size:] = 0
        return out

    idx = np.asarray(indices, np.int64).reshape(-1)
    n_node_g, n_edge_g = packed.n_node[idx], packed.n_edge[idx]
    n_node, n_edge, n_real = int(n_node_g.sum()), int(n_edge_g.sum()), idx.size
    batching._check_fits(n_real, n_node, n_edge, budget)
    node_rows = batching._concat_ranges(packed.node_start[idx], n_node_g)
    edge_rows = batching._concat_ranges(packed.edge_start[idx], n_edge_g)
    edge_offsets = np.repeat(np.cumsum(n_node_g) - n_node_g, n_edge_g)
    loops = batching.spread_padding_loops(n_node, budget.n_node, n_edge, budget.n_edge)

    def endpoints(local):
        out = np.empty(budget.n_edge, np.int32)
        out[:n_edge] = local[edge_rows] + edge_offsets
        out[n_edge:] = loops
        return out

    nodes = {k: take_padded(v, node_rows, budget.n_node) for k, v in packed.nodes.items()}
    edges = {k: endpoints(v) if k == "source" else take_padded(v, edge_rows, budget.n_edge)
             for k, v in packed.edges.items()}
    glob = {k: take_padded(v, idx, budget.n_graph) for k, v in packed.globals.items()}
    return batching._padded_graphs_tuple(nodes, edges, glob, endpoints(packed.senders), endpoints(packed.receivers),
                                         n_node_g, n_edge_g, budget, np.asarray(positions, np.int32))


def per_share(batcher) -> PatchedBatcher:
    """Each share gathered on its own and the shares stacked: the code of sessions 17-22
    (`session22_pad`), before one gather per field covered all the shares (`PackedGraphs.pad_shares`)."""
    return PatchedBatcher(batcher, lambda s, share, budget, positions: session22_pad(s.graphs, share, budget,
                                                                                     positions))


def shape_runs(batcher, batch_size: int, group: int) -> dict:
    order = batcher.epoch_order(0, 0, True)
    levels = [batcher.share_budget(batcher.shares(order[i * batch_size:(i + 1) * batch_size]))
              for i in range(batcher.num_batches(True))]
    runs, cur = [], 1
    for a, b in zip(levels, levels[1:]):
        if a == b:
            cur += 1
        else:
            runs.append(cur)
            cur = 1
    runs.append(cur)
    counts = collections.Counter(levels)
    return {"steps": len(levels),
            "budgets": {f"{k.n_node}x{k.n_edge}x{k.n_graph}": v for k, v in sorted(counts.items())},
            "mean_run_of_equal_shapes": statistics.mean(runs),
            f"steps_in_full_groups_of_{group}": sum(r // group * group for r in runs)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="pretrain_mask30")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--devices", nargs="+", type=int, default=[1, 4])
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--records", type=int, default=0, help="use only the first N records (0: all)")
    p.add_argument("--out", default=str(REPO / "scripts" / "results" / "bench_batching.json"))
    args = p.parse_args(argv)
    config = importlib.import_module(f"configs.{args.config}").get_config()
    config.train.progress_bar = False
    if args.records:
        config.data.max_records = args.records
    data = loop.load_data(config)
    rows = []
    for bs in args.batch_sizes:
        for d in args.devices:
            config.train.batch_size = bs
            batcher = loop.make_batcher(data.splits["train"], config, d)
            if batcher.num_batches(True) == 0:
                continue
            row = {"batch_size": bs, "devices": d,
                   "packed_ms_per_batch": epoch_ms_per_batch(batcher, args.repeats),
                   "per_share_ms_per_batch": epoch_ms_per_batch(per_share(batcher), args.repeats),
                   "concatenating_ms_per_batch": epoch_ms_per_batch(concatenating(batcher), args.repeats),
                   "bundle_ms_per_batch": bundle_ms_per_batch(batcher, args.repeats),
                   **shape_runs(batcher, bs, args.group)}
            row["speedup"] = row["concatenating_ms_per_batch"] / row["packed_ms_per_batch"]
            row["speedup_over_per_share"] = row["per_share_ms_per_batch"] / row["packed_ms_per_batch"]
            rows.append(row)
            print(f"B={bs} on {d} device(s): packed {row['packed_ms_per_batch']:.2f} ms/batch, per share "
                  f"{row['per_share_ms_per_batch']:.2f} ({row['speedup_over_per_share']:.1f}x), concatenating "
                  f"{row['concatenating_ms_per_batch']:.2f} ({row['speedup']:.1f}x), bundling "
                  f"{row['bundle_ms_per_batch']:.2f}; {row['steps']} steps, "
                  f"{row[f'steps_in_full_groups_of_{args.group}']} in full groups of {args.group} "
                  f"equally padded batches", flush=True)
    report = {"config": args.config, "host": {"machine": platform.machine(), "processor": platform.processor(),
                                              "cpu_count": os.cpu_count(), "python": platform.python_version()},
              "records": args.records or None, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
