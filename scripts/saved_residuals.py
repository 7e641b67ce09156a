"""What the forward pass keeps for the backward, per edge and per layer (any backend; no timing).

    python scripts/saved_residuals.py   # model.edge_kernel xla/xla_recompute x precision x model.remat

The training step is bound by memory traffic over per-edge tensors (PERF_NOTES.md): every
tensor the forward saves for the backward ("residual") is written once and read once more.
This lists the residuals JAX's autodiff keeps for one full-width MatformerConv layer (H = 4,
C = 128, real JARVIS crystals, training mode) and sums the per-edge ones in bytes per edge,
for each precision mode and `model.remat` policy, with `model.edge_kernel` "xla" (autodiff of
the gate) and "xla_recompute" (a written backward that keeps only the gate's inputs; the rest
of the layer is autodiff's either way). XLA may still fuse or recompute some of them;
the numbers are what the program asks for, a bound to compare variants by, not a timing.
Writes a JSON file (`--out`).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def residual_bytes_per_edge(precision: str, remat: str, batch, edge_kernel: str = "xla") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.ad_checkpoint import saved_residuals  # public only as print_saved_residuals

    from dpf_jax.model.matformer import MatformerEncoder

    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    encoder = MatformerEncoder(num_layers=1, dtype=dtype, remat=remat, edge_kernel=edge_kernel)
    variables = encoder.init(jax.random.PRNGKey(0), batch, train=False)

    def loss(params):
        out, _ = encoder.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch, train=True,
                               mutable=["batch_stats"])
        return jnp.sum(out.nodes ** 2)

    n_edge = batch.senders.shape[0]
    per_edge, total = collections.Counter(), 0
    for aval, _ in saved_residuals(loss, variables["params"]):
        shape = getattr(aval, "shape", ())
        if len(shape) and shape[0] == n_edge:  # a per-edge tensor
            per_edge[f"{list(shape[1:])} {aval.dtype}"] += 1
            total += int(np.prod(shape[1:])) * np.dtype(aval.dtype).itemsize
    return {"precision": precision, "remat": remat, "edge_kernel": edge_kernel, "bytes_per_edge": total,
            "per_edge_residuals": dict(per_edge.most_common())}


def real_batch(num_crystals: int = 4):
    import jax
    import jax.numpy as jnp

    from dpf_jax.data.batching import Budget, graph_to_jraph, pad_graphs
    from dpf_jax.data.graphs import build_crystal_graph
    from dpf_jax.data.readers import iter_jsonl

    crystals = [c for c in itertools.islice(iter_jsonl(REPO / "data" / "jarvis_dft3d.jsonl.gz"), 60)
                if 2 <= c.num_atoms <= 8][:num_crystals]
    graphs = [graph_to_jraph(build_crystal_graph(c)) for c in crystals]
    n = sum(int(g.n_node[0]) for g in graphs)
    e = sum(int(g.n_edge[0]) for g in graphs)
    # odd padding sizes, so that no per-node tensor has the per-edge leading dimension
    return jax.tree_util.tree_map(jnp.asarray, pad_graphs(graphs, Budget(n + 3, e + 37, num_crystals + 2)))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", nargs="+", default=["default", "bf16"], choices=["default", "bf16"])
    p.add_argument("--remat", nargs="+",
                   default=["none", "gate", "gate_lean", "stats", "dots", "dots_no_batch", "layer"])
    p.add_argument("--edge-kernels", nargs="+", default=["xla", "xla_recompute"], choices=["xla", "xla_recompute"],
                   help="model.edge_kernel: autodiff's residuals, or the recomputing gate's (its inputs)")
    p.add_argument("--out", default=str(REPO / "scripts" / "results" / "saved_residuals.json"))
    args = p.parse_args(argv)
    batch = real_batch()
    rows = [residual_bytes_per_edge(pr, rm, batch, ek) for ek in args.edge_kernels for pr in args.precision
            for rm in args.remat]
    for r in rows:
        print(f"{r['edge_kernel']:13s} precision {r['precision']:8s} remat {r['remat']:14s} "
              f"{r['bytes_per_edge']:7,d} bytes per edge and "
              f"layer: {r['per_edge_residuals']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
