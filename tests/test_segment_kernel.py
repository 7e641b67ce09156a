"""dpf_jax.model.segment_kernel: per-node sums of per-edge rows, against brute force.

On CPU the kernel runs in Pallas' interpreter (its maths); its Triton lowering is checked too
(on CPU: only the final compilation to GPU code needs a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_gpu

from dpf_jax.model.edge_kernel import KernelOptions
from dpf_jax.model.segment_kernel import (run_bounds, segment_bounds, segment_rows, segment_rows_reference,
                                          sort_order)


def brute_force(part, node_of_edge, n_node):
    out = np.zeros((n_node,) + part.shape[1:], np.float64)
    for edge, node in enumerate(node_of_edge):
        out[node] += part[edge]
    return out


def random_case(n_node, n_edge, heads, widths, seed=0):
    rng = np.random.default_rng(seed)
    # node 0 has no edges; node 3 gets 50 (several blocks of 16); the last nodes none either
    recv = np.sort(np.concatenate([rng.integers(1, n_node - 2, n_edge - 50), np.full(50, 3)])).astype(np.int32)
    send = rng.integers(0, n_node, n_edge).astype(np.int32)
    parts = [rng.standard_normal((n_edge, heads, w)).astype(np.float32) for w in widths]
    return recv, send, parts


@pytest.mark.parametrize("block", [16, 32])
def test_sums_over_sorted_receivers_and_over_senders_through_their_order(block):
    n_node, n_edge, heads, c = 11, 150, 2, 16
    recv, send, parts = random_case(n_node, n_edge, heads, (c, 3 * c))
    opts = KernelOptions(block_edges=block, interpret=True)
    by_recv = segment_rows([jnp.asarray(p) for p in parts], None, segment_bounds(jnp.asarray(recv), n_node), c, opts)
    order = sort_order(jnp.asarray(send))
    assert (np.diff(send[np.asarray(order)]) >= 0).all()
    by_send = segment_rows([jnp.asarray(p) for p in parts], order, segment_bounds(jnp.asarray(send), n_node), c, opts)
    for part, r, s in zip(parts, by_recv, by_send):
        assert r.shape == s.shape == (n_node, heads, part.shape[2]) and r.dtype == jnp.float32
        np.testing.assert_allclose(r, brute_force(part, recv, n_node), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s, brute_force(part, send, n_node), rtol=1e-5, atol=1e-5)
        assert not np.asarray(r[0]).any() and not np.asarray(r[-2:]).any()  # nodes without edges: exactly 0


def test_column_windows_sum_only_their_columns():
    """A part given as (array, first column, width) sums that window of the array's columns, in place:
    the same sums as the sliced array (the gate's backward reads d_upd out of [d e | d_upd] so)."""
    n_node, n_edge, heads, c = 11, 150, 2, 16
    recv, send, (joint,) = random_case(n_node, n_edge, heads, (4 * c,), seed=1)
    opts = KernelOptions(block_edges=16, interpret=True)
    order, bounds = sort_order(jnp.asarray(send)), segment_bounds(jnp.asarray(send), n_node)
    window, whole = segment_rows([(jnp.asarray(joint), c, 3 * c), jnp.asarray(joint[..., :c])], order, bounds, c,
                                 opts)
    assert window.shape == (n_node, heads, 3 * c)
    np.testing.assert_allclose(window, brute_force(joint[..., c:], send, n_node), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole, brute_force(joint[..., :c], send, n_node), rtol=1e-5, atol=1e-5)
    ref = segment_rows_reference([(jnp.asarray(joint), c, 3 * c)], order, bounds)[0]
    np.testing.assert_allclose(ref, window, rtol=1e-5, atol=1e-5)
    for bad in ((jnp.asarray(joint), 2 * c, 3 * c), (jnp.asarray(joint), 8, 2 * c)):  # past the end; off a chunk
        with pytest.raises(ValueError, match="windows inside the array"):
            segment_rows([bad], order, bounds, c, opts)


def test_bounds_order_and_reference():
    ids = jnp.asarray([2, 0, 2, 4, 0, 2], jnp.int32)
    np.testing.assert_array_equal(segment_bounds(ids, 6), [0, 2, 2, 5, 5, 6, 6])
    # runs of sorted ids for one program per node; the last node's end reaches the last edge,
    # past the ids beyond the table (7, 9)
    start, stop, end = run_bounds(jnp.asarray([0, 0, 2, 2, 2, 4, 7, 9], jnp.int32), 6)
    np.testing.assert_array_equal(start, [0, 2, 2, 5, 5, 6])
    np.testing.assert_array_equal(stop, [2, 2, 5, 5, 6, 6])
    np.testing.assert_array_equal(end, [2, 2, 5, 5, 6, 8])
    np.testing.assert_array_equal(sort_order(ids), [1, 4, 0, 2, 5, 3])  # stable
    part = jnp.arange(6, dtype=jnp.float32).reshape(6, 1, 1) + 1
    ref, = segment_rows_reference([part], sort_order(ids), segment_bounds(ids, 6))
    np.testing.assert_array_equal(ref[:, 0, 0], [2 + 5, 0, 1 + 3 + 6, 0, 4, 0])


def test_bad_widths_and_empty_inputs():
    bounds = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="multiples of 16"):
        segment_rows([jnp.zeros((5, 1, 24))], None, bounds, 16, KernelOptions(interpret=True))
    out, = segment_rows([jnp.zeros((0, 2, 16))], None, bounds, 16, KernelOptions(interpret=True))
    assert out.shape == (3, 2, 16) and not out.any()


