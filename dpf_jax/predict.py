"""Predict a property with a fine-tuned checkpoint: command line and Python API.

Command line (prints a CSV on stdout, or writes it with --output; messages go to stderr):

    python -m dpf_jax.predict --checkpoint runs/finetune_jarvis  my_cifs/  POSCAR  more.extxyz
    python -m dpf_jax.predict --checkpoint runs/finetune_jarvis  my_cifs/ --output preds.csv
    python -m dpf_jax.predict --checkpoint runs/finetune_jarvis  --split test --output test.csv

  * inputs: CIF, POSCAR/CONTCAR/*.vasp and extxyz files, or folders of them (--recursive to
    descend); a multi-frame extxyz / multi-block CIF gives one row per structure ("stem:k").
    The format comes from the file name; --format cif|poscar|extxyz reads every input file as
    that format. Files of a folder not named like structure files are left out, with a count.
  * columns: id, formula (reduced), prediction, units. When the run regressed log10 of the
    target (the MP moduli K_VRH / G_VRH), `prediction` is in log10(GPa), as the run's MAE is,
    and an extra column `prediction_GPa` holds 10**prediction.
  * --split test|val|train re-scores an official split of the run's own dataset (path, task
    and max_records from the run's config.json; --data overrides the dataset path), prints
    its MAE (the run's results.json test_mae_best_val / test_mae_final, for --which best /
    latest) and writes id, formula, target, prediction, units (+ target_GPa, prediction_GPa).
  * --which best (default; falls back to latest when the run never validated) or latest.
  * every unreadable file and every structure whose graph cannot be built (overlapping atoms,
    isolated atom, ...) is listed on stderr with the reason; the rest are predicted.
  * exit status 0 when at least one prediction was made, 2 when none was (or no input was
    found), 1 for an unusable checkpoint (e.g. a pre-training run, which has no property head).

Everything is batched (--batch-size, default 64 crystals) and runs data-parallel on every local
device JAX sees (the GPUs when a CUDA jaxlib is installed, else the CPU), in eval mode
(BatchNorm running statistics), so a crystal's prediction does not depend on the batch or on
the order of the inputs. A checkpoint saved on any number of devices loads on any other.

The graph is the reference Matformer's (k nearest neighbours with k-th-shell ties, lattice
self-loop edges to the atom's own images at a, b, c, b+c, a+c, a+b, duplicated self-image
edges), so the prediction depends on the cell chosen for small cells: a supercell's lattice
self-loops are longer, and its self-image edges become edges between distinct atoms. Cells
whose lattice vectors (and face diagonals) are well beyond the cutoff give the same
prediction for the cell and its supercells; for others, predict the cell the model was
trained on (JARVIS / MP give conventional or primitive cells as in their datasets).

Python API:

    import dpf_jax
    model = dpf_jax.load_model("runs/finetune_jarvis")        # which="best" | "latest"
    y = model.predict([structure, atoms, "x.cif"])           # numpy float64 [n], run's units
    rows = model.predict_records(["cifs/", structure])        # [{"id", "formula", "prediction", ...}]
    model.task, model.units, model.transform                  # e.g. "formation_energy_peratom", "eV/atom", ""

`predict` accepts pymatgen `Structure`s, ASE `Atoms`, `dpf_jax` `Crystal` records and paths
of single-structure files, and returns one value per input (raises `PredictionError` naming
every failure, or gives NaN for them with `on_error="nan"`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
SPLIT_CHOICES = ("train", "val", "test")


class PredictionError(RuntimeError):
    """A checkpoint that cannot predict, or inputs that could not be predicted."""


class CheckpointError(PredictionError):
    """The checkpoint or workdir cannot predict (missing, pre-training run, no property head)."""


# ------------------------------------------------------------------------------ small helpers

def reduced_formula(numbers: Sequence[int]) -> str:
    """Reduced formula of a list of atomic numbers (pymatgen's when pymatgen is installed)."""
    numbers = [int(z) for z in numbers]
    try:
        from pymatgen.core import Composition, Element

        comp = Composition({Element.from_Z(z): c for z, c in zip(*np.unique(numbers, return_counts=True))})
        return comp.reduced_formula
    except ImportError:  # the GPU image may lack pymatgen: a plain reduced formula
        from dpf_jax.data.records import ELEMENT_SYMBOLS

        zs, first, counts = np.unique(numbers, return_index=True, return_counts=True)
        g = int(np.gcd.reduce(counts))
        order = np.argsort(first)  # elements in order of first appearance
        return "".join(ELEMENT_SYMBOLS[zs[k] - 1] + (str(counts[k] // g) if counts[k] // g > 1 else "")
                       for k in order)


def linear_units(units: str) -> str:
    """"log10(GPa)" -> "GPa": the units of 10**value for a log10-transformed target."""
    u = units.strip()
    if u.startswith("log10(") and u.endswith(")"):
        return u[len("log10("):-1]
    return f"10^({u})" if u else "linear"


def _linear_column(units: str, prefix: str) -> str:
    lin = linear_units(units)
    safe = "".join(ch if ch.isalnum() else "_" for ch in lin).strip("_") or "linear"
    return f"{prefix}_{safe}"


def load_raw_checkpoint(path, step=None):
    """`dpf_jax.train.checkpoint.load_raw_checkpoint`, imported lazily (keeps `import dpf_jax` light)."""
    from dpf_jax.train.checkpoint import load_raw_checkpoint as load

    return load(path, step)


def _find_config_json(path: Path) -> Path | None:
    """config.json of the workdir that holds `path` (a workdir, checkpoints/x or a step folder)."""
    for p in [path, *list(path.parents)[:3]]:
        if (p / "config.json").is_file():
            return p / "config.json"
    return None


def _checkpoint_location(path: Path, which: str) -> tuple[Path, int, str]:
    """(Orbax manager folder, step, "best" | "latest" | "given") of the checkpoint to restore."""
    from dpf_jax.train.checkpoint import find_checkpoint_dir

    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    root = path / "checkpoints"
    if root.is_dir():
        order = [which] + [w for w in ("best", "latest") if w != which]
        for w in order:
            try:
                directory, step = find_checkpoint_dir(root / w)
            except FileNotFoundError:
                continue
            if w != which:
                print(f"note: {path} has no '{which}' checkpoint; using '{w}'", file=sys.stderr)
            return directory, step, w
        raise CheckpointError(f"no checkpoint under {root} (expected checkpoints/best/<step> or "
                              "checkpoints/latest/<step>; did the run get past its first epoch?)")
    try:  # a checkpoints/<which> folder or a step folder given directly
        directory, step = find_checkpoint_dir(path)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    name = directory.name if directory.name in ("best", "latest") else "given"
    return directory, step, name


# ------------------------------------------------------------------------------ the predictor

@dataclasses.dataclass
class Prediction:
    """Predictions of a set of crystals: values aligned with `crystals`, failures listed."""

    crystals: list  # Crystal records, in input order
    values: np.ndarray  # float64 [n]; NaN where the structure failed
    failures: list[tuple[str, str]]  # (id or path, reason)
    targets: np.ndarray | None = None  # float64 [n], the run's (transformed) units
    mae: float | None = None  # only with targets, computed on device as training does


class Predictor:
    """A fine-tuned property model restored from a workdir; see the module docstring.

    Attributes: task, units, transform ("" or "log10"), which ("best"/"latest"/"given"), step,
    workdir, config (the run's ConfigDict), num_devices, batch_size.
    """

    def __init__(self, checkpoint: str | os.PathLike, which: str = "best",
                 batch_size: int = DEFAULT_BATCH_SIZE, num_devices: int | None = None,
                 workers: int | None = 1, load: bool = True):
        """Reads the run's config and finds its checkpoint (no JAX device work); `load=True`
        also restores the checkpoint now (else on first use, see `load`)."""
        import ml_collections

        from dpf_jax.data.pipeline import task_units_and_transform

        path = Path(checkpoint)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        config_path = _find_config_json(path)
        config_dict = json.loads(config_path.read_text()) if config_path else None
        if config_dict is not None:
            self._check_mode(config_dict.get("mode"), path)
        directory, step, self.which = _checkpoint_location(path, which)
        self.checkpoint_dir = directory / str(step)
        self.step = step
        self._raw = None
        if config_dict is None:  # a checkpoint folder outside its workdir: the meta has the config
            self._raw, meta = load_raw_checkpoint(directory, step)
            config_dict = meta.get("config")
            if not config_dict:
                raise CheckpointError(f"no config.json next to {path} and none in the checkpoint's meta")
            self._check_mode(config_dict.get("mode", meta.get("mode")), path)
        self.config = ml_collections.ConfigDict(config_dict)
        self.workdir = config_path.parent if config_path else path
        d = self.config.data
        self.task = d.task
        units, self.transform = task_units_and_transform(d.task, d.get("units", "auto"),
                                                         d.get("target_transform", "auto"))
        results_path = self.workdir / "results.json"
        if results_path.is_file():
            try:
                units = json.loads(results_path.read_text()).get("units", units) or units
            except (OSError, ValueError):
                pass
        self.units = units
        self.workers = workers
        self.batch_size = max(int(batch_size), 1)
        self._requested_devices = num_devices
        self.num_devices = None
        self.mesh = None
        self._state = None
        self._eval_step = None
        self._key = None
        if load:
            self.load()

    def load(self) -> "Predictor":
        """Restores the checkpoint (host numpy, whatever devices saved it) and places it on
        every local device. Done on first use otherwise; graph building before it may use
        forked worker processes, which must happen before JAX initialises its backends."""
        if self._state is not None:
            return self
        import jax

        from dpf_jax.train.parallel import make_mesh

        if self._raw is None:
            self._raw, _ = load_raw_checkpoint(self.checkpoint_dir.parent, self.step)
        params = self._raw.get("params", {})
        if "fc_out" not in params or "encoder" not in params:
            raise CheckpointError(f"checkpoint {self.checkpoint_dir} has no property head (params: "
                                  f"{sorted(params)}); only fine-tuning checkpoints can predict")
        n_local = len(jax.local_devices())
        self.num_devices = min(self._requested_devices or n_local, n_local)
        self.mesh = make_mesh(self.num_devices)
        self._setup()
        return self

    @staticmethod
    def _check_mode(mode, path):
        if mode == "pretrain":
            raise CheckpointError(
                f"{path} is a pre-training (denoising) run: it has no property head, so it cannot "
                "predict. Fine-tune it first (configs/finetune_*.py with --config.init_checkpoint="
                f"{path}) and predict with the fine-tuning workdir.")
        if mode not in (None, "finetune"):
            raise CheckpointError(f"{path}: unknown run mode {mode!r} (expected 'finetune')")

    # -------------------------------------------------------------------------- device side

    def _setup(self):
        import jax
        import jax.numpy as jnp

        from dpf_jax.train.objectives import RegressionObjective
        from dpf_jax.train.parallel import put_replicated
        from dpf_jax.train.step import TrainState, make_eval_step

        objective = RegressionObjective(self.config.model)
        model = objective.make_model()
        raw = self._raw
        stats = {k: np.asarray(v, np.float32) for k, v in raw.get("stats", {}).items()}
        stats.setdefault("target_mean", np.float32(0.0))
        stats.setdefault("target_std", np.float32(1.0))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=raw["params"],
                           batch_stats=raw.get("batch_stats", {}), opt_state={},
                           key=jax.random.PRNGKey(0), stats=stats)
        self._state = put_replicated(state, self.mesh)
        self._key = put_replicated(jax.random.PRNGKey(0), self.mesh)
        self._eval_step = make_eval_step(objective, model, self.mesh)
        self._raw = None  # the device copy is all that is needed from now on

    def _batch_size_for(self, n: int) -> int:
        nd = self.num_devices
        bs = -(-self.batch_size // nd) * nd  # a multiple of the device count
        return max(nd, min(bs, -(-n // nd) * nd))

    def predict_graphs(self, graphs: Sequence, targets: Sequence[float] | None = None,
                       progress: bool = False) -> tuple[np.ndarray, float | None]:
        """Predictions (float64 [n], de-standardised, the run's units) of `CrystalGraph`s.

        With `targets`, also the MAE computed on device exactly as training evaluates it.
        """
        import jax
        from tqdm.auto import tqdm

        from dpf_jax.data.batching import GraphBatcher, graph_to_jraph, prefetch
        from dpf_jax.train.loop import budget_levels
        from dpf_jax.train.parallel import prefetch_to_device

        n = len(graphs)
        if n == 0:
            return np.zeros(0), None
        self.load()
        tg = np.zeros(n) if targets is None else np.nan_to_num(np.asarray(targets, np.float64), nan=0.0)
        jr = [graph_to_jraph(g, float(t)) for g, t in zip(graphs, tg)]
        # as many levels as the run's validation batches had
        batcher = GraphBatcher(jr, self._batch_size_for(n), self.num_devices,
                               num_levels=budget_levels(self.config, evaluation=True), seed=0,
                               budget_placement=self.config.train.get("budget_placement", "quantile"))
        preds = np.full(n, np.nan)
        order = batcher.epoch_order(0, 0, shuffle=False)
        ae_sum = ae_count = 0.0
        host_batches = []

        def host_iter():
            for b in batcher.iterate(shuffle=False):
                host_batches.append(b)
                yield b

        bar = tqdm(total=batcher.num_batches(), desc="predicting", unit="batch", leave=False,
                   disable=not progress)
        device_batches = prefetch_to_device(prefetch(host_iter(), 2), self.mesh)
        for b, dev in enumerate(device_batches):
            terms, p = jax.device_get(self._eval_step(self._state, dev, self._key))
            host = host_batches[b]
            host_batches[b] = None  # keep host memory bounded
            index, mask = host.globals["index"], host.globals["mask"]
            preds[order[b * batcher.batch_size + index[mask]]] = np.asarray(p)[mask]
            s, c = terms["mae"]
            ae_sum += float(s)
            ae_count += float(c)
            bar.update()
        bar.close()
        mae = ae_sum / max(ae_count, 1.0) if targets is not None else None
        return preds, mae

    # -------------------------------------------------------------------------- host side

    def _graph_params(self):
        from dpf_jax.data.dataset import GraphParams

        # a fine-tuned model's input geometry is never perturbed: every merge level is exact
        return GraphParams.from_config(self.config.graph)

    def predict_crystals(self, crystals: Sequence, targets: Sequence[float] | None = None,
                         progress: bool = False) -> Prediction:
        """Builds the graphs of `Crystal` records and predicts those that have one."""
        from dpf_jax.data.dataset import build_graphs

        crystals = list(crystals)
        graphs, failed = build_graphs(crystals, self._graph_params(), workers=self.workers,
                                      progress=progress, desc="building graphs")
        reasons = iter([reason for _, reason in failed])
        failures = [(_label(c), next(reasons)) for c, g in zip(crystals, graphs) if g is None]
        ok = [i for i, g in enumerate(graphs) if g is not None]
        values = np.full(len(crystals), np.nan)
        t = None if targets is None else [targets[i] for i in ok]
        preds, mae = self.predict_graphs([graphs[i] for i in ok], t, progress=progress)
        values[ok] = preds
        tv = None if targets is None else np.asarray(targets, np.float64)
        return Prediction(crystals, values, failures, tv, mae)

    def _to_crystals(self, inputs, expand: bool) -> tuple[list, list[int], list[tuple[str, str]]]:
        """Inputs -> (Crystal records, index of the input each came from, read failures)."""
        from dpf_jax.data.readers import (crystal_from_ase, crystal_from_pymatgen,
                                          expand_structure_paths, read_structure_frames)
        from dpf_jax.data.records import Crystal, CrystalError

        crystals, origin, failures = [], [], []
        for k, item in enumerate(inputs):
            try:
                if isinstance(item, Crystal):
                    got = [item]
                elif isinstance(item, (str, os.PathLike)):
                    p = Path(item)
                    if expand and p.is_dir():
                        files = expand_structure_paths([p])
                        if not files:
                            failures.append((str(p), "folder holds no structure files"))
                        got = []
                        for f in files:
                            try:
                                got.extend(read_structure_frames(f))
                            except CrystalError as e:
                                failures.append((str(f), e.reason))
                    else:
                        got = read_structure_frames(p)
                        if not expand and len(got) != 1:
                            raise CrystalError(str(p), f"file holds {len(got)} structures; "
                                               "use predict_records for multi-structure files")
                elif hasattr(item, "get_cell") and hasattr(item, "numbers"):  # ASE Atoms
                    got = [crystal_from_ase(item, id=str(k))]
                elif hasattr(item, "lattice") and hasattr(item, "sites"):  # pymatgen Structure
                    got = [crystal_from_pymatgen(item, id=str(k))]
                else:
                    raise CrystalError(str(k), f"cannot predict a {type(item).__name__}: expected a pymatgen "
                                       "Structure, an ASE Atoms, a Crystal or a structure file path")
            except CrystalError as e:
                path_like = isinstance(item, (str, os.PathLike))
                failures.append((e.record if path_like else f"input {k}", e.reason))
                continue
            crystals.extend(got)
            origin.extend([k] * len(got))
        return crystals, origin, failures

    def predict(self, structures, on_error: str = "raise") -> np.ndarray:
        """One prediction per input (float64, the run's units; log10 units for log10 tasks).

        `structures`: pymatgen Structures, ASE Atoms, Crystal records and/or paths of
        single-structure files. `on_error="raise"` raises `PredictionError` listing every
        structure that could not be predicted; `on_error="nan"` gives NaN for them.
        """
        if on_error not in ("raise", "nan"):
            raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
        items = _as_list(structures)
        crystals, origin, failures = self._to_crystals(items, expand=False)
        res = self.predict_crystals(crystals)
        failures = failures + res.failures
        if failures and on_error == "raise":
            raise PredictionError(f"{len(failures)} structure(s) could not be predicted:\n"
                                  + "\n".join(f"  {rid}: {reason}" for rid, reason in failures))
        out = np.full(len(items), np.nan)
        out[origin] = res.values
        return out

    def predict_records(self, inputs, return_failures: bool = False):
        """Rows {"id", "formula", "prediction", "units"[, "prediction_<linear units>"]} for every
        structure of `inputs` (also folders and multi-structure files). Structures that fail are
        left out, with a warning that counts them; with `return_failures=True` returns
        `(rows, [(id or path, reason)])` instead of warning."""
        crystals, _, failures = self._to_crystals(_as_list(inputs), expand=True)
        res = self.predict_crystals(crystals)
        rows = self.rows(res)
        failures = failures + res.failures
        if return_failures:
            return rows, failures
        if failures:
            rid, reason = failures[0]
            warnings.warn(f"{len(failures)} input(s) could not be predicted and are left out (first: {rid}: "
                          f"{reason}); predict_records(..., return_failures=True) lists them", stacklevel=2)
        return rows

    def rows(self, res: Prediction, with_targets: bool = False) -> list[dict]:
        rows = []
        lin_pred = _linear_column(self.units, "prediction")
        lin_target = _linear_column(self.units, "target")
        targets = res.targets if res.targets is not None else np.full(len(res.crystals), np.nan)
        for c, t, v in zip(res.crystals, targets, res.values):
            if not np.isfinite(v):
                continue
            row = {"id": c.id, "formula": reduced_formula(c.numbers)}
            if with_targets:
                row["target"] = float(t)
            row["prediction"] = float(v)
            row["units"] = self.units
            if self.transform == "log10":
                if with_targets:
                    row[lin_target] = float(10.0 ** row["target"])
                row[lin_pred] = float(10.0 ** v)
            rows.append(row)
        return rows

    # -------------------------------------------------------------------------- splits

    def score_split(self, split: str, data_path: str | None = None, progress: bool = False) -> Prediction:
        """Re-scores one split of the run's own dataset (targets in the run's transformed units)."""
        from dpf_jax.data.pipeline import DEFAULT_SPLIT_FRACTIONS, prepare_labeled

        if split not in SPLIT_CHOICES:
            raise ValueError(f"split must be one of {SPLIT_CHOICES}, got {split!r}")
        d = self.config.data
        path = _resolve_data_path(data_path or d.path, self.workdir)
        data = prepare_labeled(str(path), d.task, params=self._graph_params(), transform=self.transform,
                               cache_dir=d.get("cache_dir", "") or None, workers=self.workers,
                               max_records=d.get("max_records", 0), progress=progress,
                               split_fractions=tuple(d.get("split_fractions", DEFAULT_SPLIT_FRACTIONS)))
        sd = data.splits[split]
        if not sd.graphs:
            raise PredictionError(f"the {split} split of {path} (task {d.task}) is empty")
        preds, mae = self.predict_graphs(sd.graphs, sd.targets, progress=progress)
        return Prediction([g.crystal for g in sd.graphs], preds, list(data.skipped),
                          np.asarray(sd.targets, np.float64), mae)


def _label(c) -> str:
    """How a structure is named in failure reports: its file (and frame), else its input index."""
    if c.source.startswith("file:"):
        from dpf_jax.data.dataset import skip_label

        return skip_label(c)
    if c.source in ("pymatgen", "ase"):
        return f"input {c.id} ({reduced_formula(c.numbers)})"
    return c.id


def _as_list(inputs) -> list:
    """One input (a path, a structure, a Crystal) or an iterable of them -> a list."""
    from dpf_jax.data.records import Crystal

    one = (isinstance(inputs, (str, os.PathLike, Crystal))
           or (hasattr(inputs, "get_cell") and hasattr(inputs, "numbers"))  # ASE Atoms
           or (hasattr(inputs, "lattice") and hasattr(inputs, "sites"))  # pymatgen Structure
           or not isinstance(inputs, Iterable))
    return [inputs] if one else list(inputs)


def _resolve_data_path(path: str, workdir: Path) -> Path:
    """A dataset path of a config: as given, else relative to the repository or the workdir."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for base in (Path(__file__).resolve().parent.parent, workdir.parent.parent, workdir.parent, workdir):
        if (base / p).exists():
            return base / p
    raise PredictionError(f"dataset {path} of the run not found (looked relative to the current folder, "
                          "the repository and the workdir); pass --data PATH")


def load_model(workdir: str | os.PathLike, which: str = "best", batch_size: int = DEFAULT_BATCH_SIZE,
               num_devices: int | None = None) -> Predictor:
    """The fine-tuned model of a training workdir, ready to `.predict(structures)`.

    `which`: "best" (lowest validation MAE; default, falls back to "latest") or "latest".
    Runs on every local device (GPUs when present). Raises `PredictionError` for a
    pre-training workdir or one without a checkpoint.
    """
    return Predictor(workdir, which=which, batch_size=batch_size, num_devices=num_devices)


# ------------------------------------------------------------------------------ command line

def _write_csv(rows: list[dict], out) -> None:
    if not rows:
        return
    keys = list(rows[0])
    w = csv.writer(out)
    w.writerow(keys)
    for r in rows:
        w.writerow([f"{v:.7g}" if isinstance(v, float) else v for v in (r[k] for k in keys)])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpf_jax.predict",
        description="Predict a property with a fine-tuned dpf_jax checkpoint, or re-score a split of its dataset.",
        epilog="Output columns: id, formula, prediction, units (+ prediction_GPa = 10**prediction for log10 "
               "tasks). With --split: id, formula, target, prediction, units. Exit status: 0 when at least one "
               "structure was predicted, 2 when none was, 1 for an unusable checkpoint.")
    p.add_argument("inputs", nargs="*", help="CIF / POSCAR / CONTCAR / *.vasp / extxyz files or folders of them")
    p.add_argument("--checkpoint", "-c", required=True,
                   help="training workdir (config.json + checkpoints/), or a checkpoints/<which>[/<step>] folder")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="checkpoint to use (default: best by validation MAE, else latest)")
    p.add_argument("--split", choices=SPLIT_CHOICES,
                   help="re-score this split of the run's own dataset instead of files; prints its MAE")
    p.add_argument("--data", help="with --split: dataset file to use instead of the one in config.json")
    p.add_argument("--output", "-o", help="CSV file to write (default: CSV on stdout)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"crystals per batch over all devices (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--num-devices", type=int, default=0, help="devices to use (default 0: every local device)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.add_argument("--format", choices=("cif", "poscar", "extxyz"), default=None,
                   help="read every input file as this format, whatever its name (default: from the file name)")
    p.add_argument("--workers", type=int, default=0, help="graph-building processes (default 0: all cores)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (see the module docstring)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # failures are listed by this command itself; Orbax's absl warnings are noise here
    quiet = [logging.getLogger(n) for n in ("dpf_jax.data.readers", "absl")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        return _main(args)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _main(args) -> int:
    err = sys.stderr
    if args.split and args.inputs:
        print("error: give either structure files/folders or --split, not both", file=err)
        return 2
    if not args.split and not args.inputs:
        print("error: no input: give structure files or folders, or --split test|val|train", file=err)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=err)
        return 2
    progress = err.isatty()
    try:
        # the checkpoint is restored after graph building (forked workers before JAX starts)
        model = Predictor(args.checkpoint, which=args.which, batch_size=args.batch_size,
                          num_devices=args.num_devices or None, workers=args.workers or None, load=False)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=err)
        return 1
    print(f"{model.task} [{model.units}] from {model.checkpoint_dir} ({model.which})", file=err)

    try:
        if args.split:
            res = model.score_split(args.split, args.data, progress=progress)
            failures = []
            rows = model.rows(res, with_targets=True)
        else:
            from dpf_jax.data.readers import expand_structure_paths, has_structure_files, read_structure_files

            ignored: list[Path] = []
            files = expand_structure_paths(args.inputs, recursive=args.recursive, ignored=ignored)
            if ignored:
                print(f"ignored {len(ignored)} file(s) in the folder(s) given whose names are not structure-file "
                      f"names (first: {ignored[0]}); name a file directly with --format to read it anyway",
                      file=err)
            if not files:
                deeper = not args.recursive and any(has_structure_files(x) for x in args.inputs)
                print(f"error: no structure files (*.cif, POSCAR*, CONTCAR*, *.vasp, *.xyz, *.extxyz) in "
                      f"{' '.join(args.inputs)}" + ("; there are some in sub-folders: add -r" if deeper else ""),
                      file=err)
                return 2
            records, failures = read_structure_files(files, fmt=args.format)
            res = model.predict_crystals(records, progress=progress)
            failures = list(failures) + list(res.failures)
            rows = model.rows(res)
    except CheckpointError as e:
        print(f"error: {e}", file=err)
        return 1
    except (PredictionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=err)
        return 2

    for rid, reason in failures:
        print(f"skipped {rid}: {reason}", file=err)
    if args.split:
        if res.failures:
            print(f"({len(res.failures)} records of the dataset were skipped when it was prepared)", file=err)
        print(f"{args.split} MAE: {res.mae:.8g} {model.units} over {len(rows)} crystals "
              f"({model.which} checkpoint, step {model.step})", file=err)
    else:
        print(f"predicted {len(rows)} structure(s); {len(failures)} skipped", file=err)
    if model.mesh is not None:
        print(f"ran on {model.num_devices} {model.mesh.devices.flat[0].platform} device(s)", file=err)
    if not rows:
        print("error: nothing could be predicted", file=err)
        return 2
    if args.output:
        out = Path(args.output)
        if out.parent != Path(""):
            out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            _write_csv(rows, f)
        print(f"wrote {out}", file=err)
    else:
        _write_csv(rows, sys.stdout)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
