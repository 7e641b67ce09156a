"""Does a reduced-precision mode train like true float32? Compares validation curves on real data.

    python scripts/precision_check.py                      # GPU: default (TF32) and bf16 vs highest
    python scripts/precision_check.py --small --epochs 3   # CPU smoke version (tiny model)
    python scripts/precision_check.py --modes default+pallas bf16+pallas   # the fused edge kernel
    python scripts/precision_check.py --config pretrain_mask30 --epochs 20  # pre-training
    # several GPUs: one seed per GPU at once, then one verdict over all of them
    for s in 0 1 2; do CUDA_VISIBLE_DEVICES=$s python scripts/precision_check.py --seeds $s --out p$s.json & done; wait
    python scripts/precision_check.py --merge p0.json p1.json p2.json --out precision_check.json
    # one more mode later, with no rerun of "highest": --part runs exactly the modes given
    python scripts/precision_check.py --part --modes bf16 --seeds 0 --out b0.json

Trains the same config once per `model.precision` value and per seed (`--seeds`, default
0 1 2; config.seed = seed, so one seed gives the same initial parameters and data order in every
mode) and compares each mode with "highest" (true float32).

Metric. The validation curve is metrics.csv's `val_mae` (fine-tuning) or, when there is none,
`val_loss` (pre-training: the weighted total of the denoising losses). The final number is the
result's `test_mae_final` when there is one, else the last epoch's validation metric
(pre-training has no test split). The report names both (`metric`, `final_metric`).

Why not epoch by epoch, seed by seed. Near the one-cycle learning-rate peak the validation MAE
of a single run jumps 2-4x between adjacent epochs, and two runs that differ only in float
rounding part ways chaotically: on an H200 even TF32 ("default") deviated 270% from "highest"
at one epoch of one seed while its final test MAE was within 1.6%. A pointwise single-seed test
measures that chaos, not the precision. So the criterion averages over seeds and compares what
checkpoint selection sees, the best validation value so far, after the warm-up.

Criterion. With rtol (`--rtol`, default 0.05), a mode passes when
  (a) the mean over seeds of its final metric is within rtol of the mean over seeds of
      "highest": |mean_mode - mean_highest| <= rtol * mean_highest, and
  (b) its seed-mean best-so-far validation curve (np.minimum.accumulate over epochs per seed,
      then the mean over seeds) is within rtol of that of "highest" at every epoch from
      ceil(skip * epochs) on (`--skip`, default 0.5). Epochs before that window are reported
      but do not decide: the one-cycle schedule warms up to its peak at 30% of the epochs and
      the high-LR stretch after the peak is as chaotic (on the H200 run above, the best-so-far
      curves of "default" and "highest" were still 17% apart at 40%, 3.6% over the last 10
      epochs), so the test covers the annealing half, where checkpoints are chosen.
Seeds are paired by value. Also reported, not part of the verdict: each seed's raw pointwise
largest deviation from "highest" over all epochs (the old criterion), and, with >= 2 seeds, the
seed noise of "highest" itself: the relative standard deviation over seeds of its final metric
(ddof=1) and the largest relative deviation of a single seed's best-so-far curve from the
seed-mean curve in the same window. A mode whose deviation is within that noise cannot be told
apart from "highest" by this many seeds. Modes other than "default" are also compared with
"default" when it ran (same criterion, `*_vs_default` fields): a fused kernel at default
precision differs from XLA's default only in summation order, so that shows how much of a
deviation is the kernel's own. A run that stops (a non-finite loss or gradient) fails its
mode, and nothing passes against a stopped "highest". Writes a JSON report (`--out`),
rewritten after every run so that a killed check keeps what finished. Only modes that pass may be
quoted as verified in the performance table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# metrics.csv column of the validation curve, in order of preference
CURVE_METRICS = ("val_mae", "val_loss")


# ------------------------------------------------------------------------ reading a run

def read_val_curve(workdir: Path) -> tuple[str, list[float]]:
    """(column name, one value per epoch): `val_mae` when metrics.csv has it, else `val_loss`."""
    with open(workdir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for name in CURVE_METRICS:
        if rows and name in rows[0]:
            return name, [float(r[name]) for r in rows]
    raise ValueError(f"{workdir / 'metrics.csv'} has none of the columns {CURVE_METRICS}")


def final_value(result: dict, curve: list[float]) -> tuple[str, float]:
    """(name, value) of a run's final number: the final model's test MAE when the run has a
    test split (fine-tuning), else its last validation value (pre-training)."""
    if result.get("test_mae_final") is not None:
        return "test_mae_final", float(result["test_mae_final"])
    return "last_epoch_val", float(curve[-1])


# ------------------------------------------------------------------ the criterion (pure)

def rel_dev(value, reference):
    """|value - reference| / reference, elementwise (reference is a positive MAE or loss)."""
    reference = np.asarray(reference, np.float64)
    return np.abs(np.asarray(value, np.float64) - reference) / np.maximum(reference, 1e-12)


def best_so_far(curve) -> np.ndarray:
    """What checkpoint selection sees after each epoch: the lowest validation value so far."""
    return np.minimum.accumulate(np.asarray(curve, np.float64))


def seed_mean_best_so_far(curves_by_seed: dict) -> np.ndarray:
    """Mean over seeds of each seed's best-so-far curve."""
    return np.mean([best_so_far(c) for c in curves_by_seed.values()], axis=0)


