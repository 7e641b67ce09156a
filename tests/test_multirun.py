"""Several fine-tuning runs trained together (vmap over runs) equal the same runs trained apart."""

import csv
import json
import re

import jax
import numpy as np
import pytest

from conftest import REPO, terminate_after_epochs, tiny
from configs import finetune_jarvis, pretrain_mask30
from dpf_jax.train import loop, multirun
from dpf_jax.train.checkpoint import load_raw_checkpoint


def _config(records=80, epochs=2):
    config = tiny(finetune_jarvis.get_config(), records=records, epochs=epochs, batch=16)
    config.num_devices = 2  # the runs' batches are sharded over 2 of the 4 fake devices
    return config


def _metrics(workdir):
    with open(workdir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _params(workdir):
    state, _ = load_raw_checkpoint(workdir / "checkpoints" / "latest")
    return jax.tree_util.tree_leaves(state["params"])


def test_runs_trained_together_match_runs_trained_apart(tmp_path):
    pre = tiny(pretrain_mask30.get_config(), records=64, epochs=1, batch=16)
    loop.train_and_evaluate(pre, str(tmp_path / "pre"))
    config = _config()
    specs = multirun.run_workdirs(str(tmp_path / "together"), [0, 1], ["", str(tmp_path / "pre")])
    assert [w.split("together/")[1] for _, _, w in specs] == ["scratch/seed0", "scratch/seed1",
                                                              "pre/seed0", "pre/seed1"]
    together = multirun.train_runs(config, specs)
    for (seed, init, workdir), res in zip(specs, together):
        apart_dir = tmp_path / "apart" / workdir.split("together/")[1]
        c = _config()
        c.seed, c.init_checkpoint = seed, init
        apart = loop.train_and_evaluate(c, str(apart_dir))
        assert res["steps"] == apart["steps"] == 8
        # same losses and validation metrics up to float reassociation (other padded shapes)
        ours, theirs = _metrics(tmp_path / workdir), _metrics(apart_dir)
        assert len(ours) == len(theirs) == 2
        for a, b in zip(ours, theirs):
            for k in ("train_loss", "train_mae", "val_mae", "val_mse"):
                assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-3), (workdir, k)
        assert res["test_mae_final"] == pytest.approx(apart["test_mae_final"], rel=2e-3)
        assert res["best_epoch"] == apart["best_epoch"]
        # parameters: Adam turns float-level gradient differences of near-zero components into
        # differences of up to one step (lr <= 1e-3 here), so compare at that scale
        for a, b in zip(_params(tmp_path / workdir), _params(apart_dir)):
            np.testing.assert_allclose(a, b, atol=2e-3)
        saved = json.loads((tmp_path / workdir / "results.json").read_text())
        assert saved["init_checkpoint"] == init and len(saved["trained_together_with"]) == 4
    # different seeds and encoders really give different models
    p = [_params(tmp_path / w) for _, _, w in specs]
    assert not np.allclose(p[0][0], p[1][0]) and not np.allclose(p[0][0], p[2][0])


def test_resume_and_refusals(tmp_path):
    specs = multirun.run_workdirs(str(tmp_path), [0, 1], [""])
    multirun.train_runs(_config(epochs=2), specs)
    # other epochs = another schedule: resuming could not be exact, so it is refused
    with pytest.raises(loop.TrainingError, match="train.epochs: 2 -> 3"):
        multirun.train_runs(_config(epochs=3), specs)
    # runs whose checkpoints are at different steps cannot continue together
    with pytest.raises(loop.TrainingError, match="share no step"):
        multirun.train_runs(_config(epochs=2), specs + multirun.run_workdirs(str(tmp_path / "fresh"), [5], [""]))
    with pytest.raises(ValueError, match="share a workdir"):
        multirun.run_workdirs(str(tmp_path), [0, 0], [""])
    with pytest.raises(FileNotFoundError, match="no/such/encoder"):
        multirun.train_runs(_config(), multirun.run_workdirs(str(tmp_path / "x"), [0], ["no/such/encoder"]))
    with pytest.raises(ValueError, match="fine-tuning"):
        multirun.train_runs(tiny(pretrain_mask30.get_config()), specs)


def test_cli_trains_the_grid_and_skips_finished_runs(tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "dpf_jax.train.multirun", "--config", "configs/finetune_jarvis.py",
            "--workdir", str(tmp_path), "--seeds", "3,4", "--init_checkpoints=scratch",
            "--config.model.num_layers=1", "--config.model.channels=8", "--config.model.heads=1",
            "--config.model.rbf_bins=8", "--config.data.max_records=48", "--config.data.cache_dir=",
            "--config.train.epochs=1", "--config.train.batch_size=16", "--config.train.progress_bar=False"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for seed in (3, 4):
        res = json.loads((tmp_path / "scratch" / f"seed{seed}" / "results.json").read_text())
        assert np.isfinite(res["test_mae_final"]) and res["steps"] == 2
    # the group's log names the devices, the kernel ("auto" is the jax.numpy path on a CPU) and cuda_graphs
    log = (tmp_path / "scratch" / "train.log").read_text()
    assert re.search(r"2 runs of MatformerRegressor trained together on \d+ device\(s\) \(cpu: \w+; precision "
                     r"default, edge kernel xla \(model.edge_kernel=auto\), lin_edge folded into e @ W3; "
                     r"cuda graphs xla \(train.cuda_graphs=auto\)\)", log), log[:2000]
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("finished already") == 2, again.stdout


def test_sigterm_saves_every_run_and_the_rerun_finishes(tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "dpf_jax.train.multirun", "--config", "configs/finetune_jarvis.py",
            "--workdir", str(tmp_path), "--seeds", "0,1", "--config.model.num_layers=1",
            "--config.model.channels=8", "--config.model.heads=1", "--config.model.rbf_bins=8",
            "--config.data.max_records=64", "--config.data.cache_dir=", "--config.train.epochs=300",
            "--config.train.batch_size=16", "--config.train.progress_bar=False"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    code, out = terminate_after_epochs(args, tmp_path / "scratch" / "seed1" / "metrics.csv", env=env)
    assert code != 0 and "interrupted (signal 15)" in out, out[-3000:]
    steps = {load_raw_checkpoint(tmp_path / "scratch" / f"seed{s}" / "checkpoints" / "latest")[1]["step"]
             for s in (0, 1)}
    assert len(steps) == 1 and steps.pop() >= 9  # both saved, at the same step, > 2 epochs in
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for s in (0, 1):
        res = json.loads((tmp_path / "scratch" / f"seed{s}" / "results.json").read_text())
        assert res["steps"] == 300 * 3
