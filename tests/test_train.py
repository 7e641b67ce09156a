"""Training: data parallelism (4 fake devices = 1 device), exact resumption, learning on real
data, NaN guard, fine-tuning from a pre-trained encoder, and the command line."""

import csv
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA, REPO, all_reduced_elements, load_script, terminate_after_epochs, tiny, train_setup
from configs import finetune_jarvis, pretrain_mask30
from dpf_jax.train import loop, parallel
from dpf_jax.train.checkpoint import load_raw_checkpoint
from dpf_jax.train.objectives import describe_compute
from dpf_jax.train.optim import make_optimizer
from dpf_jax.train.parallel import make_mesh, put_batch, put_replicated
from dpf_jax.train.step import create_state, make_forward


def _loss_and_grads(config, data, num_devices):
    t = train_setup(config, data, num_devices)
    forward = make_forward(t.objective, t.model, t.mesh, train=True)
    key = jax.random.PRNGKey(5)
    fn = jax.jit(jax.value_and_grad(forward, has_aux=True))
    rep = lambda x: put_replicated(x, t.mesh)  # noqa: E731
    (loss, (bs, terms, _)), grads = fn(rep(t.state.params), rep(t.state.batch_stats), rep(t.state.stats),
                                       put_batch(t.batch, t.mesh), key)
    return jax.device_get((loss, bs, terms, grads))


@pytest.mark.parametrize("make_config, batch_norm_stats", [
    (finetune_jarvis.get_config, "gathered"), (pretrain_mask30.get_config, "gathered"),
    (pretrain_mask30.get_config, "two_pass")])
def test_four_devices_match_one_device(make_config, batch_norm_stats):
    assert len(jax.devices()) >= 4, "conftest sets 4 fake CPU devices"
    config = tiny(make_config(), records=64, batch=32)
    config.model.batch_norm_stats = batch_norm_stats
    if config.mode == "pretrain":
        config.data.path = str(DATA / "pretrain.jsonl.gz")
        config.pretrain.position_scale = 0.1
        config.pretrain.lattice_scale = 0.1
    data = loop.load_data(config)
    one = _loss_and_grads(config, data, 1)
    four = _loss_and_grads(config, data, 4)
    np.testing.assert_allclose(one[0], four[0], rtol=2e-5)
    for name in one[2]:
        np.testing.assert_allclose(one[2][name], four[2][name], rtol=2e-5, atol=1e-6, err_msg=name)
    flat1, _ = jax.tree_util.tree_flatten(one[3])
    flat4, _ = jax.tree_util.tree_flatten(four[3])
    for g1, g4 in zip(flat1, flat4):
        np.testing.assert_allclose(g1, g4, rtol=2e-4, atol=2e-6)
    for s1, s4 in zip(jax.tree_util.tree_leaves(one[1]), jax.tree_util.tree_leaves(four[1])):
        np.testing.assert_allclose(s1, s4, rtol=1e-5, atol=1e-6)  # synchronised BatchNorm stats


@pytest.mark.parametrize("remat", ["dots", "stats"])
def test_remat_inside_the_data_parallel_step_changes_nothing(remat):
    """model.remat with the real step on 4 devices (shard_map, BatchNorm collectives inside the
    recomputed layers; "stats" also keeps named tensors): same loss, terms, gradients and
    BatchNorm statistics as without it."""
    config = tiny(pretrain_mask30.get_config(), records=64, batch=32)
    config.data.path = str(DATA / "pretrain.jsonl.gz")
    data = loop.load_data(config)
    plain = _loss_and_grads(config, data, 4)
    config.model.remat = remat
    rematted = _loss_and_grads(config, data, 4)
    np.testing.assert_allclose(plain[0], rematted[0], rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(plain[3]))
    for g1, g2 in zip(jax.tree_util.tree_leaves(plain[3]), jax.tree_util.tree_leaves(rematted[3])):
        np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-4 * scale)
    for s1, s2 in zip(jax.tree_util.tree_leaves(plain[1]), jax.tree_util.tree_leaves(rematted[1])):
        np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)


def _final_params(workdir):
    state, meta = load_raw_checkpoint(os.path.join(workdir, "checkpoints", "latest"))
    return state["params"], meta


@pytest.mark.parametrize("packed", [True, False])
def test_resume_after_interruption_is_exact(tmp_path, packed):
    """Stopped mid-epoch and resumed = trained straight, with the step's state, batches and
    metrics packed (the defaults) or not."""
    config = tiny(finetune_jarvis.get_config(), records=80, epochs=2, batch=16)
    config.train.pack_state = config.train.pack_batches = config.train.pack_metrics = packed
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    assert straight["steps"] == 8  # 64 training crystals / 16, 2 epochs (drop_last)
    config.train.max_steps = 5  # "killed" mid-epoch 2
    out = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert out == {"stopped_at_step": 5}
    config.train.max_steps = 0
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed["steps"] == 8
    p1, _ = _final_params(tmp_path / "straight")
    p2, _ = _final_params(tmp_path / "resumed")
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(a, b)
    assert resumed["test_mae_final"] == straight["test_mae_final"]


def test_training_beats_the_mean_predictor_on_real_data(tmp_path):
    config = tiny(finetune_jarvis.get_config(), records=400, epochs=6, batch=32)
    config.model.channels = 32
    res = loop.train_and_evaluate(config, str(tmp_path))
    assert res["test_mae_final"] < 0.8 * res["mean_predictor_mae"], res
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("epoch")
    assert (tmp_path / "predictions_test.csv").exists()
    # the log names the devices and the kernel that ran ("auto" resolved: the jax.numpy path on a CPU)
    log = (tmp_path / "train.log").read_text()
    assert f"on {jax.device_count()} device(s) ({loop.describe_devices()}); {describe_compute(config.model)}" in log, \
        log[:2000]
    assert jax.default_backend() != "cpu" or "precision default, edge kernel xla (model.edge_kernel=auto)" in log
    assert jax.default_backend() != "cpu" or "; cuda graphs xla (train.cuda_graphs=auto)" in log


