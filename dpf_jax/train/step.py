"""The train state pytree and the jitted, data-parallel train and evaluation steps."""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from dpf_jax.train.parallel import AXIS, shard_map


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: checkpointed whole.

    `key` is the run's base PRNG key (raw uint32 form); the key of step s is
    fold_in(key, s), so randomness is a pure function of (seed, step).
    `stats` holds data statistics the model depends on (target mean/std, lattice stats).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array
    stats: Any


def split_seed(seed: int):
    """(parameter-init key, run key) of a seed; the key of step s is fold_in(run key, s)."""
    return jax.random.split(jax.random.PRNGKey(seed))


def create_state(model, tx, example_graph, seed: int, stats: dict) -> TrainState:
    """Initialises parameters on one device share of an example batch (no device axis)."""
    init_key, run_key = split_seed(seed)
    variables = jax.jit(lambda k, g: model.init(k, g, train=False))(init_key, example_graph)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      key=run_key, stats=jax.tree_util.tree_map(jnp.asarray, stats))


def _squeeze(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def _psum_terms(terms):
    return jax.tree_util.tree_map(lambda x: jax.lax.psum(jnp.asarray(x, jnp.float32), AXIS), terms)


def make_forward(objective, model, mesh, train: bool):
    """Per-device forward under shard_map → (global loss, (new batch_stats, terms, outputs))."""

    def per_device(params, batch_stats, stats, batch, key):
        graph = _squeeze(batch)
        graph, targets = objective.prepare(key, graph, stats)
        variables = {"params": params, "batch_stats": batch_stats}
        if train:
            outputs, mutated = model.apply(variables, graph, train=True, mutable=["batch_stats"])
            new_stats = mutated["batch_stats"]
        else:
            outputs = model.apply(variables, graph, train=False)
            new_stats = batch_stats
        terms, predictions = objective.loss_terms(outputs, graph, targets, stats)
        terms = _psum_terms(terms)
        loss = objective.total_loss(terms)
        if predictions is None:
            predictions = jnp.zeros_like(graph.globals["target"])
        return loss, (new_stats, terms, predictions[None])

    return shard_map(per_device, mesh,
                     in_specs=(P(), P(), P(), P(AXIS), P()),
                     out_specs=(P(), (P(), P(), P(AXIS))))


def _global_norm(tree) -> jax.Array:
    """√(Σ x²) over every leaf, as one reduction over the concatenated leaves: the same
    concatenation `optax.flatten` builds (so XLA shares it), instead of a square and a sum per
    leaf (two small kernels x 113 leaves each step)."""
    flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
    return jnp.sqrt(jnp.sum(jnp.square(flat)))


@flax.struct.dataclass
class PackedState:
    """A `TrainState` as the jitted train step takes it: its leaves concatenated into one
    vector per dtype (`vectors`: float32 parameters, BatchNorm statistics, optimiser moments
    and hyper-parameters, data statistics; int32 step and counters; the uint32 key)."""

    vectors: tuple


class StatePacking:
    """Packs a `TrainState` into a `PackedState` and back; exact (slices and reshapes).

    Why: the host's cost of one jitted call grows with the number of arrays going in and out,
    times the devices they live on. The pre-training state has 141 leaves; on four H200s
    queuing its step cost the host 4.34 ms as a tree and 2.20 ms packed, against a 4.1 ms B=256
    step, and a whole pipeline epoch went from 39% to 71% of the pure step (session 18,
    `scripts/results/h200x4_session18/ep4_tree.json`, `ep4_pack.json`). The layout (which
    leaves, their shapes and dtypes) is taken from `example` (arrays or
    `jax.ShapeDtypeStruct`s); `run_axis`: every leaf has a leading axis of runs
    (`dpf_jax.train.multirun`), kept as each vector's leading axis."""

    def __init__(self, example: TrainState, run_axis: bool = False):
        leaves, self.treedef = jax.tree_util.tree_flatten(example)
        self.lead = 1 if run_axis else 0
        self.shapes = [tuple(x.shape) for x in leaves]
        dtypes = [jnp.dtype(x.dtype) for x in leaves]
        self.dtypes = list(dict.fromkeys(dtypes))  # one vector per dtype, in order of appearance
        self.slot = [self.dtypes.index(d) for d in dtypes]
        self.pack = jax.jit(self._pack)
        self.unpack = jax.jit(self._unpack)

    def _pack(self, state: TrainState) -> PackedState:
        parts = [[] for _ in self.dtypes]
        for x, slot in zip(self.treedef.flatten_up_to(state), self.slot):
            parts[slot].append(x.reshape(x.shape[:self.lead] + (-1,)))
        return PackedState(vectors=tuple(jnp.concatenate(p, axis=-1) for p in parts))

    def _unpack(self, packed: PackedState) -> TrainState:
        out, offsets = [], [0] * len(self.dtypes)
        for shape, slot in zip(self.shapes, self.slot):
            n, o = math.prod(shape[self.lead:]), offsets[slot]
            out.append(packed.vectors[slot][..., o:o + n].reshape(shape))
            offsets[slot] = o + n
        return self.treedef.unflatten(out)


class MetricsPacking:
    """A step's metrics (scalars per step, or per run) as one float32 vector, so the host
    fetches a step's metrics in one copy instead of one per metric (~9): on four H200s the
    fetches took the training loop's thread 0.71 ms per step (session 18, `ep4_both.json`'s
    `drain`), packed 0.17 ms (session 19, `scripts/results/h200x4_session19/ep4_all.json`).
    Exact: float32 values as they are, bools as 0/1 (int metrics would have to fit float32; the
    step has none).

    The layout is recorded when the step is traced (`pack`, inside jit): the metrics'
    structure is fixed by the objective, so every trace records the same one."""

    def __init__(self):
        self.treedef, self.shapes, self.dtypes = None, None, None

    def pack(self, metrics, lead: int = 0) -> jax.Array:
        leaves, self.treedef = jax.tree_util.tree_flatten(metrics)
        self.shapes = [tuple(x.shape[lead:]) for x in leaves]
        self.dtypes = [jnp.dtype(x.dtype) for x in leaves]
        return jnp.concatenate([x.reshape(x.shape[:lead] + (-1,)).astype(jnp.float32) for x in leaves], axis=-1)

    def unpack(self, vector) -> dict:
        """Host side: the metrics dict of a fetched vector (any leading axes: runs, steps)."""
        if self.treedef is None:
            raise RuntimeError("MetricsPacking.unpack before the step was traced")
        vector = np.asarray(vector)
        out, offset = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            n = math.prod(shape)
            x = vector[..., offset:offset + n].reshape(vector.shape[:-1] + shape)
            out.append(x != 0 if dtype == jnp.bool_ else x.astype(dtype))
            offset += n
        return self.treedef.unflatten(out)


def make_train_step(objective, model, tx, mesh, num_runs: int = 0, steps_per_call: int = 1,
                    packing: StatePacking | None = None, transfer=None,
                    metrics_packing: MetricsPacking | None = None, compiler_options: dict | None = None,
                    flat_update: bool = False):
    """jit(state, batch) → (state, metrics). A non-finite loss or gradient leaves the state
    unchanged and reports `finite=False`, so no NaN ever reaches parameters or checkpoints.

    With `num_runs` > 0, `state` and `batch` carry a leading axis of independent runs (stacked
    states, one batch per run; see `dpf_jax.train.multirun`) and the step is vmapped over it.

    With `steps_per_call` = K > 1, `batch` carries a leading axis of K equally padded batches
    and one call runs K consecutive steps (`lax.scan`), returning metrics with that leading
    axis: the same state as K calls, while the host pays its per-call cost once per K steps.
    Measured (session 18, 4 x H200, pre-training B=256): no gain (4.05 against 4.08 ms per step
    on four GPUs, 8.73 against 8.62 on one), so the training loop makes one step per call;
    `scripts/bench_train.py --steps-per-dispatch K` times it.

    With `packing` (a `StatePacking` of this state), the jitted step takes and returns the
    `PackedState` instead of the `TrainState`: the same numbers, far fewer arrays per call.
    With `transfer` (a `dpf_jax.data.transfer.TransferPacking`), it takes batches bundled by
    its `pack` and unpacks them first. With `metrics_packing`, the metrics come back as one
    float32 vector per step (`MetricsPacking.unpack` on the host gives the dict).
    `compiler_options`: XLA options for this jit (`parallel.step_compiler_options`).
    `flat_update`: the optimiser update on the concatenated parameters (`train_step_fn`; `tx`
    must be wrapped in `optax.flatten`).
    """
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
    if steps_per_call > 1 and num_runs:
        raise ValueError("steps_per_call > 1 with several runs trained together is not supported")
    step = train_step_fn(objective, model, tx, mesh, flat_update)
    if num_runs:
        step = jax.vmap(step)
    if packing is not None:
        tree_step = step

        def step(packed, batch):
            state, metrics = tree_step(packing._unpack(packed), batch)
            return packing._pack(state), metrics

    if metrics_packing is not None:
        dict_step = step

        def step(state, batch):
            state, metrics = dict_step(state, batch)
            return state, metrics_packing.pack(metrics, lead=1 if num_runs else 0)

    if transfer is not None:
        bundled_step = step

        def step(state, batch):
            return bundled_step(state, transfer.unpack(batch))

    if steps_per_call > 1:
        def steps(state, batches):
            return jax.lax.scan(step, state, batches)

        return jax.jit(steps, donate_argnums=(0,), compiler_options=compiler_options or None)
    return jax.jit(step, donate_argnums=(0,), compiler_options=compiler_options or None)


def train_step_fn(objective, model, tx, mesh, flat_update: bool = False):
    """The un-jitted train step of one run (see `make_train_step`).

    `flat_update` (only for an optimiser wrapped in `optax.flatten`, whose state is that of one
    flat vector): the optimiser, the parameter update and the skip of a non-finite step run on
    the concatenated parameters and gradients, and the new parameters are split into leaves
    only at the end. `optax.flatten` does the same concatenation inside `tx.update` but hands
    back one update per leaf, and adding and selecting those per leaf left XLA a small kernel
    per leaf each step: traced on one H200 (session 30, issue #9's synthetic fine-tuning step,
    B=256), 618 -> 518 kernels per step (110 -> 11 select fusions), 18.10 -> 17.94 ms. The
    same numbers bit for bit: elementwise the same operations."""
    forward = make_forward(objective, model, mesh, train=True)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        grad_fn = jax.value_and_grad(forward, has_aux=True)
        (loss, (new_bs, terms, _)), grads = grad_fn(state.params, state.batch_stats, state.stats, batch, key)
        # one scalar test: a NaN or inf anywhere in the gradients makes their global norm
        # non-finite (so does a norm overflowing float32, a step worth skipping too); a test
        # per parameter leaf cost two small kernels per leaf (113 leaves) every step
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        if flat_update:
            flat_params, unravel = ravel_pytree(state.params)
            updates, new_opt = tx.update(ravel_pytree(grads)[0], state.opt_state, flat_params)
            new_params = unravel(jnp.where(finite, optax.apply_updates(flat_params, updates), flat_params))
        else:
            updates, new_opt = tx.update(grads, state.opt_state, state.params)
            new_params = keep(optax.apply_updates(state.params, updates), state.params)
        new_state = state.replace(step=state.step + 1, params=new_params,
                                  batch_stats=keep(new_bs, state.batch_stats),
                                  opt_state=keep(new_opt, state.opt_state))
        metrics = {"loss": loss, "finite": finite, "grad_norm": grad_norm, "terms": terms}
        return new_state, metrics

    return train_step


def make_eval_step(objective, model, mesh, num_runs: int = 0):
    """jit(state, batch, key) → (terms, predictions [devices, graphs]) in eval mode.

    With `num_runs` > 0, `state` carries a leading axis of runs, all evaluated on the same
    batch; the outputs gain that leading axis.
    """
    forward = make_forward(objective, model, mesh, train=False)

    def eval_step(state: TrainState, batch, key):
        _, (_, terms, predictions) = forward(state.params, state.batch_stats, state.stats, batch, key)
        return terms, predictions

    return jax.jit(jax.vmap(eval_step, in_axes=(0, None, None)) if num_runs else eval_step)