def window_start(epochs: int, skip: float) -> int:
    """First epoch (0-based) the pointwise test covers: ceil(skip * epochs), rounded first so
    that e.g. 0.1 * 30 = 3.0000000000000004 gives 3; at least the last epoch is always tested."""
    return min(math.ceil(round(skip * epochs, 9)), epochs - 1)


def compare_pair(curves: dict, finals: dict, base_curves: dict, base_finals: dict,
                 rtol: float, skip: float) -> dict:
    """One mode (curves/finals: {seed: ...}) against a baseline mode trained with the same seeds
    (paired by seed; a mode judged on other seeds than its baseline is an error, not a verdict)."""
    if set(curves) != set(base_curves) or not curves:
        raise ValueError(f"seeds differ from the baseline's: {sorted(curves)} vs {sorted(base_curves)}")
    seeds = sorted(curves)
    mine, base = ({s: c[s] for s in seeds} for c in (curves, base_curves))
    epochs = len(base[seeds[0]])
    if any(len(c) != epochs for c in (*mine.values(), *base.values())):
        raise ValueError("curves of different lengths")
    start = window_start(epochs, skip)
    dev = rel_dev(seed_mean_best_so_far(mine), seed_mean_best_so_far(base))
    final_mean = float(np.mean([finals[s] for s in seeds]))
    base_final_mean = float(np.mean([base_finals[s] for s in seeds]))
    row = {
        "final_mean": final_mean,
        "final_mean_base": base_final_mean,
        "rel_dev_final_mean": float(rel_dev(final_mean, base_final_mean)),
        "max_rel_dev_best_so_far": float(dev[start:].max()),
        "worst_epoch_best_so_far": int(start + dev[start:].argmax()),
        # the excluded warm-up part, for context (0 when the window starts at epoch 0)
        "max_rel_dev_best_so_far_before_window": float(dev[:start].max()) if start else 0.0,
        # the old single-seed pointwise test, informational only
        "raw_max_rel_dev_per_seed": {s: float(rel_dev(mine[s], base[s]).max()) for s in seeds},
    }
    row["passes"] = row["rel_dev_final_mean"] <= rtol and row["max_rel_dev_best_so_far"] <= rtol
    return row


