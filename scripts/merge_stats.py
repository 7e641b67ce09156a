"""How many edges `graph.merge_edges` leaves on the shipped datasets (and the synthetic benchmark set).

    python scripts/merge_stats.py                      # all shipped data, -> scripts/results/merge_edges.json
    python scripts/merge_stats.py --max-records 500    # quicker

For each file: the reference graphs (`build_crystal_graph`, the default graph settings) and the
edges that remain after merging at each level (`dpf_jax.data.graphs.merge_equivalent_edges`):
"mirror" (identical edges and an atom's self-images n / -n), "distance" (same receiver,
sender and float32 length) and "atoms" (also equal atoms computed once; with the fraction of
atoms that remain). The training step's cost grows with the edges it processes, so
these fractions bound what merging saves per step (measured: scripts/results/h100_session14/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402

from dpf_jax.data.graphs import MERGE_LEVELS, build_crystal_graph, merge_equivalent_edges  # noqa: E402
from dpf_jax.data.readers import read_jsonl  # noqa: E402
from dpf_jax.data.records import CrystalError  # noqa: E402

FILES = ("data/jarvis_dft3d.jsonl.gz", "data/mp_megnet.jsonl.gz", "data/pretrain.jsonl.gz")


def merge_fractions(crystals, max_neighbors: int = 12) -> dict:
    edges = {level: 0 for level in MERGE_LEVELS}
    atoms = skipped = computed_atoms = 0
    for c in crystals:
        try:
            ref = build_crystal_graph(c, max_neighbors=max_neighbors)
        except CrystalError:
            skipped += 1
            continue
        atoms += ref.num_nodes
        for level in MERGE_LEVELS:
            g = merge_equivalent_edges(ref, level)
            edges[level] += g.num_edges
            if level == "atoms":
                computed_atoms += int(np.count_nonzero(g.atom_counts()))
    total = edges["none"]
    return {"structures": len(crystals) - skipped, "skipped": skipped, "atoms": atoms, "edges": edges,
            "edges_per_atom": {k: v / max(atoms, 1) for k, v in edges.items()},
            "fraction_kept": {k: v / max(total, 1) for k, v in edges.items()},
            # "atoms": the class representatives, whose features are computed from messages
            "atoms_with_messages": computed_atoms, "atoms_fraction_kept": computed_atoms / max(atoms, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="+", default=list(FILES))
    p.add_argument("--max-records", type=int, default=0)
    p.add_argument("--synthetic-count", type=int, default=4096, help="bench_train.py's synthetic set (0: skip)")
    p.add_argument("--out", default=str(REPO / "scripts/results/merge_edges.json"))
    args = p.parse_args(argv)
    out = {}
    for f in args.files:
        t0 = time.perf_counter()
        records = read_jsonl(REPO / f if not Path(f).is_absolute() else f).records
        if args.max_records:
            records = records[:args.max_records]
        out[Path(f).name] = merge_fractions(records)
        res = out[Path(f).name]
        print(f"{f}: edges {res['fraction_kept']}, atoms {res['atoms_fraction_kept']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.synthetic_count:
        from bench_train import choose_k, synthetic_crystals

        crystals = synthetic_crystals(args.synthetic_count, seed=0)
        k, _ = choose_k(crystals[:128], 36.0)  # as bench_train.py --synthetic does
        out[f"synthetic_{args.synthetic_count}_k{k}"] = merge_fractions(crystals, max_neighbors=k)
        print(f"synthetic (k={k}): {out[f'synthetic_{args.synthetic_count}_k{k}']['fraction_kept']}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
