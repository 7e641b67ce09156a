"""Where does a training step's time go? Times the step and its parts on one real batch.

    python scripts/profile_step.py [--batch-size 256] [--out scripts/results/profile_step.json]
    python scripts/profile_step.py --records 0 --num-devices 4 --batch-size 1024 \
        --variants node:default --trace     # data-parallel step: busy and NCCL time per device

Parts timed (median of repeated calls, device-resident inputs): the full train step per
MatformerConv formulation and precision, the forward pass alone, the encoder's gathers
(forward + VJP) and the receiver segment sum, at the shapes of a pre-training batch built from
the shipped corpus. Used to decide what to optimise (see scripts/results/PERF_NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timeit(fn, *args, n=20, warmup=3):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def _op_names(hlo_text: str) -> dict:
    """HLO instruction name -> the model code it came from (its metadata op_name)."""
    import re

    names = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        names.setdefault(m.group(1), m.group(2))
        # the GPU names a fusion's kernel after the instruction with "." and "-" as "_"
        names.setdefault(re.sub(r"[.\-]", "_", m.group(1)), m.group(2))
    return names


def trace_kernels(run_steps, hlo_text: str, steps: int, top: int) -> dict:
    """Device time per step by kernel, from a `jax.profiler` trace of `run_steps()`
    (which runs `steps` steps): total busy ms/step and the `top` kernels with the HLO op and
    model code each came from."""
    import glob
    import gzip
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(run_steps())
        path = sorted(glob.glob(f"{d}/plugins/profile/*/*.trace.json.gz"))[-1]
        events = json.load(gzip.open(path))["traceEvents"]
    return summarise_trace(events, hlo_text, steps, top)


def _union_ms(intervals: list) -> float:
    """Total length (ms) of the union of (start, end) intervals in microseconds: kernels of one
    device that overlap on different streams count once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


COLLECTIVE_OPS = ("all-reduce", "all_reduce", "all-gather", "all_gather", "reduce-scatter", "reduce_scatter",
                  "all-to-all", "all_to_all", "collective", "psum")


def summarise_trace(events: list, hlo_text: str, steps: int, top: int) -> dict:
    """Chrome-trace events of `steps` steps -> device time per step: kernels by HLO op (summed
    kernel time, mean over the devices), and per device the time some kernel runs (`busy`, the
    union over streams), the time some collective (NCCL) kernel runs, and the time from its
    first kernel to its last divided by `steps` (`first_to_last`: includes the gaps between
    steps, so it is the step period rather than a step's own span)."""
    import collections

    pnames = {e["pid"]: e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in pnames.items() if "/device:" in n and "CPU" not in n.upper()}
    tnames = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in device_pids}
    # kernels live on the "Stream #k" lines; "XLA Ops"/"XLA Modules" lines repeat them as spans
    streams = {k for k, n in tnames.items() if n.startswith("Stream")} or set(tnames)
    per_kernel = collections.defaultdict(lambda: [0.0, 0, ""])
    per_device = collections.defaultdict(lambda: {"kernels": [], "collectives": []})
    for e in events:
        if e.get("ph") != "X" or (e["pid"], e.get("tid")) not in streams:
            continue
        args_ = e.get("args", {})
        hlo_op = args_.get("hlo_op", "")
        # inside a CUDA graph (XLA command buffer) every kernel carries the buffer's hlo_op:
        # the kernel's own name (XLA names it after its fusion) tells them apart
        key = e["name"] if not hlo_op or hlo_op.startswith("command_buffer") else hlo_op
        k = per_kernel[key]
        k[0] += e["dur"] / 1e3 / steps
        k[1] += 1
        k[2] = k[2] or e["name"]
        d = per_device[pnames[e["pid"]]]
        span = (e["ts"], e["ts"] + e["dur"])
        d["kernels"].append(span)
        if "nccl" in e["name"].lower() or any(c in hlo_op for c in COLLECTIVE_OPS):
            d["collectives"].append(span)
    n_dev = max(len(per_device), 1)
    devices = {name: {"busy_ms_per_step": _union_ms(d["kernels"]) / steps,
                      "collective_ms_per_step": _union_ms(d["collectives"]) / steps,
                      "first_to_last_ms_per_step": (max(b for _, b in d["kernels"]) - min(a for a, _ in d["kernels"]))
                      / 1e3 / steps}
               for name, d in sorted(per_device.items())}
    busy = sum(d["busy_ms_per_step"] for d in devices.values()) / n_dev  # mean over devices
    ops = _op_names(hlo_text)
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    return {"device_busy_ms_per_step": busy, "devices": devices,
            "kernels_per_step": sum(v[1] for v in per_kernel.values()) / steps / n_dev,
            "device_processes": [pnames[p] for p in device_pids],
            "device_lines": sorted(set(tnames.values()))[:20],
            "top": [{"hlo_op": k, "kernel": v[2][:80], "ms_per_step": v[0] / n_dev,
                     "launches_per_step": v[1] / steps / n_dev,
                     "source": ops.get(k, "")[-140:]} for k, v in rows[:top]]}