def test_triton_lowering_at_model_shapes():
    f32, i32 = jnp.float32, jnp.int32
    n_node, n_edge, heads, c = 640, 8704, 4, 128
    sds = jax.ShapeDtypeStruct

    def sums(a, b, send):
        return segment_rows([a, b], sort_order(send), segment_bounds(send, n_node), c, KernelOptions(interpret=False))

    text = lower_for_gpu(sums, sds((n_edge, heads, c), f32), sds((n_edge, heads, 3 * c), f32), sds((n_edge,), i32))
    assert text.count("xla.gpu.triton") == 1 and 'name = "segment_rows"' in text


def test_runs_stacked_by_vmap_give_each_runs_sums():
    """Multirun (dpf_jax.train.multirun) vmaps the step over independent runs: the kernel under
    vmap (Pallas adds a grid axis) gives each run its own sums, in the interpreter and lowered
    for the GPU."""
    n_node, n_edge, heads, c = 9, 60, 2, 16
    cases = [random_case(n_node, n_edge, heads, (c,), seed=s) for s in (1, 2)]
    send = jnp.asarray(np.stack([case[1] for case in cases]))
    part = jnp.asarray(np.stack([case[2][0] for case in cases]))

    def sums(p, s, interpret):
        out, = segment_rows([p], sort_order(s), segment_bounds(s, n_node), c, KernelOptions(interpret=interpret))
        return out

    stacked = jax.vmap(lambda p, s: sums(p, s, True))(part, send)
    for r, (_, s, (p,)) in enumerate(cases):
        np.testing.assert_allclose(stacked[r], brute_force(p, s, n_node), rtol=1e-5, atol=1e-5)
    text = lower_for_gpu(jax.vmap(lambda p, s: sums(p, s, False)), jax.ShapeDtypeStruct(part.shape, jnp.float32),
                         jax.ShapeDtypeStruct(send.shape, jnp.int32))
    assert text.count("xla.gpu.triton") == 1


@pytest.mark.parametrize("block", [4, 16])
def test_block_slots_against_brute_force(block):
    """Each (edge block, node) pair of sorted node ids is one slot, slots ascend with the node, the
    padding positions join the last edge's node, ids past the table map to n_node, and the slots'
    nodes give each node's run of slots."""
    from dpf_jax.model.segment_kernel import block_slots

    rng = np.random.default_rng(3)
    n_node = 9
    ids = np.sort(np.concatenate([rng.integers(1, n_node - 1, 40), np.full(21, 4), [n_node, n_node + 2]]))
    slot, slot_node = (np.asarray(a) for a in block_slots(jnp.asarray(ids, jnp.int32), block, n_node))
    padded = np.concatenate([np.minimum(ids, n_node), np.full((-len(ids)) % block, n_node)])
    assert slot.shape == padded.shape and slot_node.shape == (len(padded) // block + n_node,)
    pairs = sorted({(p // block, node) for p, node in enumerate(padded)})
    assert [pairs.index((p // block, node)) for p, node in enumerate(padded)] == slot.tolist()
    np.testing.assert_array_equal(slot_node[:len(pairs)], [node for _, node in pairs])
    assert (slot_node[len(pairs):] == n_node).all()
    bounds = np.asarray(segment_bounds(jnp.asarray(slot_node), n_node))
    for node in range(n_node):
        blocks_of_node = {p // block for p, n in enumerate(padded) if n == node}
        assert [n for _, n in pairs[bounds[node]:bounds[node + 1]]] == [node] * len(blocks_of_node)
