"""`train_and_evaluate(config, workdir)`: the whole run, for fine-tuning and pre-training alike.

What a user sees: a progress bar per epoch (loss, crystals/s), one line of metrics per epoch in
`<workdir>/metrics.csv` (and TensorBoard when `tensorboardX` is installed), checkpoints under
`<workdir>/checkpoints/`, and at the end `<workdir>/results.json` with the test MAE of the final
and of the best-validation model. A killed run started again with the same command resumes
from its latest checkpoint exactly (same data order, same random keys).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dpf_jax.data.batching import BUDGET_PLACEMENTS, GraphBatcher, graph_to_jraph, prefetch
from dpf_jax.data.dataset import GraphParams, default_workers
from dpf_jax.data.pipeline import (DEFAULT_SPLIT_FRACTIONS, PreparedData, SplitData, prepare_labeled, prepare_unlabeled,
                                   task_units_and_transform)
from dpf_jax.data.transfer import TransferPacking
from dpf_jax.tasks.losses import lattice_param_stats
from dpf_jax.tasks.official import OfficialBatcher, drop_single_atom_structures
from dpf_jax.tasks.rebuild import RebuildingBatcher, shutdown_workers
from dpf_jax.train import checkpoint as ckpt_lib
from dpf_jax.train.budget_search import tune_batcher
from dpf_jax.train.objectives import (DenoisingObjective, OfficialDenoisingObjective, RegressionObjective,
                                      describe_compute)
from dpf_jax.train.optim import make_optimizer
from dpf_jax.train.parallel import (check_cuda_graphs, describe_cuda_graphs, make_mesh, maybe_initialize_distributed,
                                    prefetch_to_device, put_batch, put_replicated, step_compiler_options)
from dpf_jax.train.step import (MetricsPacking, StatePacking, TrainState, create_state, make_eval_step,
                                make_train_step, split_seed)

log = logging.getLogger(__name__)

DEFAULT_PRETRAIN_WORKDIR = "runs/pretrain_mask30"


class TrainingError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------- set-up

def check_workdir(workdir: Path, min_free_mb: int = 200) -> None:
    """Fails before training if the workdir is unwritable or the disk nearly full."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"workdir {workdir} is not writable: {e}") from e
    free_mb = shutil.disk_usage(workdir).free / 2**20
    if free_mb < min_free_mb:
        raise TrainingError(f"only {free_mb:.0f} MB free on the disk of {workdir}; "
                            f"need at least {min_free_mb} MB for checkpoints")


def merge_limit(config) -> tuple[str, str]:
    """The most merging of equal edges and atoms (`graph.merge_edges`) that leaves this run's
    results unchanged, and why no more. Fine-tuning: "atoms" (the prediction is a mean over
    atoms). Pre-training predicts per atom, so at most "distance"; with the paper's corruption
    the position head sums edge vectors, and a step that perturbs the lattice changes equal
    lengths by different amounts, so "mirror" there (with `rebuild_topology` the input pipeline
    perturbs and merges the perturbed structure, which stays exact)."""
    if config.mode != "pretrain":
        return "atoms", ""
    per_atom = "pre-training predicts per-atom outputs, which merged atoms do not have"
    if _corruption(config) != "paper":
        return "distance", per_atom
    p = config.pretrain
    if p.position_scale:
        return "mirror", ("the position head (pretrain.position_scale > 0) sums edge vectors, and distance-merged "
                          "edges stand for vectors of other directions")
    if p.lattice_scale and not p.rebuild_topology:
        return "mirror", ("the training step perturbs the lattice (pretrain.lattice_scale > 0), so equal edge "
                          "lengths stop being equal")
    return "distance", per_atom


def _graph_params(config) -> GraphParams:
    return GraphParams.from_config(config.graph, *merge_limit(config))


def load_data(config) -> PreparedData:
    d = config.data
    common = dict(params=_graph_params(config), cache_dir=d.cache_dir or None,
                  workers=d.num_workers or None, max_records=d.max_records)
    if config.mode == "pretrain":
        data = prepare_unlabeled(d.path, val_fraction=d.val_fraction, seed=config.seed, **common)
        if _corruption(config) == "official":  # the authors' code drops 1-atom structures (logged)
            data = drop_single_atom_structures(data)
        return data
    if config.mode == "finetune":
        _, transform = task_units_and_transform(d.task, d.units, d.target_transform)
        return prepare_labeled(d.path, d.task, transform=transform,
                               split_fractions=tuple(d.get("split_fractions", DEFAULT_SPLIT_FRACTIONS)), **common)
    raise ValueError(f"config.mode must be 'pretrain' or 'finetune', got {config.mode!r}")