def format_kernels(t: dict) -> str:
    lines = [f"  device busy {t['device_busy_ms_per_step']:.2f} ms/step over "
             f"{t['kernels_per_step']:.0f} kernel launches/step ({t['device_processes']})"]
    for name, d in t.get("devices", {}).items():
        lines.append(f"  {name[-24:]}: busy {d['busy_ms_per_step']:.3f} ms/step, collectives "
                     f"{d['collective_ms_per_step']:.3f}, first to last kernel / steps {d['first_to_last_ms_per_step']:.3f}")
    for r in t["top"]:
        lines.append(f"  {r['ms_per_step']:7.3f} ms x{r['launches_per_step']:.0f} {r['hlo_op'][:28]:28s} "
                     f"{r['source'][-90:]}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--records", type=int, default=4000)
    p.add_argument("--config", default="pretrain_mask30")
    p.add_argument("--out", default="scripts/results/profile_step.json")
    p.add_argument("--small", action="store_true")
    p.add_argument("--variants", nargs="+", default=["node:default", "node:highest", "node:bf16", "edge:default",
                                                      "edge:highest", "edge:bf16"],
                   help="formulation[+kernel]:precision, e.g. node:default (the config's model.edge_kernel, "
                        "'auto'), node+xla:default (jax.numpy), node+pallas_gate_rows-16x4:default")
    p.add_argument("--trace", nargs="*", default=None,
                   help="also capture a profiler trace of these variants (all timed ones if empty) and "
                        "write the top device kernels per step, mapped to model code, into --out")
    p.add_argument("--top", type=int, default=25, help="kernels listed per traced variant")
    p.add_argument("--num-devices", type=int, default=1,
                   help="data-parallel over this many devices (the trace then reports each device; "
                        "kernel times in --top are means over devices)")
    args = p.parse_args(argv)

    import importlib

    from dpf_jax.train import loop
    from dpf_jax.train.optim import make_optimizer
    from dpf_jax.train.parallel import make_mesh, put_batch, put_replicated
    from dpf_jax.train.step import create_state, make_train_step
    from dpf_jax.model import layers

    config = importlib.import_module(f"configs.{args.config}").get_config()
    config.data.max_records = args.records
    config.train.batch_size = args.batch_size
    if args.small:
        config.model.num_layers, config.model.channels, config.model.heads = 1, 16, 1
    data = loop.load_data(config)
    stats = loop.data_stats(config, data)
    mesh = make_mesh(args.num_devices)
    batcher = loop.make_batcher(data.splits["train"], config, args.num_devices)
    host = next(batcher.iterate(seed=0, epoch=0))
    batch = put_batch(host, mesh)
    n_edge = int(host.edges["mask"].sum())
    n_node = int(host.nodes["mask"].sum())
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch_size": args.batch_size,
           "num_devices": args.num_devices, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "real_nodes": n_node, "real_edges": n_edge, "padded_nodes": int(host.nodes["mask"].shape[-1]),
           "padded_edges": int(host.edges["mask"].shape[-1]), "ms": {}}
    print(json.dumps({k: v for k, v in out.items() if k != "ms"}), flush=True)

    config_kernel = config.model.edge_kernel  # a variant without "+<kernel>" keeps the config's ("auto")

    def step_time(formulation, precision):
        config.model.precision = precision
        config.model.formulation, _, kernel = formulation.partition("+")  # "node+xla", "node+pallas_gate_rows"
        config.model.edge_kernel = kernel or config_kernel
        objective = loop.make_objective(config)
        model = objective.make_model()
        tx = make_optimizer(config.optim, 1000)
        example = jax.tree_util.tree_map(lambda x: x[0], host)
        state = put_replicated(create_state(model, tx, example, 0, stats), mesh)
        step = make_train_step(objective, model, tx, mesh, flat_update=loop.flat_update_enabled(config))
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        compile_s = time.perf_counter() - t0

        def run(state):
            for _ in range(5):
                state, m = step(state, batch)
            return state, m

        ts = []
        for _ in range(6):
            t = time.perf_counter()
            state, m = run(state)
            jax.block_until_ready(m["loss"])
            ts.append((time.perf_counter() - t) / 5)
        traced = None
        if args.trace is not None and (not args.trace or f"{formulation}:{precision}" in args.trace):
            hlo = step.lower(state, batch).compile().as_text()
            traced = trace_kernels(lambda: run(state), hlo, steps=5, top=args.top)
        return float(np.median(ts)) * 1e3, compile_s, traced

    for variant in args.variants:
        formulation, precision = variant.split(":")
        try:
            ms, cs, traced = step_time(formulation, precision)
            out["ms"][f"train_step_{formulation}_{precision}"] = ms
            if traced is not None:
                out.setdefault("kernels", {})[f"{formulation}_{precision}"] = traced
                print(format_kernels(traced), flush=True)
            print(f"train step {formulation:5s} {precision:8s} {ms:8.2f} ms  "
                  f"({args.batch_size / ms * 1e3:8.0f} crystals/s; compile {cs:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"train step {formulation} {precision} failed: {e}", flush=True)

    # parts, at the shapes of this batch
    H, C = config.model.heads, config.model.channels
    N, E = host.nodes["mask"].shape[-1], host.edges["mask"].shape[-1]
    recv = jnp.asarray(host.receivers[0])
    send = jnp.asarray(host.senders[0])
    key = jax.random.PRNGKey(0)
    tab5 = jax.random.normal(key, (N, H, 5 * C))
    tab4 = jax.random.normal(key, (N, H, 4 * C))
    msg = jax.random.normal(key, (E, H * C))

    def g_recv(t):
        return layers.gather(t, recv)

    def g_send(t):
        return layers.gather(t, send)

    parts = {
        "gather_recv_fwd": (jax.jit(g_recv), tab5),
        "gather_recv_fwd_bwd": (jax.jit(jax.grad(lambda t: jnp.sum(g_recv(t) ** 2))), tab5),
        "gather_send_fwd": (jax.jit(g_send), tab4),
        "gather_send_fwd_bwd": (jax.jit(jax.grad(lambda t: jnp.sum(g_send(t) ** 2))), tab4),
        "segment_sum_recv": (jax.jit(lambda m: layers.segment_sum_sorted(m, recv, N)), msg),
        "segment_sum_recv_unsorted_hint": (jax.jit(lambda m: jax.ops.segment_sum(m, recv, N)), msg),
        "dense_E_x_384_x_128": (jax.jit(lambda a, w: jnp.einsum("ehc,cd->ehd", a, w)),
                                jax.random.normal(key, (E, H, 3 * C)), jax.random.normal(key, (3 * C, C))),
    }
    for name, (fn, *xs) in parts.items():
        ms = timeit(fn, *xs)
        out["ms"][name] = ms
        print(f"{name:32s} {ms:8.3f} ms", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
