"""Denoising heads on the shared Matformer encoder (DESIGN.md §3), Flax linen.

    model = DenoisingModel(encoder=MatformerEncoder(), types=True, positions=True, lattice=True)
    variables = model.init(key, batch, train=False)
    out, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
    out["type_logits"]   float32 [N, 95]  class c = atomic number Z - 1 (Z = 1..95)
    out["displacement"]  float32 [N, 3]   Å, rotation-equivariant, translation-invariant
    out["lattice"]       float32 [G, 6]   (a, b, c, alpha, beta, gamma) in the loss's normalisation

With `official=True` (the authors' released code, `pretrain.corruption = "official"`, DESIGN
§4) two more heads, each a single Dense as in zjuKeLiu/DPF `models/pyg_att.py`:
    out["frac_coords"]   float32 [N, 3]   clean fractional coordinates ("frac_head")
    out["lattice9"]      float32 [G, 9]   clean lattice matrix, row-major, Å ("lattice9_head",
                                          on the per-crystal mean of the node features)
(the reference's type head is a 119-way Dense on a 119-way one-hot atom input; ours stays the
95-way `TypeHead` on CGCNN features.)

Only enabled heads appear in the dict (and own parameters). The encoder's parameter subtree
is named "encoder", exactly as in `MatformerRegressor`, so fine-tuning copies
`params["encoder"]` (and `batch_stats["encoder"]`) from a pre-training checkpoint into a fresh
regressor. Masked atoms come in as species 0, which the encoder embeds with the all-zero
"unknown" row of the CGCNN table. Rows of padding nodes / graphs are meaningless (the padding
edges add nothing; losses must mask).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpf_jax.model.layers import Dtype, Linear, Precision, gather, mean_pool, rbf_expansion, segment_sum_sorted
from dpf_jax.model.matformer import EncoderOutput, MatformerEncoder

NUM_TYPES = 95  # classes Z = 1..95 (DESIGN.md §3); atoms with Z > 95 cannot be type targets


class TypeHead(nn.Module):
    """Dense over node features -> `num_types` logits per node (class = Z - 1)."""

    num_types: int = NUM_TYPES
    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, nodes):
        return Linear(self.num_types, True, self.dtype, self.precision, name="dense")(nodes).astype(jnp.float32)


class PositionHead(nn.Module):
    """Equivariant displacement: d_i = sum over edges e = (j -> i) of w_e * r_e / |r_e|.

    w_e = MLP([h_i, h_j, rbf(|r_e|)]) is one invariant scalar per edge (SiLU MLP with
    `hidden` units, two hidden layers); r_e is the edge vector from the sender j to the
    receiver's image i, so rotating positions and lattice together rotates d, and translating
    every atom leaves it unchanged. Padding edges are masked out. The first layer is split
    per input block (h_i W_a + h_j W_b + rbf W_c), so h_i W_a and h_j W_b are computed per node
    and gathered. Note the lattice self-loops (+a and -a, ...) of an atom have equal weights
    and cancel, as they should (up to float rounding; exactly when merged as a mirror pair).
    `edge_net` (merged graphs, `edges["net"]`): each edge's term counts that many times (0 for a
    merged mirror pair); None: once.
    """

    hidden: int = 128
    rbf_bins: int = 128
    cutoff: float = 8.0
    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, nodes, edge_vec, edge_len, senders, receivers, edge_mask, edge_net=None):
        dt, prec = self.dtype, self.precision
        n_node = nodes.shape[0]
        h_recv = Linear(self.hidden, True, dt, prec, name="lin_receiver")(nodes)
        h_send = Linear(self.hidden, False, dt, prec, name="lin_sender")(nodes)
        rbf = rbf_expansion(edge_len, 0.0, self.cutoff, self.rbf_bins)
        z = gather(h_recv, receivers) + gather(h_send, senders) \
            + Linear(self.hidden, False, dt, prec, name="lin_rbf")(rbf)
        z = jax.nn.silu(z)
        z = jax.nn.silu(Linear(self.hidden, True, dt, prec, name="hidden")(z))
        w = Linear(1, True, dt, prec, name="out")(z)[:, 0].astype(jnp.float32)
        w = jnp.where(edge_mask, w if edge_net is None else w * edge_net.astype(jnp.float32), 0.0)
        unit = edge_vec.astype(jnp.float32) / edge_len.astype(jnp.float32)[:, None]
        return segment_sum_sorted(w[:, None] * unit, receivers, n_node)


class LatticeHead(nn.Module):
    """Masked mean of node features per crystal -> Dense(hidden) -> SiLU -> Dense(6)."""

    hidden: int = 128
    num_outputs: int = 6
    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, nodes, graph_index, node_mask, num_graphs: int):
        pooled = mean_pool(nodes, graph_index, node_mask, num_graphs)
        h = jax.nn.silu(Linear(self.hidden, True, self.dtype, self.precision, name="hidden")(pooled))
        return Linear(self.num_outputs, True, self.dtype, self.precision, name="out")(h).astype(jnp.float32)


class FracCoordHead(nn.Module):
    """Dense over node features -> 3 clean fractional coordinates per node (the reference's
    `position_mlp`, a single Linear). Not equivariant: fractional coordinates are not."""

    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, nodes):
        return Linear(3, True, self.dtype, self.precision, name="dense")(nodes).astype(jnp.float32)


class Lattice9Head(nn.Module):
    """Masked mean of node features per crystal -> Dense(9): the clean 3x3 lattice matrix,
    row-major (the reference's `lattice_mlp`, a single Linear on the mean-pooled features)."""

    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, nodes, graph_index, node_mask, num_graphs: int):
        pooled = mean_pool(nodes, graph_index, node_mask, num_graphs)
        return Linear(9, True, self.dtype, self.precision, name="dense")(pooled).astype(jnp.float32)