@pytest.mark.parametrize("on_gpu", [False, True])
def test_describe_compute_names_the_kernel_as_it_runs(monkeypatch, on_gpu):
    """What the run log states is what the encoder runs: a named kernel as named, "auto" as
    `resolve_edge_kernel` resolves it (here with the GPU check forced either way)."""
    from dpf_jax.model import layers

    monkeypatch.setattr(layers, "_on_nvidia_gpu", lambda: on_gpu)
    model = finetune_jarvis.get_config().model
    folded = ", lin_edge folded into e @ W3"  # model.fold_edge_weights="auto" with the node formulation
    model.edge_kernel, model.precision = "pallas_gate_rows-16x4", "bf16"
    assert describe_compute(model) == "precision bf16, edge kernel pallas_gate_rows-16x4" + folded
    model.edge_kernel = "auto"
    # on a GPU "auto" depends on each padded batch's size: the log names both kernels
    auto = layers.describe_auto_edge_kernel(layers.EDGE_KERNEL_AUTO_GPU) if on_gpu else "xla"
    assert not on_gpu or layers.EDGE_KERNEL_AUTO_GPU_SMALL in auto
    assert describe_compute(model) == f"precision bf16, edge kernel {auto} (model.edge_kernel=auto)" + folded
    # where the kernel cannot run, "auto" falls back to the jax.numpy path, and the log says so
    for key, value, fold in (("remat", "stats", folded), ("formulation", "edge", ""), ("channels", 96, folded)):
        changed = finetune_jarvis.get_config().model
        changed[key] = value
        assert describe_compute(changed) == "precision default, edge kernel xla (model.edge_kernel=auto)" + fold, key


def _fake_mesh(platform: str, num_devices: int):
    """Just what `parallel.resolve_cuda_graphs` reads of a mesh: its devices' platform and count."""
    device = types.SimpleNamespace(platform=platform)
    return types.SimpleNamespace(devices=np.array([device] * num_devices, dtype=object))


def test_cuda_graphs_auto_and_the_xla_options_it_gives():
    """train.cuda_graphs="auto": concurrent kernels (and collectives in the graphs) on several GPUs,
    concurrent on one GPU for small batches, XLA's defaults for large ones and off a GPU; every
    option it can give is one this XLA accepts (a misspelt name or value fails the jit below)."""
    resolve, options = parallel.resolve_cuda_graphs, parallel.step_compiler_options
    small, large = parallel.CONCURRENT_MAX_BATCH_ONE_GPU, parallel.CONCURRENT_MAX_BATCH_ONE_GPU + 1
    assert resolve("auto", _fake_mesh("gpu", 4), 1024) == "concurrent_collectives"
    assert resolve("auto", _fake_mesh("gpu", 2), 32) == "concurrent_collectives"
    assert resolve("auto", _fake_mesh("gpu", 1), small) == "concurrent"
    assert resolve("auto", _fake_mesh("gpu", 1), large) == "xla"
    assert resolve("auto", _fake_mesh("cpu", 4), 32) == "xla"
    assert resolve("concurrent", _fake_mesh("cpu", 1), 1024) == "concurrent"  # a named mode as named
    assert options("auto", _fake_mesh("cpu", 1), 32) == {} and options("xla", _fake_mesh("gpu", 4), 32) == {}
    assert options("concurrent", _fake_mesh("gpu", 1), 32) == {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
    with_collectives = options("auto", _fake_mesh("gpu", 4), 256)
    assert with_collectives["xla_gpu_command_buffer_scheduling_mode"] == "CONCURRENT"
    assert "COLLECTIVES" in with_collectives["xla_gpu_enable_command_buffer"].split(",")
    assert parallel.describe_cuda_graphs("auto", _fake_mesh("gpu", 1), small) == \
        "cuda graphs concurrent (train.cuda_graphs=auto)"
    assert parallel.describe_cuda_graphs("xla", _fake_mesh("gpu", 1), small) == "cuda graphs xla"
    for mode in parallel.CUDA_GRAPH_MODES:
        opts = options(mode, _fake_mesh("gpu", 4), 64)
        assert float(jax.jit(lambda x: 2 * x, compiler_options=opts or None)(jnp.float32(1.5))) == 3.0, mode
    with pytest.raises(ValueError, match="train.cuda_graphs must be one of"):
        resolve("CONCURRENT", _fake_mesh("gpu", 1), 32)


def test_cuda_graph_modes_reach_the_step_and_train_alike_on_real_data(tmp_path, monkeypatch):
    """The mode's XLA options reach the jitted step (`build_run_step`), and change no number: two
    steps with each mode forced give the same parameters (a CPU ignores the options; on a GPU only
    the kernels' overlap changes)."""
    passed, real_make_train_step = [], loop.make_train_step

    def spy(*args, **kwargs):
        passed.append(kwargs.get("compiler_options"))
        return real_make_train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "make_train_step", spy)
    params = {}
    for mode in ("xla", "concurrent_collectives"):
        config = tiny(finetune_jarvis.get_config(), records=64, epochs=1, batch=16)
        config.train.max_steps, config.train.cuda_graphs = 2, mode
        loop.train_and_evaluate(config, str(tmp_path / mode))
        params[mode] = _final_params(tmp_path / mode)[0]
    assert passed == [{}, parallel.step_compiler_options("concurrent_collectives", make_mesh(), 16)]
    assert passed[1]["xla_gpu_command_buffer_scheduling_mode"] == "CONCURRENT"
    tol = 0.0 if jax.default_backend() == "cpu" else 1e-5  # a GPU's atomics add in any order
    for a, b in zip(*(jax.tree_util.tree_leaves(p) for p in params.values())):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_the_batcher_places_its_padding_budgets_as_configured():
    """train.num_budget_levels and train.budget_placement reach the training batcher: its
    budgets are choose_budgets' for the training split's sizes and the device shares."""
    from dpf_jax.data.batching import choose_budgets

    config = tiny(finetune_jarvis.get_config(), records=400, batch=32)
    data = loop.load_data(config)
    budgets = {}
    for placement, levels, devices in (("cost", 4, 1), ("quantile", 4, 1), ("cost", 2, 1), ("cost", 3, 4)):
        config.train.budget_placement, config.train.num_budget_levels = placement, levels
        batcher = loop.make_batcher(data.splits["train"], config, devices)
        assert batcher.budgets == choose_budgets(batcher.n_node, batcher.n_edge, 32 // devices, num_levels=levels,
                                                 num_devices=devices, placement=placement), placement
        assert 1 <= len(batcher.budgets) <= levels
        budgets[placement, levels, devices] = batcher.budgets
    # the settings change the shapes here (so a setting lost on the way would show)
    assert len({tuple(b) for b in budgets.values()}) == len(budgets), budgets


@pytest.mark.parametrize("levels, eval_levels, expected", [(8, 4, 4), (8, 3, 3), (2, 4, 2)])
def test_evaluation_batchers_get_at_most_eval_budget_levels(levels, eval_levels, expected):
    """Validation / test batchers (forward-only steps) get min(train.num_budget_levels,
    train.eval_budget_levels) levels, the training batcher all of train.num_budget_levels."""
    from dpf_jax.data.batching import choose_budgets

    config = tiny(finetune_jarvis.get_config(), records=400, batch=32)
    config.train.num_budget_levels, config.train.eval_budget_levels = levels, eval_levels
    assert (loop.budget_levels(config), loop.budget_levels(config, evaluation=True)) == (levels, expected)
    data = loop.load_data(config)
    split = data.splits["train"]
    train_b = loop.make_batcher(split, config, 1)
    eval_b = loop.make_batcher(split, config, 1, evaluation=True)
    for batcher, n in ((train_b, levels), (eval_b, expected)):
        assert batcher.budgets == choose_budgets(batcher.n_node, batcher.n_edge, 32, num_levels=n)
        assert 1 <= len(batcher.budgets) <= n
    # these sizes give 5 distinct budgets for 8 levels, 2 / 3 / 4 for 2 / 3 / 4: a lost setting would show
    assert (train_b.budgets == eval_b.budgets) == (levels == expected)