def compare(curves: dict, finals: dict, rtol: float, skip: float = 0.5, failed: dict | None = None) -> dict:
    """Every mode but "highest" against "highest" (the verdict), and also against "default"
    when both ran (fields suffixed `_vs_default`). curves: {mode: {seed: [value per epoch]}},
    finals: {mode: {seed: value}}; failed: {mode: {seed: error}} of runs that stopped (e.g. a
    non-finite loss): such a mode fails, and nothing can pass against a failed "highest"."""
    failed = {m: f for m, f in (failed or {}).items() if f}
    out = {}
    for mode in curves:
        if mode == "highest":
            continue
        if mode in failed or "highest" in failed:
            who = mode if mode in failed else "highest"
            out[mode] = {"passes": False, "failed_runs": {who: failed[who]}}
            continue
        row = compare_pair(curves[mode], finals[mode], curves["highest"], finals["highest"], rtol, skip)
        if "default" in curves and mode != "default" and "default" not in failed:
            vs_default = compare_pair(curves[mode], finals[mode], curves["default"], finals["default"],
                                      rtol, skip)
            row.update({f"{k}_vs_default": v for k, v in vs_default.items()})
        out[mode] = row
    return out


def seed_noise(curves_by_seed: dict, finals_by_seed: dict, skip: float) -> dict | None:
    """How much "highest" varies with the seed alone (None with fewer than two seeds): the
    relative std (ddof=1) of its final metric, and the largest relative deviation of one seed's
    best-so-far curve from the seed-mean curve in the window of `compare_pair`."""
    if len(curves_by_seed) < 2:
        return None
    finals = np.array([finals_by_seed[s] for s in curves_by_seed], np.float64)
    mean_curve = seed_mean_best_so_far(curves_by_seed)
    start = window_start(len(mean_curve), skip)
    per_seed = {s: float(rel_dev(best_so_far(c), mean_curve)[start:].max()) for s, c in curves_by_seed.items()}
    return {"final_mean": float(finals.mean()),
            "final_rel_std": float(finals.std(ddof=1) / finals.mean()),
            "max_rel_dev_best_so_far_single_seed": max(per_seed.values()),
            "max_rel_dev_best_so_far_per_seed": per_seed}


# ------------------------------------------------------------------------------ running

def make_config(name: str, mode: str, seed: int, epochs: int, task: str | None, small: bool):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    # pre-training: the seed also picks the held-out validation crystals, the same in every mode
    if config.mode == "finetune":  # data.task means nothing to a pre-training corpus
        config.data.task = task or config.data.task
        config.init_checkpoint = ""  # from scratch: a pre-trained encoder would be one more variable
    config.seed = seed
    config.train.epochs = epochs
    config.train.eval_every_epochs = 1  # one curve point per epoch
    config.train.progress_bar = False
    # "default+pallas": that edge kernel; no suffix: the config's own (base.py: "auto")
    config.model.precision, _, kernel = mode.partition("+")
    config.model.edge_kernel = kernel or config.model.edge_kernel
    if small:
        config.model.num_layers, config.model.channels, config.model.heads = 2, 32, 2
        config.model.rbf_bins = 32
        config.data.max_records = 200
        config.data.cache_dir = ""
        # one padded batch shape, so one compilation of each step: compiling dominates a
        # few-epoch CPU run, and padding efficiency does not matter there
        config.train.num_budget_levels = 1
    return config


