"""Registers, spills, layout conversions and barriers of the Pallas (Triton) kernels, without a GPU.

Lowers the gate-row kernel pair (forward, backward: per edge, receiver-run or slot form), the segment
kernels and the message-sum pair on the CPU for CUDA (the same Triton IR the GPU build gets),
keeps each kernel's Triton IR, and, where the `triton` package is installed (`pip install
triton`; it brings its own ptxas), compiles the IR for sm_90a with the kernel's warps and
reports what Triton's own ptxas run allots (registers per thread, spill bytes) and what Triton
laid out (layout conversions, most of them a trip through shared memory, and barriers in the
PTX). The Triton inside XLA is another version, so the numbers guide rather than measure: in
session 26 they came within ~15% of ncu's on an H100 and lower (receiver-run backward 255
registers with spills in both, gate forward 64 here and 74 there, message-sum backward 146 and
166, segment kernel 48 and 54). A kernel lowered twice in one pair (the receiver and the sender
segment kernels of "-sorted") is reported as "segment_rows" and "segment_rows#2", in the order
the program runs them.

    python scripts/kernel_registers.py                         # the defaults' tiles
    python scripts/kernel_registers.py --tiles 16x8x4-sorted-runs 16x8-sorted
    python scripts/kernel_registers.py --ir-only --ir-dir /tmp/ttir   # the IR alone, no triton

Register pressure matters because these kernels are bound by memory latency: a kernel with 255
registers per thread at 4 warps keeps 8 warps per multiprocessor (12.5% occupancy), too few
loads in flight to reach the card's bandwidth (ncu, session 26: 52% of DRAM bandwidth for the
receiver-run backward, 76% for the forward at 74 registers and 37.5% occupancy).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_edge_kernel as bench  # noqa: E402 - its input makers

from dpf_jax.model.edge_kernel import KernelOptions, _compiler_params  # noqa: E402
from dpf_jax.model.gate_kernel import fused_gate_rows  # noqa: E402
from dpf_jax.model.message_sum_kernel import fused_message_sum  # noqa: E402

DEFAULT_TILES = ["16x8-keep-joint-mres-sorted", "16x8x4-keep-joint-mres-sorted-slots-slotsum", "16x8-sorted",
                 "16x8x4-sorted-slots-slotsum"]


def kernel_warps(name: str, opts: KernelOptions) -> int:
    """The warps `edge_kernel._compiler_params` gives kernel `name`: the segment kernel's
    ("segment_rows"), a forward kernel's (names ending in "_fwd") or a backward-pass kernel's."""
    if name.split("#")[0] == "segment_rows":
        return _compiler_params(opts, segment=True).num_warps
    return _compiler_params(opts, backward=not name.endswith("_fwd")).num_warps


def lower_kernels(spec: str, n_edge: int = 4096, heads: int = 4, channels: int = 128) -> dict[str, dict]:
    """Triton IR and warps of every kernel in the training step's gate (and, with "-sum", message-sum)
    pair for the edge kernel `spec` ("pallas_gate_rows-<tile>..."), lowered on this machine for CUDA:
    {kernel name (a repeated name numbered "#2", ...): {"ir": text, "num_warps": n}}. Where the lowered
    program shows the warps in plain text (jax 0.10's custom call), they are checked against
    `kernel_warps`."""
    from jax._src.pallas.triton import lowering

    opts = KernelOptions.parse(spec, interpret=False)
    captured = []
    original = lowering.lower_jaxpr_to_triton_module

    def keep_ir(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = keep_ir
    try:
        texts = []
        gate_inputs = bench.make_rows_inputs(n_edge, heads, channels)
        gate_loss = lambda *a: jnp.sum(fused_gate_rows(*a, opts=opts) ** 2)  # noqa: E731
        texts.append(jax.jit(jax.grad(gate_loss, argnums=bench.ROWS_DIFF)).trace(*gate_inputs)
                     .lower(lowering_platforms=("cuda",)).as_text())
        if opts.message_sum:
            sum_inputs = bench.make_sum_inputs(n_edge, heads, channels)
            n_node = bench._sum_nodes(n_edge)
            sum_loss = lambda *a: jnp.sum(fused_message_sum(*a, n_node, opts) ** 2)  # noqa: E731
            texts.append(jax.jit(jax.grad(sum_loss, argnums=bench.SUM_DIFF)).trace(*sum_inputs)
                         .lower(lowering_platforms=("cuda",)).as_text())
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    shown = {}  # kernel name -> num_warps, where the custom calls' backend configs show them
    for text in texts:  # (the configs' serialised IR may hold any character: match the fields after it)
        for name, nw in re.findall(r'name = "([A-Za-z0-9_]+)", num_stages = \d+ : i32, num_warps = (\d+) : i32', text):
            shown[name] = int(nw)
    kernels = {}
    for ir in captured:
        name = re.search(r"tt\.func public @([A-Za-z0-9_]+)", ir).group(1)
        warps = kernel_warps(name, opts)
        if name in shown and shown[name] != warps:
            raise RuntimeError(f"{spec}: kernel {name} was lowered with {shown[name]} warps, expected {warps}")
        key, n = name, 1
        while key in kernels:
            n += 1
            key = f"{name}#{n}"
        kernels[key] = {"ir": ir, "num_warps": warps}
    return kernels


def compile_report(ir: str, num_warps: int, arch: int = 90) -> dict:
    """Registers and spill bytes (from the ptxas run inside Triton's own compile, `-v` log), and the
    layout conversions and barriers, of one kernel's Triton IR compiled by the installed `triton`
    for sm_<arch>a."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as XLA's Triton (fused multiply-adds)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its ptxas -v log ...
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ... which a hit in its cache would skip
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(log):
        src = Path(tmp) / "kernel.ttir"
        src.write_text(ir)
        compiled = triton.compile(str(src), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": 1})
    ptx, out = compiled.asm["ptx"], log.getvalue()
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    if regs is None:
        raise RuntimeError(f"no register count in Triton's ptxas log: {out[-1000:]!r}")
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spills.group(1)) if spills else 0,
            "layout_conversions": compiled.asm["ttgir"].count("ttg.convert_layout"),
            "barriers": len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", ptx)), "triton": triton.__version__}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", nargs="+", default=DEFAULT_TILES,
                   help="pallas_gate_rows tiles and flags, e.g. 16x8x4-sorted-runs-sum")
    p.add_argument("--edges", type=int, default=4096, help="edges of the lowered inputs (the kernels do not "
                   "depend on it beyond their grid)")
    p.add_argument("--ir-only", action="store_true", help="lower and save the IR only (no triton needed)")
    p.add_argument("--ir-dir", default=None, help="write each kernel's Triton IR here (<tile>_<kernel>.ttir)")
    p.add_argument("--out", default=None, help="JSON report")
    args = p.parse_args(argv)
    report = {"jax": jax.__version__, "results": []}
    for tile in args.tiles:
        for name, kernel in lower_kernels(f"pallas_gate_rows-{tile}", args.edges).items():
            row = {"tile": tile, "kernel": name, "num_warps": kernel["num_warps"], "ir_lines": kernel["ir"].count("\n")}
            if args.ir_dir:
                Path(args.ir_dir).mkdir(parents=True, exist_ok=True)
                (Path(args.ir_dir) / f"{tile}_{name}.ttir").write_text(kernel["ir"])
            if not args.ir_only:
                try:
                    row.update(compile_report(kernel["ir"], kernel["num_warps"]))
                except Exception as ex:  # noqa: BLE001 - report and go on with the other kernels
                    row["error"] = f"{type(ex).__name__}: {ex}"[:500]
            report["results"].append(row)
            stats = ("" if args.ir_only else f"  registers {row.get('registers')}, "
                     f"spills {row.get('spill_store_bytes')} B, conversions {row.get('layout_conversions')}, "
                     f"barriers {row.get('barriers')}"
                     + (f"  FAILED {row['error']}" if "error" in row else ""))
            print(f"{tile:28s} {name:26s} {row['num_warps']} warps{stats}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
