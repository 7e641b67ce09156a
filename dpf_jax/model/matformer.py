"""The Matformer crystal graph transformer (YKQ98/Matformer, `pyg_att.py`) in Flax linen.

Flax linen, not NNX: parameters and BatchNorm statistics stay plain pytrees (`params`,
`batch_stats`) held by a `TrainState`, and `model.apply(..., mutable=["batch_stats"])` runs
inside `jax.jit` / `shard_map` in a purely functional style.

Input: a padded `jraph.GraphsTuple` in the layout of `dpf_jax.data.batching` (species,
positions, graph index and masks on nodes; integer images and mask on edges; lattice per
graph). Edge geometry is computed inside the model from positions, lattice and images
(`dpf_jax.data.geometry`), so perturbed positions or lattices get exact geometry and
gradients. Padding never matters: padding nodes are left out of BatchNorm statistics and of
the mean readout, padding edges add nothing to the receiver sums.

    encoder = MatformerEncoder()                       # 5 layers, 128 channels, 4 heads
    model = MatformerRegressor(encoder=encoder)
    variables = model.init(key, batch, train=False)    # {"params", "batch_stats"}
    y, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
    y = model.apply(variables, batch, train=False)     # [G] (padding graphs included)

Parameter tree (flax name <- PyTorch name; kernel = weight.T):
    encoder/atom_embedding          <- atom_embedding           Linear(92, 128)
    encoder/rbf_1, encoder/rbf_3    <- rbf.1, rbf.3             Linear(128, 128) x 2
    encoder/att_layers_{0..4}/...   <- att_layers.{0..4}.*      MatformerConv
        lin_query lin_key lin_value lin_edge(no bias) lin_msg_update layer_norm
        msg_layer_0 msg_layer_1 lin_concate bn lin_skip  (<- msg_layer.0, msg_layer.1, ...)
    fc                              <- fc.0                     Linear(128, 128)
    fc_out                          <- fc_out                   Linear(128, 1)
2,782,849 parameters (544,256 per layer). The reference module reports 2,880,641 because it
also holds `edge_init` and `angle_init_layers`, which its forward pass never uses (97,792
parameters); they are not reproduced. `params_from_torch_state_dict` ports reference weights.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpf_jax.data.geometry import edge_geometry
from dpf_jax.model.atom_features import cgcnn_feature_table
from dpf_jax.model.layers import (Dtype, Linear, MatformerConv, Precision, gather, mean_pool, rbf_expansion,
                                  resolve_edge_kernel)

# Rematerialisation of each MatformerConv layer in the backward pass (`model.remat`): what the
# forward keeps for the backward. The step is bound by memory traffic over per-edge [E, H, 3C]
# tensors, so recomputing the cheap elementwise chain (and the gathers from node tables that
# may sit in L2) inside the backward's fusions can cost less than writing and re-reading it.
# Same parameters and maths; the choice is a speed / memory trade, measured with
# `bench_train.py --set model.remat=...`: no policy is faster than "none" (scripts/results/PERFORMANCE_LOG.md);
# "stats" is the memory saver (H100: -38% peak memory at the same speed on real pre-training
# batches, -23% for +2.5-2.8% step time on the synthetic fine-tuning batch).
REMAT_POLICIES = {
    "none": None,  # keep what XLA keeps (no remat)
    "layer": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's inputs
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Between "none" and "dots": keep the matmul outputs plus some of the tensors MatformerConv names
# (layers.py: edge_q_k = the gathered q_i and k_j [E, H, C], edge_upd / edge_alpha / edge_gate =
# [E, H, 3C], ln_stats = each LayerNorm's mean and 1/std [..., 1]); with the statistics kept the
# backward recomputes the gate's LayerNorm elementwise, without a reduction.
_KEEP_NAMED = {
    "gate": ("edge_q_k", "edge_upd", "edge_alpha", "edge_gate", "ln_stats"),  # recompute x^, upd * gate
    "gate_lean": ("edge_q_k", "edge_gate", "ln_stats"),  # also recompute alpha and upd from the gathers
    "stats": ("edge_q_k", "ln_stats"),  # recompute the whole chain, but no LayerNorm reduction
}
for _name, _kept in _KEEP_NAMED.items():
    REMAT_POLICIES[_name] = jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable, jax.checkpoint_policies.save_only_these_names(*_kept))

REFERENCE_NUM_PARAMS = 2_782_849
REFERENCE_NUM_PARAMS_PER_LAYER = 544_256


class EncoderOutput(NamedTuple):
    nodes: jnp.ndarray  # [N, C] float32 node features (rows of padding nodes are meaningless)
    edge_vec: jnp.ndarray  # [E, 3] float32 displacement sender -> receiver image, Å
    edge_len: jnp.ndarray  # [E] float32 |edge_vec| (1.0 on padding edges)


class MatformerEncoder(nn.Module):
    """Atom embedding + RBF edge embedding + `num_layers` MatformerConv layers.

    The graph's edges must be sorted by receiver, as `dpf_jax.data` builds them (and checks in
    `graph_to_jraph` / `PackedGraphs`): the receiver sums take that order as given
    (`indices_are_sorted`), and so does the default GPU kernel's backward (`-sorted`).

    Attributes:
      num_layers, channels, heads: 5, 128, 4 as in the reference.
      rbf_bins, cutoff: RBF expansion of |r| with `rbf_bins` centres on [0, cutoff] Å.
      axis_name: mapped axis over which BatchNorm statistics are combined (the `shard_map` axis
        of the data-parallel batch; a `vmap` axis name only with "two_pass"); None on one device.
      dtype: compute dtype (float32 or bfloat16); parameters, geometry, RBF, normalisation
        statistics and the returned node features are float32.
      precision: matmul precision of every Dense (e.g. "highest"; None = backend default,
        TF32 on recent NVIDIA GPUs).
      formulation: "edge" or "node", two exact ways to evaluate MatformerConv (same params);
        see `dpf_jax.model.layers.MatformerConv` for their FLOPs and measured speed.
      edge_kernel: how the per-edge message chain runs (same parameters): "xla" (this class's
        default), "auto" (the configs' default: on a GPU per padded budget
        "pallas_gate_rows-16x8x4-keep-joint-mres-sorted-slots-slotsum",
        "pallas_gate_rows-16x8-keep-joint-mres-sorted" below 16,384 edges; else "xla";
        `dpf_jax.model.layers.resolve_edge_kernel`), "pallas_gate_rows" (the gate as one Triton
        kernel pair gathering node rows itself), "pallas" (the chain as one fused Triton kernel
        pair, `dpf_jax.model.edge_kernel`), "pallas_node" (gathers inside too), "pallas_gate"
        (only the gate, on gathered tables) or "xla_recompute" (the gate in jax.numpy, backward
        recomputing instead of storing; see MatformerConv).
      remat: a key of `REMAT_POLICIES`: what each layer's forward keeps for the backward.
      batch_norm_stats: "two_pass" or "gathered", how BatchNorm sums its training statistics
        (same maths up to float32 rounding; "gathered" halves the collectives across devices;
        see `dpf_jax.model.layers.MaskedBatchNorm`).
      fold_edge_weights: each layer's e @ W3 computed as edge_attr @ (W_e W3) (same parameters
        and maths up to float rounding; "node" formulation; `MatformerConv._edge_times_w3`);
        "auto" (the configs' default) where the formulation and edge kernel allow it.
    """

    num_layers: int = 5
    channels: int = 128
    heads: int = 4
    rbf_bins: int = 128
    cutoff: float = 8.0
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    precision: Precision = None
    formulation: str = "node"
    edge_kernel: str = "xla"
    remat: str = "none"
    batch_norm_stats: str = "two_pass"
    fold_edge_weights: bool | str = False

    @nn.compact
    def __call__(self, graph, train: bool) -> EncoderOutput:
        dt = self.dtype
        node_mask = node_weights(graph)  # bool mask, or per-row atom counts of an "atoms"-merged batch
        edge_mask = graph.edges["mask"].astype(bool)
        # merged graphs (`graph.merge_edges`): each message counts for the edges it stands for
        edge_count = edge_counts(graph)
        senders, receivers = graph.senders, graph.receivers
        vec, length = edge_geometry(graph)

        # Atom embedding applied to the 101-row element table, then gathered: identical to
        # embedding each atom's CGCNN vector, ~N/101 times fewer FLOPs. Species 0 (masked
        # atoms, padding) is the all-zero "unknown" row, i.e. its embedding is the bias.
        table = jnp.asarray(cgcnn_feature_table())
        emb = Linear(self.channels, True, dt, self.precision, name="atom_embedding")(table)
        x = gather(emb, graph.nodes["species"], dt)

        rbf = rbf_expansion(length, 0.0, self.cutoff, self.rbf_bins)
        edge_attr = Linear(self.channels, True, dt, self.precision, name="rbf_1")(rbf)
        edge_attr = Linear(self.channels, True, dt, self.precision, name="rbf_3")(jax.nn.softplus(edge_attr))

        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        conv = MatformerConv
        if self.remat != "none":  # same module names, so the same parameter tree and checkpoints
            # argument 7 (counting self) is `train`, a Python bool: static for the recomputation
            conv = nn.remat(MatformerConv, static_argnums=(7,), policy=REMAT_POLICIES[self.remat])
        # "auto" resolved here, where the remat policy and the padded budget are known
        # (layers.resolve_edge_kernel; static shapes: one choice per compiled budget)
        kernel = resolve_edge_kernel(self.edge_kernel, self.formulation, self.channels, self.remat,
                                     budget=(x.shape[0], senders.shape[0]))
        for layer in range(self.num_layers):
            x = conv(self.channels, self.heads, self.axis_name, dt, self.precision, self.formulation,
                     kernel, self.batch_norm_stats, self.fold_edge_weights, name=f"att_layers_{layer}")(
                x, edge_attr, senders, receivers, node_mask, edge_mask, train, edge_count)
        return EncoderOutput(x.astype(jnp.float32), vec, length)


def node_weights(graph):
    """The nodes' weights in BatchNorm statistics and per-crystal means: the node mask (bool),
    or for an "atoms"-merged batch (`nodes["count"]` not all 0/1) the float32 number of atoms
    each row stands for (`dpf_jax.data.graphs.merge_equivalent_atoms`), 0 on padding."""
    mask = graph.nodes["mask"].astype(bool)
    if "source" not in graph.edges:  # no atoms merged: counts are the mask
        return mask
    return jnp.where(mask, graph.nodes["count"].astype(jnp.float32), 0.0)


def edge_counts(graph):
    """float32 [E]: how many reference edges each edge of the batch stands for (`edges["count"]`,
    see `dpf_jax.data.graphs.merge_equivalent_edges`), 0 on padding; the edge mask for batches
    without the field."""
    count = graph.edges.get("count")
    mask = graph.edges["mask"].astype(bool)
    return jnp.where(mask, (mask if count is None else count).astype(jnp.float32), 0.0)


class MatformerRegressor(nn.Module):
    """Encoder + masked mean readout over each crystal's atoms + fc (SiLU) + fc_out.

    `__call__(graph, train, return_pooled=False)` -> predictions float32 [G] (one per graph,
    padding graphs included: the caller masks them), or `(predictions, pooled)` with the
    pooled encoder features float32 [G, C] when `return_pooled`. The encoder's parameter
    subtree is named "encoder", as in `dpf_jax.model.heads.DenoisingModel`, so pre-trained
    encoder weights copy over unchanged.
    """

    encoder: MatformerEncoder = dataclasses.field(default_factory=MatformerEncoder)
    fc_features: int = 128
    output_features: int = 1

    @nn.compact
    def __call__(self, graph, train: bool, return_pooled: bool = False):
        out = self.encoder(graph, train)
        num_graphs = graph.n_node.shape[0]
        pooled = mean_pool(out.nodes, graph.nodes["graph"], node_weights(graph), num_graphs)
        dt, prec = self.encoder.dtype, self.encoder.precision
        h = jax.nn.silu(Linear(self.fc_features, True, dt, prec, name="fc")(pooled))
        y = Linear(self.output_features, True, dt, prec, name="fc_out")(h).astype(jnp.float32)
        if self.output_features == 1:
            y = y[:, 0]
        return (y, pooled) if return_pooled else y


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


# ---------------------------------------------------------------------------------------------
# PyTorch reference weights <-> flax variables

_NORM_PARENTS = ("layer_norm", "msg_layer_1", "bn")


def _torch_to_flax_path(key: str) -> tuple[tuple[str, ...], str, str] | None:
    """'att_layers.0.msg_layer.0.weight' -> (('encoder','att_layers_0','msg_layer_0'), 'kernel', 'params')."""
    parts = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", key).split(".")
    *mods, leaf = parts
    if mods and mods[0] in ("edge_init", "angle_init_layers"):
        return None  # unused by the reference forward pass
    if leaf == "num_batches_tracked":
        return None
    top = () if mods and mods[0] in ("fc", "fc_0", "fc_out") else ("encoder",)
    mods = ["fc" if m == "fc_0" else m for m in mods]
    path = top + tuple(mods)
    if leaf == "running_mean":
        return path, "mean", "batch_stats"
    if leaf == "running_var":
        return path, "var", "batch_stats"
    if leaf == "weight":
        return path, ("scale" if mods[-1] in _NORM_PARENTS else "kernel"), "params"
    if leaf == "bias":
        return path, "bias", "params"
    raise KeyError(f"unexpected reference parameter {key!r}")


def params_from_torch_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Flax variables {"params", "batch_stats"} of `MatformerRegressor` from a reference
    Matformer `state_dict` (values: numpy arrays or tensors with `.numpy()`). Linear weights
    are transposed; unused `edge_init` / `angle_init_layers` entries are dropped."""
    out: dict = {"params": {}, "batch_stats": {}}
    for key, value in state_dict.items():
        target = _torch_to_flax_path(key)
        if target is None:
            continue
        path, leaf, coll = target
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
        if leaf == "kernel":
            arr = arr.T
        node = out[coll]
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return out


def params_to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `params_from_torch_state_dict` (reference key names, numpy float32)."""
    out = {}
    for coll in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(variables.get(coll, {}))[0]
        for kp, value in flat:
            names = [k.key for k in kp]
            *mods, leaf = names
            if mods and mods[0] == "encoder":
                mods = mods[1:]
            mods = ["fc.0" if m == "fc" else re.sub(r"_(\d+)$", r".\1", m) for m in mods]
            tleaf = {"kernel": "weight", "scale": "weight", "bias": "bias",
                     "mean": "running_mean", "var": "running_var"}[leaf]
            arr = np.asarray(value, np.float32)
            out[".".join(mods + [tleaf])] = arr.T if leaf == "kernel" else arr
    return out
