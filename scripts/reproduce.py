"""Reproduce the paper's comparisons on the shipped data: scratch Matformer vs DPF pre-training.

    python scripts/reproduce.py                      # full sweep (a GPU job)
    python scripts/reproduce.py --quick              # tiny models and epochs, 2 CPU cores
    python scripts/reproduce.py --recipe reference --methods scratch pretrain_mask30   # parity

For every pre-training config it pre-trains once (runs/reproduce/pretrain/<config>), then
fine-tunes every task from scratch and from each pre-trained encoder with a fixed set of seeds
(runs/reproduce/finetune/<task>/<method>/seed<k>; finetune_reference/ for --recipe reference). A finished run (its results.json exists) is
never redone and an unfinished one resumes from its checkpoint, so the sweep can be stopped and
continued across sessions. Outputs (under --out, default results/):

  reproduce.md    test MAE (mean ± std over seeds) per task and method, change vs scratch
  reproduce.json  every number: per run, per seed, per epoch
  curves_<dataset>.png  validation MAE per epoch during fine-tuning, one panel per task
                  (<name>_curves_<dataset>.png for other --name values: --quick, parity)

Methods are "scratch" or the name of a pre-training config ("pretrain_mask30"); append
"+rebuild" (e.g. "pretrain_pos30+rebuild") to pre-train with the k-NN topology rebuilt from
each perturbed structure instead of kept from the clean one (the paper's §5.3 hypothesis).

Recipes: "paper" fine-tunes as the paper does (500 epochs, batch 32); "reference" trains as
../shared/reference_results.md measured the PyTorch Matformer (batch 64, 500 epochs on JARVIS
and the MP moduli, 100 on MP formation energy and band gap) — the parity comparison.

Scheduling (for machines with a hard time limit per call): pre-training runs first, one at a
time; fine-tuning jobs (one run, or one --together program) then run --parallel at a time, each
worker on its own GPU when several are visible (round robin). --start-deadline S starts no job
once S seconds have passed since the script started: the rest are listed as "not started" and the
reports are written from what finished (exit status 0 unless a job failed). A fine-tuning job
whose pre-trained encoder is not finished (pre-training failed or not started) is not started
either. --order longest-first starts the costliest fine-tuning jobs first, cost = epochs × training
records of the task's official split (counted from the dataset's JSONL, no graphs built; 0 when
unknown) × runs in the job, so the call's end finds fewer half-done jobs; "given" (the default)
keeps task, method, seed order.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import functools
import gzip
import json
import logging
import math
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

PRETRAIN_CONFIGS = [f"pretrain_{k}{v}" for k, vs in
                    (("mask", (30, 50, 70)), ("pos", (10, 30, 50)), ("lattice", (10, 30, 50))) for v in vs]
JARVIS_TASKS = ["formation_energy_peratom", "optb88vdw_bandgap", "optb88vdw_total_energy", "ehull", "mbj_bandgap"]
MP_TASKS = ["formation_energy_per_atom", "band_gap", "G_VRH", "K_VRH"]
ALL_TASKS = [f"jarvis:{t}" for t in JARVIS_TASKS] + [f"mp:{t}" for t in MP_TASKS]
REFERENCE_EPOCHS = {"mp:formation_energy_per_atom": 100, "mp:band_gap": 100}  # others: 500
DEFAULT_EPOCHS = 500  # configs/base.py: train.epochs
DATA_FILES = {"jarvis": "data/jarvis_dft3d.jsonl.gz", "mp": "data/mp_megnet.jsonl.gz"}  # configs/finetune_*.py
ORDERS = ("given", "longest-first")
clock = time.monotonic  # the start deadline's clock (tests replace it)

# Tiny settings of --quick: the real code path, small enough for 2 CPU cores.
QUICK_MODEL = ["--config.model.num_layers=1", "--config.model.channels=16", "--config.model.heads=1",
               "--config.model.rbf_bins=16"]
QUICK_PRETRAIN = ["--config.data.max_records=192", "--config.train.epochs=1", "--config.train.batch_size=32"]
QUICK_FINETUNE = ["--config.data.max_records=160", "--config.train.epochs=2", "--config.train.batch_size=32"]


def task_config(task: str) -> tuple[str, str]:
    dataset, name = task.split(":", 1)
    if dataset not in ("jarvis", "mp"):
        raise ValueError(f"task {task!r}: use jarvis:<task> or mp:<task>")
    return f"configs/finetune_{dataset}.py", name


def split_method(method: str) -> tuple[str, bool]:
    base, _, flag = method.partition("+")
    if flag not in ("", "rebuild"):
        raise ValueError(f"method {method!r}: only the suffix '+rebuild' is known")
    return base, flag == "rebuild"


def pretrain_run(method: str, args) -> tuple[str, list[str]]:
    base, rebuild = split_method(method)
    workdir = Path(args.runs) / "pretrain" / method
    flags = [f"--config=configs/{base}.py", f"--workdir={workdir}",
             f"--config.pretrain.rebuild_topology={rebuild}"]
    if args.quick:
        flags += QUICK_MODEL + QUICK_PRETRAIN
    if args.pretrain_epochs:
        flags.append(f"--config.train.epochs={args.pretrain_epochs}")
    return str(workdir), flags


def finetune_base(task: str, args) -> Path:
    """Folder of a task's fine-tuning runs; the recipe is part of the path, so runs of the two
    recipes never pass for each other (finished runs are skipped by path)."""
    folder = "finetune" if args.recipe == "paper" else f"finetune_{args.recipe}"
    return Path(args.runs) / folder / task.replace(":", "_")


def finetune_run(task: str, method: str, seed: int, args) -> tuple[str, list[str]]:
    config_file, name = task_config(task)
    workdir = finetune_base(task, args) / method / f"seed{seed}"
    init = "" if method == "scratch" else str(Path(args.runs) / "pretrain" / method)
    flags = [f"--config={config_file}", f"--workdir={workdir}", f"--config.data.task={name}",
             f"--config.seed={seed}", f"--config.init_checkpoint={init}"]
    if args.recipe == "reference":
        flags += ["--config.train.batch_size=64", f"--config.train.epochs={REFERENCE_EPOCHS.get(task, 500)}"]
    if args.quick:
        flags += QUICK_MODEL + QUICK_FINETUNE
    if args.finetune_epochs:
        flags.append(f"--config.train.epochs={args.finetune_epochs}")
    return str(workdir), flags + list(args.extra)


def finetune_group(task: str, methods: list[str], seeds: list[int], args) -> tuple[str, list[str], list[str]]:
    """One `dpf_jax.train.multirun` job training every (method, seed) of a task together:
    (job name, flags, the runs' workdirs) — the workdirs are those of `finetune_run`."""
    _, flags = finetune_run(task, methods[0], seeds[0], args)
    drop = ("--workdir=", "--config.seed=", "--config.init_checkpoint=")
    base = finetune_base(task, args)
    inits = ["scratch" if m == "scratch" else str(Path(args.runs) / "pretrain" / m) for m in methods]
    flags = [f for f in flags if not f.startswith(drop)] + [
        f"--workdir={base}", "--seeds=" + ",".join(map(str, seeds)), "--init_checkpoints=" + ",".join(inits)]
    name = f"{base}/{'+'.join(methods)}"  # names the group's log: several groups may share a task
    return name, flags, [finetune_run(task, m, s, args)[0] for m in methods for s in seeds]


def run_main(workdir: str, flags: list[str], env: dict, log_dir: Path, module: str = "dpf_jax.main",
             run_dirs: list[str] | None = None) -> dict:
    """Training in its own process (own device memory share), skipped when finished: one run
    (`dpf_jax.main`), or with `run_dirs` a `dpf_jax.train.multirun` group writing those runs."""
    run_dirs = run_dirs or [workdir]
    results = [Path(w) / "results.json" for w in run_dirs]
    if all(r.exists() for r in results):
        return json.loads(results[0].read_text())
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / (workdir.replace("/", "_") + ".log")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not all(r.exists() for r in results):
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"run {workdir} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    for r in results:
        out = json.loads(r.read_text())
        out.setdefault("wall_s", time.time() - t0)
        r.write_text(json.dumps(out, indent=2))
    return json.loads(results[0].read_text())


def visible_gpus() -> list[str]:
    """Ids of the NVIDIA GPUs this process may use ([] without any): CUDA_VISIBLE_DEVICES if
    set, else one per line of `nvidia-smi -L`."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def worker_envs(parallel: int, gpus: list[str]) -> list[dict]:
    """Environment of each of `parallel` worker slots. With several workers and several GPUs,
    worker k sees only GPU k mod n (independent runs gain nothing from sharing a card: with
    2 GPUs, 4 workers put 2 runs on each); the memory fraction is split among a card's workers:
    0.9 of the card, or of XLA_PYTHON_CLIENT_MEM_FRACTION when it is set (to leave room for
    another program on the same GPUs: JAX preallocates, and CUDA graphs need memory outside
    that pool, so two programs at 0.9 each fail with out-of-memory)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    if parallel <= 1:
        return [env]  # one run at a time uses every device (data parallel)
    per_card = math.ceil(parallel / max(1, len(gpus)))
    share = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9"))
    envs = []
    for k in range(parallel):
        e = dict(env, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{share / per_card:.3f}")
        if len(gpus) > 1:
            e["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
        envs.append(e)
    return envs


def unfinished_runs(job) -> list[Path]:
    """The run folders of a job (workdir, flags[, run_dirs]) without their results.json."""
    run_dirs = job[2] if len(job) > 2 and job[2] else [job[0]]
    return [Path(w) for w in run_dirs if not (Path(w) / "results.json").exists()]


def job_finished(job) -> bool:
    """Whether every run of a job has its results.json."""
    return not unfinished_runs(job)


def methods_left(job) -> set[str]:
    """The methods of a fine-tuning job (one run, or a --together group) that still have a run
    to do (run folders are <task>/<method>/seed<k>; multirun trains only those)."""
    return {w.parent.name for w in unfinished_runs(job)}


NOT_STARTED = object()


def run_all(jobs, parallel: int, log_dir: Path, module: str = "dpf_jax.main",
            deadline: float | None = None) -> dict:
    """Runs the jobs, `parallel` at a time (a worker slot each, see `worker_envs`); a job not yet
    started when `clock()` reaches `deadline` is not started (finished ones still count as done).
    Returns {"done": [names], "failed": [(name, error)], "not_started": [names]} in job order;
    raises nothing for a failed job (the caller reports them)."""
    parallel = max(1, parallel)
    slots: queue.Queue = queue.Queue()
    for env in worker_envs(parallel, visible_gpus() if parallel > 1 else []):
        slots.put(env)

    def run_in_slot(job):
        env = slots.get()  # at most `parallel` jobs hold a slot at once
        try:
            if deadline is not None and clock() >= deadline and not job_finished(job):
                return NOT_STARTED
            return run_main(job[0], job[1], env, log_dir, module, *job[2:])
        finally:
            slots.put(env)

    status: dict = {}
    with cf.ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(run_in_slot, job): job[0] for job in jobs}
        for fut in cf.as_completed(futures):
            name = futures[fut]
            try:
                status[name] = "not_started" if fut.result() is NOT_STARTED else "done"
                if status[name] == "done":
                    print(f"done: {name}", flush=True)
            except Exception as e:  # noqa: BLE001 - report every failure, keep the sweep going
                status[name] = str(e)
                print(f"FAILED: {name}\n{e}", flush=True)
    names = [job[0] for job in jobs]
    return {"done": [n for n in names if status[n] == "done"],
            "not_started": [n for n in names if status[n] == "not_started"],
            "failed": [(n, status[n]) for n in names if status[n] not in ("done", "not_started")]}


# ------------------------------------------------------------------------- job ordering

@functools.lru_cache(maxsize=None)
def split_sizes(path: str) -> dict:
    """{task: number of training records} of a JSONL dataset's official splits (each record's
    "split" object), read without building graphs; {} when the file is missing or not JSONL."""
    counts: dict = {}
    file = Path(path) if Path(path).is_absolute() else REPO / path
    try:
        opener = gzip.open if file.suffix == ".gz" else open
        with opener(file, "rt") as f:
            for line in f:
                if line.strip():
                    for task, split in (json.loads(line).get("split") or {}).items():
                        counts[task] = counts.get(task, 0) + (split == "train")
    except (OSError, ValueError, AttributeError):
        return {}
    return counts


def _last_flag(flags: list[str], prefix: str) -> str | None:
    values = [f[len(prefix):] for f in flags if f.startswith(prefix)]
    return values[-1] if values else None  # absl: the last one wins


def job_cost(task: str, job) -> float:
    """Estimated cost of a fine-tuning job (workdir, flags[, run_dirs]): epochs × training
    records × runs; 0 for a task whose split sizes are unknown."""
    dataset, name = task.split(":", 1)
    flags = job[1]
    epochs = int(_last_flag(flags, "--config.train.epochs=") or DEFAULT_EPOCHS)
    records = split_sizes(_last_flag(flags, "--config.data.path=") or DATA_FILES[dataset]).get(name, 0)
    max_records = int(_last_flag(flags, "--config.data.max_records=") or 0)
    if max_records:
        records = min(records, max_records)
    runs = len(job[2]) if len(job) > 2 and job[2] else 1
    return float(epochs * records * runs)


def order_jobs(tasks_and_jobs: list, order: str) -> list:
    """[(task, job)] in `order`: "given" keeps it, "longest-first" sorts by `job_cost`,
    highest first (ties keep the given order)."""
    if order == "given":
        return list(tasks_and_jobs)
    if order == "longest-first":
        return sorted(tasks_and_jobs, key=lambda tj: -job_cost(*tj))
    raise ValueError(f"unknown order {order!r}: one of {ORDERS}")


# ------------------------------------------------------------------------------- reporting

def _read_curve(workdir: Path) -> list[float]:
    path = workdir / "metrics.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [float(r["val_mae"]) for r in csv.DictReader(f) if r.get("val_mae")]


def _mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else None  # no spread from one seed


def collect(tasks, methods, seeds, args) -> dict:
    out = {"tasks": {}, "methods": methods, "seeds": seeds, "recipe": args.recipe, "quick": args.quick,
           "pretrain": {}}
    for m in methods:
        if m != "scratch":
            res = Path(args.runs) / "pretrain" / m / "results.json"
            out["pretrain"][m] = json.loads(res.read_text()) if res.exists() else None
    for task in tasks:
        t = out["tasks"][task] = {}
        for m in methods:
            runs = []
            for s in seeds:
                wd = Path(finetune_run(task, m, s, args)[0])
                res = json.loads((wd / "results.json").read_text()) if (wd / "results.json").exists() else None
                runs.append({"seed": s, "results": res, "val_mae_curve": _read_curve(wd)})
            finals = [r["results"].get("test_mae_final") for r in runs if r["results"]]
            bests = [r["results"].get("test_mae_best_val") for r in runs if r["results"]]
            t[m] = {"runs": runs, "test_mae_final": _mean_std(finals), "test_mae_best_val": _mean_std(bests),
                    "units": next((r["results"].get("units") for r in runs if r["results"]), ""),
                    "n_seeds_done": len(finals)}
    return out


def _fmt(ms, digits=4):
    m, s = ms
    if m is None:
        return "—"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(summary: dict, key: str = "test_mae_final") -> str:
    methods = summary["methods"]
    lines = ["| task | units | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for task, per in summary["tasks"].items():
        scratch = per.get("scratch", {}).get(key, (None, None))[0]
        cells = []
        for m in methods:
            ms = per[m][key]
            cell = _fmt(ms)
            if m != "scratch" and ms[0] is not None and scratch:
                cell += f" ({100 * (ms[0] - scratch) / scratch:+.1f}%)"
            if per[m]["n_seeds_done"] < len(summary["seeds"]):
                cell += f" [{per[m]['n_seeds_done']}/{len(summary['seeds'])} seeds]"
            cells.append(cell)
        units = next((per[m]["units"] for m in methods if per[m]["units"]), "")
        lines.append(f"| {task} | {units} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(summary: dict, out_dir: Path, name: str = "reproduce") -> list[Path]:
    """curves_<dataset>.png for the "reproduce" report, <name>_curves_<dataset>.png for others
    (parity must not overwrite the sweep's plots); a dataset without any curve gets no file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plots (pip install dpf_jax[plots])")
        return []
    paths = []
    for dataset in ("jarvis", "mp"):
        tasks = [t for t in summary["tasks"] if t.startswith(dataset + ":")]
        if not any(r["val_mae_curve"] for t in tasks for m in summary["methods"]
                   for r in summary["tasks"][t][m]["runs"]):
            continue
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for m in summary["methods"]:
                curves = [r["val_mae_curve"] for r in summary["tasks"][task][m]["runs"] if r["val_mae_curve"]]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                mean = np.mean([c[:n] for c in curves], axis=0)
                ax.plot(np.arange(1, n + 1), mean, label=m, lw=1.2 if m != "scratch" else 2.0,
                        color="black" if m == "scratch" else None)
            ax.set_title(task.split(":", 1)[1], fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_yscale("log")
            ax.set_ylabel(f"val MAE ({summary['tasks'][task][summary['methods'][0]]['units']})")
        if axes[0][-1].get_legend_handles_labels()[0]:
            axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / (f"curves_{dataset}.png" if name == "reproduce" else f"{name}_curves_{dataset}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(summary: dict, out_dir: Path, name: str, header: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # one line: indented, every per-epoch curve value took a line of its own (the full sweep's
    # file grew past 2 MB); the Markdown file is the readable view
    (out_dir / f"{name}.json").write_text(json.dumps(summary))
    text = [header, "", "Test MAE of the final model, mean ± std over seeds "
            f"{summary['seeds']} (change vs scratch):", "", markdown_table(summary, "test_mae_final"), "",
            "Test MAE of the best-validation checkpoint:", "", markdown_table(summary, "test_mae_best_val"), ""]
    if summary.get("pretrain"):
        text += ["Pre-training runs (validation split of the corpus):", ""]
        for m, res in summary["pretrain"].items():
            if not res:
                text.append(f"* {m}: run files not here (fine-tuning results from an earlier machine, or "
                            "not pre-trained yet)")
            else:
                shown = {k: v for k, v in res.items() if k.startswith(("val_", "type_acc")) and k.endswith(
                    ("_final", "_baseline"))}
                text.append(f"* {m}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
                            + f" ({res.get('steps')} steps)")
        text.append("")
    for reason, names in summary.get("not_started", {}).items():
        text += [f"Not started ({reason}): {len(names)} job(s): " + ", ".join(names), ""]
    if summary.get("failed"):
        text += [f"Failed: {len(summary['failed'])} job(s): " + ", ".join(summary["failed"]), ""]
    (out_dir / f"{name}.md").write_text("\n".join(text))
    plot_curves(summary, out_dir, name)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None,
                   help="scratch and/or pre-training config names (default: scratch + all nine)")
    p.add_argument("--tasks", nargs="+", default=None, help=f"default: {' '.join(ALL_TASKS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--recipe", choices=["paper", "reference"], default="paper")
    p.add_argument("--quick", action="store_true", help="tiny model and data: minutes on 2 CPU cores")
    p.add_argument("--parallel", type=int, default=1,
                   help="fine-tuning processes at once; on several GPUs they are spread over them "
                        "(one card each, round robin), on one GPU they share it")
    p.add_argument("--together", type=int, default=0,
                   help="train up to this many fine-tuning runs of a task in one program (vmapped; "
                        "dpf_jax.train.multirun): far faster on a GPU for small batches; 0 = one process per run")
    p.add_argument("--start-deadline", type=float, default=0, metavar="SECONDS",
                   help="start no job (pre-training or fine-tuning) once this many seconds have passed "
                        "since the script started; the rest are listed as not started and the reports are "
                        "written from what finished (0 = no deadline)")
    p.add_argument("--order", choices=ORDERS, default="given",
                   help="order of the fine-tuning jobs: given (task, method, seed) or longest-first "
                        "(epochs × training records × runs per job, highest first: fewer half-done jobs "
                        "when a time limit stops the call)")
    p.add_argument("--pretrain-epochs", type=int, default=0)
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--runs", default="runs/reproduce")
    p.add_argument("--out", default="results")
    p.add_argument("--name", default="reproduce")
    p.add_argument("--report-only", action="store_true", help="only collect finished runs and write reports")
    p.add_argument("--extra", nargs="*", default=[], help="extra --config.x=y flags for fine-tuning runs")
    args = p.parse_args(argv)
    if args.quick:
        args.methods = args.methods or ["scratch", "pretrain_mask30", "pretrain_pos10", "pretrain_lattice10"]
        args.tasks = args.tasks or ["jarvis:formation_energy_peratom", "mp:band_gap"]
        if args.runs == "runs/reproduce":
            args.runs = "runs/reproduce_quick"
        if args.name == "reproduce":
            args.name = "reproduce_quick"
    args.methods = args.methods or ["scratch"] + PRETRAIN_CONFIGS
    args.tasks = args.tasks or ALL_TASKS
    for t in args.tasks:
        task_config(t)
    for m in args.methods:
        if m != "scratch" and split_method(m)[0] not in PRETRAIN_CONFIGS:
            raise SystemExit(f"unknown method {m!r}: scratch or one of {PRETRAIN_CONFIGS} (+rebuild)")
    return args


class RunsFailed(SystemExit):
    """Some jobs failed (exit status 1); `summary` holds what the others produced."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def pretrain_done(method: str, args) -> bool:
    return method == "scratch" or (Path(args.runs) / "pretrain" / method / "results.json").exists()


def has_checkpoint(workdir: Path) -> bool:
    """Whether fine-tuning can restore an encoder from `workdir`: the lookup `restore_encoder`
    itself makes (imported here: the sweep's own process otherwise never loads JAX / Orbax)."""
    from dpf_jax.train.checkpoint import find_checkpoint_dir

    try:
        find_checkpoint_dir(workdir)
    except FileNotFoundError:
        return False
    return True


def forget_encoders_without_checkpoint(methods, args) -> list[str]:
    """Encoders whose results.json is here but whose checkpoint is not (a committed sweep
    continued on a fresh machine: checkpoints are never committed) cannot be fine-tuned from:
    their results.json is removed so that they are pre-trained again. Returns their names."""
    stale = []
    for m in methods:
        workdir = Path(args.runs) / "pretrain" / m
        if m != "scratch" and (workdir / "results.json").exists() and not has_checkpoint(workdir):
            (workdir / "results.json").unlink()
            stale.append(m)
    return stale


def run_jobs(args) -> tuple[list, dict]:
    """Pre-trains, then fine-tunes; returns (failed job names, {reason: names not started})."""
    deadline = clock() + args.start_deadline if args.start_deadline > 0 else None
    log_dir = Path(args.runs) / "logs"
    failed, not_started = [], {}
    per_group = max(1, args.together // len(args.seeds))  # methods per --together program
    if args.together:
        jobs = [(t, args.methods[i:i + per_group], finetune_group(t, args.methods[i:i + per_group], args.seeds, args))
                for t in args.tasks for i in range(0, len(args.methods), per_group)]
    else:
        jobs = [(t, [m], finetune_run(t, m, s, args)) for t in args.tasks for m in args.methods for s in args.seeds]
    # an encoder is pre-trained only while some fine-tuning run still needs it: a continued sweep
    # whose runs from an encoder are all finished does not pre-train it again (its checkpoint may
    # be gone, e.g. on a fresh GPU machine, while its committed fine-tuning results stay valid)
    needed = set().union(*(methods_left(job) for _, _, job in jobs))
    stale = forget_encoders_without_checkpoint(sorted(needed), args)
    if stale:
        print(f"pre-training again {', '.join(stale)}: finished before, but the checkpoint is not "
              "here (e.g. a fresh machine; checkpoints are not committed)", flush=True)
    pre = [pretrain_run(m, args) for m in args.methods if m != "scratch" and m in needed]
    unneeded = [m for m in args.methods if m != "scratch" and m not in needed]
    print(f"pre-training {len(pre)} config(s)"
          + (f" ({len(unneeded)} skipped, their fine-tuning runs are all finished: {', '.join(unneeded)})"
             if unneeded else ""), flush=True)
    res = run_all(pre, 1, log_dir, deadline=deadline)  # one at a time: each fills the accelerator
    failed += [n for n, _ in res["failed"]]
    if res["not_started"]:
        not_started["start deadline"] = list(res["not_started"])
    # an encoder that is not finished (failed, not started) is no start point: its jobs would fail,
    # or worse, start from a half-trained checkpoint
    missing = sorted(m for m in needed if not pretrain_done(m, args))
    blocked = [job[0] for _, _, job in jobs if methods_left(job) & set(missing)]
    if blocked:
        not_started[f"pre-training not finished: {', '.join(missing)}"] = blocked
    todo = order_jobs([(t, job) for t, _, job in jobs if job[0] not in set(blocked)], args.order)
    module = "dpf_jax.train.multirun" if args.together else "dpf_jax.main"
    if args.together:
        print(f"fine-tuning {sum(len(job[2]) for _, job in todo)} run(s) in {len(todo)} program(s) of up to "
              f"{per_group * len(args.seeds)} runs, {args.parallel} at a time, order {args.order}", flush=True)
    else:
        print(f"fine-tuning {len(todo)} run(s), {args.parallel} at a time, order {args.order}", flush=True)
    res = run_all([job for _, job in todo], args.parallel, log_dir, module=module, deadline=deadline)
    failed += [n for n, _ in res["failed"]]
    if res["not_started"]:
        not_started.setdefault("start deadline", []).extend(res["not_started"])
    return failed, not_started


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    failed, not_started = run_jobs(args) if not args.report_only else ([], {})
    summary = collect(args.tasks, args.methods, args.seeds, args)
    summary["wall_s"] = time.time() - t0
    if not_started:
        summary["not_started"] = not_started
    if failed:
        summary["failed"] = failed
    header = (f"# DPF reproduction on the shipped data ({'quick' if args.quick else args.recipe} recipe)")
    write_report(summary, Path(args.out), args.name, header)
    print(markdown_table(summary), flush=True)
    for reason, names in not_started.items():
        print(f"not started ({reason}): {', '.join(names)}", flush=True)
    if failed:
        raise RunsFailed(f"{len(failed)} job(s) failed: {', '.join(failed)}; rerun to retry them "
                         "(finished runs are kept)", summary)
    return summary


if __name__ == "__main__":
    main()