def empty_split_warnings(config, data: PreparedData) -> list[str]:
    """What an empty validation or test split costs a run, to say before it trains."""
    out = []
    if not data.splits["val"].graphs:
        out.append(f"{data.source}: no validation records: no validation metric, no checkpoints/best "
                   "(a fine-tuning run started from this workdir takes checkpoints/latest)"
                   + (f"; raise data.val_fraction (now {config.data.val_fraction})" if config.mode == "pretrain"
                      else ""))
    if config.mode == "finetune" and not data.splits["test"].graphs:
        out.append(f"{data.source}: no test records: results.json will have no test MAE")
    return out


def _corruption(config) -> str:
    """config.pretrain.corruption: "paper" (default) or "official" (the authors' released code)."""
    corruption = config.pretrain.get("corruption", "paper")
    if corruption not in ("paper", "official"):
        raise ValueError(f"config.pretrain.corruption must be 'paper' or 'official', got {corruption!r}")
    return corruption


def make_objective(config):
    if config.mode == "pretrain":
        if _corruption(config) == "official":  # fixed noise, drawn once per crystal by the batcher
            return OfficialDenoisingObjective(config.model, config.pretrain)
        p = config.pretrain
        if not (p.mask_fraction or p.position_scale or p.lattice_scale):
            raise ValueError("pre-training needs at least one of pretrain.mask_fraction, "
                             "pretrain.position_scale, pretrain.lattice_scale")
        return DenoisingObjective(config.model, config.pretrain)
    return RegressionObjective(config.model)


def data_stats(config, data: PreparedData) -> dict:
    """Training-set statistics the objective needs; stored in the train state (checkpointed)."""
    train = data.splits["train"]
    stats = {"target_mean": np.float32(0.0), "target_std": np.float32(1.0),
             "lattice_mean": np.zeros(6, np.float32), "lattice_std": np.ones(6, np.float32)}
    if config.mode == "finetune" and config.train.standardize_targets:
        stats["target_mean"] = np.float32(np.mean(train.targets))
        std = float(np.std(train.targets))
        stats["target_std"] = np.float32(std if std > 1e-8 else 1.0)
    if config.mode == "pretrain" and config.pretrain.lattice_scale:
        mean, std = lattice_param_stats([g.crystal.lattice for g in train.graphs])
        stats["lattice_mean"], stats["lattice_std"] = np.float32(mean), np.float32(std)
    return stats


def check_step_settings(config) -> None:
    """train.cuda_graphs, train.budget_placement, train.num_budget_levels and
    train.eval_budget_levels, checked before the data loads (by every entry point that trains)."""
    check_cuda_graphs(config.train.get("cuda_graphs", "auto"))
    placement = config.train.get("budget_placement", "cost")
    if placement not in BUDGET_PLACEMENTS:
        raise ValueError(f"train.budget_placement must be one of {BUDGET_PLACEMENTS}, got {placement!r}")
    for key in ("num_budget_levels", "eval_budget_levels"):
        levels = config.train.get(key, 1)
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"train.{key} must be a whole number >= 1, got {levels!r}")


def budget_levels(config, evaluation: bool = False) -> int:
    """How many padding budget levels a batcher gets: train.num_budget_levels for training,
    at most train.eval_budget_levels (default 4) of them for evaluation and prediction (defaults
    2 and 4 for the saved configs of runs older than those settings)."""
    levels = int(config.train.get("num_budget_levels", 2))
    return min(levels, int(config.train.get("eval_budget_levels", 4))) if evaluation else levels


def make_batcher(split: SplitData, config, num_devices: int, budgets=None, key_fn=None,
                 evaluation: bool = False) -> GraphBatcher | None:
    """The split's batcher; in pre-training with `rebuild_topology`, one that perturbs on the
    host and rebuilds each perturbed crystal's graph, keyed by `key_fn(epoch, batch)`.
    `evaluation`: a validation / test batcher (fewer budget levels, `budget_levels`)."""
    if not split.graphs:
        return None
    balance = config.train.get("balance_shares", True)
    # budgets are sampled with a fixed seed, not the run's: runs that differ only in seed then
    # share padded shapes, hence compiled executables in the persistent compilation cache
    padding = dict(num_levels=budget_levels(config, evaluation), seed=0,
                   budget_placement=config.train.get("budget_placement", "cost"))
    if config.mode == "pretrain" and _corruption(config) == "official":  # corrupted once, here
        return OfficialBatcher(split.graphs, config.train.batch_size, num_devices, config.seed,
                               dataclasses.asdict(_graph_params(config)),
                               workers=config.data.num_workers or default_workers(),
                               progress=config.train.progress_bar, budgets=budgets, balance=balance, **padding)
    if config.mode == "pretrain" and config.pretrain.rebuild_topology and key_fn is not None:
        return RebuildingBatcher(split.graphs, config.train.batch_size, num_devices,
                                 DenoisingObjective(config.model, config.pretrain).perturb_cfg(), key_fn,
                                 dataclasses.asdict(_graph_params(config)),
                                 workers=config.data.num_workers or default_workers(), balance=balance, **padding)
    targets = np.nan_to_num(split.targets, nan=0.0)
    graphs = [graph_to_jraph(g, float(t)) for g, t in zip(split.graphs, targets)]
    return GraphBatcher(graphs, config.train.batch_size, num_devices, budgets=budgets, balance=balance, **padding)


