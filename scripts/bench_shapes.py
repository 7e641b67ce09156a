"""Step time of one real batch padded to several budgets: same crystals, same step code, only
the padded shape changes.

    python scripts/bench_shapes.py --batch-size 256 --budgets 2176x47104 2176x48128 2176x49152

XLA chooses its fusions per shape, so two padded shapes of the same batch can compile to
programs of different cost (session 10, one H200: 18.4 ms at 49,152 padded edges, 22.7 ms at
48,128, for the same 46,700 real edges). For each budget (per-device NODESxEDGES) this compiles
the project's training step (`count_step_ops.compile_step`: the first batch of the seed-0
shuffled epoch, padded to that budget), times it (median of --blocks blocks of --steps steps,
after warm-up; compilation excluded) and reads XLA's own count of bytes accessed, which is what
`train.budget_search` ranks candidates by. `--padding-edges spread first` also times each
budget with jraph's padding layout (every padding edge on the first padding node) in place of
the batcher's (spread over the padding nodes). Writes a JSON file (`--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import count_step_ops  # noqa: E402  (scripts/ is not a package)


def loops_on_first_padding_node(batch):
    """The batch with jraph's own padding layout (every padding edge a self-loop on the first
    padding node) instead of the batcher's (spread over the padding nodes): same shapes, same
    compiled program, for timing the two layouts against each other."""
    senders, receivers = np.array(batch.senders), np.array(batch.receivers)
    for d in range(senders.shape[0]):  # device shares
        n_e, n_n = int(batch.edges["mask"][d].sum()), int(batch.nodes["mask"][d].sum())
        senders[d, n_e:] = receivers[d, n_e:] = n_n
    return batch._replace(senders=senders, receivers=receivers)


def time_budget(config: str, batch_size: int, records: int, budget: tuple[int, int], steps: int, blocks: int,
                overrides=(), layouts=("spread",)):
    """One row per padding-edge layout: the step compiled once at `budget` (the layout changes
    data, not shapes), each layout timed on it in turn."""
    import jax

    from dpf_jax.data.batching import Budget
    from dpf_jax.train.budget_search import bytes_accessed
    from dpf_jax.train.parallel import make_mesh, put_batch

    compiled, spread, state = count_step_ops.compile_step(
        config, batch_size, records, True, 1, [Budget(budget[0], budget[1], batch_size + 1)], overrides, shuffle=True)
    gb = bytes_accessed(compiled) / 1e9
    for layout in layouts:
        host = loops_on_first_padding_node(spread) if layout == "first" else spread
        batch = put_batch(host, make_mesh(1))
        for _ in range(3):
            state, m = compiled(state, batch)
        jax.block_until_ready(m["loss"])
        times = []
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, m = compiled(state, batch)
            jax.block_until_ready(m["loss"])
            times.append((time.perf_counter() - t0) / steps * 1e3)
        ms = float(np.median(times))
        yield {"budget": list(budget), "padding_edges": layout, "real_nodes": int(host.nodes["mask"].sum()),
               "real_edges": int(host.edges["mask"].sum()), "ms": ms, "ms_min": float(min(times)),
               "ns_per_padded_edge": ms * 1e6 / budget[1], "xla_gb_accessed": gb,
               "xla_kb_per_padded_edge": gb * 1e6 / budget[1]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pretrain_mask30")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--records", type=int, default=0, help="dataset records to load (0: all)")
    p.add_argument("--budgets", nargs="+", required=True, metavar="NODESxEDGES")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides (bench_train.py's)")
    p.add_argument("--padding-edges", nargs="+", default=["spread"], choices=["spread", "first"],
                   help="layouts of the padding edges to time at each budget: spread over the padding nodes "
                        "(the batcher's) and/or all on the first padding node (jraph's)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "scripts" / "results" / "bench_shapes.json"))
    args = p.parse_args(argv)
    import jax

    budgets = [tuple(int(x) for x in b.lower().split("x")) for b in args.budgets]
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "config": args.config,
           "batch_size": args.batch_size, "set": args.set, "rows": []}
    rows = (r for b in budgets
            for r in time_budget(args.config, args.batch_size, args.records, b, args.steps, args.blocks, args.set,
                                 args.padding_edges))
    for r in rows:
        b = r["budget"]
        out["rows"].append(r)
        print(f"{b[0]} x {b[1]} ({r['padding_edges']} padding edges): {r['ms']:.2f} ms/step ({r['ns_per_padded_edge']:.0f} ns per padded edge), "
              f"XLA {r['xla_gb_accessed']:.1f} GB ({r['xla_kb_per_padded_edge']:.0f} KB per padded edge); "
              f"batch of {r['real_nodes']} nodes / {r['real_edges']} edges", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))  # after every row: a killed run keeps its rows
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
