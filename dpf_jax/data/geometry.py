"""Edge geometry of a padded crystal batch, computed on device (pure jnp, jit/grad friendly).

Convention (dpf_jax/data/graphs.py): edge e from `senders[e]` (j) to `receivers[e]` (i) has the
displacement

    vec[e] = pos[i] + images[e] @ L[g(e)] - pos[j]          (Å)

where `pos` are the Cartesian positions `nodes["positions"]`, `L[g]` the lattice of graph g
(rows = lattice vectors, `globals["lattice"]`) and g(e) = nodes["graph"][senders[e]].
Because it is recomputed from positions and lattice, a perturbation of either gives exact new
geometry, and gradients flow into both.

The image term is evaluated elementwise (images are small integers), not as a matmul, so no
reduced-precision (TF32) matmul can round it on GPU.
"""

from __future__ import annotations

import jax.numpy as jnp


def edge_vectors(graph) -> jnp.ndarray:
    """(E, 3) displacement vectors, sender -> receiver image, in the dtype of the positions
    (from edges["source"] where an "atoms"-merged batch has it: the real sender atom)."""
    pos = graph.nodes["positions"]
    lattice = graph.globals["lattice"].astype(pos.dtype)
    senders, receivers = graph.edges.get("source", graph.senders), graph.receivers
    edge_graph = graph.nodes["graph"][senders]
    lat = lattice[edge_graph]  # (E, 3, 3)
    img = graph.edges["images"].astype(pos.dtype)  # (E, 3)
    shift = img[:, 0:1] * lat[:, 0] + img[:, 1:2] * lat[:, 1] + img[:, 2:3] * lat[:, 2]
    return pos[receivers] + shift - pos[senders]


def edge_lengths(vec: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """(E,) |vec|, finite with finite gradients everywhere.

    Padding edges (mask False) are zero-length self-loops: they get length 1.0 and zero
    gradient (the `where` comes before the square root, so no NaN appears in the backward
    pass). A real edge of zero length (two atoms perturbed onto each other) is floored at
    1e-6 Å instead of producing a NaN gradient.
    """
    sq = jnp.sum(vec * vec, axis=-1)
    if mask is not None:
        sq = jnp.where(mask, sq, jnp.ones_like(sq))
    return jnp.sqrt(jnp.maximum(sq, jnp.asarray(1e-12, sq.dtype)))


def edge_geometry(graph) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(vec [E,3], length [E]) of a padded batch; see `edge_vectors` and `edge_lengths`."""
    vec = edge_vectors(graph)
    return vec, edge_lengths(vec, graph.edges["mask"])
