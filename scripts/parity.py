"""Accuracy parity with the reference PyTorch Matformer on every shipped task.

    python scripts/parity.py                                  # scratch, 3 seeds (GPU job)
    python scripts/parity.py --methods scratch pretrain_mask30 # plus fine-tuning from mask-30%

Trains with the reference's recipe (AdamW 1e-3, wd 1e-5, one-cycle, MSE, batch 64, its epochs;
MP moduli in log10 GPa) through `scripts/reproduce.py --recipe reference`, then writes
results/parity.md and results/parity.json: ours (mean ± std over seeds) next to the reference's
test MAE from results/reference_matformer.md (a copy of ../shared/reference_results.md) and their
ratio (target: ≤ 1.05 on every task). Other options (--together, --start-deadline, --order, ...)
go to scripts/reproduce.py unchanged; the tables are written from whatever runs finished, even
when some failed (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import reproduce  # noqa: E402

REFERENCE_FILE = REPO / "results" / "reference_matformer.md"
DATASET_PREFIX = {"JARVIS": "jarvis", "MP": "mp"}


def reference_numbers(path: Path = REFERENCE_FILE) -> dict:
    """task ("jarvis:ehull") -> {"final": MAE, "best_val": MAE, "mean_predictor": MAE, ...}."""
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in DATASET_PREFIX and re.match(r"^[\d.]+$", cells[5]):
            out[f"{DATASET_PREFIX[cells[0]]}:{cells[1]}"] = {
                "units": cells[2], "sizes": cells[3], "epochs": int(cells[4]), "final": float(cells[5]),
                "best_val": float(cells[6]), "mean_predictor": float(cells[7])}
    return out


def parity_table(summary: dict, reference: dict) -> str:
    methods = summary["methods"]
    head = ["task", "units", "reference (final / best val)"]
    for m in methods:
        head += [f"ours {m} (final)", "ratio", f"ours {m} (best val)", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, per in summary["tasks"].items():
        ref = reference.get(task)
        row = [task, ref["units"] if ref else "", f"{ref['final']:.3f} / {ref['best_val']:.3f}" if ref else "—"]
        for m in methods:
            for key, rkey in (("test_mae_final", "final"), ("test_mae_best_val", "best_val")):
                mean, _ = per[m][key]
                row.append(reproduce._fmt(per[m][key], 3))
                row.append("—" if mean is None or not ref else f"{mean / ref[rkey]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["scratch"])
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--runs", default="runs/parity")
    p.add_argument("--out", default="results")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--quick", action="store_true")
    args, rest = p.parse_known_args(argv)
    reference = reference_numbers()
    tasks = args.tasks or list(reference)
    argv2 = ["--recipe", "reference", "--methods", *args.methods, "--tasks", *tasks, "--seeds",
             *map(str, args.seeds), "--parallel", str(args.parallel), "--runs", args.runs, "--out", args.out,
             "--name", "parity_runs", *rest]
    if args.report_only:
        argv2.append("--report-only")
    if args.quick:
        argv2.append("--quick")
    failed = None
    try:
        summary = reproduce.main(argv2)
    except reproduce.RunsFailed as e:  # tables of what finished, then the failure
        summary, failed = e.summary, e
    table = parity_table(summary, reference)
    out = Path(args.out)
    (out / "parity.json").write_text(json.dumps({"reference": reference, "ours": summary}, indent=1))
    (out / "parity.md").write_text(
        "# Parity with the reference Matformer (same splits, same recipe)\n\n"
        f"Seeds {args.seeds}; ratio = ours / reference test MAE (target ≤ 1.05).\n\n" + table + "\n"
        + "".join(f"\nNot started ({reason}): {len(names)} job(s), listed in parity_runs.md.\n"
                  for reason, names in summary.get("not_started", {}).items())
        + (f"\nFailed: {', '.join(summary['failed'])}\n" if summary.get("failed") else ""))
    print(table)
    if failed:
        raise failed


if __name__ == "__main__":
    main()