def describe_budgets(train_b, *eval_batchers) -> str:
    """One log line: the padded (nodes, edges) shapes per device of the training batches and how
    many the evaluation batchers have; each is one compilation, made when a batch first needs it
    (the pauses of a first epoch)."""
    shapes = ", ".join(f"{b.n_node}x{b.n_edge}" for b in train_b.budgets)
    n_eval = len({b for e in eval_batchers if e is not None for b in e.budgets})
    return (f"padding budgets (nodes x edges per device): {len(train_b.budgets)} training shapes ({shapes}), "
            f"{n_eval} evaluation shapes; each compiles when a batch first needs it")


def maybe_tune_budgets(config, batcher, train_step, state, host_batch_fn, mesh, run_axis: bool = False) -> list[dict]:
    """With `train.budget_search` = K > 0: the training batcher's padded edge counts chosen
    among K per budget level by the compiled step's cost (`dpf_jax.train.budget_search`);
    `host_batch_fn()`: any batch of the step's input layout (its shapes do not matter), made
    only when the search runs."""
    candidates = int(config.train.get("budget_search", 0))
    if candidates <= 0:
        return []
    t0 = time.time()
    level = int(config.train.get("budget_search_autotune_level", 0))
    options = {"xla_gpu_autotune_level": level} if level >= 0 and jax.default_backend() == "gpu" else None
    rows = tune_batcher(batcher, train_step, state, put_batch(host_batch_fn(), mesh, run_axis), candidates,
                        int(config.train.get("budget_search_granule", 1024)),
                        config.train.get("budget_search_cache", "") or None,
                        threads=int(config.train.get("budget_search_threads", 4)), compiler_options=options)
    log.info("budget search: %d candidate shapes in %.1f s", sum(len(r["bytes_accessed"]) for r in rows),
             time.time() - t0)
    return rows


def make_transfer_packing(config, example_batch_fn) -> TransferPacking | None:
    """With `train.pack_batches`: the layout that bundles this run's batches into three arrays
    for the copy and the call (`dpf_jax.data.transfer`), taken from `example_batch_fn()`; None
    otherwise, or, with a warning, when a field cannot travel packed (the batches then go as
    they are)."""
    if not config.train.get("pack_batches", False):
        return None
    try:
        return TransferPacking(example_batch_fn())
    except TypeError as e:
        log.warning("train.pack_batches: batches go unpacked (%s)", e)
        return None


@dataclasses.dataclass
class RunStep:
    """The jitted train step as the training loops run it, with what goes in and out packed
    as the config says (`train.pack_state`, `train.pack_batches`, `train.pack_metrics`):
    `carried, m = step(carried, device batch of bundle(host batch))`, where `carried =
    pack(state)` and the `TrainState` is `unpack(carried)`; `unpack_metrics` (None: not packed)
    turns a fetched `m` into the metrics dict (`_drain(..., unpack=...)`)."""

    step: Any
    packing: StatePacking | None
    transfer: TransferPacking | None
    unpack_metrics: Any

    def pack(self, state):
        return self.packing.pack(state) if self.packing else state

    def unpack(self, carried) -> TrainState:
        return self.packing.unpack(carried) if self.packing else carried

    def bundle(self, host_batch):
        return self.transfer.pack(host_batch) if self.transfer else host_batch


def step_crystals(config, num_runs: int = 0) -> int:
    """Crystals one training step processes: the global batch, times the runs trained together."""
    return config.train.batch_size * max(num_runs, 1)


def flat_update_enabled(config) -> bool:
    """`train.flat_update`, which needs the optimiser state of one flat vector (`optim.flatten`)."""
    return bool(config.train.get("flat_update", True) and config.optim.get("flatten", False))


def build_run_step(config, objective, model, tx, mesh, state, example_batch_fn, num_runs: int = 0,
                   steps_per_call: int = 1) -> RunStep:
    """`make_train_step` with the packings `config.train` asks for; `state`: the (replicated)
    initial state, for the state's layout; `example_batch_fn()`: a host batch, for the batches'
    layout (built only when `train.pack_batches` is on)."""
    packing = StatePacking(state, run_axis=num_runs > 0) if config.train.get("pack_state", False) else None
    transfer = make_transfer_packing(config, example_batch_fn)
    metrics = MetricsPacking() if config.train.get("pack_metrics", False) else None
    options = step_compiler_options(config.train.get("cuda_graphs", "auto"), mesh, step_crystals(config, num_runs))
    step = make_train_step(objective, model, tx, mesh, num_runs=num_runs, steps_per_call=steps_per_call,
                           packing=packing, transfer=transfer, metrics_packing=metrics, compiler_options=options,
                           flat_update=flat_update_enabled(config))
    return RunStep(step, packing, transfer, metrics.unpack if metrics else None)


