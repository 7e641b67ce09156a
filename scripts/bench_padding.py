"""Padding waste of the device shares: contiguous vs edge-balanced splits, 1..N devices (CPU only).

    python scripts/bench_padding.py                                   # pretrain_mask30 + finetune_jarvis
    python scripts/bench_padding.py --configs pretrain_mask30 --devices 1 2 4 8 --batch-sizes 256 1024
    # where the budget levels sit, and how many:
    python scripts/bench_padding.py --levels 2 3 4 --placements quantile cost --devices 1 4 \
        --batch-sizes 32 256 1024 --out scripts/results/padding_levels.json
    python scripts/bench_padding.py --configs synthetic --batch-sizes 256 --devices 1 --levels 2 3 4 \
        --placements quantile cost --out scripts/results/padding_levels_synthetic.json   # issue #9's crystals
    # the expected padding (many epochs) with 4 to 16 levels (session 31):
    python scripts/bench_padding.py --configs synthetic pretrain_mask30 --batch-sizes 256 1024 --devices 1 \
        --levels 4 6 8 12 16 --epochs 200 --out scripts/results/padding_levels_session31.json

Every device's share of a global batch is padded to one budget (the one that holds the largest
share), so a split whose shares differ in size pads the smaller ones up to the largest. With
contiguous shares the largest of N small sums lies further above their mean as N grows, and the
padded work per real edge grows with the device count: on a 4-GPU H200 machine the
pre-training step at global batch 256 ran 24% padding edges on 4 devices against 6% on one
(scripts/results/h200x4_session5/bench_scaling_pretrain.json). `train.balance_shares` (default
on) splits each batch heaviest-crystal-first onto the lightest share (`balanced_split`), and the
budgets are chosen from balanced splits too. This script measures both over one shuffled epoch
of the training split, exactly as `GraphBatcher.padding_waste` counts (padded slots of every
share / all slots), and writes a JSON file; no accelerator needed. With `--levels` /
`--placements` it compares instead how many budget levels there are and where they sit
(`train.num_budget_levels`, `train.budget_placement`; balanced shares).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dpf_jax.data.batching import BUDGET_PLACEMENTS  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["pretrain_mask30", "finetune_jarvis"],
                   help="configs/<name>.py to take the data and settings from; 'synthetic': issue #9's "
                        "JARVIS-like random crystals (bench_train.py --synthetic) with finetune_jarvis")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--max-records", type=int, default=0, help="cap on dataset records (0: all)")
    p.add_argument("--levels", nargs="+", type=int, default=None, help="compare these numbers of budget levels")
    p.add_argument("--placements", nargs="+", default=None, choices=BUDGET_PLACEMENTS,
                   help="compare these budget placements (default with --levels: the config's)")
    p.add_argument("--epochs", type=int, default=1,
                   help="shuffled epochs to count over (many: the expected padding; "
                        "a small set has few batches per epoch)")
    p.add_argument("--out", default=str(REPO / "scripts" / "results" / "padding_shares.json"))
    args = p.parse_args(argv)

    from dpf_jax.data.batching import GraphBatcher
    from dpf_jax.train import loop

    rows = []
    for name in args.configs:
        config = importlib.import_module(f"configs.{'finetune_jarvis' if name == 'synthetic' else name}").get_config()
        if args.max_records:
            config.data.max_records = args.max_records
        t0 = time.perf_counter()
        data = synthetic_data() if name == "synthetic" else loop.load_data(config)
        print(f"{name}: {data.summary()} ({time.perf_counter() - t0:.0f} s)", flush=True)
        graphs = loop.make_batcher(data.splits["train"], config, 1).graphs
        for bs in args.batch_sizes:
            for n_dev in args.devices:
                if bs % n_dev:
                    continue
                row = {"config": name, "batch_size": bs, "num_devices": n_dev, "crystals": len(graphs)}
                if args.levels or args.placements:
                    rows.extend(dict(row, **level_row(graphs, bs, n_dev, config, placement, levels, args.epochs))
                                for placement in args.placements or [config.train.budget_placement]
                                for levels in args.levels or [config.train.num_budget_levels])
                    continue
                for balance in (False, True):
                    b = GraphBatcher(graphs, bs, n_dev, num_levels=config.train.num_budget_levels, seed=0,
                                     balance=balance, budget_placement=config.train.budget_placement)
                    waste = b.padding_waste(seed=config.seed, epochs=args.epochs)
                    tag = "balanced" if balance else "contiguous"
                    row[f"edge_padding_{tag}"] = waste["edge_padding"]
                    row[f"node_padding_{tag}"] = waste["node_padding"]
                    row[f"budgets_{tag}"] = [[x.n_node, x.n_edge, x.n_graph] for x in b.budgets]
                rows.append(row)
                print(f"  B={bs:5d} {n_dev} device(s): edge padding contiguous "
                      f"{100 * row['edge_padding_contiguous']:5.1f}%  balanced {100 * row['edge_padding_balanced']:5.1f}%"
                      f"   (node {100 * row['node_padding_contiguous']:5.1f}% -> {100 * row['node_padding_balanced']:5.1f}%)",
                      flush=True)
    what = ("budget levels and placements (balanced shares)" if args.levels or args.placements
            else "contiguous vs balanced device shares")
    out = {"description": f"padding waste over {args.epochs} shuffled training epoch(s) "
                          f"(GraphBatcher.padding_waste): padded / all node and edge slots, {what}",
           "epochs": args.epochs,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return out


def synthetic_data():
    """The crystals of `bench_train.py --synthetic` with its default options."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_train

    return bench_train.synthetic_data(bench_train.parse_args(["--synthetic"]))[0]


def level_row(graphs, batch_size: int, num_devices: int, config, placement: str, levels: int, epochs: int = 1) -> dict:
    """Padding waste over `epochs` epochs with `levels` budget levels placed by `placement`."""
    from dpf_jax.data.batching import GraphBatcher

    b = GraphBatcher(graphs, batch_size, num_devices, num_levels=levels, seed=0, budget_placement=placement)
    waste = b.padding_waste(seed=config.seed, epochs=epochs)
    print(f"  B={batch_size:5d} {num_devices} device(s) {placement:8s} x {levels}: edge padding "
          f"{100 * waste['edge_padding']:5.1f}%, node {100 * waste['node_padding']:5.1f}%, "
          f"{waste['budgets_used']} of {len(b.budgets)} shapes used", flush=True)
    return {"placement": placement, "levels": levels, "edge_padding": waste["edge_padding"],
            "node_padding": waste["node_padding"], "budgets": [[x.n_node, x.n_edge, x.n_graph] for x in b.budgets],
            "budgets_used": waste["budgets_used"]}


if __name__ == "__main__":
    main()
