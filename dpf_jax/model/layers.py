"""Building blocks of the Matformer encoder (Flax linen).

Flax *linen* (not NNX) on purpose: the training code keeps parameters and BatchNorm statistics
as plain pytrees (`params`, `batch_stats`) in a `TrainState`, and runs `model.apply` inside
`jax.jit` / `shard_map` in a purely functional style; linen's `apply(..., mutable=["batch_stats"])`
fits that directly.

Parameters mirror the PyTorch reference (YKQ98/Matformer) one to one: every `torch.nn.Linear`
is a `Linear` here with `kernel` = weight.T (shape [in, out]) and `bias`, initialised like
PyTorch (weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))); LayerNorm / BatchNorm have
`scale` (= weight) and `bias`; BatchNorm running statistics live in the `batch_stats`
collection as `mean` / `var`. Parameters are always float32; `dtype` is the compute dtype
(bfloat16 allowed); normalisation statistics, geometry and segment sums run in float32.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from dpf_jax.model.edge_kernel import KernelOptions, fused_edge_message
from dpf_jax.model.gate_kernel import fused_gate, fused_gate_rows
from dpf_jax.model.gate_recompute import gate_message
from dpf_jax.model.gather_kernel import fused_node_message
from dpf_jax.model.message_sum_kernel import fused_message_sum
from dpf_jax.model.row_sums import add_bias, broadcast_rows, column_sum

Dtype = Any
Precision = Any  # None | str | jax.lax.Precision | tuple


def torch_uniform_init(fan_in: int):
    """PyTorch's default Linear init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LinearParams(nn.Module):
    """The parameters of one `torch.nn.Linear(in_features, features)`, returned unapplied.

    For layers whose input is a concatenation that the fast formulation never materialises
    (`lin_msg_update` of MatformerConv): the caller multiplies blocks of the kernel itself.
    """

    in_features: int
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self):
        init = torch_uniform_init(self.in_features)
        kernel = self.param("kernel", init, (self.in_features, self.features), jnp.float32)
        bias = self.param("bias", init, (self.features,), jnp.float32) if self.use_bias else None
        return kernel, bias