def restore_encoder(state: TrainState, path: str) -> TrainState:
    """Copies a pre-trained encoder (params and BatchNorm statistics) into `state`.

    The architecture must match exactly; otherwise the error lists every differing parameter.
    """
    raw, meta = ckpt_lib.load_raw_checkpoint(path)
    src_params = raw.get("params", {}).get("encoder")
    if src_params is None:
        raise TrainingError(f"checkpoint {path} holds no 'encoder' parameters "
                            f"(top-level params: {sorted(raw.get('params', {}))})")
    flat_src = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(src_params)[0]}
    flat_dst = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(state.params["encoder"])[0]}
    problems = []
    for k in sorted(set(flat_src) | set(flat_dst)):
        if k not in flat_src:
            problems.append(f"  {k}: missing in the checkpoint")
        elif k not in flat_dst:
            problems.append(f"  {k}: not in this model")
        elif tuple(flat_src[k].shape) != tuple(flat_dst[k].shape):
            problems.append(f"  {k}: checkpoint {tuple(flat_src[k].shape)} vs model {tuple(flat_dst[k].shape)}")
    if problems:
        raise TrainingError(f"the encoder in {path} does not match this model's architecture:\n"
                            + "\n".join(problems))
    cast = lambda dst, src: jnp.asarray(src, dtype=dst.dtype)
    params = dict(state.params)
    params["encoder"] = jax.tree_util.tree_map(cast, state.params["encoder"], src_params)
    batch_stats = dict(state.batch_stats)
    src_bs = raw.get("batch_stats", {}).get("encoder")
    if src_bs is not None and "encoder" in batch_stats:
        batch_stats["encoder"] = jax.tree_util.tree_map(cast, batch_stats["encoder"], src_bs)
    log.info("initialised the encoder from the pre-trained checkpoint %s (step %s)", path, meta.get("step"))
    return state.replace(params=params, batch_stats=batch_stats)


def resolve_init_checkpoint(config) -> str | None:
    path = config.get("init_checkpoint", "")
    if not path or config.mode != "finetune":
        return None
    if Path(path).exists():
        print(f"Fine-tuning from the pre-trained encoder in {path}", flush=True)
        return path
    if path == DEFAULT_PRETRAIN_WORKDIR:
        print(f"No pre-trained checkpoint at {path}: training from scratch "
              "(run configs/pretrain_mask30.py first to fine-tune from pre-training)", flush=True)
        return None
    raise FileNotFoundError(f"init_checkpoint {path!r} does not exist")


# ------------------------------------------------------------------------------ evaluation

def evaluate(eval_step, state, batcher: GraphBatcher, mesh, key, num_runs: int = 0):
    """Metrics over a whole split and the per-crystal predictions in the split's order.

    Every batch is dispatched before any result is fetched, so host batching, transfers and
    device work overlap; one `device_get` at the end. With `num_runs` (runs stacked along a
    leading axis, `make_eval_step(..., num_runs)`): a list of metrics per run and predictions
    [runs, crystals].
    """
    runs = num_runs or 1
    order = batcher.epoch_order(0, 0, shuffle=False)
    host_meta, outputs = [], []
    for host, dev in prefetch_to_device(prefetch(batcher.iterate(shuffle=False)), mesh, with_host=True):
        host_meta.append((host.globals["index"], host.globals["mask"]))
        outputs.append(eval_step(state, dev, key))
    totals: dict[str, np.ndarray] = {}
    preds = np.full((runs, len(batcher)), np.nan)
    for b, ((terms, p), (index, mask)) in enumerate(zip(jax.device_get(outputs), host_meta)):
        for name, (s, c) in terms.items():
            acc = totals.setdefault(name, np.zeros((runs, 2)))
            acc += np.stack([np.reshape(s, runs), np.reshape(c, runs)], axis=1)
        p = np.reshape(p, (runs,) + index.shape)
        preds[:, order[b * batcher.batch_size + index[mask]]] = p[:, mask]
    metrics = [{name: float(t[r, 0] / max(t[r, 1], 1.0)) for name, t in totals.items()} for r in range(runs)]
    return (metrics, preds) if num_runs else (metrics[0], preds[0])


# ---------------------------------------------------------------------------- the run itself

class MetricsWriter:
    """metrics.csv (one row per epoch; rows past a resumed epoch are dropped) + TensorBoard."""

    def __init__(self, workdir: Path, resume_epoch: int):
        self.path = workdir / "metrics.csv"
        self.rows = []
        if self.path.exists() and resume_epoch > 0:
            with open(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < resume_epoch]
        self.tb = None
        try:
            from tensorboardX import SummaryWriter  # optional

            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict):
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_suffix(".csv.part")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()


