"""Where the compiled training step's memory traffic goes, per layer and per padded edge (any
backend; no timing).

    python scripts/step_bytes.py --batch-sizes 256 1024               # compile pretrain_mask30 here
    python scripts/step_bytes.py --batch-sizes 256 --shuffle --budgets 2176x48128 2176x49152   # chosen shapes
    python scripts/step_bytes.py --hlo scripts/results/h200x4_session9/hlo_*.txt.gz   # saved programs

The step is bound by memory traffic over per-edge tensors (PERF_NOTES.md), and XLA chooses its
fusions per shape: the same step code compiled at two padding budgets can move different numbers
of bytes per edge (session 9: 253 KB per edge and layer at a B=256 budget on an H200, 217-223 KB
at B=512 and B=1024 budgets). For every top-level instruction of the optimised program (fusion,
library call, copy, collective) this counts the bytes of its operands and results (the traffic if
each is read or written once; cuBLAS workspaces not counted), groups them by message-passing
layer (the `att_layers_<k>` in the op_name metadata), direction (forward, or backward where
autodiff's `transpose(` is in the op_name) and kind (kLoop / kInput fusion, a Triton fusion's
backend kind, cublas, ...), and divides by the padded edges of the batch. The per-layer numbers
compare programs with each other; they are an upper-bound model of traffic (a gather's operand
counts whole), not a timing. Writes a JSON file (`--out`); `--save-hlo` keeps the programs.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import count_step_ops  # noqa: E402  (scripts/ is not a package)

ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                 "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}
ARRAY = re.compile(r"\b(" + "|".join(ELEMENT_BYTES) + r")\[([\d,]*)\]")


def array_bytes(type_text: str, first_only: bool = False) -> int:
    """Bytes of an HLO type: an array `f32[8,4]{1,0}` or a tuple of them (all, or the first)."""
    total = 0
    for dtype, dims in ARRAY.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * ELEMENT_BYTES[dtype]
        if first_only:
            break
    return total


def entry_instructions(hlo_text: str) -> list[dict]:
    """Top-level instructions of an optimised HLO module's ENTRY computation, with the bytes of
    their results and operands, their kind and their op_name metadata."""
    result_bytes, rows = {}, []
    for line, (name, type_text, opcode, rest) in count_step_ops.entry_instructions(hlo_text):
        target = re.search(r'custom_call_target="([^"]*)"', line)
        # a library call's tuple result is (output, workspace): the workspace is scratch, not traffic
        out = array_bytes(type_text, first_only=opcode == "custom-call" and type_text.startswith("("))
        result_bytes[name] = out
        operands = rest.split("), kind=")[0] if opcode == "fusion" else rest.split(")")[0]
        kind = opcode
        if opcode == "fusion":
            kind = re.search(r"kind=(k\w+)", line).group(1)
            backend_kind = re.search(r'"kind":"([^"]+)"', line)
            if kind == "kCustom" and backend_kind:
                kind = backend_kind.group(1)
        elif target:
            kind = "cublas" if "cublas" in target.group(1) else target.group(1)
        op_name = re.search(r'op_name="([^"]*)"', line)
        rows.append({"name": name, "opcode": opcode, "kind": kind, "type": type_text, "out_bytes": out,
                     "in_bytes": sum(result_bytes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", operands)),
                     "op_name": op_name.group(1) if op_name else ""})
    return rows


def padded_edges(hlo_text: str) -> int:
    """Padded edges of the batch the program was compiled for (per device): the last dimension
    of the `batch.senders` parameter."""
    m = re.search(r"=\s*s32\[([\d,]+)\]\S*\s+parameter\(\d+\).*op_name=\"batch\.senders\"", hlo_text)
    if not m:
        raise ValueError("no batch.senders parameter in this HLO module (not a training step?)")
    return int(m.group(1).split(",")[-1])


def summarise(hlo_text: str, list_layer: int = 2) -> dict:
    """Bytes per padded edge: whole step, each message-passing layer, and by (direction, kind)
    averaged over the layers; plus the instructions of layer `list_layer` above 1 KB per edge."""
    n_edge = padded_edges(hlo_text)
    rows = [r for r in entry_instructions(hlo_text) if r["opcode"] not in NO_TRAFFIC]
    per_layer = collections.defaultdict(float)
    by_kind = collections.defaultdict(float)
    listing = []
    for r in rows:
        layer = re.search(r"att_layers_(\d+)", r["op_name"])
        if not layer:
            continue
        kb = (r["out_bytes"] + r["in_bytes"]) / n_edge / 1e3
        direction = "backward" if "transpose(" in r["op_name"] else "forward"
        per_layer[int(layer.group(1))] += kb
        by_kind[f"{direction} {r['kind']}"] += kb
        if int(layer.group(1)) == list_layer and kb >= 1.0:
            listing.append({"kb_per_edge": round(kb, 2), "direction": direction, "kind": r["kind"],
                            "result": r["type"][:60], "op": r["op_name"].split(f"att_layers_{list_layer}")[-1][-80:]})
    n_layers = max(len(per_layer), 1)
    total = sum(r["out_bytes"] + r["in_bytes"] for r in rows)
    return {"padded_edges": n_edge, "instructions": len(rows),
            "kb_per_edge_step": round(total / n_edge / 1e3, 1),
            "kb_per_edge_layer": {k: round(v, 1) for k, v in sorted(per_layer.items())},
            "kb_per_edge_layer_mean_by_kind": {k: round(v / n_layers, 1) for k, v in sorted(by_kind.items())},
            f"layer_{list_layer}_instructions": listing}


def compile_and_summarise(config: str, batch_size: int, records: int, num_devices: int, list_layer: int,
                          save_hlo: str | None, budget: tuple[int, int] | None = None, overrides=(),
                          shuffle: bool = False) -> dict:
    import jax

    from dpf_jax.data.batching import Budget
    from dpf_jax.train.budget_search import bytes_accessed

    budgets = [Budget(budget[0], budget[1], batch_size // num_devices + 1)] if budget else None
    compiled, batch, _ = count_step_ops.compile_step(config, batch_size, records, True, num_devices, budgets, overrides,
                                                     shuffle)
    text = compiled.as_text()
    xla_bytes = bytes_accessed(compiled)
    row = {"config": config, "batch_size": batch_size, "num_devices": num_devices, "set": list(overrides),
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "padded_nodes": int(jax.tree_util.tree_leaves(batch.nodes)[0].shape[-1]),
           "xla_bytes_accessed_per_edge_kb": None, **summarise(text, list_layer)}
    if xla_bytes > 0:  # nan (no cost analysis) compares False
        row["xla_bytes_accessed_per_edge_kb"] = round(xla_bytes / row["padded_edges"] / 1e3, 1)
    if save_hlo:
        Path(save_hlo).mkdir(parents=True, exist_ok=True)
        path = Path(save_hlo) / f"hlo_B{batch_size}_N{row['padded_nodes']}_E{row['padded_edges']}.txt.gz"
        with gzip.open(path, "wt") as f:
            f.write(text)
        row["hlo"] = str(path)
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hlo", nargs="+", default=None, help="saved optimised HLO texts (.txt or .txt.gz) to analyse")
    p.add_argument("--config", default="pretrain_mask30")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    p.add_argument("--records", type=int, default=0,
                   help="dataset records to load (0: all, so the first batch has the budgets bench_train.py times)")
    p.add_argument("--num-devices", type=int, default=1)
    p.add_argument("--budgets", nargs="+", default=None, metavar="NODESxEDGES",
                   help="pad the first batch to each of these per-device budgets in turn (e.g. 2176x47104: "
                        "how the program depends on the padded shape; a batch that does not fit is an "
                        "error); default: the batcher's own")
    p.add_argument("--shuffle", action="store_true",
                   help="the first batch of the seed-0 shuffled epoch (a typical one) instead of the first "
                        "in file order")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, as bench_train.py's (e.g. model.edge_kernel=xla_recompute)")
    p.add_argument("--layer", type=int, default=2, help="message-passing layer whose instructions are listed")
    p.add_argument("--save-hlo", default=None, help="folder for the compiled programs (.txt.gz)")
    p.add_argument("--out", default=str(REPO / "scripts" / "results" / "step_bytes.json"))
    args = p.parse_args(argv)
    rows = []
    if args.hlo:
        for path in args.hlo:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                rows.append({"hlo": path, **summarise(f.read(), args.layer)})
    else:
        budgets = [tuple(int(x) for x in b.lower().split("x")) for b in args.budgets] if args.budgets else [None]
        rows = [compile_and_summarise(args.config, b, args.records, args.num_devices, args.layer, args.save_hlo, budget,
                                      args.set, args.shuffle)
                for b in args.batch_sizes for budget in budgets]
    for r in rows:
        layers = r["kb_per_edge_layer"]
        print(f"{r.get('hlo') or 'B=%d' % r['batch_size']}: {r.get('padded_nodes', '?')} x {r['padded_edges']} padded, "
              f"{r['kb_per_edge_step']} KB/edge per step, per layer "
              f"{', '.join(str(v) for v in layers.values())} KB/edge", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
