"""Several fine-tuning runs of one task trained together in one program (vmapped over runs).

    python -m dpf_jax.train.multirun --config configs/finetune_jarvis.py --workdir runs/fe \
        --seeds 0,1,2 --init_checkpoints scratch,runs/pretrain_mask30 [--config.x=y ...]

trains every (init checkpoint, seed) pair — here 2 x 3 = 6 runs — into
`<workdir>/<init name or "scratch">/seed<k>/`, each workdir laid out exactly like a
`python -m dpf_jax.main` run (metrics.csv, checkpoints, results.json, predictions), so
`predict`, `scripts/reproduce.py` and resumption treat them alike.

Why: fine-tuning on small datasets is latency-bound on a GPU. A batch of 32-64 small crystals
keeps each of the step's ~800 kernels busy for microseconds (7.8 ms per step on an H100, not
much less than a 256-crystal step), and separate processes sharing the GPU each run at 1/N
speed. Here the runs' states are stacked along a leading axis and one jitted step, `jax.vmap`
of the usual step, trains them all: N times the work per kernel at a fraction of N times the
cost. Seeds and pre-trained encoders vary per run; everything else (task, data, model,
optimiser, epochs) is shared.

Each run draws its own data order and keys from its seed, as a separate run would. The one
difference: in each step every run's batch is padded to the same budget (the smallest that
holds all of them). Padding is masked everywhere, so the numbers are those of separate runs
up to floating-point reassociation (tested).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dpf_jax.data.batching import prefetch
from dpf_jax.train import checkpoint as ckpt_lib
from dpf_jax.train import loop
from dpf_jax.train.objectives import describe_compute
from dpf_jax.train.optim import make_optimizer
from dpf_jax.train.parallel import describe_cuda_graphs, make_mesh, prefetch_to_device, put_replicated
from dpf_jax.train.step import create_state, make_eval_step

log = logging.getLogger(__name__)


def run_workdirs(base: str, seeds, init_checkpoints) -> list[tuple[int, str, str]]:
    """(seed, init checkpoint, workdir) of every pair; workdir = base/<init name|scratch>/seed<k>."""
    out = []
    for init in init_checkpoints:
        name = Path(init).name if init else "scratch"
        for seed in seeds:
            out.append((int(seed), init, str(Path(base) / name / f"seed{seed}")))
    names = [w for _, _, w in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs would share a workdir: {names} (init checkpoints with one name?)")
    return out


def _stack(trees):
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)


def _run_slice(tree, r: int):
    return jax.tree_util.tree_map(lambda x: x[r], tree)


class _Batches:
    """Per step, one batch per run (each run's own shuffled order), padded to one budget."""

    def __init__(self, batcher, seeds, batch_size: int, drop: bool):
        self.batcher, self.seeds, self.batch_size, self.drop = batcher, list(seeds), batch_size, drop

    def iterate(self, epoch: int, start_batch: int = 0):
        b_ = self.batcher
        orders = [b_.epoch_order(s, epoch, shuffle=True) for s in self.seeds]
        for b in range(start_batch, b_.num_batches(self.drop)):
            chunks = [o[b * self.batch_size:(b + 1) * self.batch_size] for o in orders]
            budget = b_.share_budget([sh for c in chunks for sh in b_.shares(c)])
            yield _stack([b_.make_batch(c, budget) for c in chunks])


def train_runs(config: ml_collections.ConfigDict, runs: list[tuple[int, str, str]]) -> list[dict]:
    """Trains the fine-tuning runs `(seed, init_checkpoint, workdir)` together; returns their
    results (as `loop.train_and_evaluate` does for one). Finished runs must not be passed."""
    if config.mode != "finetune":
        raise ValueError("training several runs together is for fine-tuning (config.mode='finetune')")
    if config.train.get("max_steps", 0) or config.train.get("checkpoint_every_steps", 0):
        raise ValueError("train.max_steps and train.checkpoint_every_steps are not supported when training "
                         "several runs together (checkpoints are written at epoch ends)")
    if not runs:
        return []
    n_runs = len(runs)
    workdirs = [Path(w) for _, _, w in runs]
    run_names = [str(w) for w in workdirs]
    configs = []
    for (seed, init, _), workdir in zip(runs, workdirs):
        c = ml_collections.ConfigDict(config.to_dict())
        c.seed, c.init_checkpoint = seed, init
        loop.check_workdir(workdir)
        configs.append(c)
    loop._add_file_logging(Path(os.path.commonpath([str(w.absolute()) for w in workdirs])))
    for _, init, workdir in runs:  # strict: a run named after an encoder must start from it
        if init and not Path(init).exists():
            raise FileNotFoundError(f"init checkpoint {init!r} of {workdir} does not exist")
    init_paths = [loop.resolve_init_checkpoint(c) for c in configs]
    loop.check_step_settings(config)

    objective = loop.make_objective(config)
    data = loop.load_data(config)  # shared: fine-tuning data do not depend on the seed
    for warning in loop.empty_split_warnings(config, data):
        log.warning("%s", warning)
    mesh = make_mesh(config.get("num_devices", 0) or None)
    num_devices = mesh.size
    stats = loop.data_stats(config, data)
    n_train = len(data.splits["train"])
    drop, steps_per_epoch = loop.epoch_steps(n_train, config.train.batch_size)
    train_b = loop.make_batcher(data.splits["train"], config, num_devices)
    val_b = loop.make_batcher(data.splits["val"], config, num_devices, evaluation=True)
    test_b = loop.make_batcher(data.splits["test"], config, num_devices, evaluation=True)
    batches = _Batches(train_b, [c.seed for c in configs], config.train.batch_size, drop)
    checkpointers = [ckpt_lib.Checkpointer(w) for w in workdirs]
    saved = [set(ck.latest.all_steps()) for ck in checkpointers]
    common = set.intersection(*saved)
    # runs saved one after another can be a save apart if killed hard in between: resume all
    # at the newest step every run still holds (two latest checkpoints are kept per run)
    resume_step = max(common) if common else None
    metas = [ck.read_meta("latest", step=resume_step) for ck in checkpointers] if resume_step is not None else []
    for c, w, meta in zip(configs, workdirs, metas):  # before the state exists: see loop.py
        loop._check_resume_compatible(meta, steps_per_epoch, c, w)
    if metas and loop.adopt_saved_optimizer_layout(metas[0], config):  # one optimiser for all runs
        for c in configs:
            c.optim.flatten = config.optim.flatten
    tx = make_optimizer(config.optim, steps_per_epoch * config.train.epochs)
    model = objective.make_model()
    example = jax.tree_util.tree_map(lambda x: x[0], next(train_b.iterate(shuffle=False)))

    if resume_step is None and any(saved):
        raise loop.TrainingError(
            f"the runs' latest checkpoints share no step ({dict(zip(map(str, workdirs), map(sorted, saved)))}); "
            "resume them separately (python -m dpf_jax.main) or delete the unfinished ones")
    for c, w in zip(configs, workdirs):  # once the workdirs are known to hold these runs (or none)
        (w / "config.json").write_text(c.to_json_best_effort(indent=2))
    states, best, resumed = [], [], []
    for c, init, ck, w in zip(configs, init_paths, checkpointers, workdirs):
        state = create_state(model, tx, example, c.seed, stats)
        restored = ck.restore("latest", state, step=resume_step) if resume_step is not None else None
        if restored is not None:
            state, meta = restored
            best.append([meta.get("best_metric", math.inf), meta.get("best_epoch", -1)])
            resumed.append(int(state.step))
        else:
            if init:
                state = loop.restore_encoder(state, init)
            best.append([math.inf, -1])
            resumed.append(0)
        states.append(jax.device_get(state))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(states[0].params))
    state = put_replicated(_stack(states), mesh)
    del states
    log.info("%d runs of %s trained together on %d device(s) (%s; %s; %s): %s", n_runs, type(model).__name__,
             num_devices, loop.describe_devices(), describe_compute(config.model),
             describe_cuda_graphs(config.train.get("cuda_graphs", "auto"), mesh, loop.step_crystals(config, n_runs)),
             run_names)

    # as train/loop.py: the step carries the runs' states packed, batches bundled, metrics packed
    run = loop.build_run_step(config, objective, model, tx, mesh, state, lambda: next(batches.iterate(0)),
                              num_runs=n_runs)
    train_step, bundle, unpack = run.step, run.bundle, run.unpack_metrics
    carried = run.pack(state)
    del state

    def train_state():
        return run.unpack(carried)

    budget_rows = loop.maybe_tune_budgets(config, train_b, train_step, carried,
                                          lambda: bundle(next(batches.iterate(0))), mesh, run_axis=True)
    eval_step = make_eval_step(objective, model, mesh, num_runs=n_runs)
    eval_key = put_replicated(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**30), mesh)

    step = resumed[0]
    start_epoch, start_batch = divmod(step, steps_per_epoch)
    writers = [loop.MetricsWriter(w, start_epoch) for w in workdirs]
    clock = ckpt_lib.SaveClock(config.train.get("checkpoint_every_secs", 0), config.train.epochs)

    def meta(r, epoch):
        return ckpt_lib.run_meta(step, epoch, best[r][0], best[r][1], steps_per_epoch, configs[r])

    def save(epoch, host=None):  # one host copy of all runs (`host`: if the caller has it)
        host = jax.device_get(train_state()) if host is None else host
        with stop.deferred():  # a signal during the saves does not leave the runs at different steps
            for r, ck in enumerate(checkpointers):
                ck.save_latest(_run_slice(host, r), meta(r, epoch))
        clock.saved()

    stop = loop.StopOnSignal()
    in_flight = config.train.get("steps_in_flight", 2)
    pending: list = []
    try:
        for epoch in range(start_epoch, config.train.epochs):
            t0 = time.time()
            first = start_batch if epoch == start_epoch else 0
            bar = tqdm(total=steps_per_epoch, initial=first, unit="step", leave=False,
                       desc=f"{n_runs} runs, epoch {epoch + 1}/{config.train.epochs}",
                       disable=not config.train.progress_bar)
            pending = []
            host_batches = prefetch(map(bundle, batches.iterate(epoch, first)), config.train.prefetch)
            for dev_batch in prefetch_to_device(host_batches, mesh, config.train.prefetch, run_axis=True):
                carried, m = train_step(carried, dev_batch)
                pending.append((step, m))
                loop.wait_for_older_steps(pending, in_flight)
                step += 1
                bar.update()
                if step % steps_per_epoch:  # the epoch's last step: checked after its validation
                    stop.check()
            bar.close()
            sums = {}
            loop._drain(pending, sums, run_names=run_names, unpack=unpack)
            elapsed = time.time() - t0
            state = train_state()
            lr = loop._current_lr(state)
            val_metrics = None
            if val_b is not None and ((epoch + 1) % config.train.eval_every_epochs == 0
                                      or epoch + 1 == config.train.epochs):
                val_metrics, _ = loop.evaluate(eval_step, state, val_b, mesh, eval_key, num_runs=n_runs)
            host = None  # fetched once, if some run has a new best model
            for r in range(n_runs):
                row = {"epoch": epoch, "step": step, "time_s": elapsed,
                       "crystals_per_s": (step - epoch * steps_per_epoch - first) * config.train.batch_size
                       / max(elapsed, 1e-9), "lr": lr}
                row.update(loop.train_means(sums, r))
                if val_metrics is not None:
                    row.update(loop._flatten_terms("val", val_metrics[r]))
                    if val_metrics[r]["mae"] < best[r][0]:
                        best[r] = [val_metrics[r]["mae"], epoch]
                        host = jax.device_get(state) if host is None else host
                        checkpointers[r].stage_best(_run_slice(host, r), meta(r, epoch))
                writers[r].write(row)
            log.info("epoch %d: train loss %s, val MAE %s", epoch + 1,
                     [round(loop.train_means(sums, r)["train_loss"], 4) for r in range(n_runs)],
                     None if val_metrics is None else [round(v["mae"], 4) for v in val_metrics])
            if clock.due(epoch):
                save(epoch + 1, jax.device_get(state) if host is None else host)
            del state, host  # the unpacked copies: not kept through the next epoch
            stop.check()  # after the epoch's validation, best models and metrics rows
    except (KeyboardInterrupt, loop.Interrupted):
        if loop.donated(carried):  # stopped inside a step: its donated input state is gone
            log.warning("interrupted inside a step: resume from the previous checkpoints")
            for ck in checkpointers:
                ck.close()
            raise
        loop._drain(pending, {}, run_names=run_names, unpack=unpack)
        log.warning("interrupted: saving the latest checkpoints at step %d", step)
        save(step // steps_per_epoch)
        for ck in checkpointers:
            ck.close()
        raise
    finally:
        stop.restore()

    host = jax.device_get(train_state())
    single_eval = make_eval_step(objective, model, mesh)
    results = []
    for r, (c, ck) in enumerate(zip(configs, checkpointers)):
        ck.wait()
        run_state = put_replicated(_run_slice(host, r), mesh)
        res = loop.final_results(c, objective, run_state, ck, single_eval, mesh, eval_key,
                                 {"train": train_b, "val": val_b, "test": test_b}, data, "mae")
        res.update({"best_epoch": best[r][1], "best_val_mae": best[r][0] if math.isfinite(best[r][0]) else None,
                    "num_parameters": int(n_params), "num_devices": num_devices,
                    "platform": jax.devices()[0].platform, "steps": step,
                    "skipped_records": len(data.skipped), "init_checkpoint": init_paths[r] or "",
                    "trained_together_with": run_names})
        if budget_rows:
            res["budget_search"] = budget_rows
        (workdirs[r] / "results.json").write_text(json.dumps(res, indent=2))
        ck.close()
        results.append(res)
    return results


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    from dpf_jax.cli import enable_compilation_cache, explain, put_config_root_on_path, run_app

    cli_argv = sys.argv if argv is None else argv
    put_config_root_on_path(cli_argv)
    flags_ = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "fine-tuning config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "base folder: runs go to <workdir>/<init name|scratch>/seed<k>")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (comma-separated)")
    flags.DEFINE_list("init_checkpoints", ["scratch"], "pre-trained workdirs to start from, comma-separated "
                      "('scratch' or '' = from scratch)")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv_):
        if len(argv_) > 1:
            raise app.UsageError(f"unexpected arguments: {argv_[1:]}")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("absl").setLevel(logging.WARNING)
        enable_compilation_cache(flags_.config.train.get("compilation_cache_dir", ""))
        inits = ["" if i in ("", "scratch") else i for i in flags_.init_checkpoints] or [""]
        specs = run_workdirs(flags_.workdir, flags_.seeds, inits)
        todo = [s for s in specs if not (Path(s[2]) / "results.json").exists()]
        for s in specs:
            if s not in todo:
                print(f"finished already: {s[2]}", flush=True)
        try:
            for res, spec in zip(train_runs(flags_.config, todo), todo):
                print(f"{spec[2]}: test MAE {res.get('test_mae_final')} (best-val model "
                      f"{res.get('test_mae_best_val')})", flush=True)
        except (loop.TrainingError, FileNotFoundError, ValueError) as e:
            message = explain(e, cli_argv)
            logging.error("%s", message)
            raise SystemExit(f"error: {message}")
        except (loop.Interrupted, KeyboardInterrupt) as e:
            raise SystemExit(f"interrupted ({e or 'Ctrl-C'}); run the same command again to resume")

    run_app(run, argv)


if __name__ == "__main__":
    main()