def test_a_wrong_cuda_graphs_mode_or_padding_setting_fails_before_the_data_loads(tmp_path):
    config = tiny(finetune_jarvis.get_config())
    config.data.path = str(tmp_path / "missing.jsonl.gz")  # would be the error if the data loaded first
    config.train.cuda_graphs = "CONCURRENT"
    with pytest.raises(ValueError, match="train.cuda_graphs must be one of"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    config.train.cuda_graphs = "auto"  # and a wrong padding setting
    for key, value, message in (("budget_placement", "median", "train.budget_placement must be one of"),
                                ("num_budget_levels", 0, "train.num_budget_levels must be a whole number >= 1"),
                                ("eval_budget_levels", 0, "train.eval_budget_levels must be a whole number >= 1")):
        wrong = config.copy_and_resolve_references()
        wrong.train[key] = value
        with pytest.raises(ValueError, match=message):
            loop.train_and_evaluate(wrong, str(tmp_path / "run"))


def test_empty_validation_and_test_splits_are_warned_before_training(tmp_path):
    from dpf_jax.data.pipeline import PreparedData, SplitData

    empty = SplitData([], np.zeros(0))
    data = PreparedData({"train": SplitData([None], np.zeros(1)), "val": empty, "test": empty}, [], 1, "my.jsonl.gz")
    fine = finetune_jarvis.get_config()
    assert [w.split(": ")[1] for w in loop.empty_split_warnings(fine, data)] == ["no validation records",
                                                                                 "no test records"]
    pre = pretrain_mask30.get_config()
    (warning,) = loop.empty_split_warnings(pre, data)
    assert "checkpoints/latest" in warning and "raise data.val_fraction (now 0.05)" in warning
    full = PreparedData({"train": data.splits["train"], "val": data.splits["train"], "test": data.splits["train"]},
                        [], 1, "my.jsonl.gz")
    assert loop.empty_split_warnings(fine, full) == []


def test_nan_loss_stops_with_the_step_and_no_nan_checkpoint(tmp_path):
    config = tiny(finetune_jarvis.get_config(), records=64, epochs=3, batch=16)
    config.optim.learning_rate = 1e30
    config.optim.clip_norm = 0.0
    with pytest.raises(loop.TrainingError, match=r"non-finite .* at step \d+"):
        loop.train_and_evaluate(config, str(tmp_path))
    ckpt = tmp_path / "checkpoints" / "latest"
    if ckpt.exists() and any(ckpt.iterdir()):
        params, _ = _final_params(tmp_path)
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("flat_update", [False, True])
def test_nan_gradient_with_a_finite_loss_leaves_the_state_unchanged(monkeypatch, flat_update):
    """The guard tests the loss and the gradients' global norm: one NaN in one gradient leaf
    (the loss itself finite) must skip the update of every leaf, per leaf or on the
    concatenated parameters (train.flat_update)."""
    import jax.numpy as jnp

    from dpf_jax.train import step as step_lib

    @jax.custom_jvp
    def zero_with_nan_gradient(x):
        return jnp.zeros(())

    @zero_with_nan_gradient.defjvp
    def _jvp(primals, tangents):
        return jnp.zeros(()), jnp.nan * jnp.sum(tangents[0])

    def fake_forward(params, batch_stats, stats, batch, key):
        leaves = jax.tree_util.tree_leaves(params)
        loss = sum(jnp.sum(x ** 2) for x in leaves) + zero_with_nan_gradient(leaves[0].sum())
        return loss, (batch_stats, {}, None)

    monkeypatch.setattr(step_lib, "make_forward", lambda *a, **k: fake_forward)
    config = tiny(finetune_jarvis.get_config(), records=40, epochs=1, batch=8)
    data = loop.load_data(config)
    batch = next(loop.make_batcher(data.splits["train"], config, 1).iterate(shuffle=False))
    objective = loop.make_objective(config)
    model = objective.make_model()
    tx = make_optimizer(config.optim, 10)
    state = create_state(model, tx, jax.tree_util.tree_map(lambda x: x[0], batch), 0, loop.data_stats(config, data))
    assert config.optim.flatten  # the flat update needs optax.flatten's state
    new_state, metrics = jax.jit(step_lib.train_step_fn(objective, model, tx, None, flat_update))(state, batch)
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
    assert not np.isfinite(float(metrics["grad_norm"]))
    for part in ("params", "opt_state", "batch_stats"):  # the whole state but the step counter
        for a, b in zip(jax.tree_util.tree_leaves(getattr(new_state, part)),
                        jax.tree_util.tree_leaves(getattr(state, part))):
            np.testing.assert_array_equal(a, b, err_msg=part)
    assert int(new_state.step) == int(state.step) + 1


def test_finetuning_starts_from_the_pretrained_encoder(tmp_path):
    pre = tiny(pretrain_mask30.get_config(), records=64, epochs=1, batch=16)
    pre_dir = tmp_path / "pre"
    loop.train_and_evaluate(pre, str(pre_dir))
    ft = tiny(finetune_jarvis.get_config(), records=64, epochs=1, batch=16)
    data = loop.load_data(ft)
    objective = loop.make_objective(ft)
    model = objective.make_model()
    tx = make_optimizer(ft.optim, 4)
    batcher = loop.make_batcher(data.splits["train"], ft, 1)
    example = jax.tree_util.tree_map(lambda x: x[0], next(batcher.iterate(shuffle=False)))
    state = create_state(model, tx, example, 0, loop.data_stats(ft, data))
    restored = loop.restore_encoder(state, str(pre_dir))
    raw, _ = load_raw_checkpoint(pre_dir / "checkpoints" / "latest")
    for a, b in zip(jax.tree_util.tree_leaves(restored.params["encoder"]),
                    jax.tree_util.tree_leaves(raw["params"]["encoder"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    # a slim export (no optimiser state) initialises the encoder identically
    from dpf_jax.train.export import export_slim_checkpoint

    export_slim_checkpoint(pre_dir, tmp_path / "slim", which="latest")
    slim_raw, slim_meta = load_raw_checkpoint(tmp_path / "slim")
    assert "opt_state" not in slim_raw and slim_meta["slim"] and (tmp_path / "slim" / "config.json").exists()
    from_slim = loop.restore_encoder(state, str(tmp_path / "slim"))
    for a, b in zip(jax.tree_util.tree_leaves(from_slim.params), jax.tree_util.tree_leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the property head stays freshly initialised
    for a, b in zip(jax.tree_util.tree_leaves(restored.params["fc_out"]),
                    jax.tree_util.tree_leaves(state.params["fc_out"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a different architecture is refused with the differing parameters listed
    ft.model.channels = 8
    other = loop.make_objective(ft).make_model()
    state8 = create_state(other, tx, example, 0, loop.data_stats(ft, data))
    with pytest.raises(loop.TrainingError, match="does not match"):
        loop.restore_encoder(state8, str(pre_dir))


def _cli(*args, cwd=REPO, timeout=600, **env_vars):
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_vars)
    return subprocess.run([sys.executable, "-m", "dpf_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_started_outside_the_repository_loads_its_config(tmp_path):
    """`python -m dpf_jax.main --config <repo>/configs/x.py` from another folder: the config's
    `from configs import base` still imports (the repository goes on the import path), and the
    data path, relative to the working directory, fails with a hint instead of a traceback."""
    from dpf_jax import cli

    config = REPO / "configs" / "finetune_jarvis.py"
    assert cli.config_root(["m", "--config", str(config)]) == REPO
    assert cli.config_root(["m", f"--config={config}:arg", "--workdir", "w"]) == REPO
    assert cli.config_root(["m", "-config", str(config)]) == REPO
    assert cli.config_root(["m", f"-config={config}"]) == REPO
    assert cli.config_root(["m", "--config.train.epochs=1", "--", "--config", str(config)]) is None
    assert cli.config_root(["m", "--config", str(tmp_path / "x.py")]) is None
    site = tmp_path / "site"
    site.mkdir()
    (site / "dpf_jax").symlink_to(REPO / "dpf_jax")  # the package alone, not the repository root
    res = subprocess.run([sys.executable, "-m", "dpf_jax.main", "--config", str(config),
                          "--workdir", str(tmp_path / "run"), "--config.init_checkpoint="],
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "No module named 'configs'" not in res.stderr, res.stderr[-2000:]
    assert "dataset file not found: data/jarvis_dft3d.jsonl.gz" in res.stderr
    assert f"run from the repository root, {REPO}" in res.stderr


def test_cli_runs_and_reports_bad_config(tmp_path):
    common = ["--config.model.num_layers=1", "--config.model.channels=8", "--config.model.heads=1",
              "--config.model.rbf_bins=8", "--config.data.max_records=48", "--config.data.cache_dir=",
              "--config.train.epochs=1", "--config.train.batch_size=16", "--config.train.progress_bar=False"]
    bad = _cli("--config", "configs/finetune_jarvis.py", "--workdir", str(tmp_path / "bad"),
               "--config.data.task=no_such_task", *common)
    assert bad.returncode != 0 and "no_such_task" in bad.stderr
    missing = _cli("--config", "configs/finetune_jarvis.py", "--workdir", str(tmp_path / "m"),
                   "--config.data.path=does/not/exist.jsonl.gz", *common)
    assert missing.returncode != 0 and "does/not/exist.jsonl.gz" in missing.stderr
    # a misspelt override: one line naming the field and the suggestion, no traceback
    typo = _cli("--config", "configs/finetune_jarvis.py", "--workdir", str(tmp_path / "t"), "--config.train.epoch=1")
    assert typo.returncode != 0 and "Traceback" not in typo.stderr, typo.stderr[-3000:]
    (line,) = [x for x in typo.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: bad command line: --config.train.epoch: no config field 'epoch'")
    assert "epochs" in line  # ml_collections' suggestion, kept
    cache = tmp_path / "jax_cache"  # train.compilation_cache_dir: the compiled programs are kept there
    ok = _cli("--config", "configs/finetune_jarvis.py", "--workdir", str(tmp_path / "ok"),
              "--config.init_checkpoint=", f"--config.train.compilation_cache_dir={cache}", *common,
              JAX_COMPILATION_CACHE_DIR="", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert ok.returncode == 0, ok.stderr[-3000:]
    res = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert np.isfinite(res["test_mae_final"]) and res["task"] == "formation_energy_peratom"
    assert f"persistent compilation cache: {cache}" in ok.stderr
    assert any(p.name.startswith("jit_") for p in cache.iterdir())


def test_the_compilation_cache_setting_yields_to_the_environment(monkeypatch):
    """JAX_COMPILATION_CACHE_DIR (read by JAX itself) wins over train.compilation_cache_dir;
    an empty setting without it leaves the cache off (neither touches this process's JAX)."""
    from dpf_jax.cli import enable_compilation_cache

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    assert enable_compilation_cache(".cache/jax") == "/elsewhere"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert enable_compilation_cache("") is None


def test_checkpoint_boundaries_and_changed_settings(tmp_path):
    """Periodic saves on epoch ends, a stop exactly at an epoch end, a repeated stop, and a
    resume with other settings (refused, since it could not be exact)."""
    config = tiny(finetune_jarvis.get_config(), records=80, epochs=2, batch=16)  # 4 steps / epoch
    config.train.checkpoint_every_steps = 2
    config.train.max_steps = 4
    assert loop.train_and_evaluate(config, str(tmp_path)) == {"stopped_at_step": 4}
    assert loop.train_and_evaluate(config, str(tmp_path)) == {"stopped_at_step": 4}
    config.train.max_steps = 0
    assert loop.train_and_evaluate(config, str(tmp_path))["steps"] == 8
    # edge merging only changes speed: a finished run is found finished, not refused
    config.graph.merge_edges = "none"
    assert loop.train_and_evaluate(config, str(tmp_path))["steps"] == 8
    config.graph.merge_edges = "auto"
    config.train.epochs = 3
    with pytest.raises(loop.TrainingError, match=r"holds a different run \(train.epochs: 2 -> 3\)"):
        loop.train_and_evaluate(config, str(tmp_path))
    # another task in the same workdir (same split sizes, so the same steps per epoch): refused,
    # and the finished run's files are left as they were
    written = {f: (tmp_path / f).read_text() for f in ("config.json", "results.json")}
    config.train.epochs = 2
    config.data.task = "optb88vdw_bandgap"
    with pytest.raises(loop.TrainingError, match="data.task: 'formation_energy_peratom' -> 'optb88vdw_bandgap'"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert {f: (tmp_path / f).read_text() for f in written} == written


def test_resume_adopts_the_saved_optimizer_layout(tmp_path, capsys):
    """A run saved with the per-leaf optimiser state (optim.flatten=False, as every checkpoint
    from before the option) resumes under the flat default: it adopts the saved layout, says
    so, and ends exactly as the uninterrupted per-leaf run."""
    config = tiny(finetune_jarvis.get_config(), records=80, epochs=2, batch=16)
    config.optim.flatten = False
    whole = loop.train_and_evaluate(config, str(tmp_path / "whole"))
    config.train.max_steps = 3
    loop.train_and_evaluate(config, str(tmp_path / "split"))
    config.train.max_steps, config.optim.flatten = 0, True
    resumed = loop.train_and_evaluate(config, str(tmp_path / "split"))
    assert "Resuming with optim.flatten=False" in capsys.readouterr().out
    assert json.loads((tmp_path / "split" / "config.json").read_text())["optim"]["flatten"] is False
    assert resumed["test_mae_final"] == whole["test_mae_final"]


def test_evaluate_returns_predictions_in_dataset_order_on_4_balanced_devices():
    """Balanced shares put crystals on devices out of order; `evaluate` maps every prediction
    back through globals["index"]: an eval step that 'predicts' each crystal's own target must
    give back the split's targets in order (103 crystals, batch 32: a partial last batch)."""
    import jax.numpy as jnp

    config = tiny(finetune_jarvis.get_config(), records=150, epochs=1, batch=32)
    data = loop.load_data(config)
    split = data.splits["train"]
    mesh = make_mesh(4)
    batcher = loop.make_batcher(split, config, 4)
    assert batcher.balance

    def echo_step(state, batch, key):
        m = batch.globals["mask"]
        return {"mae": (jnp.sum(m), jnp.sum(m))}, batch.globals["target"]

    metrics, preds = loop.evaluate(echo_step, None, batcher, mesh, jax.random.PRNGKey(0))
    np.testing.assert_allclose(preds, np.nan_to_num(split.targets, nan=0.0), rtol=1e-6)
    assert metrics["mae"] == 1.0


def test_global_norm_over_the_concatenated_leaves():
    import optax

    from dpf_jax.train.step import _global_norm

    rng = np.random.default_rng(1)
    tree = {"a": rng.normal(size=(92, 128)).astype(np.float32), "b": [rng.normal(size=(7,)).astype(np.float32)]}
    np.testing.assert_allclose(float(_global_norm(tree)), float(optax.global_norm(tree)), rtol=1e-6)


def test_flat_optimizer_update_equals_the_per_leaf_one():
    """optax.flatten (optim.flatten, the default) runs the same AdamW + clipping maths on one
    vector: three updates of real-shaped parameters agree with the per-leaf optimiser."""
    config = finetune_jarvis.get_config()
    rng = np.random.default_rng(0)
    params = {"a": {"w": rng.normal(size=(92, 128)).astype(np.float32)}, "b": rng.normal(size=(128,)).astype(np.float32)}
    out = []
    for flat in (False, True):
        config.optim.flatten = flat
        tx = make_optimizer(config.optim, 100)
        p, st = params, tx.init(params)
        for k in range(3):
            g = jax.tree_util.tree_map(lambda x: np.float32(3.0 + k) * np.cos(x), p)  # norm > 5: clipping acts
            upd, st = tx.update(g, st, p)
            p = jax.tree_util.tree_map(lambda x, u: x + u, p, upd)
        out.append((p, loop._current_lr(type("S", (), {"opt_state": st})())))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), out[0][0], out[1][0])
    assert out[0][1] == out[1][1] and np.isfinite(out[0][1])


def test_flat_update_step_equals_the_per_leaf_update_with_fewer_operations():
    """train.flat_update: the optimiser, the update and the non-finite guard on the concatenated
    parameters give bit for bit the state of the per-leaf update over three real pre-training
    steps (packed state, 4 devices), and the compiled step has fewer operations (the per-leaf
    adds and selects were a small kernel each on a GPU)."""
    from dpf_jax.train.step import StatePacking, make_train_step

    entry_op_counts = load_script("count_step_ops").entry_op_counts
    config = tiny(pretrain_mask30.get_config(), records=96, batch=16)
    config.data.path = str(DATA / "pretrain.jsonl.gz")
    assert config.optim.flatten and config.train.flat_update  # the defaults
    data = loop.load_data(config)
    t = train_setup(config, data, 4)
    hosts = [put_batch(b, t.mesh) for b in list(t.batcher.iterate(seed=0, epoch=0, shuffle=True))[:3]]
    packing = StatePacking(t.state)
    states, fusions = [], []
    for flat in (False, True):
        step = make_train_step(t.objective, t.model, t.tx, t.mesh, packing=packing, flat_update=flat)
        packed = packing.pack(put_replicated(jax.device_get(t.state), t.mesh))
        fusions.append(entry_op_counts(step.lower(packed, hosts[0]).compile().as_text())["fusion"])
        for b in hosts:
            packed, metrics = step(packed, b)
            assert bool(metrics["finite"])
        states.append(jax.device_get(packing.unpack(packed)))
    assert int(states[1].step) == 3
    for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1])):
        np.testing.assert_array_equal(a, b)
    n_leaves = len(jax.tree_util.tree_leaves(t.state.params))
    assert fusions[1] <= fusions[0] - n_leaves // 2, (fusions, n_leaves)


def test_four_device_step_all_reduces_the_gradients_and_no_more():
    """The compiled four-device pre-training step all-reduces about one value per parameter (the
    gradients; some just before a small reshape or concatenation, such as the atom embedding's
    [101, F] table: 17,826 values for 16,127 parameters here, as with session 29's code), not
    per-device rows: a replicated bias marked varying only where it was added to the rows had
    its [rows, F] cotangent all-reduced (session 30, `dpf_jax/model/row_sums.py`: 144,227 values
    here)."""
    from dpf_jax.train.step import make_train_step

    config = tiny(pretrain_mask30.get_config(), records=64, batch=32)
    config.data.path = str(DATA / "pretrain.jsonl.gz")
    t = train_setup(config, loop.load_data(config), 4)
    step = make_train_step(t.objective, t.model, t.tx, t.mesh, flat_update=True)
    text = step.lower(put_replicated(t.state, t.mesh), put_batch(t.batch, t.mesh)).compile().as_text()
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(t.state.params))
    sizes = all_reduced_elements(text)
    assert n_params <= sum(sizes) <= 1.25 * n_params, (n_params, sorted(sizes)[-8:])


def test_deferred_checkpoints_keep_the_best_model(tmp_path):
    """With saves deferred (checkpoint_every_secs), only the final latest state is written, and
    the best-validation model still reaches disk (the state of its own step, not the final)."""
    config = tiny(finetune_jarvis.get_config(), records=80, epochs=4, batch=16)  # 4 steps / epoch
    config.optim.learning_rate = 3e-3
    config.train.checkpoint_every_secs = 3600
    res = loop.train_and_evaluate(config, str(tmp_path))
    latest = sorted(int(p.name) for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    best = [int(p.name) for p in (tmp_path / "checkpoints" / "best").iterdir() if p.name.isdigit()]
    assert latest == [16]
    assert best == [4 * (res["best_epoch"] + 1)]
    val = [float(r.split(",")[-2]) for r in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert res["best_epoch"] == int(np.argmin(val))
    best_state, meta = load_raw_checkpoint(tmp_path / "checkpoints" / "best")
    assert meta["best_epoch"] == res["best_epoch"] and int(best_state["step"]) == best[0]


def test_sigterm_saves_and_the_rerun_finishes(tmp_path):
    """A SIGTERM mid-run (as a cluster scheduler sends) stops after the current step with a
    checkpoint; the same command then resumes and finishes the run."""

    args = ["--config", "configs/finetune_jarvis.py", "--workdir", str(tmp_path),
            "--config.model.num_layers=1", "--config.model.channels=8", "--config.model.heads=1",
            "--config.model.rbf_bins=8", "--config.data.max_records=64", "--config.data.cache_dir=",
            "--config.train.epochs=400", "--config.train.batch_size=16", "--config.train.progress_bar=False",
            "--config.init_checkpoint=", f"--config.train.compilation_cache_dir={tmp_path / 'jax_cache'}"]
    code, out = terminate_after_epochs([sys.executable, "-m", "dpf_jax.main", *args], tmp_path / "metrics.csv")
    assert code != 0 and "interrupted (signal 15)" in out, out[-3000:]
    _, meta = _final_params(tmp_path)
    assert meta["step"] >= 3 * 3  # 48 training crystals / 16 = 3 steps per epoch, > 2 epochs done
    res = _cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Resuming from" in res.stdout + res.stderr
    log_text = (tmp_path / "train.log").read_text()
    assert f"at step {meta['step']} of {400 * 3}" in log_text  # in the log too
    # the padded shapes (one compilation each) are logged: the first epoch's pauses explained
    assert "training shapes (" in log_text
    assert "evaluation shapes; each compiles when a batch first needs it" in log_text
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 400 * 3
    again = _cli(*args)  # a finished run started again says so
    assert again.returncode == 0 and f"at step {400 * 3} of {400 * 3} (the run had finished" in again.stdout


def test_shipped_pretrained_encoder_recovers_masked_atom_types():
    """The committed mask-30% checkpoint (data/pretrained/pretrain_mask30, 50 epochs on one
    H100) loads into today's model and predicts masked atom types on held-out structures far
    better than the most-frequent-element baseline (0.24 on the validation split)."""
    config = pretrain_mask30.get_config()
    config.data.max_records = 800
    config.data.cache_dir = ""
    config.data.num_workers = 1
    data = loop.load_data(config)
    stats = loop.data_stats(config, data)
    objective = loop.make_objective(config)
    model = objective.make_model()
    val_b = loop.make_batcher(data.splits["val"], config, 1)
    example = jax.tree_util.tree_map(lambda x: x[0], next(val_b.iterate(shuffle=False)))
    state = create_state(model, make_optimizer(config.optim, 10), example, 0, stats)
    raw, meta = load_raw_checkpoint(DATA / "pretrained" / "pretrain_mask30")
    # the pre-training run's folder links to the same checkpoint (reproduce.py --runs results/runs)
    linked, _ = load_raw_checkpoint(REPO / "results" / "runs" / "pretrain" / "pretrain_mask30")
    np.testing.assert_array_equal(linked["params"]["encoder"]["atom_embedding"]["kernel"],
                                  raw["params"]["encoder"]["atom_embedding"]["kernel"])
    assert meta["step"] == 5300
    state = state.replace(params=jax.tree_util.tree_map(np.asarray, raw["params"]),
                          batch_stats=raw["batch_stats"])
    mesh = make_mesh(1)
    eval_step = loop.make_eval_step(objective, model, mesh)
    metrics, _ = loop.evaluate(eval_step, put_replicated(state, mesh), val_b, mesh,
                               put_replicated(jax.random.PRNGKey(3), mesh))
    assert len(data.splits["val"]) >= 30
    assert metrics["type_acc"] > 0.55, metrics


def test_stop_at_an_epoch_end_keeps_that_epochs_validation(tmp_path, monkeypatch):
    """A signal arriving during an epoch's last step stops the run only after that epoch's
    validation, metrics row and best model: the resumed run has every epoch's row and ends
    with the same parameters as a run never stopped."""
    config = tiny(finetune_jarvis.get_config(), records=80, epochs=3, batch=16)  # 4 steps / epoch
    config.train.checkpoint_every_secs = 0
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    calls = []

    class SignalDuringLastStepOfEpoch1(loop.StopOnSignal):
        def check(self):  # calls 1-3: after steps 1-3; call 4: the end of epoch 1
            calls.append(1)
            if len(calls) == 4:
                raise loop.Interrupted("signal 15")

    monkeypatch.setattr(loop, "StopOnSignal", SignalDuringLastStepOfEpoch1)
    with pytest.raises(loop.Interrupted):
        loop.train_and_evaluate(config, str(tmp_path / "stopped"))
    monkeypatch.undo()
    resumed = loop.train_and_evaluate(config, str(tmp_path / "stopped"))
    with open(tmp_path / "stopped" / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2"]
    assert resumed["best_epoch"] == straight["best_epoch"]
    for a, b in zip(jax.tree_util.tree_leaves(_final_params(tmp_path / "straight")[0]),
                    jax.tree_util.tree_leaves(_final_params(tmp_path / "stopped")[0])):
        np.testing.assert_array_equal(a, b)


def test_compare_device_counts_script(tmp_path):
    """scripts/compare_device_counts.py (issue: multi-GPU run): the per-step pre-training loss
    on 4 fake devices follows the 1-device curve; the script really trains (loss moves)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import compare_device_counts

    report = compare_device_counts.main(["--small", "--steps", "4", "--devices", "1", "4",
                                         "--edge-kernels", "pallas_gate_rows-16x4", "--cuda-graphs", "concurrent",
                                         "--set", "train.cuda_graphs=auto",
                                         "--out", str(tmp_path / "report.json")])
    one, four = report["loss_curves"]["1"], report["loss_curves"]["4"]
    assert len(one) == len(four) == 4
    assert abs(one[-1] - one[0]) > 1e-3 * abs(one[0])  # four optimiser steps changed the loss
    assert report["max_rel_dev_all_steps"]["4"] < 1e-5
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 4
    assert report["merge_edges"] == "distance"  # the pre-training default, as resolved
    # another edge kernel on one device (on a CPU inside the step's shard_map the kernel's
    # jax.numpy twin runs: this checks the plumbing; the GPU run is in the README)
    from dpf_jax.model.layers import resolve_edge_kernel

    assert report["edge_kernel"] == resolve_edge_kernel("auto", "node", 16)  # "xla" on a CPU
    assert len(report["edge_kernel_curves"]["pallas_gate_rows-16x4"]) == 4
    assert report["edge_kernel_max_rel_dev_all_steps"]["pallas_gate_rows-16x4"] < 1e-5
    # --set reaches every run; --cuda-graphs runs one device with another train.cuda_graphs
    assert report["overrides"] == ["train.cuda_graphs=auto"]
    expected = {str(n): parallel.resolve_cuda_graphs("auto", make_mesh(n), 32) for n in (1, 4)}
    assert report["cuda_graphs"] == expected and (jax.default_backend() != "cpu" or set(expected.values()) == {"xla"})
    assert len(report["cuda_graphs_curves"]["concurrent"]) == 4
    assert report["cuda_graphs_max_rel_dev_all_steps"]["concurrent"] < 1e-5


@pytest.mark.parametrize("name, level", [("finetune_jarvis", "atoms"), ("finetune_mp", "atoms"),
                                         ("pretrain_mask30", "distance"), ("pretrain_official", "distance"),
                                         ("pretrain_pos10", "mirror"), ("pretrain_lattice30", "mirror"),
                                         ("pretrain_lattice30+rebuild", "distance"), ("pretrain_pos10+rebuild", "mirror")])
def test_shipped_configs_merge_edges_as_far_as_exact(name, level):
    """graph.merge_edges="auto" per shipped config: equal atoms too for fine-tuning (a mean over
    atoms); by distance in pre-training where the step never moves atoms or the lattice and no
    head sums edge vectors (type masking, the official corruption and rebuilt topologies, whose
    graphs are merged as perturbed); only mirrored self-images under lattice noise on the
    device or with the position head. More than that is refused."""
    import importlib

    module, _, rebuild = name.partition("+")
    config = importlib.import_module(f"configs.{module}").get_config()
    config.pretrain.rebuild_topology = bool(rebuild)
    assert loop._graph_params(config).merge_edges == level
    if level != "atoms":
        config.graph.merge_edges = "atoms"
        with pytest.raises(ValueError, match="would change this run's results"):
            loop._graph_params(config)


def test_finetune_config_without_a_pretrain_section():
    """Fine-tuning never reads the pre-training settings (configs of older versions lack them)."""
    config = finetune_jarvis.get_config()
    del config["pretrain"]
    assert loop._graph_params(config).merge_edges == "atoms"


def test_a_donated_state_is_recognised():
    """What the interrupt handler asks before touching the state: whether a step cut short
    took its donated input with it."""
    import jax.numpy as jnp

    from dpf_jax.train.step import StatePacking

    x = {"a": jnp.ones(3), "b": jnp.zeros((), jnp.int32)}
    assert not loop.donated(x)
    jax.jit(lambda t: {"a": t["a"] + 1, "b": t["b"]}, donate_argnums=0)(x)
    assert loop.donated(x)
    packed = StatePacking(x).pack({"a": jnp.ones(3), "b": jnp.zeros((), jnp.int32)})
    assert not loop.donated(packed)
    packed.vectors[0].delete()
    assert loop.donated(packed)


def test_host_waits_for_the_step_two_back():
    """`wait_for_older_steps` blocks on the newest step that must be finished for at most
    `in_flight` to be running (here the third newest of five), on nothing else, and on nothing
    when the queue is short or the limit off."""
    class Queued:
        def __init__(self):
            self.waited = False

        def block_until_ready(self):
            self.waited = True
            return self

    for n, in_flight, expect in ((5, 2, [0, 0, 1, 0, 0]), (2, 2, [0, 0]), (5, 0, [0] * 5), (4, 3, [1, 0, 0, 0])):
        pending = [(i, {"loss": Queued()}) for i in range(n)]
        loop.wait_for_older_steps(pending, in_flight)
        assert [int(m["loss"].waited) for _, m in pending] == expect, (n, in_flight)


def test_training_bounds_steps_in_flight_and_lists_skipped_records(tmp_path, monkeypatch):
    """The training loop applies train.steps_in_flight after every step (a signal then lands
    within that many steps instead of up to log_every_steps), and a dataset with a bad record
    trains on the rest, writing skipped.json with the source, the count and the record."""
    import gzip

    lines = gzip.open(DATA / "jarvis_dft3d.jsonl.gz", "rt").read().splitlines()[:60]
    bad = json.loads(lines[5])
    bad["frac_coords"][0] = [float("nan")] * 3
    lines[5] = json.dumps(bad)
    path = tmp_path / "subset.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    config = tiny(finetune_jarvis.get_config(), records=0, epochs=1, batch=8)
    config.data.path = str(path)
    config.train.steps_in_flight = 3
    calls = []
    original = loop.wait_for_older_steps
    monkeypatch.setattr(loop, "wait_for_older_steps",
                        lambda pending, in_flight: (calls.append((pending[-1][0], in_flight)),
                                                    original(pending, in_flight)))
    res = loop.train_and_evaluate(config, str(tmp_path / "run"))
    steps = res["steps"]
    assert steps >= 4 and calls == [(s, 3) for s in range(steps)]
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert skipped["count"] == 1 and skipped["source"].startswith(str(path))
    assert skipped["skipped"][0]["record"] == bad["id"] and skipped["skipped"][0]["reason"]


def test_prefetch_to_device_copies_in_order_from_a_background_thread():
    """Device batches in the host order, sharded over the 4 devices; (host, device) pairs with
    with_host; a failing host iterator raises in the consumer; stopping early does not hang."""
    import threading
    import time

    from dpf_jax.train.parallel import prefetch_to_device

    mesh = make_mesh()
    host = [{"x": np.arange(8, dtype=np.float32).reshape(4, 2) + i} for i in range(5)]
    callers = set()

    def source():
        for b in host:
            callers.add(threading.current_thread().name)
            yield b

    out = list(prefetch_to_device(source(), mesh, size=2))
    assert threading.current_thread().name not in callers  # copies issued off the main thread
    assert len(out) == 5 and all(len(o["x"].sharding.device_set) == 4 for o in out)
    for h, d in zip(host, out):
        np.testing.assert_array_equal(np.asarray(d["x"]), h["x"])
    for h, (h2, d) in zip(host, prefetch_to_device(iter(host), mesh, with_host=True)):
        assert h2 is h and np.array_equal(np.asarray(d["x"]), h["x"])

    def broken():
        yield host[0]
        raise ValueError("bad batch 1")

    with pytest.raises(ValueError, match="bad batch 1"):
        list(prefetch_to_device(broken(), mesh))
    before = threading.active_count()
    for source in (host * 100, host[:3]):  # stopped early with the source left, or exhausted
        it = prefetch_to_device(iter(source), mesh, size=2)
        next(it)
        time.sleep(0.3)  # both threads fill their queues
        it.close()
        assert threading.active_count() == before  # the copying thread has ended


def test_several_steps_per_call_equal_one_step_per_call():
    """make_train_step(steps_per_call=3): one call over three stacked batches gives the state
    and per-step metrics of three single-step calls (4 devices, real pre-training batches,
    perturbation keys from the step counter as in the loop)."""
    from dpf_jax.train.step import make_train_step

    config = tiny(pretrain_mask30.get_config(), records=96, batch=16)
    config.data.path = str(DATA / "pretrain.jsonl.gz")
    config.train.num_budget_levels = 1  # one padded shape: the batches stack
    data = loop.load_data(config)
    t = train_setup(config, data, 4)
    hosts = list(t.batcher.iterate(seed=0, epoch=0, shuffle=True))[:3]
    assert len(hosts) == 3 and len({b.edges["mask"].shape for b in hosts}) == 1
    host_state = jax.device_get(t.state)  # both runs start here (the steps donate their input)
    one = make_train_step(t.objective, t.model, t.tx, t.mesh)
    state, singles = put_replicated(host_state, t.mesh), []
    for b in hosts:
        state, m = one(state, put_batch(b, t.mesh))
        singles.append(jax.device_get(m))
    three = make_train_step(t.objective, t.model, t.tx, t.mesh, steps_per_call=3)
    stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), *hosts)
    state3, m3 = three(put_replicated(host_state, t.mesh), put_batch(stacked, t.mesh, run_axis=True))
    m3 = jax.device_get(m3)
    assert int(state3.step) == int(state.step) == 3
    np.testing.assert_allclose(m3["loss"], [m["loss"] for m in singles], rtol=1e-5)
    assert m3["finite"].all() and not np.allclose(m3["loss"][0], m3["loss"][1:])  # three different steps
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state3.params)),
                    jax.tree_util.tree_leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="steps_per_call"):
        make_train_step(t.objective, t.model, t.tx, t.mesh, num_runs=2, steps_per_call=2)


def test_packed_state_step_equals_tree_step():
    """train.pack_state: packing is exact (every leaf back with its shape and dtype), and the
    step on the packed state gives the tree step's losses and state (4 devices, real
    pre-training batches), also with bundled batches and packed metrics (train.pack_batches,
    train.pack_metrics); with a run axis each run's leaves stay in their own row."""
    from dpf_jax.data.transfer import TransferPacking
    from dpf_jax.train.step import MetricsPacking, StatePacking, make_train_step

    config = tiny(pretrain_mask30.get_config(), records=96, batch=16)
    config.data.path = str(DATA / "pretrain.jsonl.gz")
    data = loop.load_data(config)
    t = train_setup(config, data, 4)
    hosts = list(t.batcher.iterate(seed=0, epoch=0, shuffle=True))[:3]
    host_state = jax.device_get(t.state)
    packing = StatePacking(t.state)
    packed = packing.pack(put_replicated(host_state, t.mesh))
    n_leaves = len(jax.tree_util.tree_leaves(host_state))
    assert len(jax.tree_util.tree_leaves(packed)) == 3 < n_leaves  # float32, int32, uint32 (key)
    floats = [v for v in packed.vectors if v.dtype == np.float32]
    n_float = sum(x.size for x in jax.tree_util.tree_leaves(host_state) if x.dtype == np.float32)
    assert len(floats) == 1 and floats[0].shape == (n_float,)
    back = jax.device_get(packing.unpack(packed))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(host_state)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(host_state)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)

    tree_step = make_train_step(t.objective, t.model, t.tx, t.mesh)
    packed_step = make_train_step(t.objective, t.model, t.tx, t.mesh, packing=packing)
    transfer = TransferPacking(hosts[0])  # and the batches bundled (train.pack_batches)
    metrics_packing = MetricsPacking()  # and the metrics as one vector (train.pack_metrics)
    with pytest.raises(RuntimeError, match="before the step was traced"):
        metrics_packing.unpack(np.zeros(9, np.float32))
    bundled_step = make_train_step(t.objective, t.model, t.tx, t.mesh, packing=packing, transfer=transfer,
                                   metrics_packing=metrics_packing)
    state, bundled = put_replicated(host_state, t.mesh), packing.pack(put_replicated(host_state, t.mesh))
    for b in hosts:
        dev = put_batch(b, t.mesh)
        state, m_tree = tree_step(state, dev)
        packed, m_packed = packed_step(packed, dev)
        bundled, m_bundled = bundled_step(bundled, put_batch(transfer.pack(b), t.mesh))
        np.testing.assert_allclose(float(m_packed["loss"]), float(m_tree["loss"]), rtol=1e-6)
        assert m_bundled.ndim == 1 and m_bundled.dtype == np.float32  # one vector per step
        m_bundled = metrics_packing.unpack(jax.device_get(m_bundled))
        m_tree = jax.device_get(m_tree)
        assert jax.tree_util.tree_structure(m_bundled) == jax.tree_util.tree_structure(m_tree)
        assert m_bundled["finite"].dtype == np.bool_ and bool(m_bundled["finite"])
        for a, b in zip(jax.tree_util.tree_leaves(m_bundled), jax.tree_util.tree_leaves(m_tree)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-6)
    # the bundled step is another program, free to sum in another order: lin_concate's bias feeds
    # a BatchNorm, so its exact gradient is 0, and Adam turns the rounding noise into steps of up
    # to ~lr either way; those leaves are not compared, and the running means of that BatchNorm,
    # which take the bias in, to 1e-4
    paths = jax.tree_util.tree_flatten_with_path(jax.device_get(packing.unpack(bundled)))[0]
    compared = 0
    for (path, a), b in zip(paths, jax.tree_util.tree_leaves(jax.device_get(packing.unpack(packed)))):
        name = jax.tree_util.keystr(path)
        if not ("lin_concate" in name and "bias" in name):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 if "batch_stats" in name else 1e-7, err_msg=name)
            compared += 1
    assert compared == len(paths) - config.model.num_layers  # every leaf but the lin_concate biases
    after = jax.device_get(packing.unpack(packed))
    assert int(after.step) == 3 and not np.array_equal(after.params["encoder"]["atom_embedding"]["kernel"],
                                                       host_state.params["encoder"]["atom_embedding"]["kernel"])
    for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(jax.device_get(state))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    runs = jax.tree_util.tree_map(lambda x: np.stack([x, x + 1]), host_state)
    run_packing = StatePacking(runs, run_axis=True)
    rows = run_packing.pack(runs)
    for v in rows.vectors:  # run 1's row is run 0's + 1
        assert v.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(v[1]), np.asarray(v[0]) + 1)
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(run_packing.unpack(rows))),
                    jax.tree_util.tree_leaves(runs)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
