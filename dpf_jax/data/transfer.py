"""Padded batches as three arrays for the copy to the devices and the jitted call.

A padded batch (`dpf_jax.data.batching`) has 16-17 arrays: per node, per edge and per graph
fields in int32, float32 and bool. Every array costs the host a copy per device and an
argument per device in every jitted call, and on a four-GPU host those per-array costs, not the
bytes, set the pace of the input pipeline. Session 18, 4 x H200, pre-training B=256 with the
train state packed: the main thread waited 2.29 ms per step for the next batch, against a 4.1 ms
step, and 0.72 ms with the batches bundled; the whole epoch went from 69% to 89% of the pure
step (`scripts/results/h200x4_session18/ep4_statepack.json`, `ep4_both.json`).

`TransferPacking` bundles a batch into one int32 array per axis: nodes [..., N, Cn], edges
(with senders and receivers) [..., E, Ce] and graphs (with n_node and n_edge) [..., G, Cg];
float32 fields travel bit for bit (a view as int32), bools as 0/1. `unpack` inside the jitted
step restores the `jraph.GraphsTuple` exactly. The bundle is itself a GraphsTuple (fields
`nodes`, `edges`, `globals` = {"packed": ...}, the rest None), so code that resizes a batch's
node or edge axis (`dpf_jax.train.budget_search.shaped_like`) handles it unchanged. Leading
axes (devices, runs, stacked steps) are kept.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph
import numpy as np

_KINDS = (np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.bool_))


class _Field(NamedTuple):
    path: tuple  # ("nodes", "positions"), ("senders",), ...
    axis: str  # "nodes" | "edges" | "globals": the bundle it travels in
    trail: tuple  # the shape after the per-share axis, e.g. (3,) for positions
    dtype: np.dtype
    offset: int  # first column in its bundle


def _axis_of(field: str) -> str:
    return {"senders": "edges", "receivers": "edges", "n_node": "globals", "n_edge": "globals"}.get(field, field)


def _fields_of(graphs: jraph.GraphsTuple):
    """(path, array) of every array of a padded batch, in a fixed order."""
    for field in ("nodes", "edges", "globals"):
        for key in sorted(getattr(graphs, field)):
            yield (field, key), getattr(graphs, field)[key]
    for field in ("senders", "receivers", "n_node", "n_edge"):
        yield (field,), getattr(graphs, field)


def _lead(graphs: jraph.GraphsTuple) -> int:
    """The leading axes before the per-share ones (devices; runs or stacked steps before them)."""
    return np.ndim(graphs.n_node) - 1


class TransferPacking:
    """The bundle layout of a batcher's batches, taken from one padded batch `example` (host or
    device arrays); it packs batches of this layout with any leading axes and any budget."""

    def __init__(self, example: jraph.GraphsTuple):
        lead = _lead(example)
        fields, width = [], {"nodes": 0, "edges": 0, "globals": 0}
        for path, x in _fields_of(example):
            dtype = np.dtype(x.dtype)
            if dtype not in _KINDS:
                raise TypeError(f"batch field {'.'.join(path)}: dtype {dtype} cannot travel packed "
                                f"(int32, float32 and bool can)")
            axis = _axis_of(path[0])
            trail = tuple(x.shape[lead + 1:])
            fields.append(_Field(path, axis, trail, dtype, width[axis]))
            width[axis] += math.prod(trail)
        self.fields, self.width = fields, width

    def pack(self, graphs: jraph.GraphsTuple) -> jraph.GraphsTuple:
        """Host side (numpy): the batch as three int32 bundles."""
        parts, lead = {"nodes": [], "edges": [], "globals": []}, _lead(graphs)
        arrays = list(_fields_of(graphs))
        if [path for path, _ in arrays] != [f.path for f in self.fields]:
            raise ValueError(f"batch fields {[p for p, _ in arrays]} differ from the packing layout's "
                             f"{[f.path for f in self.fields]}")
        for field, (path, x) in zip(self.fields, arrays):
            x = np.asarray(x)
            if x.dtype != field.dtype or x.shape[lead + 1:] != field.trail:
                raise ValueError(f"batch field {'.'.join(path)}: {x.dtype}{list(x.shape[lead + 1:])} per row, "
                                 f"the packing layout has {field.dtype}{list(field.trail)}")
            cols = x.reshape(x.shape[:lead + 1] + (-1,))
            if field.dtype == np.float32:
                cols = cols.view(np.int32)  # bit for bit
            elif field.dtype == np.bool_:
                cols = cols.astype(np.int32)
            parts[field.axis].append(cols)
        packed = {axis: {"packed": np.concatenate(p, axis=-1)} for axis, p in parts.items()}
        return jraph.GraphsTuple(nodes=packed["nodes"], edges=packed["edges"], globals=packed["globals"],
                                 senders=None, receivers=None, n_node=None, n_edge=None)

    def unpack(self, packed: jraph.GraphsTuple) -> jraph.GraphsTuple:
        """Device side (jax.numpy, inside the jitted step): the batch `pack` was given."""
        out = {"nodes": {}, "edges": {}, "globals": {}}
        for field in self.fields:
            bundle = getattr(packed, field.axis)["packed"]
            n = math.prod(field.trail)
            x = bundle[..., field.offset:field.offset + n]
            x = x.reshape(bundle.shape[:-1] + field.trail)
            if field.dtype == np.float32:
                x = jax.lax.bitcast_convert_type(x, jnp.float32)
            elif field.dtype == np.bool_:
                x = x != 0
            if len(field.path) == 2:
                out[field.path[0]][field.path[1]] = x
            else:
                out[field.path[0]] = x
        return jraph.GraphsTuple(nodes=out["nodes"], edges=out["edges"], globals=out["globals"],
                                 senders=out["senders"], receivers=out["receivers"],
                                 n_node=out["n_node"], n_edge=out["n_edge"])
