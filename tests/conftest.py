"""Test session set-up: four fake CPU devices, so data-parallel code runs on N > 1 devices."""

import os
import sys
from pathlib import Path

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # configs/ is a plain folder imported by config files
    sys.path.insert(0, str(REPO))

DATA = REPO / "data"


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package), registered in sys.modules."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def all_reduced_elements(hlo_text: str) -> list[int]:
    """Elements of each all-reduce operand in the ENTRY computation of an optimised HLO
    module's text (`scripts/count_step_ops.py` parses the instructions)."""
    import re

    import numpy as np

    sizes = []
    for _, (_, typ, opcode, _) in load_script("count_step_ops").entry_instructions(hlo_text):
        if opcode in ("all-reduce", "all-reduce-start"):
            sizes += [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in re.findall(r"\[([\d,]*)\]", typ)]
    return sizes


def tiny(config, records=96, epochs=2, batch=16, layers=2, channels=16, heads=2):
    """A small model and data slice so CPU tests run in seconds; the code path is the real one."""
    config.model.num_layers = layers
    config.model.channels = channels
    config.model.heads = heads
    config.model.rbf_bins = 16
    config.data.max_records = records
    config.data.cache_dir = ""
    config.data.num_workers = 1
    config.train.epochs = epochs
    config.train.batch_size = batch
    config.train.progress_bar = False
    config.train.budget_search_cache = ""  # tests that search give it a temporary file
    config.train.num_budget_levels = 2  # fewer compilations on the CPU (the levels: test_batching)
    config.init_checkpoint = ""
    return config


def train_setup(config, data, num_devices):
    """What the training loop builds for `config` on `num_devices` (mesh, the training split's
    batcher, objective, model, optimiser) plus the initial state (seed 0, on the host) and the
    first batch of the seed-0 shuffled epoch."""
    import types

    import jax

    from dpf_jax.train import loop
    from dpf_jax.train.optim import make_optimizer
    from dpf_jax.train.parallel import make_mesh
    from dpf_jax.train.step import create_state

    mesh = make_mesh(num_devices)
    batcher = loop.make_batcher(data.splits["train"], config, num_devices)
    objective = loop.make_objective(config)
    model = objective.make_model()
    tx = make_optimizer(config.optim, 10)
    host = next(batcher.iterate(seed=0, epoch=0, shuffle=True))
    example = jax.tree_util.tree_map(lambda x: x[0], host)
    # identical initial parameters whatever the device count (same seed, same model)
    state = create_state(model, tx, example, 0, loop.data_stats(config, data))
    return types.SimpleNamespace(mesh=mesh, batcher=batcher, objective=objective, model=model, tx=tx,
                                 state=state, batch=host)


def terminate_after_epochs(command, metrics_csv, epochs=3, env=None, timeout=300):
    """Starts `command` (a training CLI), sends SIGTERM once `metrics_csv` has `epochs` rows,
    waits for it to stop; returns (exit code, its stdout + stderr)."""
    import signal
    import subprocess
    import time

    env = env or dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics_csv.exists() and len(metrics_csv.read_text().splitlines()) > epochs:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    return proc.returncode, out


def lower_for_gpu(fn, *shapes) -> str:
    """StableHLO text of `fn` lowered for an NVIDIA GPU, on this CPU-only machine (the Pallas
    kernels' Triton lowering runs here; only the final compilation to GPU code needs a GPU)."""
    import jax

    lowered = lambda: jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()  # noqa: E731
    try:
        return lowered()
    except RuntimeError as e:  # jax >= 0.11 asks which GPU to build for when none is attached
        if "No supported GPU devices" not in str(e):
            raise
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    target = AbstractMesh((1,), ("gpu",), abstract_device=AbstractDevice("NVIDIA H100 80GB HBM3", None, "gpu"))
    with use_abstract_mesh(target):
        return lowered()


def random_conv_inputs(seed: int, n_node: int = 24, n_edge: int = 96, channels: int = 16):
    """MatformerConv's inputs (x, edge_attr, senders, receivers, node mask, edge mask) for a
    random graph: receivers sorted among the first 20 nodes, the last 4 nodes and 6 edges padding."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    receivers = np.sort(rng.integers(0, 20, n_edge)).astype(np.int32)
    return tuple(map(jnp.asarray, (rng.standard_normal((n_node, channels)).astype(np.float32),
                                   rng.standard_normal((n_edge, 8)).astype(np.float32),
                                   rng.integers(0, 20, n_edge).astype(np.int32), receivers,
                                   np.arange(n_node) < n_node - 4, np.arange(n_edge) < n_edge - 6)))