class Linear(nn.Module):
    """`torch.nn.Linear` in flax: y = x @ kernel + bias, PyTorch init, float32 params.

    Computes in `dtype` with matmul `precision`; applies to the last axis of any-rank input.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        init = torch_uniform_init(fan_in)
        kernel = self.param("kernel", init, (fan_in, self.features), jnp.float32)
        y = jnp.matmul(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
        if self.use_bias:
            y = add_bias(y, self.param("bias", init, (self.features,), jnp.float32))
        return y


def layer_norm(x, scale, bias, epsilon: float = 1e-5, dtype: Dtype = jnp.float32):
    """LayerNorm over the last axis, statistics in float32 (two-pass variance), output in dtype."""
    xf = x.astype(jnp.float32)
    # named for `model.remat` policies that keep the statistics ([..., 1]) and recompute the rest
    mean = checkpoint_name(jnp.mean(xf, axis=-1, keepdims=True), "ln_stats")
    d = xf - mean
    rstd = checkpoint_name(jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + epsilon), "ln_stats")
    y = d * rstd * scale + bias
    return y.astype(dtype)


class NormParams(nn.Module):
    """The parameters of one `torch.nn.LayerNorm(features)` (`scale`, `bias`), returned
    unapplied: for the fused edge kernel, which normalises inside the kernel."""

    features: int

    @nn.compact
    def __call__(self):
        scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return scale, bias


def _is_highest(precision) -> bool:
    """True for matmul precision "highest" (true float32) in any of its spellings."""
    if isinstance(precision, (tuple, list)):
        return all(_is_highest(p) for p in precision)
    return precision is not None and str(precision).lower().split(".")[-1] in ("highest", "float32")


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm(features)` (eps 1e-5, elementwise affine): params `scale`, `bias`."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return layer_norm(x, scale, bias, self.epsilon, self.dtype)


# `lax.all_gather(..., to="invarying")` (recent JAX): a gather whose result shard_map knows is the
# same on every device, so statistics derived from it can leave shard_map replicated. Without
# it, "gathered" BatchNorm statistics fall back to the two psums of "two_pass" (same numbers).
_INVARIANT_GATHER = "to" in inspect.signature(jax.lax.all_gather).parameters
BATCH_NORM_STATS = ("two_pass", "gathered")  # MaskedBatchNorm.stats


class MaskedBatchNorm(nn.Module):
    """`torch.nn.BatchNorm1d` over the real nodes of a padded batch.

    Training: mean and (biased) variance over rows with `mask` True only (a float `mask`
    weights each row: an "atoms"-merged batch's row stands for that many equal atoms); with `axis_name`
    set, the statistics are combined over that axis first (see `stats`), so every device
    normalises with the statistics of the whole global batch (call inside `shard_map`; with
    "two_pass" also `vmap` with the same axis name). Running averages (`batch_stats`: `mean`, `var`) follow
    PyTorch: new = momentum * old + (1 - momentum) * batch, with the *unbiased* variance
    (n / (n - 1)), momentum 0.9 here = 0.1 in PyTorch. A step with no real node anywhere
    leaves them unchanged. Evaluation: normalises with the running averages. Statistics are
    float32 whatever the compute dtype.

    `stats`: how the statistics of several devices are combined (this class defaults to
    "two_pass"; the training configs to "gathered", `model.batch_norm_stats`). "two_pass": the sums
    and count, then the squared deviations from the global mean, each `psum`-ed: two collectives
    one after the other in the forward and two in the backward per BatchNorm. "gathered": each
    device's count, mean and squared deviations from its own mean, all-gathered in one
    collective and combined exactly (Chan et al.: Σ sq_d + Σ n_d (mean_d - mean)^2), so one
    collective in the forward and one in the backward. Same numbers up to float32 rounding on
    one device or several; same parameters, statistics and checkpoints. "gathered" runs under
    `shard_map` (the training step; also vmapped over runs), not under `vmap` with an axis name,
    and needs `lax.all_gather(..., to="invarying")` (recent JAX; older: two_pass's psums).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    stats: str = "two_pass"

    @nn.compact
    def __call__(self, x, mask, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if self.stats not in BATCH_NORM_STATS:
            raise ValueError(f"batch-norm stats must be one of {BATCH_NORM_STATS}, got {self.stats!r}")
        xf = x.astype(jnp.float32)
        if train:
            # `mask`: bool, or float weights (an "atoms"-merged batch: each row stands for that many atoms)
            w = mask.astype(jnp.float32)[:, None]
            m = w > 0
            count = jnp.sum(w)
            # "gathered" on several devices: this device's own mean and squared deviations, then
            # one collective; otherwise the sums are psum-ed before the mean (none on one device)
            gathered = self.axis_name is not None and self.stats == "gathered" and _INVARIANT_GATHER
            # the sums over rows (and, through broadcast_rows, their gradients) in two stages
            # (row_sums.py: XLA's one-pass column sums left most of a GPU idle)
            total = column_sum(jnp.where(m, w * xf, 0.0))
            if self.axis_name is not None and not gathered:
                count, total = jax.lax.psum((count, total), self.axis_name)
            n = jnp.maximum(count, 1.0)
            mean = total / n
            dev = jnp.where(m, xf - broadcast_rows(mean, xf), 0.0)
            sq = column_sum(w * dev * dev)
            if gathered:
                # every device's (count, mean, squared deviations) in one collective, then
                # combined exactly (Chan et al.): no global mean is needed before the squares
                shares = jax.lax.all_gather(jnp.concatenate([count[None], mean, sq]), self.axis_name,
                                            to="invarying")
                counts, means, sqs = shares[:, :1], shares[:, 1:c + 1], shares[:, c + 1:]
                count = jnp.sum(counts)
                n = jnp.maximum(count, 1.0)
                mean = jnp.sum(counts * means, axis=0) / n
                sq = jnp.sum(sqs, axis=0) + jnp.sum(counts * jnp.square(means - mean), axis=0)
            elif self.axis_name is not None:
                sq = jax.lax.psum(sq, self.axis_name)
            var = sq / n
            if not self.is_initializing():
                unbiased = sq / jnp.maximum(count - 1.0, 1.0)
                have = count > 0
                mom = self.momentum
                ra_mean.value = jnp.where(have, mom * ra_mean.value + (1 - mom) * mean, ra_mean.value)
                ra_var.value = jnp.where(have, mom * ra_var.value + (1 - mom) * unbiased, ra_var.value)
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - broadcast_rows(mean, xf)) * broadcast_rows(jax.lax.rsqrt(var + self.epsilon) * scale, xf)
        return (y + broadcast_rows(bias, xf)).astype(self.dtype)


def rbf_expansion(d, vmin: float = 0.0, vmax: float = 8.0, bins: int = 128):
    """Reference `RBFExpansion`: exp(-gamma (d - mu_k)^2), mu = linspace(vmin, vmax, bins),
    gamma = 1 / (mean centre spacing). float32 [..., bins] for d [...] (computed in float32)."""
    centers = np.linspace(vmin, vmax, bins, dtype=np.float32)
    gamma = float(1.0 / np.diff(centers).mean())
    d = d.astype(jnp.float32)[..., None]
    return jnp.exp(-gamma * (d - jnp.asarray(centers)) ** 2)


def gather(x, idx, dtype=None):
    """x[idx] (rows) for in-bounds indices, gathered in float32 and returned in `dtype`.

    Measured on H100, jax 0.11.2 (81k edges x 2560 features): the backward of a gather is a
    scatter-add, which takes 0.55 ms in float32 but 11-13 ms in bfloat16, and 35 ms in
    float32 when the gather carries `indices_are_sorted=True` (even though receivers are
    sorted). So: gather float32 rows, no sortedness hint, cast after the gather.
    """
    out = x.astype(jnp.float32).at[idx].get(mode="promise_in_bounds")
    return out.astype(dtype or x.dtype)


def segment_sum_sorted(data, segment_ids, num_segments: int):
    """Sum of rows of `data` into `num_segments` segments, ids sorted ascending (receivers)."""
    return jax.ops.segment_sum(data, segment_ids, num_segments=num_segments, indices_are_sorted=True)


def mean_pool(x, graph_index, node_mask, num_graphs: int):
    """Per-graph mean of node rows with `node_mask` True: float32 [num_graphs, C]. A float
    `node_mask` weights the rows (an "atoms"-merged batch: the atoms each row stands for).

    A one-hot matmul (exact: float32 HIGHEST precision) rather than a scatter into few
    segments (slow f32 scatter-add into few segments on GPU in jaxlib 0.10.2-0.11.0, see
    ENGINEERING_NOTES). Graphs without real nodes (padding graphs) get zeros.
    """
    onehot = (graph_index[None, :] == jnp.arange(num_graphs)[:, None]).astype(jnp.float32)
    onehot = onehot * node_mask.astype(jnp.float32)[None, :]
    sums = jnp.matmul(onehot, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    counts = jnp.sum(onehot, axis=1, keepdims=True)
    return sums / jnp.maximum(counts, 1.0)


# model.edge_kernel = "auto" (the configs' default): the fastest kernel measured on this backend.
# On an NVIDIA GPU the gate kernel pair that gathers node rows itself (session 16, one H100,
# default precision, B=256: synthetic fine-tuning 42.85 -> 31.62 ms with the 16x4 tile and
# 30.64 with 16x8; real pre-training 13.11 -> 10.40, real JARVIS fine-tuning 8.09 -> 6.53, both
# 16x4; scripts/results/h100_session16/), since session 19 with its node-table gradients
# summed by the segment kernel instead of XLA's scatter-adds ("-sorted", segment_kernel.py; one
# H100, synthetic fine-tuning B=256 30.68 -> 29.44 ms, real pre-training B=64 3.92 -> 3.92;
# scripts/results/h100_session19/; session 20, real B=256 pre-training 10.27 -> 10.03 ms, its
# first-epoch loss curve within 3.3e-5 of the scatter-add form's, h100_session20/,
# h200x4_session20/). Elsewhere, with channels the kernel's tile rules
# refuse, or with a `model.remat` policy that names per-edge tensors only the jax.numpy path
# has: "xla" (on a CPU Pallas would run in its slow interpreter).
# Since session 25 the GPU choice depends on each compiled budget (per device; one H100,
# scripts/results/h100_session25/):
# - with at least `AUTO_SUM_MIN_EDGES` edges, msg_layer_1 and the receiver sums run as one kernel
#   pair ("-sum", message_sum_kernel.py): synthetic fine-tuning B=256 25.27 -> 23.91 ms, real
#   pre-training B=256 9.51 -> 9.35; below (real pre-training B=64, <= 8,704 edges) it lost,
#   2.99 -> 3.05, so smaller budgets keep `EDGE_KERNEL_AUTO_GPU_SMALL`;
# - session 25-26 added, where such a budget had >= 20 edges per node, the receiver-run backward
#   and 4 backward warps (synthetic, 29 edges per node: 23.91 -> 23.15 ms; it lost on the real
#   pre-training batches, 12 edges per node, 9.35 -> 9.65);
# - since session 27 (scripts/results/h100_session27/) every budget with at least
#   `AUTO_SUM_MIN_EDGES` edges runs `EDGE_KERNEL_AUTO_GPU`: the receiver side of the gate's
#   backward and the message sums summed per (edge block, receiver) slot ("-slots", "-slotsum";
#   one program per edge block, no run loops), 4 backward warps: synthetic fine-tuning B=256
#   23.20 -> 22.73 ms (the runs kernel with "-sum" on the same machine), real pre-training B=256
#   9.35 -> 8.97 ("-16x8-sorted-sum"); real pre-training B=64 (below the threshold) 2.98 ms with
#   the small kernel against 3.00 with the slots pair, so smaller budgets keep
#   `EDGE_KERNEL_AUTO_GPU_SMALL`. First-epoch pre-training loss curve against "-16x8-sorted-sum":
#   within 2.4e-5 (first 10 steps) and 9.9e-5 (all 106);
# - since session 28 (scripts/results/h100_session28/) that pair with "-keep" (q, qk, k, e loaded
#   once per program), "-joint" (e and e @ W3 as one [E, H, 4C] matmul output, its gradient one
#   array: `_edge_joint`) and "-mres" (the backward reads the forward's output m instead of
#   forming upd): synthetic fine-tuning B=256 22.53 -> 21.37 ms, real pre-training B=256 8.70 ->
#   8.06 (one machine, both with the node projections as one matmul, `_node_projections`); the
#   first-epoch loss curve within 2.5e-5 (10 steps) / 8.5e-5 (106) of session 27's default's
#   (recorded then on another H100, same jax, seed and batches);
# - since session 29 the smaller budgets run their kernel with the same three flags: real
#   pre-training B=64 on one H100 3.09 -> 2.96 ms with "-joint-mres" (same process), each GPU's
#   share of B=256 on 4 x H200 3.11 -> 3.00 ("-joint-mres") -> 2.96 ms ("-keep-joint-mres"; one
#   machine); first-epoch pre-training loss curve with this kernel on every budget against the
#   default on one H100: within 1.3e-5 (10 steps) / 9.0e-5 (106) (scripts/results/h100_session29/,
#   h200x4_session29/).
EDGE_KERNEL_AUTO_GPU = "pallas_gate_rows-16x8x4-keep-joint-mres-sorted-slots-slotsum"
EDGE_KERNEL_AUTO_GPU_SMALL = "pallas_gate_rows-16x8-keep-joint-mres-sorted"
AUTO_SUM_MIN_EDGES = 16384


def _on_nvidia_gpu() -> bool:
    """JAX's default backend is a CUDA GPU (the kernels were built and measured for NVIDIA's
    Triton path; a ROCm build also reports "gpu")."""
    if jax.default_backend() != "gpu":
        return False
    try:
        version = str(jax.devices()[0].client.platform_version)
    except Exception:  # noqa: BLE001 - an unusual client: trust the backend name
        return True
    return "rocm" not in version.lower()


# model.remat policies that keep tensors named in the jax.numpy path (checkpoint_name in
# MatformerConv): with a kernel those names do not exist and the policy would mean another thing
NAMED_EDGE_TENSOR_POLICIES = ("gate", "gate_lean", "stats")


def auto_gpu_edge_kernel(budget: tuple[int, int] | None) -> str:
    """The GPU kernel "auto" runs for a padded budget (n_node, n_edge) per device (None: not known,
    as where a run's log names the kernel before any batch: `EDGE_KERNEL_AUTO_GPU`)."""
    if budget is None:
        return EDGE_KERNEL_AUTO_GPU
    n_edge = budget[1]
    return EDGE_KERNEL_AUTO_GPU_SMALL if n_edge < AUTO_SUM_MIN_EDGES else EDGE_KERNEL_AUTO_GPU


def resolve_edge_kernel(name: str, formulation: str = "node", channels: int = 128, remat: str = "none",
                        budget: tuple[int, int] | None = None) -> str:
    """`model.edge_kernel` as it runs here: "auto" becomes `auto_gpu_edge_kernel(budget)` (the
    padded budget's (n_node, n_edge) per device) on an NVIDIA GPU with the "node" formulation
    (the kernel's), a channel count the kernel's tile rules accept (a power of two) and a `remat`
    policy that does not name the jax.numpy path's per-edge tensors; "xla" otherwise. Any other
    name is returned unchanged."""
    if name != "auto":
        return name
    if formulation != "node" or remat in NAMED_EDGE_TENSOR_POLICIES or not _on_nvidia_gpu():
        return "xla"
    kernel = auto_gpu_edge_kernel(budget)
    try:
        KernelOptions.parse(kernel).check(channels, "auto")
    except ValueError:
        return "xla"
    return kernel


def describe_auto_edge_kernel(kernel: str) -> str:
    """How "auto" runs, for a log line: `kernel` (as `resolve_edge_kernel` gave it without a
    budget), and where that is `EDGE_KERNEL_AUTO_GPU`, the kernels of the other budgets."""
    if kernel != EDGE_KERNEL_AUTO_GPU:
        return kernel
    return f"{kernel} per padded budget: {EDGE_KERNEL_AUTO_GPU_SMALL} below {AUTO_SUM_MIN_EDGES} edges"


FOLD_EDGE_WEIGHTS = ("auto", True, False)  # model.fold_edge_weights; also "true" / "false" (the command line)


def resolve_fold_edge_weights(fold, formulation: str, kernel: str) -> bool:
    """`model.fold_edge_weights` as a layer runs it: "auto" folds wherever the layer computes e @ W3
    itself (the "node" formulation with any edge kernel but pallas_node, which computes it inside);
    True asks for the fold and is an error elsewhere; False never folds. The strings "true" and
    "false" (any case) count as the booleans: the configs' field is a string, so a command-line
    override arrives as one."""
    if isinstance(fold, str) and fold.lower() in ("auto", "true", "false"):
        fold = "auto" if fold.lower() == "auto" else fold.lower() == "true"
    elif isinstance(fold, (bool, int, np.bool_)) and fold in (0, 1):
        fold = bool(fold)
    else:
        raise ValueError(f"model.fold_edge_weights must be one of {FOLD_EDGE_WEIGHTS}, got {fold!r}")
    possible = formulation == "node" and not kernel.startswith("pallas_node")
    if fold == "auto":
        return possible
    if fold and not possible:
        raise ValueError("model.fold_edge_weights needs formulation 'node' and an edge kernel other than "
                         f"pallas_node (e @ W3 is computed inside it), got {formulation!r}, {kernel!r}")
    return bool(fold)


class MatformerConv(nn.Module):
    """One Matformer message-passing layer (reference `MatformerConv`, concat=True, beta=False).

    Reference, per edge e = (j -> i) (sender j, receiver i) and head h (C = channels):
        q = W_q x, k = W_k x, v = W_v x  (per node, [H, C]);  e = W_e edge_attr (no bias)
        alpha = [q_i | q_i | q_i] * [k_i | k_j | e] / sqrt(3C)                    [H, 3C]
        m = lin_msg_update([v_i | v_j | e]) * sigmoid(LayerNorm_3C(alpha))         [H, 3C]
        m = LayerNorm_C(msg_layer_0(m))                                            [H, C]
        out_i = sum_{e -> i} m  -> [H*C] -> lin_concate -> BatchNorm -> SiLU; + lin_skip(x_i)

    Two exact formulations, same parameters (those of the reference, so counting and weight
    porting are unchanged), chosen by `formulation`:

    "node" (fewest FLOPs): with lin_msg_update's kernel split in row blocks W1, W2, W3 (each
    [C, 3C]), lin_msg_update([v_i | v_j | e]) = (v_i W1 + b) + v_j W2 + e W3; the first two
    terms and q_i * k_i are computed once per NODE and gathered. Forward FLOPs per edge and
    layer (multiply-add = 2; H = 4, C = 128):
        lin_edge             2 * C * H*C          =   131,072
        e @ W3               2 * H * C * 3C       =   393,216
        msg_layer_0          2 * H * 3C * C       =   393,216
        elementwise (3 products, 2 LayerNorms, sigmoid, gate, sums)  ~ 30,000
        total                                     ~   0.95 MFLOP / edge / layer
    plus ~1.34 MFLOP per node (q, k, v 393,216; v W1, v W2 786,432; lin_concate 131,072;
    lin_skip 32,768). Gathered per edge: [q | q*k | v W1 + b] at the receiver (5HC = 2560
    values) and [k | v W2] at the sender (4HC = 2048), so the backward scatter-adds 4608
    values per edge and layer.

    "edge" (least gather/scatter traffic): gathers only x_i and x_j (C = 128 values each) and
    does everything else per edge, as the reference does:
        q_i, k_i, v_i, k_j, v_j   5 * 2 * C * H*C    =   655,360
        lin_edge                  2 * C * H*C        =   131,072
        lin_msg_update            2 * H * 3C * 3C    = 1,179,648
        msg_layer_0               2 * H * 3C * C     =   393,216
        elementwise                                  ~    30,000
        total                                        ~   2.39 MFLOP / edge / layer
    (the reference computes q, k, v per node, ~1.73 MFLOP / edge / layer). The backward
    scatter-adds only 2C = 256 values per edge and layer.

    Which is faster depends on the hardware: on GPU the backward scatter-adds dominate (see
    `gather`), on CPU the FLOPs do. Measured on one H100 (jax 0.11.2, 256 crystals = 3.3k
    nodes / 81k edges per step, full model, train step incl. backward), before `gather` got
    its float32 / no-sortedness-hint fix: "edge" 55.6 ms (f32) / 77.5 ms (bf16), "node"
    288 ms (f32) / 200 ms (bf16); forward only ~8-15 ms for both (most of "node"'s gap was
    the 35 ms sorted-hint scatter, x5 layers, that the fix removes). Default "node"; re-measure
    both after the fix (scripts/profile_step.py). Both are tested against a float64 loop.

    `edge_kernel` chooses how the per-edge chain after `upd` and alpha runs (same parameters,
    same maths): "xla" (jax.numpy; XLA fuses it into ~15 passes over [E, H, 3C] tensors per
    layer, forward and backward) or "pallas" (`dpf_jax.model.edge_kernel`: one fused Triton
    kernel forward, one backward, no [E, H, 3C] intermediate kept; Pallas' interpreter on CPU);
    "pallas-32x4" sets its tile (edges per program x Triton warps; default 32x4; "-16x8x4": the
    backward-pass kernels with 4 warps). "pallas_node"
    (node formulation only; `dpf_jax.model.gather_kernel`) also moves the gathers and e @ W3
    into the kernels: the per-edge tables, upd and their copies are never written to memory.
    "pallas_gate" (node formulation; `dpf_jax.model.gate_kernel`) fuses only the gate (alpha ->
    LayerNorm_3C -> sigmoid -> x upd) into one kernel pair reading the gathered tables as XLA
    wrote them, and leaves msg_layer_0 and LayerNorm_C to XLA. "pallas_gate_rows" (node formulation;
    `gate_kernel.fused_gate_rows`) is that kernel pair reading the node tables' rows itself, so
    XLA never writes the gathered tables. "xla_recompute" (node
    formulation; `dpf_jax.model.gate_recompute`) is the gate in jax.numpy with a written backward
    that keeps no per-edge intermediate and recomputes them from the node tables, e and e @ W3.
    """

    channels: int = 128
    heads: int = 4
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    precision: Precision = None
    formulation: str = "node"
    edge_kernel: str = "xla"  # or "auto": see resolve_edge_kernel
    batch_norm_stats: str = "two_pass"
    fold_edge_weights: bool | str = False  # e @ W3 as edge_attr @ (W_e W3): `_edge_times_w3`; or "auto"

    @nn.compact
    def __call__(self, x, edge_attr, senders, receivers, node_mask, edge_mask, train: bool, edge_count=None):
        """`edge_count` (float32 [E], optional): how many reference edges each edge stands for
        (merged graphs, `dpf_jax.data.graphs.merge_equivalent_edges`): its message is counted
        that many times in the receiver's sum. None: once (the edge mask alone). `receivers`
        must be sorted (see `MatformerEncoder`)."""
        H, C = self.heads, self.channels
        n_node, n_edge = x.shape[0], edge_attr.shape[0]
        dt = self.dtype
        kernel = resolve_edge_kernel(self.edge_kernel, self.formulation, self.channels, budget=(n_node, n_edge))
        dense = lambda f, name, bias=True: Linear(f, bias, dt, self.precision, name=name)  # noqa: E731
        ein = lambda spec, a, b: jnp.einsum(spec, a, b, precision=self.precision)  # noqa: E731

        # lin_edge's kernel (no bias), kept for folding it into e @ W3 (same parameter as a Linear)
        w_edge = LinearParams(edge_attr.shape[-1], H * C, use_bias=False, name="lin_edge")()[0].astype(dt)
        e = jnp.matmul(edge_attr.astype(dt), w_edge, precision=self.precision).reshape(n_edge, H, C)
        w_msg, b_msg = LinearParams(3 * C, 3 * C, name="lin_msg_update")()
        w_msg, b_msg = w_msg.astype(dt), b_msg.astype(dt)
        inv = jnp.asarray(1.0 / math.sqrt(3 * C), dt)

        fold = resolve_fold_edge_weights(self.fold_edge_weights, self.formulation, kernel)
        skip = None  # lin_skip(x): computed with q, k, v in the "node" formulation, else by `_update`
        if self.formulation == "node":
            q, k, v, skip = self._node_projections(x)
            w1, w2, w3 = w_msg[:C], w_msg[C:2 * C], w_msg[2 * C:]
            edge_w3 = lambda: self._edge_times_w3(e, edge_attr, w_edge, w3, fold)  # noqa: E731 - [E, H, 3C]
            # per node: the value_i (+ bias) and value_j parts of lin_msg_update (one matmul with W1 and
            # W2 side by side), q_i * k_i
            vm = ein("nhc,cd->nhd", v, jnp.concatenate([w1, w2], axis=1))  # [N, H, 6C]
            recv_tab = jnp.concatenate([q, q * k, vm[..., :3 * C] + b_msg], axis=-1)  # [N, H, 5C]
            send_tab = jnp.concatenate([k, vm[..., 3 * C:]], axis=-1)  # [N, H, 4C]
            update = functools.partial(self._aggregate_and_update, x, receivers=receivers, node_mask=node_mask,
                                       train=train, edge_count=edge_count, skip=skip)
            if kernel.startswith("pallas_node"):  # gathers and chain in one kernel pair
                *params, opts = self._chain_params(kernel)
                return update(fused_node_message(recv_tab, send_tab, e, receivers, senders, edge_mask, w3, *params,
                                                 opts))
            if kernel.startswith("pallas_gate_rows"):  # the gate kernel pair gathering rows itself
                ln1_scale, ln1_bias = NormParams(3 * C, name="layer_norm")()
                opts = self._kernel_options(kernel)
                # e and e @ W3 as one [E, H, 4C] array (KernelOptions.joint_edge_projection), or apart
                edge_in = ((self._edge_joint(e, edge_attr, w_edge, w3, fold), None) if opts.joint_edge_projection
                           else (edge_w3(), e))
                msg = fused_gate_rows(recv_tab, send_tab, *edge_in, receivers, senders, edge_mask,
                                      ln1_scale, ln1_bias, opts)
                if opts.message_sum:  # msg_layer_1 and the receiver sums in one kernel pair
                    return self._update(x, self._message_sum(msg, receivers, edge_mask, edge_count, n_node, opts),
                                        node_mask, train, skip)
                return update(self._message_out(msg, edge_mask))
            if kernel == "xla_recompute":  # the gate in jax.numpy, its backward recomputing
                ln1_scale, ln1_bias = NormParams(3 * C, name="layer_norm")()
                msg = gate_message(recv_tab, send_tab, edge_w3(), e, receivers, senders, edge_mask,
                                   ln1_scale, ln1_bias)
                return update(self._message_out(msg, edge_mask))
            r = gather(recv_tab, receivers, dt)
            s = gather(send_tab, senders, dt)
            if kernel.startswith("pallas_gate"):  # the gate in one kernel pair, matmuls in XLA
                ln1_scale, ln1_bias = NormParams(3 * C, name="layer_norm")()
                msg = fused_gate(r, s, edge_w3(), e, edge_mask, ln1_scale, ln1_bias,
                                 self._kernel_options(kernel))
                return update(self._message_out(msg, edge_mask))
            q_i, qk_ii, vm_i = r[..., :C], r[..., C:2 * C], r[..., 2 * C:]
            k_j, vm_j = s[..., :C], s[..., C:]
            upd = vm_i + vm_j + edge_w3()
        elif self.formulation == "edge":
            if kernel.startswith(("pallas_node", "pallas_gate", "xla_recompute")):  # incl. pallas_gate_rows
                raise ValueError(f"edge_kernel {kernel!r} needs formulation 'node' (use 'pallas' with 'edge')")
            lin_q, lin_k, lin_v = dense(H * C, "lin_query"), dense(H * C, "lin_key"), dense(H * C, "lin_value")
            x_i = gather(x, receivers, dt)
            x_j = gather(x, senders, dt)
            q_i = lin_q(x_i).reshape(n_edge, H, C)
            k_i = lin_k(x_i).reshape(n_edge, H, C)
            v_i = lin_v(x_i).reshape(n_edge, H, C)
            k_j = lin_k(x_j).reshape(n_edge, H, C)
            v_j = lin_v(x_j).reshape(n_edge, H, C)
            qk_ii = q_i * k_i
            upd = ein("ehc,cd->ehd", jnp.concatenate([v_i, v_j, e], axis=-1), w_msg) + b_msg
        else:
            raise ValueError(f"unknown MatformerConv formulation {self.formulation!r}")

        # Named for the `model.remat` policies that keep some per-edge tensors for the backward
        # and recompute the rest (matformer.REMAT_POLICIES); without remat the names do nothing.
        q_i, k_j = checkpoint_name(q_i, "edge_q_k"), checkpoint_name(k_j, "edge_q_k")
        upd = checkpoint_name(upd, "edge_upd")
        # upd * sigmoid(LayerNorm_3C(alpha)) -> msg_layer_0 -> LayerNorm_C -> edge mask
        if kernel.startswith("pallas"):  # one fused kernel pair (dpf_jax.model.edge_kernel)
            *params, opts = self._chain_params(kernel)
            msg = fused_edge_message(qk_ii, q_i, k_j, e, upd, edge_mask, *params, opts)
        elif kernel == "xla":
            alpha = jnp.concatenate([qk_ii, q_i * k_j, q_i * e], axis=-1) * inv  # [E, H, 3C]
            alpha = checkpoint_name(alpha, "edge_alpha")
            gate = jax.nn.sigmoid(LayerNorm(dtype=jnp.float32, name="layer_norm")(alpha))
            gate = checkpoint_name(gate, "edge_gate")
            msg = self._message_out((upd.astype(jnp.float32) * gate).astype(dt), edge_mask)
        else:
            raise ValueError(f"unknown MatformerConv edge_kernel {kernel!r} (xla, xla_recompute, pallas, pallas_node, "
                             "pallas_gate, pallas_gate_rows; the pallas ones optionally "
                             "-<block_edges>x<num_warps>[x<backward_warps>])")
        return self._aggregate_and_update(x, msg, receivers, node_mask, train, edge_count, skip)

    def _node_projections(self, x):
        """q, k, v [N, H, C] and lin_skip(x) [N, C] as one matmul: the kernels of lin_query, lin_key,
        lin_value and lin_skip side by side (their parameters as four Linears), so each output
        column is the same dot product over x as with four matmuls, but one kernel runs forward and
        one for each gradient instead of four (and the adds of four d x products)."""
        H, C, dt = self.heads, self.channels, self.dtype
        widths = (H * C, H * C, H * C, C)
        params = [LinearParams(x.shape[-1], w, name=name)()
                  for name, w in zip(("lin_query", "lin_key", "lin_value", "lin_skip"), widths)]
        kernel = jnp.concatenate([w for w, _ in params], axis=1).astype(dt)
        bias = jnp.concatenate([b for _, b in params]).astype(dt)
        y = add_bias(jnp.matmul(x.astype(dt), kernel, precision=self.precision), bias)
        q, k, v, skip = jnp.split(y, np.cumsum(widths)[:-1].tolist(), axis=-1)
        n_node = x.shape[0]
        return q.reshape(n_node, H, C), k.reshape(n_node, H, C), v.reshape(n_node, H, C), skip

    def _edge_times_w3(self, e, edge_attr, w_edge, w3, fold: bool):
        """e @ W3 per head, [E, H, 3C]: the edge's part of lin_msg_update.

        With `fold` (`fold_edge_weights` resolved), as edge_attr @ W_c where W_c[:, h] = W_e[:, h] @ W3
        (both maps are linear in edge_attr, which every layer shares): the product reads edge_attr
        ([E, K]) instead of e ([E, H, C], H times larger), and its backward writes d(edge_attr)
        instead of an [E, H, C] d(e). Same FLOPs; the sums are associated differently (float
        rounding). Measured (session 23, one H200, issue #9's synthetic fine-tuning step, B=256):
        21.81 -> 20.94 ms; first-epoch pre-training loss within ~1.0e-4 of the unfolded curve."""
        if not fold:
            return jnp.einsum("ehc,cd->ehd", e, w3, precision=self.precision)
        w_c = self._folded_w3(w_edge, w3)
        return jnp.einsum("ek,khd->ehd", edge_attr.astype(w_c.dtype), w_c, precision=self.precision)

    def _folded_w3(self, w_edge, w3):
        """W_c [K, H, 3C], W_c[:, h] = W_e[:, h] @ W3: lin_edge's kernel folded into e @ W3."""
        return jnp.einsum("khc,cd->khd", w_edge.reshape(-1, self.heads, self.channels), w3, precision=self.precision)

    def _edge_joint(self, e, edge_attr, w_edge, w3, fold: bool):
        """[e | e @ W3] per head, [E, H, 4C] (`KernelOptions.joint_edge_projection`). With `fold`, one
        matmul of edge_attr with lin_edge's kernel and the folded W_c (`_edge_times_w3`) side by side
        per head: each column the same dot product as in the two matmuls, and the backward has one
        product for d edge_attr and one for the kernels' gradient instead of two each and an add.
        Without, e and e @ W3 concatenated (a copy)."""
        if not fold:
            return jnp.concatenate([e, self._edge_times_w3(e, edge_attr, w_edge, w3, False)], axis=-1)
        H, C = self.heads, self.channels
        w_joint = jnp.concatenate([w_edge.reshape(-1, H, C), self._folded_w3(w_edge, w3)], axis=-1)
        w_joint = w_joint.reshape(-1, H * 4 * C)
        joint = jnp.matmul(edge_attr.astype(w_joint.dtype), w_joint, precision=self.precision)
        return joint.reshape(-1, H, 4 * C)

    def _message_out(self, gated, edge_mask):
        """msg_layer_0 -> LayerNorm_C -> edge mask of the gated message [E, H, 3C]: [E, H, C] float32."""
        msg = Linear(self.channels, True, self.dtype, self.precision, name="msg_layer_0")(gated)
        msg = LayerNorm(dtype=jnp.float32, name="msg_layer_1")(msg)
        return jnp.where(edge_mask[:, None, None], msg, 0.0)

    def _message_sum(self, gated, receivers, edge_mask, edge_count, n_node: int, opts: KernelOptions):
        """The receivers' sums [N, H * C] (float32) of `_message_out(gated)` times the edge counts, as
        `_aggregate_and_update` forms them: msg_layer_0's matmul in XLA, its bias, LayerNorm_C, the
        edge mask and count and the sums in `message_sum_kernel.fused_message_sum` (with bf16
        `dtype` the bias is added in float32 there, where the jax.numpy path adds it in bf16:
        equal up to bf16 rounding)."""
        C = self.channels
        w0, b0 = LinearParams(3 * C, C, name="msg_layer_0")()
        pre = jnp.matmul(gated.astype(self.dtype), w0.astype(self.dtype), precision=self.precision)
        scale, bias = NormParams(C, name="msg_layer_1")()
        weight = edge_mask.astype(jnp.float32)
        if edge_count is not None:  # merged edges: one message for several equal ones
            weight = jnp.where(edge_mask, edge_count.astype(jnp.float32), 0.0)
        return fused_message_sum(pre, b0, scale, bias, weight, receivers, n_node, opts).reshape(n_node, self.heads * C)

    def _chain_params(self, kernel):
        """For the fused kernels: the parameters of layer_norm, msg_layer_0 and msg_layer_1 (the
        names and initialisation of the "xla" path's modules) and the kernel options."""
        C = self.channels
        ln1_scale, ln1_bias = NormParams(3 * C, name="layer_norm")()
        w0, b0 = LinearParams(3 * C, C, name="msg_layer_0")()
        ln2_scale, ln2_bias = NormParams(C, name="msg_layer_1")()
        return ln1_scale, ln1_bias, w0, b0, ln2_scale, ln2_bias, self._kernel_options(kernel)

    def _kernel_options(self, kernel: str) -> KernelOptions:
        """The fused kernels' settings from the kernel name ("pallas_gate-32x4" etc.) and the precision."""
        return KernelOptions.parse(kernel, allow_tf32=not _is_highest(self.precision))

    def _aggregate_and_update(self, x, msg, receivers, node_mask, train, edge_count, skip=None):
        """Receiver sums of the messages [E, H, C] -> lin_concate -> BatchNorm -> SiLU, + lin_skip(x)
        (`skip`, where the caller computed it)."""
        n_node, (n_edge, H, C) = x.shape[0], msg.shape
        if edge_count is not None:  # merged edges: one message for several equal ones
            msg = msg * edge_count.astype(msg.dtype)[:, None, None]
        agg = segment_sum_sorted(msg.reshape(n_edge, H * C), receivers, n_node)  # float32
        return self._update(x, agg, node_mask, train, skip)

    def _update(self, x, agg, node_mask, train, skip=None):
        """The receivers' message sums [N, H * C] -> lin_concate -> BatchNorm -> SiLU, + lin_skip(x)
        (`skip`: lin_skip(x) as the caller computed it; None: here)."""
        C, dt = self.channels, self.dtype
        out = Linear(C, True, dt, self.precision, name="lin_concate")(agg.astype(dt))
        bn = MaskedBatchNorm(axis_name=self.axis_name, dtype=dt, stats=self.batch_norm_stats, name="bn")
        out = bn(out, node_mask, train)
        out = jax.nn.silu(out)
        if skip is None:
            skip = Linear(C, True, dt, self.precision, name="lin_skip")(x)
        return out + skip
