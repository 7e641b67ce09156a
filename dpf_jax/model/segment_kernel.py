"""Sums of per-edge rows into node rows, for edges grouped by node: a Pallas (Triton) kernel.

The gate kernels' backward (`gate_kernel._rows_backward`) ends in the transposes of its row
gathers: per-edge gradients [E, H, w] summed into the node tables [N, H, w]. XLA does that with
scatter-adds, which on a GPU are one float atomic per element: in the synthetic fine-tuning
step the two of them took 4.5 of 30.6 ms (H100, session 17 trace), ~10x the time their bytes
need; these kernels took 3.4 ms there (session 19, scripts/results/h100_session19/).

Here every node's edges are one contiguous run of `order` (receivers: the edges themselves,
which are sorted by receiver; senders: the edges sorted by sender), so one program per
(node, head) reads its run in blocks of BE rows and adds them up in registers: no atomics, each
output row written once, and a fixed summation order (deterministic, unlike the scatter-adds).
With `KernelOptions.receiver_runs` the gate's backward kernel sums the receiver side itself, in
the same way, and this kernel sums the sender side only. `segment_rows_reference` is the same
sums in jax.numpy (the tests compare).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dpf_jax.model.edge_kernel import KernelOptions, _compiler_params, _out_struct


def segment_bounds(node_of_edge, n_node: int):
    """[n_node + 1] int32: node n's edges are positions bounds[n]:bounds[n + 1] of the order in
    which `node_of_edge` ascends (the count of edges of each node, cumulated; ids >= n_node,
    which no edge should have, are not counted)."""
    counts = jnp.zeros(n_node + 1, jnp.int32).at[node_of_edge].add(1, mode="drop")[:n_node]
    return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])


def run_bounds(node_of_edge, n_node: int):
    """(start, stop, end), each [n_node] int32, for kernels with one program per node over its run
    of edges (`node_of_edge` sorted): node n's run is start[n]:stop[n] (`segment_bounds`), and
    end = stop except that the last node's reaches the last edge, so its program also covers any
    tail of edges whose node is past the table (every per-edge output gets written)."""
    bounds = segment_bounds(node_of_edge, n_node)
    stop = bounds[1:]
    return bounds[:-1], stop, stop.at[-1].set(node_of_edge.shape[0])


def block_slots(node_of_edge, block_edges: int, n_node: int):
    """Slots of (edge block, node) pairs, for kernels that sum a block's edges per node before
    they write (`KernelOptions.receiver_slots`): with `node_of_edge` sorted and the edges in blocks
    of `block_edges` (the edge axis padded to a whole block; padding positions join the last
    edge's node), the edges of one block that share a node share a slot, each slot lies in one
    block (its row is written by one program only: no atomics), and slots ascend with the node.

    Returns (slot [E padded] int32, slot_node [n_slots] int32): slot_node[p] is the node of slot p,
    n_node for the unused slots at the end (ids past the table count as n_node too), so
    `segment_bounds(slot_node, n_node)` gives each node's run of slots; n_slots = blocks + n_node,
    an upper bound (a new slot starts at every block and at every change of node)."""
    n_edge = node_of_edge.shape[0]
    n_pad = (-n_edge) % block_edges
    node = jnp.minimum(node_of_edge.astype(jnp.int32), n_node)
    if n_pad:
        node = jnp.concatenate([node, jnp.broadcast_to(node[-1:], (n_pad,))])
    pos = jnp.arange(n_edge + n_pad)
    starts = (pos % block_edges == 0) | (node != jnp.roll(node, 1))
    n_slots = (n_edge + n_pad) // block_edges + n_node
    # clipped: with unsorted ids (a broken input contract) the count could pass the bound; the sums
    # are then wrong, as with the other sorted-receiver kernels, but no kernel writes past a buffer
    slot = jnp.minimum(jnp.cumsum(starts, dtype=jnp.int32) - 1, n_slots - 1)
    slot_node = jnp.full((n_slots,), n_node, jnp.int32).at[slot].set(node, mode="promise_in_bounds")
    return slot, slot_node


def sort_order(node_of_edge):
    """Edge positions in ascending node order (stable: a node's edges keep their order)."""
    return jnp.argsort(node_of_edge, stable=True).astype(jnp.int32)


def _window(part):
    """A `segment_rows` part as (array, first column, width): an array stands for all its columns."""
    if isinstance(part, tuple):
        return part
    return part, 0, part.shape[-1]


def segment_rows_reference(parts, order, bounds):
    """out[k][n, h] = sum of parts[k][order[p], h] over p in bounds[n]:bounds[n + 1], float32."""
    n_node = bounds.shape[0] - 1
    parts = [a[..., start:start + width] for a, start, width in map(_window, parts)]
    n_edge = parts[0].shape[0]
    node_of_position = jnp.searchsorted(bounds, jnp.arange(n_edge), side="right") - 1
    rows = jnp.arange(n_edge) if order is None else order
    return [jax.ops.segment_sum(p.astype(jnp.float32)[rows], node_of_position, num_segments=n_node,
                                indices_are_sorted=True) for p in parts]


def _segment_rows_kernel(start_ref, stop_ref, *refs, c, be, n_rows, windows, has_order):
    from jax.experimental import pallas as pl

    widths = [w for _, w in windows]
    order_ref = refs[0] if has_order else None
    x_refs = refs[int(has_order):int(has_order) + len(widths)]
    out_refs = refs[int(has_order) + len(widths):]
    h = pl.program_id(1)
    start, stop = start_ref[...], stop_ref[...]  # this node's run of positions, as scalars
    lane = jax.lax.broadcasted_iota(jnp.int32, (be,), 0)
    # (part, chunk of c columns in the part's array): each part's window of columns
    chunks = [(x_ref, first // c + q) for x_ref, (first, w) in zip(x_refs, windows) for q in range(w // c)]

    def add_block(i, sums):
        pos = start + i * be + lane
        inside = pos < stop
        pos = jnp.minimum(pos, n_rows - 1)  # a valid row to load; its values are masked off below
        rows = order_ref[pos] if has_order else pos
        return tuple(
            acc + jnp.sum(jnp.where(inside[:, None], x_ref[rows, h, pl.ds(q * c, c)].astype(jnp.float32), 0.0), axis=0)
            for acc, (x_ref, q) in zip(sums, chunks))

    n_blocks = (stop - start + be - 1) // be
    sums = jax.lax.fori_loop(0, n_blocks, add_block, tuple(jnp.zeros((c,), jnp.float32) for _ in chunks))
    k = 0
    for out_ref, w in zip(out_refs, widths):
        for q in range(w // c):
            out_ref[pl.ds(q * c, c)] = sums[k].astype(out_ref.dtype)
            k += 1


def segment_rows(parts, order, bounds, c: int, opts: KernelOptions = KernelOptions()):
    """Per node n and head h, the float32 sum of rows parts[k][order[p], h, :] over the positions
    p in bounds[n]:bounds[n + 1] (order None: p itself), for every part k at once.

    parts: [E, H, w_k] arrays (w_k a multiple of c, c a power of two), or (array, first column,
    w_k) for a window of an array's columns (first a multiple of c too; read in place, no copy);
    order: [E] int32 or None; bounds: [N + 1] int32 from `segment_bounds`. Returns [N, H, w_k]
    float32 arrays. One program per (node, head); `opts.block_edges` rows per load;
    `opts.segment_warps`, else the backward-pass warps (`opts.backward_warps`, else
    `opts.num_warps`): it runs in the backward passes (and in the message-sum forward with
    `message_sum_slots`)."""
    from jax.experimental import pallas as pl

    parts = [_window(p) for p in parts]
    windows = tuple((first, w) for _, first, w in parts)
    parts = [a for a, _, _ in parts]
    n_edge, heads = parts[0].shape[:2]
    n_node = bounds.shape[0] - 1
    widths = tuple(w for _, w in windows)
    outside = any(w % c or first % c or w < 1 or first < 0 or first + w > p.shape[2] for p, (first, w) in
                  zip(parts, windows))
    if outside or any(p.shape[:2] != (n_edge, heads) for p in parts):
        raise ValueError(f"segment_rows: parts {[p.shape for p in parts]} (column windows {windows}) must share "
                         f"[E, H] and have windows inside the array whose start and width are multiples of {c}")
    if n_edge == 0 or n_node == 0:
        return [jnp.zeros((n_node, heads, w), jnp.float32) for w in widths]
    bounds = bounds.astype(jnp.int32)
    scalar = pl.BlockSpec((None,), lambda n, h: (n,))
    whole = lambda a: pl.BlockSpec(a.shape, lambda n, h: (0,) * a.ndim)  # noqa: E731
    has_order = order is not None
    inputs = [bounds[:-1], bounds[1:]] + ([order.astype(jnp.int32)] if has_order else []) + list(parts)
    in_specs = [scalar, scalar] + [whole(a) for a in inputs[2:]]
    kernel = functools.partial(_segment_rows_kernel, c=c, be=opts.block_edges, n_rows=n_edge, windows=windows,
                               has_order=has_order)
    return pl.pallas_call(
        kernel, grid=(n_node, heads), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, w), lambda n, h: (n, h, 0)) for w in widths],
        out_shape=[_out_struct(parts[0], (n_node, heads, w), jnp.float32) for w in widths],
        compiler_params=_compiler_params(opts, segment=True), interpret=opts.resolved_interpret(),
        name="segment_rows",
    )(*inputs)
