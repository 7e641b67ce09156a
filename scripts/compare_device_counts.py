"""Does data-parallel training follow one-device training? Per-step losses on 1 vs N devices.

    python scripts/compare_device_counts.py                          # pretrain_mask30, first epoch,
                                                                     # 1 device vs all visible ones
    python scripts/compare_device_counts.py --devices 1 2 4 --steps 50
    python scripts/compare_device_counts.py --small --steps 3        # CPU smoke run (tiny model)
    python scripts/compare_device_counts.py --devices 1 --edge-kernels xla   # the config's edge
                                                                     # kernel ("auto") vs "xla"
    python scripts/compare_device_counts.py --devices 1 4 --set train.cuda_graphs=auto \
        --cuda-graphs concurrent                                     # any config field; one device
                                                                     # with other train.cuda_graphs

For each device count, in one process: the config's own training step (as train/loop.py builds
it, `loop.build_run_step`), its optimiser schedule, the same seed and initial parameters, and
the same global batches (the global batch is split over the devices; BatchNorm statistics and
the loss are global), for the
first `--steps` steps of epoch 0 (default: the whole epoch). Records the loss of every step and
reports, per device count, the largest relative deviation from the one-device curve. The
curves drift apart slowly (float summation order differs between device counts, and training
amplifies it), so the report gives the deviation over the first 10 steps and over all steps.
`--edge-kernels K ...` also runs one device with each `model.edge_kernel` K and reports its
deviation from the one-device curve of the config's own kernel the same way: the check that a
fused kernel trains like jax.numpy on real batches (same maths, other float summation order).
`--cuda-graphs M ...` does the same with `train.cuda_graphs` (which should change no number:
only how the kernels overlap). `--set KEY=VALUE` changes a config field for every run.
Writes a JSON report (`--out`).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def loss_curve(config, data, stats, num_devices: int, steps: int) -> list[float]:
    import jax

    from dpf_jax.train import loop
    from dpf_jax.train.optim import make_optimizer
    from dpf_jax.train.parallel import make_mesh, prefetch_to_device, put_replicated
    from dpf_jax.train.step import create_state, split_seed

    mesh = make_mesh(num_devices)
    _, run_key = split_seed(config.seed)
    n_train = len(data.splits["train"])
    drop, steps_per_epoch = loop.epoch_steps(n_train, config.train.batch_size)
    key_fn = lambda e, b: jax.random.fold_in(run_key, e * steps_per_epoch + b)  # noqa: E731 - as loop.py
    batcher = loop.make_batcher(data.splits["train"], config, num_devices, key_fn=key_fn)
    objective = loop.make_objective(config)
    model = objective.make_model()
    tx = make_optimizer(config.optim, steps_per_epoch * config.train.epochs)
    example = jax.tree_util.tree_map(lambda x: x[0], next(batcher.iterate(shuffle=False)))
    state = put_replicated(create_state(model, tx, example, config.seed, stats), mesh)
    # the step exactly as train/loop.py runs it: packed state, bundled batches, packed metrics
    run = loop.build_run_step(config, objective, model, tx, mesh, state,
                              lambda: next(batcher.iterate(shuffle=False)))
    carried, metrics = run.pack(state), []
    batches = map(run.bundle, batcher.iterate(config.seed, 0, shuffle=True, drop_remainder=drop))
    for host_batch in prefetch_to_device(batches, mesh, 2):
        if len(metrics) >= steps:
            break
        carried, m = run.step(carried, host_batch)
        metrics.append(m)  # fetched at the end: no host sync inside the loop
    unpack = run.unpack_metrics or (lambda m: m)
    return [float(unpack(m)["loss"]) for m in jax.device_get(metrics)]


def max_rel_dev(curve, ref) -> float:
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(curve, ref))


# one-device variants of the config: option -> (report key prefix, config field)
VARIANTS = {"edge_kernels": ("edge_kernel", "model.edge_kernel"), "cuda_graphs": ("cuda_graphs", "train.cuda_graphs")}


def make_report(device_kind: str, args, config, steps: int, curves: dict, wall: dict,
                variant_curves: dict | None = None) -> dict:
    """The JSON report of the device counts (1 first: the reference curve) and the one-device
    variants (`VARIANTS`: {option: {value: curve}}) run so far."""
    from dpf_jax.train import loop
    from dpf_jax.train.objectives import resolved_edge_kernel
    from dpf_jax.train.parallel import make_mesh, resolve_cuda_graphs

    ref = curves[1]
    report = {"device": device_kind, "config": args.config, "small": args.small,
              "batch_norm_stats": config.model.get("batch_norm_stats", ""),
              "merge_edges": loop._graph_params(config).merge_edges,  # graph.merge_edges as resolved
              "edge_kernel": resolved_edge_kernel(config.model),  # as it ran
              "cuda_graphs": {str(n): resolve_cuda_graphs(config.train.cuda_graphs, make_mesh(n),
                                                          config.train.batch_size) for n in curves},
              "overrides": list(args.set or []),
              "global_batch": config.train.batch_size, "steps": steps,
              "loss_curves": {str(n): c for n, c in curves.items()},
              "wall_s": {str(n): w for n, w in wall.items()}, "max_rel_dev_first_10_steps": {},
              "max_rel_dev_all_steps": {}}
    for n, curve in curves.items():
        if n != 1:
            report["max_rel_dev_first_10_steps"][str(n)] = max_rel_dev(curve[:10], ref[:10])
            report["max_rel_dev_all_steps"][str(n)] = max_rel_dev(curve, ref)
    for option, by_value in (variant_curves or {}).items():  # one device, another value, against the config's
        prefix = VARIANTS[option][0]
        report[f"{prefix}_curves"] = by_value
        report[f"{prefix}_max_rel_dev_first_10_steps"] = {k: max_rel_dev(c[:10], ref[:10]) for k, c in by_value.items()}
        report[f"{prefix}_max_rel_dev_all_steps"] = {k: max_rel_dev(c, ref) for k, c in by_value.items()}
    return report


def main(argv=None) -> dict:
    from dpf_jax.train.parallel import CUDA_GRAPH_MODES  # imports JAX, starts no backend

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pretrain_mask30")
    p.add_argument("--devices", nargs="+", type=int, default=None, help="device counts (default: 1 and all)")
    p.add_argument("--steps", type=int, default=0, help="steps of epoch 0 to compare (default: all)")
    p.add_argument("--records", type=int, default=0, help="use only the first N records (0 = all)")
    p.add_argument("--small", action="store_true", help="tiny model and data (CPU smoke run)")
    p.add_argument("--edge-kernels", nargs="*", default=[],
                   help="also one device with each of these model.edge_kernel values, compared with the "
                        "config's own kernel on one device")
    p.add_argument("--cuda-graphs", nargs="*", default=[], choices=CUDA_GRAPH_MODES,
                   help="also one device with each of these train.cuda_graphs values, compared the same way")
    p.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE", help="config field overrides (all runs)")
    p.add_argument("--out", default="scripts/results/compare_device_counts.json")
    args = p.parse_args(argv)

    from dpf_jax.cli import apply_config_override
    from dpf_jax.train import loop

    config = importlib.import_module(f"configs.{args.config}").get_config()
    config.init_checkpoint = ""
    if args.small:
        config.model.num_layers, config.model.channels, config.model.heads = 2, 16, 2
        config.model.rbf_bins = 16
        config.train.batch_size = 32
        config.data.max_records = args.records or 160
        config.data.cache_dir = ""
    elif args.records:
        config.data.max_records = args.records
    for item in args.set or []:  # after --small: an explicit field wins
        apply_config_override(config, item)
    data = loop.load_data(config)  # before JAX starts its backends (graph workers are forked)
    stats = loop.data_stats(config, data)

    import jax

    counts = args.devices or sorted({1, len(jax.devices())})
    if 1 not in counts:
        counts = [1] + counts
    steps = args.steps or loop.epoch_steps(len(data.splits["train"]), config.train.batch_size)[1]
    curves, wall = {}, {}
    for n in counts:
        t0 = time.time()
        curves[n] = loss_curve(config, data, stats, n, steps)
        wall[n] = time.time() - t0
        print(f"{n} device(s): {len(curves[n])} steps, loss {curves[n][0]:.5g} -> {curves[n][-1]:.5g} "
              f"({wall[n]:.1f} s incl. compilation)", flush=True)
        # written after every device count: a run cut short (a time limit) keeps the curves it has
        report = make_report(jax.devices()[0].device_kind, args, config, steps, curves, wall)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    variant_curves = {}
    for option, (prefix, field) in VARIANTS.items():
        for value in getattr(args, option):
            t0 = time.time()
            other = copy.deepcopy(config)
            apply_config_override(other, f"{field}={value}")
            variant_curves.setdefault(option, {})[value] = loss_curve(other, data, stats, 1, steps)
            wall[f"1:{prefix}={value}"] = time.time() - t0
            report = make_report(jax.devices()[0].device_kind, args, config, steps, curves, wall, variant_curves)
            Path(args.out).write_text(json.dumps(report, indent=1))
    for n in counts[1:]:
        print(f"{n} vs 1 device(s): max relative loss deviation {report['max_rel_dev_first_10_steps'][str(n)]:.2e} "
              f"(first 10 steps), {report['max_rel_dev_all_steps'][str(n)]:.2e} (all {len(curves[1])} steps)")
    for option, by_value in variant_curves.items():
        prefix = VARIANTS[option][0]
        for value in by_value:
            print(f"{VARIANTS[option][1]}={value} vs the config's (1 device): max relative loss deviation "
                  f"{report[f'{prefix}_max_rel_dev_first_10_steps'][value]:.2e} (first 10 steps), "
                  f"{report[f'{prefix}_max_rel_dev_all_steps'][value]:.2e} (all {len(curves[1])} steps)")
    return report


if __name__ == "__main__":
    main()
