"""Times MatformerConv's per-edge work alone: the jax.numpy version (what XLA fuses) against the
fused Pallas kernels, forward and forward+backward: `--family chain` the chain on gathered
inputs (`dpf_jax.model.edge_kernel`), `--family node` the gathers, e @ W3 and the chain from
the node tables (`dpf_jax.model.gather_kernel`), `--family gate` the gate alone on the gathered
tables (`dpf_jax.model.gate_kernel`; forward 13 HC in, 3 HC out per edge; backward 16 HC in, 13 HC
out), `--family gate_rows` the same gate reading the node tables' rows itself (forward 4 HC in,
3 HC out; backward 7 HC in, 7 HC out; its xla variant is XLA's gathers fused into the gate),
`--family message_sum` msg_layer_1, the edge weights and the receivers' sums
(`dpf_jax.model.message_sum_kernel`; forward 1 HC in, backward 1 HC in and 1 HC out; N = E / 25
receivers, the padding edges spread over the last 64 nodes as the batcher spreads them).

    python scripts/bench_edge_kernel.py                       # GPU: E = 46,080 edges (a B=256
                                                              # pre-training budget), H = 4, C = 128
    python scripts/bench_edge_kernel.py --tiles 32x4 16x8 64x8 --edges 46080 81920
    python scripts/bench_edge_kernel.py --small               # CPU smoke run (interpreter, tiny)
    python scripts/bench_train.py --synthetic --models finetune --batch-sizes 256 --num-devices 1 \
        --dump-npz batches.npz                                # then the training step's own graphs:
    python scripts/bench_edge_kernel.py --family gate_rows message_sum --graphs-npz batches.npz

Random receivers (N = E / 25) are not the synthetic batches' structure (29 edges per node, runs of
varying length): in session 26 kernel-level differences of 2-3% on random graphs (each variant in
its own process, within the spread between processes) did not show in the step, hence
`--graphs-npz`, and variants timed side by side in one process.

Inputs are random with the chain's real shapes (qk, q, k, e [E, H, C]; upd [E, H, 3C]; 5% of
edges masked as padding). Reported per variant: median ms of `jit(forward)` and of
`jit(grad)` (forward + backward, all 11 differentiable inputs), and the effective bandwidth of
the fused kernels from the bytes they must move (forward: inputs 7 HC + output 1 HC floats
per edge; forward+backward: that, plus the backward's 8 HC in and 11 HC out; HC = H x C), so the fraction
of the card's bandwidth they reach is visible; and, for every variant, the largest error of its
output and (relative) of its gradients against true-float32 jax.numpy on the same inputs: the
check that the kernels the GPU compiled compute the right thing. Writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import profile_step  # noqa: E402 - its `timeit`

from dpf_jax.model.edge_kernel import KernelOptions, edge_message_reference, fused_edge_message  # noqa: E402
from dpf_jax.model.gate_kernel import fused_gate, fused_gate_rows, gate_reference  # noqa: E402
from dpf_jax.model.gate_recompute import gate_message_reference  # noqa: E402
from dpf_jax.model.gather_kernel import fused_node_message, node_message_reference  # noqa: E402
from dpf_jax.model.message_sum_kernel import fused_message_sum, message_sum_reference  # noqa: E402

DIFF = (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11)
NODE_DIFF = (0, 1, 2, 6, 7, 8, 9, 10, 11, 12)
GATE_DIFF = (0, 1, 2, 3, 5, 6)
ROWS_DIFF = (0, 1, 2, 3, 7, 8)
SUM_DIFF = (0, 1, 2, 3)
# floats per edge, in units of HC = heads x channels, that each family's kernels must move:
# (forward, forward + backward)
KERNEL_HC = {"chain": (8, 8 + 19), "gate": (16, 16 + 29), "gate_rows": (7, 7 + 14), "message_sum": (1, 1 + 2)}
EDGES_PER_NODE = 25  # the reference graphs' average (PERF_NOTES.md)


class GraphStructure(NamedTuple):
    """A padded batch's edge structure: receivers (sorted), senders, each edge's count (0: a
    padding edge) and the node budget."""

    receivers: np.ndarray
    senders: np.ndarray
    weight: np.ndarray
    n_node: int


def load_graph(path: str, which: str | None = None) -> GraphStructure:
    """The structure of one batch that `bench_train.py --dump-npz` wrote (its real edges, all
    device shares together), padded to the batch's budget (per device, times the devices) as the
    batcher pads: the padding edges at the end, spread over the padding nodes, weight 0.
    `which`: "<group>/<index>" (default: the first batch in the file)."""
    data = np.load(path)
    batches = sorted({k.rsplit("/", 1)[0] for k in data.files})
    which = which or batches[0]
    if which not in batches:
        raise ValueError(f"{path}: no batch {which!r}; it holds {batches}")
    get = lambda k: data[f"{which}/{k}"]  # noqa: E731
    devices, (n_node_dev, n_edge_dev) = int(get("num_devices")), (int(x) for x in get("budget")[:2])
    n_node, n_edge = devices * n_node_dev, devices * n_edge_dev
    n_real_nodes, recv = int(get("n_node").sum()), get("receivers").astype(np.int32)
    n_pad, pad_nodes = n_edge - len(recv), max(1, n_node - n_real_nodes)
    pad = (min(n_real_nodes, n_node - 1) + np.arange(n_pad) * pad_nodes // max(1, n_pad)).astype(np.int32)
    weight = np.concatenate([get("edge_count").astype(np.float32), np.zeros(n_pad, np.float32)])
    return GraphStructure(np.concatenate([recv, pad]), np.concatenate([get("senders").astype(np.int32), pad]),
                          weight, n_node)


def make_node_inputs(n_edge: int, heads: int, c: int, seed: int = 0, graph: GraphStructure | None = None):
    """Node tables and edge indices for the gather kernel: N = E / 25 nodes, receivers sorted (or
    `graph`'s nodes, edges and mask)."""
    n_node = max(1, n_edge // EDGES_PER_NODE) if graph is None else graph.n_node
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    rt = jax.random.normal(ks[0], (n_node, heads, 5 * c))
    st = jax.random.normal(ks[1], (n_node, heads, 4 * c))
    recv = jnp.sort(jax.random.randint(ks[2], (n_edge,), 0, n_node))
    send = jax.random.randint(ks[3], (n_edge,), 0, n_node)
    w3 = jax.random.normal(ks[4], (c, 3 * c)) / np.sqrt(c)
    qk, q, k, e, upd, mask, *params = make_inputs(n_edge, heads, c, seed)
    if graph is not None:
        recv, send, mask = jnp.asarray(graph.receivers), jnp.asarray(graph.senders), jnp.asarray(graph.weight > 0)
    return (rt, st, e, recv, send, mask, w3, *params)


def make_gate_inputs(n_edge: int, heads: int, c: int, seed: int = 0):
    """Gathered tables r [E, H, 5C], s [E, H, 4C], e @ W3 [E, H, 3C], e, mask, LayerNorm params."""
    ks = jax.random.split(jax.random.PRNGKey(seed + 1), 3)
    qk, q, k, e, upd, mask, g1, b1, *_ = make_inputs(n_edge, heads, c, seed)
    r = jnp.concatenate([q, qk, jax.random.normal(ks[0], (n_edge, heads, 3 * c))], axis=-1)
    s = jnp.concatenate([k, jax.random.normal(ks[1], (n_edge, heads, 3 * c))], axis=-1)
    return (r, s, upd, e, mask, g1, b1)


def make_rows_inputs(n_edge: int, heads: int, c: int, seed: int = 0, graph: GraphStructure | None = None):
    """Node tables [N, H, 5C] / [N, H, 4C] (N = E / 25), e @ W3, e, sorted receivers, senders,
    mask, LayerNorm params: the arguments of `gate_message_reference` / `fused_gate_rows`."""
    rt, st, e, recv, send, mask, _w3, g1, b1, *_ = make_node_inputs(n_edge, heads, c, seed, graph)
    ew3 = make_inputs(n_edge, heads, c, seed)[4]  # its upd [E, H, 3C], as the gate family's e @ W3
    return (rt, st, ew3, e, recv, send, mask, g1, b1)


def make_sum_inputs(n_edge: int, heads: int, c: int, seed: int = 0, graph: GraphStructure | None = None):
    """msg_layer_0's output pre [E, H, C], b0, LayerNorm scale and bias, edge counts (1-2; 0 on the
    last 5%, the padding edges, which point at the last 64 of N = E / 25 nodes, spread as the
    batcher spreads them) and sorted receivers: the arguments of `fused_message_sum` but N (or
    `graph`'s receivers and counts)."""
    n_node = _sum_nodes(n_edge)
    n_real = int(0.95 * n_edge)
    ks = jax.random.split(jax.random.PRNGKey(seed + 2), 6)
    pad_nodes = min(64, n_node)
    recv = jnp.concatenate([jnp.sort(jax.random.randint(ks[0], (n_real,), 0, max(1, n_node - pad_nodes))),
                            n_node - pad_nodes + jnp.arange(n_edge - n_real) * pad_nodes // max(1, n_edge - n_real)])
    weight = jnp.where(jnp.arange(n_edge) < n_real, jax.random.randint(ks[1], (n_edge,), 1, 3), 0).astype(jnp.float32)
    pre = 2.0 * jax.random.normal(ks[2], (n_edge, heads, c)) + 0.3
    b0, scale, bias = (0.1 * jax.random.normal(k, (c,)) + base for k, base in zip(ks[3:], (0.0, 1.0, 0.0)))
    if graph is not None:
        recv, weight = jnp.asarray(graph.receivers), jnp.asarray(graph.weight)
    return (pre, b0, scale, bias, weight, recv.astype(jnp.int32))


def _sum_nodes(n_edge: int) -> int:
    return max(1, n_edge // EDGES_PER_NODE)


def _message_sum(*a, opts, n_node=None):
    return fused_message_sum(*a, n_node or _sum_nodes(a[0].shape[0]), opts)


def _sum_reference(*a, precision=None, n_node=None):
    del precision  # no matmuls
    return message_sum_reference(*a, n_node or _sum_nodes(a[0].shape[0]))


def _rows_reference(*a, precision=None):
    del precision  # no matmuls in the gate
    return gate_message_reference(*a)


def _gate_reference(*a, precision=None):
    del precision  # no matmuls in the gate
    return gate_reference(*a)


def make_inputs(n_edge: int, heads: int, c: int, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 11)
    qk, q, k, e = (jax.random.normal(ks[i], (n_edge, heads, c)) for i in range(4))
    upd = jax.random.normal(ks[4], (n_edge, heads, 3 * c))
    mask = jnp.arange(n_edge) < int(0.95 * n_edge)
    vec3 = lambda i, b: b + 0.1 * jax.random.normal(ks[i], (3 * c,))  # noqa: E731
    vec = lambda i, b: b + 0.1 * jax.random.normal(ks[i], (c,))  # noqa: E731
    w0 = jax.random.normal(ks[7], (3 * c, c)) / np.sqrt(3 * c)
    return (qk, q, k, e, upd, mask, vec3(5, 1.0), vec3(6, 0.0), w0, vec(8, 0.0), vec(9, 1.0), vec(10, 0.0))


def median_ms(fn, args, reps: int, warmup: int = 2) -> tuple[float, float]:
    """(median ms of a call after warm-up, seconds of the first call = compilation)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    return profile_step.timeit(fn, *args, n=reps, warmup=warmup), compile_s


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edges", nargs="+", type=int, default=[46080])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--tiles", nargs="+", default=["32x4", "16x8", "64x8"],
                   help="edges-per-program x warps [x backward warps], then any flags of the family's kernel "
                        "(e.g. 16x8-sorted, 16x8x4-sorted-runs for gate_rows)")
    p.add_argument("--precision", choices=["default", "highest"], default="default")
    p.add_argument("--family", nargs="+", choices=["chain", "node", "gate", "gate_rows", "message_sum"],
                   default=["chain", "node", "gate", "gate_rows", "message_sum"],
                   help="chain: the per-edge chain on gathered inputs (edge_kernel 'pallas'); node: gathers "
                        "+ e@W3 + chain from node tables (edge_kernel 'pallas_node', N = E / 25); gate: the "
                        "gate alone on the gathered tables (edge_kernel 'pallas_gate'); gate_rows: the "
                        "gate from the node tables, gathering rows itself (edge_kernel 'pallas_gate_rows'; "
                        "its xla variant: XLA's gathers fused into the gate); message_sum: msg_layer_1, "
                        "the edge weights and the receiver sums (the '-sum' kernel pair, N = E / 25)")
    p.add_argument("--graphs-npz", default=None,
                   help="the node, gate_rows and message_sum families take their receivers, senders, edge counts "
                        "and node and edge budgets from a batch that `bench_train.py --dump-npz` wrote (the "
                        "training step's own structure) instead of random graphs; --edges is then that budget")
    p.add_argument("--graph", default=None, help="with --graphs-npz: which batch, '<group>/<index>' (default: "
                   "the first)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny shapes, Pallas interpreter")
    p.add_argument("--out", default="scripts/results/bench_edge_kernel.json")
    args = p.parse_args(argv)
    if args.small:
        args.edges, args.heads, args.channels, args.reps = [64], 2, 16, 2
        args.tiles = args.tiles[:1]
    highest = args.precision == "highest"
    precision = jax.lax.Precision.HIGHEST if highest else None
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "heads": args.heads,
              "channels": args.channels, "precision": args.precision, "results": []}
    hc = args.heads * args.channels
    graph = load_graph(args.graphs_npz, args.graph) if args.graphs_npz else None
    if graph is not None:
        args.edges = [len(graph.receivers)]
        report["graph"] = {"file": args.graphs_npz, "batch": args.graph, "nodes": graph.n_node,
                           "edges": len(graph.receivers), "real_edges": int((graph.weight > 0).sum())}
    n_node = graph.n_node if graph is not None else None
    families = {  # what is timed: the chain alone (inputs gathered already), or gathers + chain
        "chain": (make_inputs, edge_message_reference, fused_edge_message, "pallas", DIFF),
        "node": (make_node_inputs, node_message_reference, fused_node_message, "pallas_node", NODE_DIFF),
        "gate": (make_gate_inputs, _gate_reference, fused_gate, "pallas_gate", GATE_DIFF),
        "gate_rows": (make_rows_inputs, _rows_reference, fused_gate_rows, "pallas_gate_rows", ROWS_DIFF),
        "message_sum": (make_sum_inputs, functools.partial(_sum_reference, n_node=n_node),
                        functools.partial(_message_sum, n_node=n_node), "message_sum", SUM_DIFF)}
    for n_edge, family in [(n, f) for n in args.edges for f in args.family]:
        make, reference, fused, kernel_name, diff = families[family]
        structured = family in ("node", "gate_rows", "message_sum")  # the families with an edge structure
        inputs = make(n_edge, args.heads, args.channels, graph=graph) if structured else make(n_edge, args.heads,
                                                                                             args.channels)
        variants = {f"xla ({family})": lambda *a, r=reference: r(*a, precision=precision)}
        # correctness of what the GPU really compiled: every variant against true-float32 jax.numpy
        exact = lambda *a, r=reference: r(*a, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
        ref_y = jax.jit(exact)(*inputs)
        ref_g = jax.jit(jax.grad(lambda *a: jnp.sum(exact(*a) ** 2), argnums=diff))(*inputs)
        for tile in args.tiles:
            spec = f"{kernel_name}-{tile}" if family != "message_sum" else f"pallas_gate_rows-{tile}"
            opts = KernelOptions.parse(spec, allow_tf32=not highest, interpret=True if args.small else None)
            variants[f"{kernel_name}-{tile}"] = lambda *a, o=opts, f=fused: f(*a, opts=o)
        for name, fn in variants.items():
            row = {"edges": n_edge, "variant": name, "family": family}
            try:
                fwd = jax.jit(fn)
                grad = jax.jit(jax.grad(lambda *a, f=fn: jnp.sum(f(*a) ** 2), argnums=diff))
                row["forward_ms"], row["forward_compile_s"] = median_ms(fwd, inputs, args.reps)
                row["train_ms"], row["train_compile_s"] = median_ms(grad, inputs, args.reps)
                row["max_abs_err_forward"] = float(jnp.max(jnp.abs(fwd(*inputs) - ref_y)))
                row["max_rel_err_grads"] = max(float(jnp.max(jnp.abs(g - r)) / (jnp.max(jnp.abs(r)) + 1e-30))
                                               for g, r in zip(grad(*inputs), ref_g))
                if family in KERNEL_HC and not name.startswith("xla"):  # bytes the kernels must move
                    fwd_bytes, train_bytes = (n * hc * n_edge * 4 for n in KERNEL_HC[family])
                    row["forward_gb_s"] = fwd_bytes / row["forward_ms"] / 1e6
                    row["train_gb_s"] = train_bytes / row["train_ms"] / 1e6
            except Exception as ex:  # noqa: BLE001 - report and go on with the other variants
                row["error"] = f"{type(ex).__name__}: {ex}"[:1500]
            report["results"].append(row)
            msg = (f"E={n_edge} {name:20s} " + (f"forward {row['forward_ms']:8.3f} ms   forward+backward "
                   f"{row['train_ms']:8.3f} ms" if "error" not in row else "FAILED " + row["error"][:300]))
            if "train_gb_s" in row:
                msg += f"   ({row['forward_gb_s']:.0f} / {row['train_gb_s']:.0f} GB/s)"
            if "max_abs_err_forward" in row:
                msg += f"   err vs fp32: y {row['max_abs_err_forward']:.1e}, grads {row['max_rel_err_grads']:.1e}"
            print(msg, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