def print_summary(report: dict) -> None:
    noise = report["highest_seed_noise"]
    if noise is not None:
        print(f"{'highest':20s} seed noise: final {report['final_metric']} rel. std "
              f"{noise['final_rel_std']:.3%}, single seed vs seed-mean best-so-far curve "
              f"{noise['max_rel_dev_best_so_far_single_seed']:.3%}")
    for mode, c in report["comparison"].items():
        if "failed_runs" in c:
            print(f"{mode:20s} FAIL: runs stopped: {c['failed_runs']}")
            continue
        vs_default = (f" (vs default: final {c['rel_dev_final_mean_vs_default']:.3%}, best-so-far "
                      f"{c['max_rel_dev_best_so_far_vs_default']:.3%})"
                      if "rel_dev_final_mean_vs_default" in c else "")
        raw = max(c["raw_max_rel_dev_per_seed"].values())
        print(f"{mode:20s} final mean {c['final_mean']:.5g} vs {c['final_mean_base']:.5g} "
              f"({c['rel_dev_final_mean']:.3%}), best-so-far curve max {c['max_rel_dev_best_so_far']:.3%} "
              f"from epoch {report['window_start']} (before: {c['max_rel_dev_best_so_far_before_window']:.3%}), "
              f"raw single-seed max {raw:.3%}: {'PASS' if c['passes'] else 'FAIL'}{vs_default}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="finetune_jarvis", help="a module of configs/ (fine-tuning or pre-training)")
    p.add_argument("--task", default=None, help="fine-tuning only; default: the config's data.task")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--modes", nargs="+", default=["highest", "default", "bf16"],
                   help="model.precision values, each optionally +<model.edge_kernel> (e.g. default+xla); "
                        "without one the config's edge_kernel ('auto')")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="default 0 1 2; with --merge: judge only these seeds (default: every seed the "
                        "reports declare, each of which must have finished in every mode)")
    p.add_argument("--rtol", type=float, default=0.05)
    p.add_argument("--skip", type=float, default=0.5,
                   help="share of the epochs at the start left out of the best-so-far curve test")
    p.add_argument("--small", action="store_true", help="tiny model and data (CPU)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="scripts/results/precision_check.json")
    p.add_argument("--merge", nargs="+", default=None, metavar="REPORT",
                   help="train nothing: combine the runs of these reports (e.g. one per seed, run on "
                        "different GPUs at once) into one report and verdict")
    p.add_argument("--part", action="store_true",
                   help="run exactly --modes (no implied 'highest') and write the runs only, for --merge")
    args = p.parse_args(argv)
    if args.merge:
        return merge_reports([Path(f) for f in args.merge], args.rtol, args.skip, Path(args.out), args.seeds)
    args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    if "highest" not in args.modes and not args.part:
        args.modes = ["highest"] + args.modes

    import jax

    from dpf_jax.train.loop import TrainingError, train_and_evaluate
    from dpf_jax.train.objectives import resolved_edge_kernel

    root = Path(args.workdir or tempfile.mkdtemp(prefix="precision_"))
    curves, finals, failed, metric_names, task = {}, {}, {}, set(), None
    report = {"device": jax.devices()[0].device_kind, "config": args.config, "epochs": args.epochs,
              "rtol": args.rtol, "small": args.small, "seeds": args.seeds, "skip": args.skip,
              "window_start": window_start(args.epochs, args.skip), "modes": args.modes, "edge_kernels": {},
              "val_curves": curves, "final": finals, "failed_runs": failed}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        curves[mode], finals[mode], failed[mode] = {}, {}, {}
        for seed in args.seeds:
            config = make_config(args.config, mode, seed, args.epochs, args.task, args.small)
            task = config.data.task if config.mode == "finetune" else None
            # the kernel as it runs here ("auto" resolved), so reports can be told apart
            report["edge_kernels"][mode] = resolved_edge_kernel(config.model)
            workdir = root / f"{mode}_seed{seed}"
            try:
                result = train_and_evaluate(config, str(workdir))
            except TrainingError as e:  # a diverging mode is a verdict, not a crash of the check
                failed[mode][seed] = str(e)
                print(f"{mode} seed {seed}: {e}", flush=True)
            else:
                curve_name, curves[mode][seed] = read_val_curve(workdir)
                final_name, finals[mode][seed] = final_value(result, curves[mode][seed])
                metric_names.add((curve_name, final_name))
                report["metric"], report["final_metric"] = curve_name, final_name
            report["task"] = task
            out.write_text(json.dumps(report, indent=1))  # partial report: finished runs survive a kill
    if args.part:
        return report
    return finish_report(report, metric_names, args.rtol, args.skip, out)


def finish_report(report: dict, metric_names: set, rtol: float, skip: float, out: Path) -> dict:
    """The verdict over the report's runs (val_curves / final / failed_runs), written to `out`."""
    if len(metric_names) > 1:  # e.g. a run without a test split among ones with
        raise RuntimeError(f"runs disagree on the metric: {sorted(metric_names)}")
    (curve_name, final_name), = metric_names or {(None, None)}
    curves, finals, failed = report["val_curves"], report["final"], report["failed_runs"]
    ok = not failed["highest"]
    report.update({"metric": curve_name, "final_metric": final_name,
                   "comparison": compare(curves, finals, rtol, skip, failed),
                   "highest_seed_noise": seed_noise(curves["highest"], finals["highest"], skip) if ok else None})
    out.write_text(json.dumps(report, indent=1))
    print_summary(report)
    return report


def merge_reports(paths: list[Path], rtol: float, skip: float, out: Path, seeds: list[int] | None = None) -> dict:
    """One report from several (partial or finished) ones that trained the same config for the
    same number of epochs on the same kind of device, e.g. `--seeds 0`, `--seeds 1`, `--seeds 2`
    run on three GPUs at once. A (mode, seed) run may appear in one report only. Every mode a
    report declares (`modes`; older reports: the modes that started) must have a finished or
    failed run for every judged seed: `seeds`, default every seed the reports declare. The
    verdict uses this call's `rtol` and `skip`, whatever the parts were run with."""
    keep = ("device", "config", "epochs", "small", "task")
    merged, metric_names, seen, kernels, modes, declared = None, set(), {}, {}, [], set()
    for path in paths:
        part = json.loads(path.read_text())
        if merged is None:
            merged = {**{k: part.get(k) for k in keep}, "rtol": rtol, "skip": skip, "seeds": [],
                      "window_start": window_start(part["epochs"], skip), "modes": modes, "edge_kernels": kernels,
                      "val_curves": {}, "final": {}, "failed_runs": {}, "merged_from": []}
        bad = [k for k in keep if part.get(k) != merged[k]]
        if bad:
            raise ValueError(f"{path}: {', '.join(f'{k}={part.get(k)!r}' for k in bad)} differ from "
                             f"{paths[0]}'s ({', '.join(f'{k}={merged[k]!r}' for k in bad)})")
        merged["merged_from"].append(str(path))
        declared.update(part.get("seeds") or [])
        for mode in part.get("modes") or list(part["val_curves"]):
            if mode not in modes:
                modes.append(mode)
        for mode, kernel in (part.get("edge_kernels") or {}).items():
            if kernels.setdefault(mode, kernel) != kernel:
                raise ValueError(f"{path}: {mode} ran edge kernel {kernel!r}, another report's ran {kernels[mode]!r}")
        if part.get("metric") is not None:
            metric_names.add((part["metric"], part["final_metric"]))
        for field in ("val_curves", "failed_runs"):  # a run is either a curve or a failure
            for mode, by_seed in part[field].items():
                for seed, value in by_seed.items():
                    seed = int(seed)  # JSON keys are strings
                    if (mode, seed) in seen:
                        raise ValueError(f"{path}: {mode} seed {seed} also in {seen[mode, seed]}")
                    seen[mode, seed] = path
                    merged[field].setdefault(mode, {})[seed] = value
                    if field == "val_curves":
                        final = part["final"].get(mode, {}).get(str(seed))
                        if final is None:
                            raise ValueError(f"{path}: {mode} seed {seed} has a curve but no final value")
                        merged["final"].setdefault(mode, {})[seed] = final
    judged = sorted(seeds if seeds is not None else declared or {s for _, s in seen})
    missing = [(m, s) for m in modes for s in judged if (m, s) not in seen]
    if missing or "highest" not in modes:
        raise ValueError(f"runs missing from {[str(p) for p in paths]}: "
                         f"{missing or [('highest', s) for s in judged]} (a killed part? judge fewer seeds "
                         "with --seeds)")
    for field in ("val_curves", "final", "failed_runs"):  # only the judged seeds, every mode present
        merged[field] = {m: {s: v for s, v in merged[field].get(m, {}).items() if s in judged} for m in modes}
    merged["seeds"] = judged
    return finish_report(merged, metric_names, rtol, skip, out)


if __name__ == "__main__":
    main()