def _flatten_terms(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": float(v) for k, v in metrics.items()}


class Interrupted(Exception):
    """SIGTERM or Ctrl-C stopped the run (after saving, unless stopped inside a step)."""


class StopOnSignal:
    """SIGTERM (what schedulers send) and Ctrl-C only set a flag, which the training loop checks
    between steps with `check()`: raised inside a step, the exception would leave the train
    state donated to a call whose result is lost, with nothing to save. A second signal stops
    at once (then only the previous checkpoint remains). Handlers are installed on creation
    (main thread only) and put back by `restore()`."""

    def __init__(self):
        self.received: list[int] = []
        handled = (signal.SIGTERM, signal.SIGINT)
        self._old = {s: signal.signal(s, self._on_signal) for s in handled} if _main_thread() else {}

    _deferring = False

    def _on_signal(self, signum, frame):
        if self.received and self._deferring:
            log.warning("signal %d: still saving a checkpoint, stopping when done", signum)
            return
        if self.received:
            raise Interrupted(f"second signal {signum}")
        self.received.append(signum)
        log.warning("signal %d: stopping after the current step (send it again to stop at once)", signum)

    def check(self):
        if self.received:
            raise Interrupted(f"signal {self.received[0]}")

    @contextlib.contextmanager
    def deferred(self):
        """Signals inside this block are only recorded (e.g. while writing a checkpoint)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def epoch_steps(n_train: int, batch_size: int) -> tuple[bool, int]:
    """(drop the last partial batch?, steps per epoch): full train batches, as the reference
    does, unless the split is smaller than one batch (then one partial batch)."""
    drop = n_train >= batch_size
    return drop, (n_train // batch_size if drop else 1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    workdir = Path(workdir)
    check_workdir(workdir)
    _add_file_logging(workdir)
    maybe_initialize_distributed(config.get("distributed", False))

    objective = make_objective(config)
    init_path = resolve_init_checkpoint(config)  # fail fast, before data preparation
    check_step_settings(config)
    data = load_data(config)  # before JAX starts its backends (graph workers are forked)
    mesh = make_mesh(config.get("num_devices", 0) or None)
    num_devices = mesh.size
    log.info("%s", data.summary())
    for warning in empty_split_warnings(config, data):
        log.warning("%s", warning)
    if data.skipped:
        (workdir / "skipped.json").write_text(json.dumps(
            {"source": data.source, "count": len(data.skipped),
             "skipped": [{"record": rid, "reason": reason} for rid, reason in data.skipped]}, indent=1))
    stats = data_stats(config, data)

    _, run_key = split_seed(config.seed)
    eval_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**30)
    n_train = len(data.splits["train"])
    drop, steps_per_epoch = epoch_steps(n_train, config.train.batch_size)
    # key of the step that consumes batch b of epoch e (used when perturbing on the host)
    train_key_fn = lambda e, b: jax.random.fold_in(run_key, e * steps_per_epoch + b)
    train_b = make_batcher(data.splits["train"], config, num_devices, key_fn=train_key_fn)
    val_b = make_batcher(data.splits["val"], config, num_devices, key_fn=lambda e, b: eval_key, evaluation=True)
    test_b = make_batcher(data.splits["test"], config, num_devices, key_fn=lambda e, b: eval_key, evaluation=True)
    assert steps_per_epoch == train_b.num_batches(drop_remainder=drop)
    total_steps = steps_per_epoch * config.train.epochs
    checkpointer = ckpt_lib.Checkpointer(workdir)
    saved_meta = checkpointer.read_meta("latest")
    if saved_meta is not None:  # before building the state a restore must match
        _check_resume_compatible(saved_meta, steps_per_epoch, config, workdir)
        adopt_saved_optimizer_layout(saved_meta, config)
    # written once the run is known to be this workdir's own (a refused resume leaves it alone)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    tx = make_optimizer(config.optim, total_steps)
    model = objective.make_model()

    first_batch = next(train_b.iterate(shuffle=False))
    example = jax.tree_util.tree_map(lambda x: x[0], first_batch)
    state = create_state(model, tx, example, config.seed, stats)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    log.info("model: %s with %d parameters on %d device(s) (%s); %s; %s", type(model).__name__, n_params,
             num_devices, describe_devices(), describe_compute(config.model),
             describe_cuda_graphs(config.train.get("cuda_graphs", "auto"), mesh, step_crystals(config)))

    restored = checkpointer.restore("latest", state)
    best_metric, best_epoch = math.inf, -1
    if restored is not None:
        state, meta = restored
        best_metric, best_epoch = meta.get("best_metric", math.inf), meta.get("best_epoch", -1)
        step = int(state.step)
        done = " (the run had finished: its models are evaluated again)" if step >= total_steps else ""
        message = f"Resuming from {workdir}/checkpoints/latest at step {step} of {total_steps}{done}"
        print(message, flush=True)  # on the console whatever the logging setup; and in train.log
        log.info("%s", message)
    elif init_path:
        state = restore_encoder(state, init_path)
    state = put_replicated(state, mesh)

    # the step takes and returns `carried`: the state packed into a few arrays (train.pack_state),
    # batches bundled (train.pack_batches) and metrics packed (train.pack_metrics), which costs
    # the host less per call; `train_state()` is the TrainState for everything else
    run = build_run_step(config, objective, model, tx, mesh, state, lambda: first_batch)
    train_step, bundle = run.step, run.bundle
    drain = functools.partial(_drain, unpack=run.unpack_metrics)
    carried = run.pack(state)
    del state  # packed: its arrays are copies, not needed any more

    def train_state() -> TrainState:
        return run.unpack(carried)

    budget_rows = maybe_tune_budgets(config, train_b, train_step, carried, lambda: bundle(first_batch), mesh)
    log.info("%s", describe_budgets(train_b, val_b, test_b))
    eval_step = make_eval_step(objective, model, mesh)
    eval_key = put_replicated(eval_key, mesh)
    metric_name = "mae" if config.mode == "finetune" else "loss"

    step = int(jax.device_get(train_state().step))
    start_epoch, start_batch = divmod(step, steps_per_epoch)
    writer = MetricsWriter(workdir, start_epoch)
    log_every = max(1, config.train.log_every_steps)
    in_flight = config.train.get("steps_in_flight", 2)
    ckpt_every = config.train.checkpoint_every_steps
    max_steps = config.train.get("max_steps", 0)
    clock = ckpt_lib.SaveClock(config.train.get("checkpoint_every_secs", 0), config.train.epochs)

    def meta(epoch, state):
        return ckpt_lib.run_meta(jax.device_get(state.step), epoch, best_metric, best_epoch, steps_per_epoch,
                                 config)

    def save(epoch, state=None):  # `state`: the unpacked state if the caller has it
        with stop.deferred():  # a signal during a save does not cut it short
            state = train_state() if state is None else state
            checkpointer.save_latest(state, meta(epoch, state))
        clock.saved()

    stop = StopOnSignal()
    pending, sums = [], {}
    try:
        for epoch in range(start_epoch, config.train.epochs):
            t0 = time.time()
            first = start_batch if epoch == start_epoch else 0
            batches = prefetch(map(bundle, train_b.iterate(config.seed, epoch, shuffle=True, drop_remainder=drop,
                                                           start_batch=first)), config.train.prefetch)
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{config.train.epochs}",
                       unit="step", leave=False, disable=not config.train.progress_bar)
            pending, sums, n_crystals = [], {}, 0
            stopped = False
            for host_batch_dev in prefetch_to_device(batches, mesh, config.train.prefetch):
                if max_steps and step >= max_steps:
                    stopped = True
                    break
                carried, m = train_step(carried, host_batch_dev)
                pending.append((int(step), m))
                wait_for_older_steps(pending, in_flight)
                step += 1
                n_crystals += config.train.batch_size
                bar.update()
                if step % steps_per_epoch:  # the epoch's last step: checked after its validation
                    stop.check()
                if len(pending) >= log_every + 2:
                    # fetch all but the two newest steps: no wait on work still in flight
                    drain(pending, sums, keep=2)
                    bar.set_postfix(loss=f"{train_means(sums)['train_loss']:.4g}",
                                    cryst_s=f"{n_crystals / (time.time() - t0):.0f}")
                if ckpt_every and step % ckpt_every == 0:
                    drain(pending, sums)  # never checkpoint past an unchecked step
                    save(epoch)
            if stopped:
                # stopped mid-epoch on purpose: save and leave, as an interruption would
                drain(pending, sums)
                bar.close()
                save(epoch)
                checkpointer.close()
                log.warning("stopped at train.max_steps=%d (step %d); run again with a larger (or no) "
                            "train.max_steps to continue", max_steps, step)
                return {"stopped_at_step": step}
            drain(pending, sums)
            bar.close()
            elapsed = time.time() - t0
            state = train_state()
            row = {"epoch": epoch, "step": step, "time_s": elapsed,
                   "crystals_per_s": n_crystals / max(elapsed, 1e-9),
                   "lr": float(_current_lr(state))}
            row.update(train_means(sums))
            if val_b is not None and ((epoch + 1) % config.train.eval_every_epochs == 0
                                      or epoch + 1 == config.train.epochs):
                val_metrics, _ = evaluate(eval_step, state, val_b, mesh, eval_key)
                row.update(_flatten_terms("val", val_metrics))
                if metric_name == "mae":
                    current = float(val_metrics["mae"])
                else:  # pre-training: the weighted total of the validation denoising losses
                    current = float(objective.total_loss({k: (v, 1.0) for k, v in val_metrics.items()}))
                row["val_" + metric_name] = current
                if current < best_metric:
                    best_metric, best_epoch = current, epoch
                    checkpointer.stage_best(state, meta(epoch, state))
            writer.write(row)
            # "epoch N" counts from 1 like the progress bar; the row's own "epoch" (metrics.csv,
            # results.json's best_epoch) is the 0-based index, so it is not repeated here
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                                                          f"{k}={v}" for k, v in row.items() if k != "epoch"))
            if clock.due(epoch):
                save(epoch + 1, state)
            del state  # the unpacked copy: not kept on the devices through the next epoch
            stop.check()  # after the epoch's validation, best model and metrics row
    except (KeyboardInterrupt, Interrupted) as e:
        if donated(carried):  # stopped inside a step: its donated input state is gone
            log.warning("interrupted (%s) inside a step: resume from the previous checkpoint", e)
            checkpointer.close()
            raise
        state = train_state()  # unpacked once, for the step count and the save
        at = int(jax.device_get(state.step))
        drain(pending, sums)
        log.warning("interrupted (%s): saving the latest checkpoint at step %d", e, at)
        save(at // steps_per_epoch, state)
        checkpointer.close()
        raise
    finally:
        stop.restore()
    checkpointer.wait()

    state = train_state()
    results = final_results(config, objective, state, checkpointer, eval_step, mesh, eval_key,
                            {"train": train_b, "val": val_b, "test": test_b}, data, metric_name)
    shutdown_workers()  # graph-rebuild processes, if this run started any
    results.update({"best_epoch": best_epoch,
                    "best_val_" + metric_name: best_metric if math.isfinite(best_metric) else None,
                    "num_parameters": int(n_params), "num_devices": num_devices,
                    "platform": jax.devices()[0].platform, "steps": int(jax.device_get(state.step)),
                    "skipped_records": len(data.skipped),
                    "init_checkpoint": init_path or ""})
    if budget_rows:
        results["budget_search"] = budget_rows
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2), flush=True)
    checkpointer.close()
    return results


def final_results(config, objective, state, checkpointer, eval_step, mesh, key, batchers, data,
                  metric_name) -> dict:
    """Test metrics of the final model and of the best-validation checkpoint."""
    out: dict[str, Any] = {"mode": config.mode}
    split = "test" if batchers["test"] is not None else "val"
    b = batchers[split]
    if b is None:
        return out
    final_metrics, preds = evaluate(eval_step, state, b, mesh, key)
    out.update({f"{split}_{k}_final": float(v) for k, v in final_metrics.items()})
    best = checkpointer.restore("best", jax.device_get(state))
    if best is not None:
        best_state = put_replicated(best[0], mesh)
        best_metrics, best_preds = evaluate(eval_step, best_state, b, mesh, key)
        out.update({f"{split}_{k}_best_val": float(v) for k, v in best_metrics.items()})
    if config.mode == "pretrain" and (config.pretrain.mask_fraction or _corruption(config) == "official"):
        # accuracy of always guessing the training set's most frequent element
        train_z = np.concatenate([g.crystal.numbers for g in data.splits["train"].graphs])
        top = int(np.bincount(train_z).argmax())
        split_z = np.concatenate([g.crystal.numbers for g in data.splits[split].graphs])
        out["type_acc_most_frequent_element_baseline"] = float(np.mean(split_z == top))
    if config.mode == "finetune":
        out["task"] = config.data.task
        out["units"] = task_units_and_transform(config.data.task, config.data.units,
                                                config.data.target_transform)[0]
        out["mean_predictor_mae"] = float(np.mean(np.abs(data.splits[split].targets
                                                         - np.mean(data.splits["train"].targets))))
        ids = data.splits[split].ids
        with open(Path(checkpointer.latest.directory).parent.parent / f"predictions_{split}.csv", "w") as f:
            w = csv.writer(f)
            w.writerow(["id", "target", "prediction"])
            for i, t, p in zip(ids, data.splits[split].targets, preds):
                w.writerow([i, f"{t:.6g}", f"{p:.6g}"])
    return out


# The settings that define what a run computes: resuming with any of them changed would continue
# one run under another's name (e.g. a formation-energy model scored and saved as a band gap run).
# "pretrain" is compared whole, "graph" key by key (a new graph.* key must be added here if it
# changes results). Speed-only settings (precision, remat, kernels, budgets, edge merging,
# logging, checkpoint intervals, workers, max_steps) may change between a run and its resumption.
RUN_DEFINING_SETTINGS = (
    "mode", "seed", "init_checkpoint", "data.path", "data.task", "data.units", "data.target_transform",
    "data.val_fraction", "data.split_fractions", "data.max_records", "graph.cutoff", "graph.max_neighbors",
    "graph.use_lattice",
    "model.num_layers", "model.channels", "model.heads",
    "model.rbf_bins", "model.cutoff", "optim.learning_rate", "optim.weight_decay", "optim.pct_start",
    "optim.div_factor", "optim.final_div_factor", "optim.cycle_momentum", "optim.base_momentum",
    "optim.max_momentum", "optim.clip_norm", "train.epochs", "train.batch_size", "train.standardize_targets",
    "pretrain",
)
_MISSING = object()


def _setting(tree, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _check_resume_compatible(meta: dict, steps_per_epoch: int, config, workdir) -> None:
    """Resuming is exact only with the same data, model, task and schedule: refuse anything else
    (settings a checkpoint predates are not compared)."""
    saved_cfg, cfg = meta.get("config", {}), json.loads(config.to_json_best_effort())
    pairs = [(k, _setting(saved_cfg, k), _setting(cfg, k)) for k in RUN_DEFINING_SETTINGS]
    changed = [f"{k}: {old!r} -> {new!r}" for k, old, new in pairs if old is not _MISSING and old != new]
    if changed:
        raise TrainingError(
            f"{workdir} holds a different run ({'; '.join(changed)}). Resume it with its own settings "
            "(its config.json), or give this run another --workdir.")
    if meta.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise TrainingError(
            f"{workdir} holds a run with {meta.get('steps_per_epoch')} steps per epoch; this config gives "
            f"{steps_per_epoch} (the data changed). Resume with the same data or use another --workdir.")


def adopt_saved_optimizer_layout(meta: dict, config) -> bool:
    """A run resumes with the optimiser-state layout it was saved with (`optim.flatten` only
    changes speed, and the two layouts cannot restore into each other; checkpoints from before
    the option existed are per-leaf). Returns whether `config` was changed."""
    saved = bool(meta.get("config", {}).get("optim", {}).get("flatten", False))
    if saved == bool(config.optim.get("flatten", False)):
        return False
    print(f"Resuming with optim.flatten={saved}, the optimiser-state layout the checkpoint was saved with",
          flush=True)
    config.optim.flatten = saved
    return True


def donated(tree) -> bool:
    """Whether some array of `tree` is gone: the input of a step that was cut short (the
    step donates its input state). Asked before touching the state, because what touching a
    deleted array raises differs between calls and JAX versions (RuntimeError, ValueError)."""
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree_util.tree_leaves(tree))


def wait_for_older_steps(pending: list, in_flight: int) -> None:
    """Blocks until at most `in_flight` of the queued steps (`pending`, oldest first; earlier
    ones were fetched) can still be running. JAX dispatches steps asynchronously, so without
    this the host runs ahead by up to `log_every_steps` steps: a SIGTERM or Ctrl-C would then
    wait for all of them (minutes on a CPU) before the checkpoint. Two in flight keep a GPU
    fed. No data is copied to the host."""
    if in_flight > 0 and len(pending) > in_flight:
        jax.block_until_ready(pending[-in_flight - 1][1])  # the metrics of that step


def _drain(pending: list, sums: dict, keep: int = 0, run_names: list[str] | None = None,
           unpack=None) -> None:
    """Fetches buffered step metrics but the `keep` newest (one host sync) into `sums`
    (name -> [runs, (sum, count)]; one run, or several trained together, named by
    `run_names`) and stops at the first non-finite step. `unpack`: the metrics came packed
    (`MetricsPacking.unpack` makes each fetched vector the dict again)."""
    ready = pending[:len(pending) - keep]
    if not ready:
        return
    fetched = jax.device_get([m for _, m in ready])
    if unpack is not None:
        fetched = [unpack(m) for m in fetched]
    for (s, _), m in zip(ready, fetched):
        loss = np.atleast_1d(np.asarray(m["loss"], np.float64))
        finite = np.atleast_1d(m["finite"])
        if not finite.all():
            where = "" if run_names is None else f" in {[run_names[r] for r in np.flatnonzero(~finite)]}"
            raise TrainingError(f"non-finite loss or gradient at step {s}{where} (loss="
                                f"{', '.join(f'{x:g}' for x in loss)}); the run stopped, no NaN reached the "
                                "parameters and the latest checkpoint predates that step. Try a lower "
                                "learning rate or check the data.")
        terms = {"loss": (loss, np.ones_like(loss)), **m["terms"]}
        for name, (tsum, tcount) in terms.items():
            acc = sums.setdefault(name, np.zeros((len(loss), 2)))
            acc[:, 0] += np.atleast_1d(tsum)
            acc[:, 1] += np.atleast_1d(tcount)
    del pending[:len(ready)]


def train_means(sums: dict, run: int = 0) -> dict:
    """`train_<name>`: the mean of every metric `_drain` summed, for one run."""
    return {f"train_{k}": float(v[run, 0] / max(v[run, 1], 1)) for k, v in sums.items()}


def _current_lr(state) -> float:
    """The optimiser's current learning rate (of the first run, when runs are stacked)."""
    for leaf_state in state.opt_state:
        hp = getattr(leaf_state, "hyperparams", None)
        if hp is not None:
            return float(np.ravel(jax.device_get(hp["learning_rate"]))[0])
    return float("nan")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def describe_devices() -> str:
    """The platform and the kind of the first device, e.g. "gpu: NVIDIA H200", for the logs."""
    device = jax.devices()[0]
    return f"{device.platform}: {getattr(device, 'device_kind', '?')}"


def _add_file_logging(workdir: Path) -> None:
    root = logging.getLogger()
    path = str(workdir / "train.log")
    if not any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in root.handlers):
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it touches
    # JAX logs at INFO each backend it could not start (e.g. "Unable to initialize backend 'tpu'")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
