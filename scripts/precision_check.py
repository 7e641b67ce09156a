"""Does a reduced-precision mode train like true float32? Compares validation curves on real data.

    python scripts/precision_check.py                      # GPU: default (TF32) and bf16 vs highest
    python scripts/precision_check.py --small --epochs 3   # CPU smoke version (tiny model)
    python scripts/precision_check.py --modes default+pallas bf16+pallas   # the fused edge kernel

Trains the same config (same seed, data order and initial parameters) once per
`model.precision` value and compares each curve of validation MAE with the "highest" (true
float32) curve. A mode passes when, at every epoch, |MAE_mode − MAE_highest| ≤ rtol ·
MAE_highest (default rtol 0.05) and the final test MAE is within the same tolerance. Writes a
JSON report (`--out`). Only modes that pass may be quoted as verified in the performance table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def val_curve(workdir: Path) -> list[float]:
    with open(workdir / "metrics.csv") as f:
        return [float(r["val_mae"]) for r in csv.DictReader(f)]


def compare(curves: dict, finals: dict, rtol: float) -> dict:
    """Each mode against "highest" (the verdict), and also against "default" when both ran:
    a fused kernel at default precision differs from XLA's default only in summation order,
    so that second pair of numbers shows how much of a deviation is the kernel's own."""
    out = {}
    for mode, curve in curves.items():
        if mode == "highest":
            continue
        row = {}
        for base in ("highest", "default"):
            if base not in curves or base == mode:
                continue
            worst = max(abs(a - b) / max(b, 1e-12) for a, b in zip(curve, curves[base]))
            final_dev = abs(finals[mode] - finals[base]) / max(finals[base], 1e-12)
            suffix = "" if base == "highest" else "_vs_default"
            row[f"max_rel_dev_val_curve{suffix}"] = worst
            row[f"rel_dev_final_test{suffix}"] = final_dev
        row["passes"] = row["max_rel_dev_val_curve"] <= rtol and row["rel_dev_final_test"] <= rtol
        out[mode] = row
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="finetune_jarvis")
    p.add_argument("--task", default="formation_energy_peratom")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--modes", nargs="+", default=["highest", "default", "bf16"],
                   help="model.precision values, each optionally +pallas (model.edge_kernel)")
    p.add_argument("--rtol", type=float, default=0.05)
    p.add_argument("--small", action="store_true", help="tiny model and data (CPU)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="scripts/results/precision_check.json")
    args = p.parse_args(argv)
    if "highest" not in args.modes:
        args.modes = ["highest"] + args.modes

    import importlib

    import jax

    from dpf_jax.train.loop import train_and_evaluate

    root = Path(args.workdir or tempfile.mkdtemp(prefix="precision_"))
    curves, finals = {}, {}
    for mode in args.modes:
        config = importlib.import_module(f"configs.{args.config}").get_config()
        config.data.task = args.task
        config.init_checkpoint = ""
        config.train.epochs = args.epochs
        config.train.progress_bar = False
        config.model.precision, _, kernel = mode.partition("+")  # "default+pallas": fused edge kernel
        config.model.edge_kernel = kernel or "xla"
        if args.small:
            config.model.num_layers, config.model.channels, config.model.heads = 2, 32, 2
            config.model.rbf_bins = 32
            config.data.max_records = 200
            config.data.cache_dir = ""
        res = train_and_evaluate(config, str(root / mode))
        curves[mode] = val_curve(root / mode)
        finals[mode] = res["test_mae_final"]
    report = {"device": jax.devices()[0].device_kind, "config": args.config, "task": args.task,
              "epochs": args.epochs, "rtol": args.rtol, "small": args.small, "val_mae_curves": curves,
              "test_mae_final": finals, "comparison": compare(curves, finals, args.rtol)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for mode, c in report["comparison"].items():
        vs_default = (f" (vs default: {c['max_rel_dev_val_curve_vs_default']:.3%}, "
                      f"{c['rel_dev_final_test_vs_default']:.3%})" if "rel_dev_final_test_vs_default" in c else "")
        print(f"{mode:20s} max rel. deviation of the val curve {c['max_rel_dev_val_curve']:.3%}, "
              f"final test {c['rel_dev_final_test']:.3%}: {'PASS' if c['passes'] else 'FAIL'}{vs_default}")
    return report


if __name__ == "__main__":
    main()
