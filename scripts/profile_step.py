"""Where does a training step's time go? Times the step and its parts on one real batch.

    python scripts/profile_step.py [--batch-size 256] [--out scripts/results/profile_step.json]

Parts timed (median of repeated calls, device-resident inputs): the full train step per
MatformerConv formulation and precision, the forward pass alone, the encoder's gathers
(forward + VJP) and the receiver segment sum, at the shapes of a pre-training batch built from
the shipped corpus. Used to decide what to optimise (see scripts/results/PERF_NOTES.md).
"""

from __future__ import annotations

import argparse
import json
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


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--records", type=int, default=4000)
    p.add_argument("--config", default="pretrain_mask30")
    p.add_argument("--out", default="scripts/results/profile_step.json")
    p.add_argument("--small", action="store_true")
    p.add_argument("--variants", nargs="+", default=["node:default", "node:highest", "node:bf16", "edge:default",
                                                      "edge:highest", "edge:bf16"], help="formulation:precision")
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
    mesh = make_mesh(1)
    batcher = loop.make_batcher(data.splits["train"], config, 1)
    host = next(batcher.iterate(seed=0, epoch=0))
    batch = put_batch(host, mesh)
    n_edge = int(host.edges["mask"].sum())
    n_node = int(host.nodes["mask"].sum())
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch_size": args.batch_size,
           "real_nodes": n_node, "real_edges": n_edge, "padded_nodes": int(host.nodes["mask"].shape[-1]),
           "padded_edges": int(host.edges["mask"].shape[-1]), "ms": {}}
    print(json.dumps({k: v for k, v in out.items() if k != "ms"}), flush=True)

    def step_time(formulation, precision):
        config.model.precision = precision
        config.model.formulation = formulation
        objective = loop.make_objective(config)
        model = objective.make_model()
        tx = make_optimizer(config.optim, 1000)
        example = jax.tree_util.tree_map(lambda x: x[0], host)
        state = put_replicated(create_state(model, tx, example, 0, stats), mesh)
        step = make_train_step(objective, model, tx, mesh)
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
        return float(np.median(ts)) * 1e3, compile_s

    for variant in args.variants:
        formulation, precision = variant.split(":")
        if True:
            try:
                ms, cs = step_time(formulation, precision)
                out["ms"][f"train_step_{formulation}_{precision}"] = ms
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