class DenoisingModel(nn.Module):
    """Shared `MatformerEncoder` ("encoder") + the denoising heads switched on by fields.

    `__call__(graph, train)` -> dict with "type_logits" [N, 95] (if `types`), "displacement"
    [N, 3] (if `positions`), "lattice" [G, 6] (if `lattice`), "frac_coords" [N, 3] and
    "lattice9" [G, 9] (if `official`), all float32.
    """

    encoder: MatformerEncoder = dataclasses.field(default_factory=MatformerEncoder)
    types: bool = True
    positions: bool = True
    lattice: bool = True
    num_types: int = NUM_TYPES
    head_hidden: int = 128
    official: bool = False  # the authors' released heads (module doc); adds two heads

    @nn.compact
    def __call__(self, graph, train: bool) -> dict:
        if "source" in graph.edges:
            raise ValueError("these graphs were merged by equal atoms (graph.merge_edges='atoms'), which keeps "
                             "per-crystal means exact but not per-atom outputs: pre-train with 'distance' or less")
        enc: EncoderOutput = self.encoder(graph, train)
        dt, prec = self.encoder.dtype, self.encoder.precision
        out = {}
        if self.types:
            out["type_logits"] = TypeHead(self.num_types, dt, prec, name="type_head")(enc.nodes)
        if self.positions:
            if "count" in graph.edges and "net" not in graph.edges:
                raise ValueError("the position head sums edge vectors, but these graphs were merged by distance "
                                 "(graph.merge_edges='distance'), whose merged edges stand for vectors of other "
                                 "directions: build them with merge_edges='mirror' or 'none'")
            out["displacement"] = PositionHead(self.head_hidden, self.encoder.rbf_bins, self.encoder.cutoff, dt,
                                               prec, name="position_head")(
                enc.nodes, enc.edge_vec, enc.edge_len, graph.senders, graph.receivers,
                graph.edges["mask"].astype(bool), graph.edges.get("net"))
        if self.lattice:
            out["lattice"] = LatticeHead(self.head_hidden, 6, dt, prec, name="lattice_head")(
                enc.nodes, graph.nodes["graph"], graph.nodes["mask"], graph.n_node.shape[0])
        if self.official:
            out["frac_coords"] = FracCoordHead(dt, prec, name="frac_head")(enc.nodes)
            out["lattice9"] = Lattice9Head(dt, prec, name="lattice9_head")(
                enc.nodes, graph.nodes["graph"], graph.nodes["mask"], graph.n_node.shape[0])
        return out
