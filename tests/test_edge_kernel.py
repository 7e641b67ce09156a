"""The fused Pallas kernels (dpf_jax.model.edge_kernel: the per-edge chain; gather_kernel: the
same with the gathers inside) against plain jax.numpy.

On CPU the kernels run in Pallas' interpreter, so these tests check the kernels' maths (values
and every gradient, padding of the edge axis, a real MatformerConv on real crystals); the
Triton lowering of both kernels at the model's real shapes is checked too (it runs on CPU:
only the final compilation to GPU code needs a GPU).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_gpu, random_conv_inputs

from dpf_jax.model.edge_kernel import KernelOptions, edge_message_reference, fused_edge_message
from dpf_jax.model.gate_kernel import fused_gate, fused_gate_rows, gate_reference
from dpf_jax.model.gather_kernel import fused_node_message, node_message_reference
from dpf_jax.model.layers import MatformerConv

DIFF_ARGS = (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11)  # all but the edge mask


def random_args(n_edge, heads, c, seed=0, n_real=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 11)
    qk, q, k, e = (jax.random.normal(ks[i], (n_edge, heads, c)) for i in range(4))
    upd = jax.random.normal(ks[4], (n_edge, heads, 3 * c))
    mask = jnp.arange(n_edge) < (n_edge if n_real is None else n_real)
    g1 = 1 + 0.2 * jax.random.normal(ks[5], (3 * c,))
    b1 = 0.2 * jax.random.normal(ks[6], (3 * c,))
    w0 = jax.random.normal(ks[7], (3 * c, c)) / np.sqrt(3 * c)
    b0 = 0.2 * jax.random.normal(ks[8], (c,))
    g2 = 1 + 0.2 * jax.random.normal(ks[9], (c,))
    b2 = 0.2 * jax.random.normal(ks[10], (c,))
    return (qk, q, k, e, upd, mask, g1, b1, w0, b0, g2, b2)


def check_gradients(fused, ref, args, argnums, cotangent, ref_args=None, atol=1e-5):
    """Gradients of sum(f(*args) * cotangent) for f = fused and ref (on `ref_args` if given):
    same shapes, every argument really receives one, equal within rtol 1e-5 and `atol` x the
    largest reference entry. Returns fused's gradients."""
    grads = jax.grad(lambda *a: jnp.sum(fused(*a) * cotangent), argnums=argnums)(*args)
    grads_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cotangent), argnums=argnums)(*(ref_args or args))
    for i, g, g_ref in zip(argnums, grads, grads_ref):
        assert g.shape == args[i].shape
        scale = float(jnp.abs(g_ref).max())
        assert scale > 0  # every argument really receives a gradient
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=atol * scale, err_msg=f"argument {i}")
    return grads


@pytest.mark.parametrize("n_edge,n_real,block", [(64, 50, 16), (72, 72, 32)])  # 72: edge axis padded
def test_fused_matches_reference_values_and_gradients(n_edge, n_real, block):
    args = random_args(n_edge, 2, 16, n_real=n_real)
    opts = KernelOptions(block_edges=block, allow_tf32=False)
    fused = lambda *a: fused_edge_message(*a, opts=opts)  # noqa: E731
    ref = lambda *a: edge_message_reference(*a, precision="highest")  # noqa: E731
    y, y_ref = fused(*args), ref(*args)
    assert y.shape == (n_edge, 2, 16) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert not np.asarray(y[n_real:]).any()  # padding edges send nothing

    w = jax.random.normal(jax.random.PRNGKey(9), y.shape)  # a generic cotangent
    grads = check_gradients(fused, ref, args, DIFF_ARGS, w)
    # masked edges get no gradient at all
    for i in range(5):
        assert not np.asarray(grads[i][n_real:]).any()


def test_model_width_scattered_mask_nan_padding_and_bf16():
    """The default model's width (H = 4, C = 128), fewer edges than one block (padded), a
    scattered edge mask with inf/NaN in masked edges (padding edges must give exactly zero,
    never NaN), and bfloat16 inputs."""
    n_edge = 20
    args = list(random_args(n_edge, 4, 128, seed=3))
    mask = jnp.asarray(np.random.default_rng(0).random(n_edge) < 0.7)
    bad = int(np.flatnonzero(~np.asarray(mask))[0])
    args[5] = mask
    args[4] = args[4].at[bad].set(jnp.inf)
    args[1] = args[1].at[bad, 0, 0].set(jnp.nan)
    opts = KernelOptions(block_edges=32, allow_tf32=False)
    clean = [jnp.where(mask.reshape(-1, *([1] * (a.ndim - 1))), a, 0.0) if i < 5 else a for i, a in enumerate(args)]
    y = fused_edge_message(*args, opts=opts)
    np.testing.assert_allclose(y, edge_message_reference(*clean, precision="highest"), rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(y)).all() and not np.asarray(y[~mask]).any()
    w = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    grads = jax.grad(lambda *a: jnp.sum(fused_edge_message(*a, opts=opts) * w), argnums=DIFF_ARGS)(*args)
    for i, g in zip(DIFF_ARGS, grads):
        assert np.isfinite(np.asarray(g)).all(), f"argument {i}"
    for i in range(5):
        assert not np.asarray(grads[i][~mask]).any()
    # bfloat16 inputs: same as the reference on the same (rounded) inputs; gradients in bf16
    b16 = [a.astype(jnp.bfloat16) if i < 5 else a for i, a in enumerate(clean)]
    np.testing.assert_allclose(fused_edge_message(*b16, opts=opts),
                               edge_message_reference(*b16, precision="highest"), rtol=1e-4, atol=1e-4)
    g16 = jax.grad(lambda x: jnp.sum(fused_edge_message(x, *b16[1:], opts=opts)))(b16[0])
    assert g16.dtype == jnp.bfloat16


def test_no_edges():
    args = random_args(0, 2, 16)
    assert fused_edge_message(*args).shape == (0, 2, 16)


@pytest.mark.parametrize("kernel", ["pallas", "pallas_node-16x4", "pallas_gate-16x4", "pallas_gate_rows-16x4",
                                    "pallas_gate-16x4-keep", "pallas_gate_rows-16x4-keep",
                                    "pallas_gate_rows-16x4-atomic", "pallas_gate_rows-16x4-sorted",
                                    "pallas_gate_rows-16x4-sorted-runs", "pallas_gate_rows-16x4-sorted-slots",
                                    "pallas_gate_rows-16x4-sorted-slots-slotsum",
                                    "pallas_gate_rows-16x4-mres-sorted-slots-slotsum",
                                    "pallas_gate_rows-16x4-joint-sorted", "pallas_gate_rows-16x4-joint",
                                    "pallas_gate_rows-16x4-keep-joint-mres-sorted-slots-slotsum",
                                    "pallas_gate_rows-16x4-keep-joint-mres-sorted"])
def test_conv_pallas_equals_xla_with_gradients(kernel):
    """MatformerConv with a fused kernel and with jax.numpy: same parameter tree, same outputs,
    same gradients (of parameters and of the node features)."""
    rng = np.random.default_rng(0)
    n_node, n_edge, C, H = 24, 96, 16, 2
    receivers = np.sort(rng.integers(0, 20, n_edge)).astype(np.int32)
    senders = rng.integers(0, 20, n_edge).astype(np.int32)
    node_mask = np.arange(n_node) < 20
    edge_mask = np.arange(n_edge) < 90
    x = rng.standard_normal((n_node, C)).astype(np.float32)
    ea = rng.standard_normal((n_edge, 8)).astype(np.float32)
    args = tuple(map(jnp.asarray, (x, ea, senders, receivers, node_mask, edge_mask)))
    convs = {"xla": MatformerConv(C, H, precision="highest"),
             "pallas": MatformerConv(C, H, precision="highest", edge_kernel=kernel)}
    variables = {k: c.init(jax.random.PRNGKey(3), *args, train=False) for k, c in convs.items()}
    same = jax.tree_util.tree_map(np.array_equal, variables["xla"], variables["pallas"])
    assert jax.tree_util.tree_all(same)  # checkpoints interchangeable
    v = variables["xla"]

    def loss(params, conv, x):
        y, _ = conv.apply({**v, "params": params}, x, *args[1:], train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.where(node_mask[:, None], y, 0.0) ** 2)

    out = {k: jax.value_and_grad(loss, argnums=(0, 2))(v["params"], c, args[0]) for k, c in convs.items()}
    np.testing.assert_allclose(out["pallas"][0], out["xla"][0], rtol=1e-5)
    flat_p = jax.tree_util.tree_leaves_with_path(out["pallas"][1])
    flat_x = jax.tree_util.tree_leaves(out["xla"][1])
    # round-off floor from the largest gradient (lin_concate's bias, before a BatchNorm, has a
    # zero true gradient: both sides are round-off there)
    floor = 1e-6 * max(float(np.abs(g).max()) for g in flat_x)
    for (path, gp), gx in zip(flat_p, flat_x):
        np.testing.assert_allclose(gp, gx, rtol=2e-4, atol=2e-4 * float(np.abs(gx).max()) + floor,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kernel", ["pallas_gate-16x4", "pallas_gate_rows-16x4", "pallas_gate_rows-16x4-sorted",
                                    "pallas_gate_rows-16x4-sorted-runs", "pallas_gate_rows-16x4-sorted-sum",
                                    "xla_recompute"])
def test_conv_gate_in_bf16_is_close_to_xla(kernel):
    """precision bf16: the gate kernel and the recomputing gate compute the alpha products and upd
    in float32 where the "xla" path rounds them to bfloat16, so they agree to bfloat16 rounding,
    not exactly."""
    C, H = 16, 2
    args = random_conv_inputs(1, channels=C)
    convs = {k: MatformerConv(C, H, dtype=jnp.bfloat16, edge_kernel=k) for k in ("xla", kernel)}
    v = convs["xla"].init(jax.random.PRNGKey(3), *args, train=False)

    def loss(params, conv):
        y, _ = conv.apply({**v, "params": params}, *args, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.where(args[4][:, None], y.astype(jnp.float32), 0.0) ** 2)

    (lx, gx), (lp, gp) = (jax.value_and_grad(loss)(v["params"], c) for c in convs.values())
    np.testing.assert_allclose(lp, lx, rtol=2e-2)
    # lin_concate's bias (before a BatchNorm) has a zero true gradient: both sides are round-off,
    # hence a floor from the largest gradient
    floor = 1e-2 * max(float(jnp.abs(b.astype(jnp.float32)).max()) for b in jax.tree_util.tree_leaves(gx))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree_util.tree_leaves(gx)):
        scale = float(jnp.abs(b.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0,
                                   atol=0.08 * scale + floor, err_msg=jax.tree_util.keystr(path))


def test_triton_lowering_at_model_shapes():
    """Both kernels lower to Triton IR at the default model's shapes (C = 128, H = 4), the way
    the GPU build sees them; catches unsupported operations and non-power-of-two tiles."""
    f32 = jnp.float32
    E, H, C = 1024, 4, 128
    sds = jax.ShapeDtypeStruct
    shapes = ([sds((E, H, C), f32)] * 4 + [sds((E, H, 3 * C), f32), sds((E,), jnp.bool_)]
              + [sds((3 * C,), f32)] * 2 + [sds((3 * C, C), f32)] + [sds((C,), f32)] * 3)
    opts = KernelOptions(block_edges=32, interpret=False)
    grad = jax.grad(lambda *a: jnp.sum(fused_edge_message(*a, opts=opts) ** 2), argnums=DIFF_ARGS)
    text = lower_for_gpu(grad, *shapes)
    assert text.count("xla.gpu.triton") == 2  # forward and backward kernel, nothing else
    assert 'name = "edge_message_fwd"' in text and 'name = "edge_message_bwd"' in text


def _data_parallel(fn, n_dev):
    """loss(args) = sum over devices of sum(fn(edge shard) * w shard), params replicated."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))

    def per_device(w, *a):
        return jax.lax.psum(jnp.sum(fn(*a) * w), "data")

    return lambda w, *a: jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) * 7 + (P(),) * 6,
                                       out_specs=P())(w, *a)


def test_parameter_gradients_are_summed_over_devices(monkeypatch):
    """Inside the data-parallel shard_map the custom VJP's parameter gradients are per device
    and must be summed over devices. The kernels are swapped for their jax.numpy maths here
    (Pallas' interpreter cannot run inside shard_map), so this checks the plumbing around
    them: varying-axis marking of parameters and outputs, and the cross-device sum."""
    import dpf_jax.model.edge_kernel as ek

    monkeypatch.setattr(ek, "_forward", lambda args, opts: ek.edge_message_reference(*args, precision="highest"))
    monkeypatch.setattr(ek, "_backward", lambda args, dy, opts: jax.vjp(
        lambda *a: ek.edge_message_reference(*a, precision="highest"), *args)[1](dy))
    n_dev = 4
    args = random_args(64, 2, 16, n_real=60)
    w = jax.random.normal(jax.random.PRNGKey(4), (64, 2, 16))
    opts = KernelOptions(interpret=False)  # take the kernel path (patched) even on CPU
    loss = _data_parallel(lambda *a: fused_edge_message(*a, opts=opts), n_dev)
    argnums = tuple(i + 1 for i in DIFF_ARGS)
    grads = jax.jit(jax.grad(loss, argnums=argnums))(w, *args)
    want = jax.grad(lambda w, *a: jnp.sum(edge_message_reference(*a, precision="highest") * w),
                    argnums=argnums)(w, *args)
    for i, g, g_ref in zip(DIFF_ARGS, grads, want):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(g_ref).max()),
                                   err_msg=f"argument {i}")


def test_triton_lowering_inside_data_parallel_step():
    """Lowered for the GPU inside shard_map (as the train step runs it): two Triton kernels,
    and the one cross-device all-reduce of the parameter gradients."""
    f32 = jnp.float32
    E, H, C = 1024, 4, 128
    sds = jax.ShapeDtypeStruct
    shapes = ([sds((E, H, C), f32)] * 5 + [sds((E, H, 3 * C), f32), sds((E,), jnp.bool_)]
              + [sds((3 * C,), f32)] * 2 + [sds((3 * C, C), f32)] + [sds((C,), f32)] * 3)
    opts = KernelOptions(interpret=False)
    loss = _data_parallel(lambda *a: fused_edge_message(*a, opts=opts), 2)
    text = lower_for_gpu(jax.grad(loss, argnums=9), *shapes)
    assert text.count("xla.gpu.triton") == 2
    assert text.count("stablehlo.all_reduce") == 1


def test_kernel_options_from_config_string():
    assert KernelOptions.parse("pallas") == KernelOptions()
    o = KernelOptions.parse("pallas-16x8", allow_tf32=False)
    assert (o.block_edges, o.num_warps, o.allow_tf32, o.keep_tiles) == (16, 8, False, False)
    o = KernelOptions.parse("pallas_gate_rows-16x8-keep")
    assert (o.block_edges, o.num_warps, o.keep_tiles, o.atomic_grads) == (16, 8, True, False)
    o = KernelOptions.parse("pallas_gate_rows-16x8-atomic")
    assert (o.keep_tiles, o.atomic_grads, o.sorted_sums) == (False, True, False)
    assert KernelOptions.parse("pallas_gate_rows-32x4-keep-atomic").atomic_grads
    o = KernelOptions.parse("pallas_gate_rows-16x8-sorted")
    assert (o.keep_tiles, o.atomic_grads, o.sorted_sums, o.receiver_runs) == (False, False, True, False)
    o = KernelOptions.parse("pallas_gate_rows-16x8-sorted-runs")
    assert (o.block_edges, o.keep_tiles, o.atomic_grads, o.sorted_sums, o.receiver_runs) == (16, False, False, True,
                                                                                            True)
    for bad in ("pallas_gate_rows-16x8-runs", "pallas_gate_rows-16x8-runs-sorted",
                "pallas_gate_rows-16x8-keep-sorted-runs", "pallas_gate-16x8-sorted-runs",
                "pallas_gate_rows-16x8-atomic-runs"):
        with pytest.raises(ValueError):
            KernelOptions.parse(bad)
    o = KernelOptions.parse("pallas_gate_rows-16x8x4-sorted-runs")
    assert (o.block_edges, o.num_warps, o.backward_warps, o.receiver_runs, o.message_sum) == (16, 8, 4, True, False)
    o = KernelOptions.parse("pallas_gate_rows-16x8x4-sorted-runs-sum")
    assert (o.block_edges, o.backward_warps, o.sorted_sums, o.receiver_runs, o.message_sum) == (16, 4, True, True, True)
    o = KernelOptions.parse("pallas_gate_rows-16x8-sum")
    assert (o.sorted_sums, o.atomic_grads, o.message_sum) == (False, False, True)
    for bad in ("pallas_gate_rows-16x8-sum-sorted", "pallas_gate_rows-16x8-sorted-sum-runs", "pallas_gate-16x8-sum",
                "pallas_gate_rows-16x8-sum-sum", "pallas-16x8-sum", "pallas_gate_rows-sum"):
        with pytest.raises(ValueError):
            KernelOptions.parse(bad)
    o = KernelOptions.parse("pallas_gate_rows-16x8x8x4-sorted-slots-slotsum")
    assert (o.num_warps, o.backward_warps, o.segment_warps, o.sorted_sums, o.receiver_runs, o.receiver_slots,
            o.message_sum, o.message_sum_slots) == (8, 8, 4, True, False, True, True, True)
    o = KernelOptions.parse("pallas_gate_rows-16x8-sorted-slots-sum")
    assert (o.segment_warps, o.receiver_slots, o.message_sum, o.message_sum_slots) == (0, True, True, False)
    assert not o.gated_residual
    o = KernelOptions.parse("pallas_gate_rows-16x8x4-mres-sorted-slots-slotsum")
    assert (o.gated_residual, o.sorted_sums, o.receiver_slots, o.message_sum_slots) == (True, True, True, True)
    assert not o.joint_edge_projection
    o = KernelOptions.parse("pallas_gate_rows-16x8x4-keep-joint-mres-sorted-slots-slotsum")
    assert (o.keep_tiles, o.joint_edge_projection, o.gated_residual, o.receiver_slots) == (True, True, True, True)
    with pytest.raises(ValueError, match="joint_edge_projection is not implemented"):
        KernelOptions.parse("pallas_gate_rows-16x8-joint-sorted-runs")
    for bad in ("pallas_gate_rows-16x8-slots", "pallas_gate_rows-16x8-sorted-runs-slots",
                "pallas_gate_rows-16x8-sorted-slots-runs", "pallas_gate_rows-16x8-slotsum-sorted",
                "pallas_gate_rows-16x8-sorted-sum-slotsum", "pallas_gate-16x8-slotsum",
                "pallas_gate_rows-16x8-sorted-slots-mres", "pallas_gate-16x8-mres"):
        with pytest.raises(ValueError):
            KernelOptions.parse(bad)
    with pytest.raises(ValueError, match="excludes receiver_runs"):
        KernelOptions(sorted_sums=True, receiver_runs=True, receiver_slots=True)
    with pytest.raises(ValueError, match="needs message_sum"):
        KernelOptions(message_sum_slots=True)
    assert KernelOptions.parse("pallas_gate_rows-16x4-sorted").backward_warps == 0
    for bad in ("pallas-16x4x0", "pallas-16x4x2x2x2", "pallas-16x4x2x0", "pallas-16xx4"):
        with pytest.raises(ValueError, match="tile must look like"):
            KernelOptions.parse(bad)
    with pytest.raises(ValueError, match=r"backward_warps \(3"):
        KernelOptions.parse("pallas_gate_rows-16x8x3-sorted").check(128, "test")
    with pytest.raises(ValueError, match=r"segment_warps \(6"):
        KernelOptions.parse("pallas_gate_rows-16x8x8x6-sorted").check(128, "test")
    with pytest.raises(ValueError, match="keep_tiles does not apply"):
        KernelOptions(keep_tiles=True, sorted_sums=True, receiver_runs=True)
    with pytest.raises(ValueError, match="needs sorted_sums"):
        KernelOptions(receiver_runs=True)
    for bad in ("pallas-16", "triton", "pallas-axb", "pallas-16x8-keep", "pallas_gate_rows-16x8-fast",
                "pallas_gate-16x8-keep-keep", "pallas_gate-16x8-atomic", "pallas_gate_rows-16x8-atomic-atomic",
                "pallas_gate-16x8-sorted", "pallas_gate_rows-16x8-atomic-sorted"):
        with pytest.raises(ValueError):
            KernelOptions.parse(bad)
    with pytest.raises(ValueError, match="choose one"):
        KernelOptions(atomic_grads=True, sorted_sums=True)
    with pytest.raises(ValueError, match="powers of two"):
        fused_edge_message(*random_args(32, 1, 16), opts=KernelOptions(block_edges=24))


def _write_fake_dump(path, group="synthetic/finetune/8/0"):
    """A two-device batch in `bench_train.py --dump-npz`'s layout: each share's real part, node
    indices offset by the shares before it, receivers sorted, merged-edge counts; budget per device."""
    recv = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 4, 4, 5, 6, 6], np.int32)  # share 0: nodes 0-3, share 1: 4-6
    send = np.array([1, 2, 0, 2, 3, 0, 1, 2, 5, 6, 6, 5, 4, 4, 5], np.int32)
    np.savez(path, **{f"{group}/receivers": recv, f"{group}/senders": send,
                      f"{group}/edge_count": np.array([1, 2, 1, 1, 3, 1, 1, 1, 1, 2, 1, 1, 1, 1, 2], np.int32),
                      f"{group}/n_node": np.array([3, 1, 2, 1], np.int32),
                      f"{group}/budget": np.array([6, 16, 4], np.int32),
                      f"{group}/num_devices": np.array(2, np.int32)})
    return recv, send


def test_bench_edge_kernel_takes_the_steps_own_graphs(tmp_path):
    """`bench_edge_kernel.py --graphs-npz`: the gate-row and message-sum kernels timed on a dumped
    batch's structure, padded to its budget as the batcher pads (sorted receivers, padding edges on
    padding nodes with weight 0), and still equal to jax.numpy there."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_edge_kernel

    npz = tmp_path / "batches.npz"
    recv, send = _write_fake_dump(npz)
    g = bench_edge_kernel.load_graph(str(npz))
    assert g.n_node == 12 and len(g.receivers) == len(g.senders) == len(g.weight) == 32
    np.testing.assert_array_equal(g.receivers[:15], recv)
    np.testing.assert_array_equal(g.senders[:15], send)
    assert (np.diff(g.receivers) >= 0).all() and (g.receivers[15:] >= 7).all() and (g.receivers < 12).all()
    assert (g.weight[:15] >= 1).all() and (g.weight[15:] == 0).all() and g.weight[4] == 3
    with pytest.raises(ValueError, match="no batch"):
        bench_edge_kernel.load_graph(str(npz), "other/0")
    report = bench_edge_kernel.main(["--small", "--family", "gate_rows", "message_sum", "--tiles", "16x4-sorted-runs",
                                     "--graphs-npz", str(npz), "--out", str(tmp_path / "b.json")])
    assert report["graph"]["edges"] == 32 and report["graph"]["real_edges"] == 15 and report["graph"]["nodes"] == 12
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"xla (gate_rows)", "pallas_gate_rows-16x4-sorted-runs", "xla (message_sum)",
                         "message_sum-16x4-sorted-runs"}
    for r in rows.values():
        assert r["edges"] == 32 and "error" not in r
        assert r["max_abs_err_forward"] < 1e-3 and r["max_rel_err_grads"] < 1e-3


def test_kernel_registers_script_lowers_every_kernel_with_its_warps(tmp_path):
    """scripts/kernel_registers.py, its CPU part: the Triton IR of every kernel of a tile, with the
    warps the tile gives it (forward 8, backward-pass kernels 4 for "16x8x4", the segment kernels 2
    for "16x8x4x2"), written per kernel. (Compiling the IR needs the `triton` package, which CI
    does not install.)"""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import kernel_registers

    report = kernel_registers.main(["--ir-only", "--edges", "256", "--tiles", "16x8x4-sorted-runs-sum",
                                    "16x8x4x2-sorted-slots-slotsum", "--ir-dir", str(tmp_path)])
    warps = {(r["tile"], r["kernel"]): r["num_warps"] for r in report["results"]}
    assert warps == {("16x8x4-sorted-runs-sum", "edge_gate_rows_fwd"): 8,
                     ("16x8x4-sorted-runs-sum", "edge_gate_rows_bwd_runs"): 4,
                     ("16x8x4-sorted-runs-sum", "segment_rows"): 4,
                     ("16x8x4-sorted-runs-sum", "message_sum_fwd"): 8,
                     ("16x8x4-sorted-runs-sum", "message_sum_bwd"): 4,
                     # in running order: the gate's forward and backward, the segment kernels adding the
                     # receivers' slots and the senders' edges, then the message sums and their slots
                     ("16x8x4x2-sorted-slots-slotsum", "edge_gate_rows_fwd"): 8,
                     ("16x8x4x2-sorted-slots-slotsum", "edge_gate_rows_bwd_slots"): 4,
                     ("16x8x4x2-sorted-slots-slotsum", "segment_rows"): 2,
                     ("16x8x4x2-sorted-slots-slotsum", "segment_rows#2"): 2,
                     ("16x8x4x2-sorted-slots-slotsum", "message_sum_slots_fwd"): 8,
                     ("16x8x4x2-sorted-slots-slotsum", "segment_rows#3"): 2,
                     ("16x8x4x2-sorted-slots-slotsum", "message_sum_slots_bwd"): 4}
    runs = (tmp_path / "16x8x4-sorted-runs-sum_edge_gate_rows_bwd_runs.ttir").read_text()
    assert "tt.func public @edge_gate_rows_bwd_runs" in runs and "scf.for" in runs  # the loop over the run
    # the message-sum backward over edge blocks: no loop at all
    assert "scf.for" not in (tmp_path / "16x8x4x2-sorted-slots-slotsum_message_sum_slots_bwd.ttir").read_text()


def test_bench_edge_kernel_script_runs(tmp_path):
    """scripts/bench_edge_kernel.py (kernel-level timing on the GPU), CPU smoke run."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_edge_kernel

    report = bench_edge_kernel.main(["--small", "--out", str(tmp_path / "b.json")])
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"xla (chain)", "pallas-32x4", "xla (node)", "pallas_node-32x4",
                         "xla (gate)", "pallas_gate-32x4", "xla (gate_rows)", "pallas_gate_rows-32x4",
                         "xla (message_sum)", "message_sum-32x4"}
    for r in rows.values():
        assert "error" not in r and r["forward_ms"] > 0 and r["train_ms"] > 0
        assert r["max_abs_err_forward"] < 1e-3 and r["max_rel_err_grads"] < 1e-3


# ------------------------------------------------------------- gathers inside (gather_kernel)

NODE_DIFF = (0, 1, 2, 6, 7, 8, 9, 10, 11, 12)  # all but receivers, senders, mask


def random_node_args(n_node, n_edge, heads, c, seed=0, n_real=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 12)
    rt = jax.random.normal(ks[0], (n_node, heads, 5 * c))
    st = jax.random.normal(ks[1], (n_node, heads, 4 * c))
    e = jax.random.normal(ks[2], (n_edge, heads, c))
    recv = jnp.sort(jax.random.randint(ks[3], (n_edge,), 0, n_node))
    send = jax.random.randint(ks[4], (n_edge,), 0, n_node)
    mask = jnp.arange(n_edge) < (n_edge if n_real is None else n_real)
    w3 = jax.random.normal(ks[5], (c, 3 * c)) / np.sqrt(c)
    g1, b1 = 1 + 0.2 * jax.random.normal(ks[6], (3 * c,)), 0.2 * jax.random.normal(ks[7], (3 * c,))
    w0, b0 = jax.random.normal(ks[8], (3 * c, c)) / np.sqrt(3 * c), 0.2 * jax.random.normal(ks[9], (c,))
    g2, b2 = 1 + 0.2 * jax.random.normal(ks[10], (c,)), 0.2 * jax.random.normal(ks[11], (c,))
    return (rt, st, e, recv, send, mask, w3, g1, b1, w0, b0, g2, b2)


@pytest.mark.parametrize("n_edge,n_real,heads,c", [(70, 64, 2, 16), (24, 20, 4, 128)])
def test_gather_kernel_matches_reference_values_and_gradients(n_edge, n_real, heads, c):
    """Node tables in, messages out: values and the gradients of both node tables (summed over
    each node's edges), e and every parameter; padded edge axis, masked edges."""
    args = random_node_args(30, n_edge, heads, c, n_real=n_real)
    opts = KernelOptions(block_edges=16, allow_tf32=False)
    fused = lambda *a: fused_node_message(*a, opts=opts)  # noqa: E731
    ref = lambda *a: node_message_reference(*a, precision="highest")  # noqa: E731
    y = fused(*args)
    np.testing.assert_allclose(y, ref(*args), rtol=1e-5, atol=1e-5)
    assert not np.asarray(y[n_real:]).any()
    check_gradients(fused, ref, args, NODE_DIFF, jax.random.normal(jax.random.PRNGKey(9), y.shape), atol=2e-5)


def test_gather_kernel_triton_lowering_inside_data_parallel_step():
    f32 = jnp.float32
    N, E, H, C = 256, 1024, 4, 128
    sds = jax.ShapeDtypeStruct
    shapes = (sds((N, H, 5 * C), f32), sds((N, H, 4 * C), f32), sds((E, H, C), f32), sds((E,), jnp.int32),
              sds((E,), jnp.int32), sds((E,), jnp.bool_), sds((C, 3 * C), f32), sds((3 * C,), f32),
              sds((3 * C,), f32), sds((3 * C, C), f32), sds((C,), f32), sds((C,), f32), sds((C,), f32))
    text = lower_grad_in_shard_map(fused_node_message, shapes, n_sharded=6, argnums=(0, 9))
    assert text.count("xla.gpu.triton") == 2
    assert 'name = "node_message_fwd"' in text and 'name = "node_message_bwd"' in text


def lower_grad_in_shard_map(kernel_fn, shapes, n_sharded, argnums):
    """GPU lowering of grad(sum over 2 devices of sum(kernel_fn(...) ** 2)), the first
    `n_sharded` arguments split over the devices, the rest replicated (as in the train step)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    opts = KernelOptions(interpret=False)
    in_specs = (P("data"),) * n_sharded + (P(),) * (len(shapes) - n_sharded)

    def per_device(*b):
        return jax.lax.psum(jnp.sum(kernel_fn(*b, opts=opts).astype(jnp.float32) ** 2), "data")

    def loss(*a):
        return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=P())(*a)

    return lower_for_gpu(jax.grad(loss, argnums=argnums), *shapes)


# ------------------------------------------------------- the gate alone (gate_kernel)

GATE_DIFF = (0, 1, 2, 3, 5, 6)  # all but the edge mask


def random_gate_args(n_edge, heads, c, seed=0, n_real=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    r = jax.random.normal(ks[0], (n_edge, heads, 5 * c))
    s = jax.random.normal(ks[1], (n_edge, heads, 4 * c))
    ew3 = jax.random.normal(ks[2], (n_edge, heads, 3 * c))
    e = jax.random.normal(ks[3], (n_edge, heads, c))
    mask = jnp.arange(n_edge) < (n_edge if n_real is None else n_real)
    g1, b1 = 1 + 0.2 * jax.random.normal(ks[4], (3 * c,)), 0.2 * jax.random.normal(ks[5], (3 * c,))
    return (r, s, ew3, e, mask, g1, b1)


@pytest.mark.parametrize("n_edge,n_real,heads,c,block", [(64, 50, 2, 16, 16), (40, 33, 4, 128, 32)])
def test_gate_kernel_matches_reference_values_and_gradients(n_edge, n_real, heads, c, block):
    """Values and every gradient (both gathered tables, e @ W3, e, the LayerNorm parameters);
    masked edges give and get exactly 0, also when they hold inf/NaN; an edge axis that is not
    a multiple of the block (40 edges, blocks of 32)."""
    args = list(random_gate_args(n_edge, heads, c, n_real=n_real))
    args[0] = args[0].at[n_real, 0, 0].set(jnp.nan)
    args[2] = args[2].at[n_real, 0, 0].set(jnp.inf)
    clean = [jnp.where(args[4].reshape(-1, 1, 1), a, 0.0) if i < 4 else a for i, a in enumerate(args)]
    opts = KernelOptions(block_edges=block)
    fused = lambda *a: fused_gate(*a, opts=opts)  # noqa: E731
    m = fused(*args)
    assert m.shape == (n_edge, heads, 3 * c) and m.dtype == jnp.float32
    np.testing.assert_allclose(m, gate_reference(*clean), rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(m)).all() and not np.asarray(m[n_real:]).any()
    w = jax.random.normal(jax.random.PRNGKey(9), m.shape)
    grads = check_gradients(fused, gate_reference, args, GATE_DIFF, w, ref_args=clean)
    for i, g in zip(GATE_DIFF, grads):
        if i < 4:  # masked edges get no gradient at all
            assert not np.asarray(g[n_real:]).any()
    b16 = [a.astype(jnp.bfloat16) if i < 4 else a for i, a in enumerate(clean)]
    m16 = fused(*b16)
    assert m16.dtype == jnp.bfloat16
    np.testing.assert_allclose(m16.astype(jnp.float32), gate_reference(*b16).astype(jnp.float32),
                               rtol=2e-2, atol=2e-2)


def test_gate_kernel_triton_lowering_inside_data_parallel_step():
    f32 = jnp.float32
    E, H, C = 1024, 4, 128
    sds = jax.ShapeDtypeStruct
    shapes = (sds((E, H, 5 * C), f32), sds((E, H, 4 * C), f32), sds((E, H, 3 * C), f32), sds((E, H, C), f32),
              sds((E,), jnp.bool_), sds((3 * C,), f32), sds((3 * C,), f32))
    text = lower_grad_in_shard_map(fused_gate, shapes, n_sharded=5, argnums=(0, 5))
    assert text.count("xla.gpu.triton") == 2
    assert 'name = "edge_gate_fwd"' in text and 'name = "edge_gate_bwd"' in text


def random_rows_args(n_node, n_edge, heads, c, n_real, seed=1):
    """Node tables, ew3, e, sorted receivers, senders, edge mask, LayerNorm parameters (the
    arguments of gate_recompute.gate_message_reference)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    n_real_nodes = max(1, n_node - 2)  # the last nodes are padding: the padding edges point there
    recv = np.sort(rng.integers(0, n_real_nodes, n_edge)).astype(np.int32)
    send = rng.integers(0, n_real_nodes, n_edge).astype(np.int32)
    recv[n_real:], send[n_real:] = n_node - 1, n_node - 1
    return [f(n_node, heads, 5 * c), f(n_node, heads, 4 * c), f(n_edge, heads, 3 * c), f(n_edge, heads, c),
            jnp.asarray(recv), jnp.asarray(send), jnp.arange(n_edge) < n_real, 1 + 0.2 * f(3 * c), 0.2 * f(3 * c)]


@pytest.mark.parametrize("n_node,n_edge,n_real,heads,c,block,keep,sums,flags", [
    (12, 70, 65, 2, 16, 16, False, "xla", ""), (9, 40, 33, 4, 128, 32, False, "xla", ""),
    (12, 70, 65, 2, 16, 16, True, "xla", ""), (12, 70, 65, 2, 16, 16, False, "atomic", ""),
    (9, 40, 33, 4, 128, 32, True, "atomic", ""), (12, 70, 65, 2, 16, 16, False, "sorted", ""),
    (9, 40, 33, 4, 128, 32, True, "sorted", ""), (8, 90, 80, 2, 16, 16, False, "runs", ""),
    (9, 40, 33, 4, 128, 32, False, "runs", ""), (8, 90, 80, 2, 16, 16, False, "slots", ""),
    (9, 40, 33, 4, 128, 32, False, "slots", ""),
    # gated_residual: the backward reads the forward's m instead of forming upd; joint_edge_projection:
    # e and e @ W3 as one [e | ew3] array, its gradient one array
    (12, 70, 65, 2, 16, 16, True, "xla", "mres"), (8, 90, 80, 2, 16, 16, False, "runs", "mres"),
    (8, 90, 80, 2, 16, 16, False, "slots", "mres"), (9, 40, 33, 4, 128, 32, False, "slots", "mres"),
    (12, 70, 65, 2, 16, 16, False, "xla", "joint"), (12, 70, 65, 2, 16, 16, True, "sorted", "joint"),
    (8, 90, 80, 2, 16, 16, False, "slots", "joint"), (9, 40, 33, 4, 128, 32, True, "slots", "joint mres"),
    (12, 70, 65, 2, 16, 16, True, "sorted", "joint mres")])
def test_gate_rows_kernel_matches_reference_values_and_gradients(n_node, n_edge, n_real, heads, c, block, keep,
                                                                 sums, flags):
    """The gate kernel that gathers node rows itself: values and every gradient (both node
    tables, summed over each node's edges; e @ W3, e, the LayerNorm parameters); an edge axis
    that is not a multiple of the block; padding edges holding inf/NaN give and get exactly 0.
    `sums`: how the node-table gradients are summed: XLA's scatter-adds, inside the backward
    kernel ("atomic"; 12 nodes, 16-70 edges per block: every block holds edges sharing a
    receiver and edges sharing a sender), by the segment kernel ("sorted"), or over each
    receiver's run inside the backward kernel and by the segment kernel for senders ("runs";
    receivers with no edge, runs shorter and longer than a block), or per (block, receiver) slot
    inside the backward kernel, then by the segment kernel ("slots": the same batches). `flags`:
    "mres", the backward reads the forward's output in place of upd (`gated_residual`); "joint",
    e and e @ W3 go in as one [e | ew3] array (`joint_edge_projection`; the gradients of both
    are then its gradient's two parts)."""
    atomic = sums == "atomic"
    from dpf_jax.model.gate_recompute import gate_message_reference

    args = random_rows_args(n_node, n_edge, heads, c, n_real)
    args[2] = args[2].at[n_real:].set(jnp.inf)
    args[3] = args[3].at[n_real:].set(jnp.nan)
    args[0] = args[0].at[-1].set(jnp.nan)  # the padding node the padding edges point to
    args[1] = args[1].at[-1].set(jnp.inf)
    clean = [jnp.where(args[6].reshape(-1, 1, 1), a, 0.0) if i in (2, 3) else a for i, a in enumerate(args)]
    clean[0], clean[1] = clean[0].at[-1].set(0.0), clean[1].at[-1].set(0.0)
    opts = KernelOptions(block_edges=block, keep_tiles=keep, atomic_grads=atomic,
                         sorted_sums=sums in ("sorted", "runs", "slots"), receiver_runs=sums == "runs",
                         receiver_slots=sums == "slots", gated_residual="mres" in flags,
                         joint_edge_projection="joint" in flags)
    if "joint" in flags:
        def fused(rt, st, ew3, e, *rest):
            joint = jnp.concatenate([e, ew3], axis=-1)
            return fused_gate_rows(rt, st, joint, None, *rest, opts=opts)
    else:
        fused = lambda *a: fused_gate_rows(*a, opts=opts)  # noqa: E731
    if sums in ("runs", "slots"):
        runs = np.bincount(np.asarray(args[4]), minlength=n_node)
        assert runs.min() == 0  # a receiver without edges: its program writes a zero row
        if c == 16:  # runs over several blocks, the last one partly outside the run
            assert runs.max() > block and runs.max() % block
    if atomic:  # repeated nodes inside one block, the case the in-kernel sums exist for
        recv, send = np.asarray(args[4][:block]), np.asarray(args[5][:block])
        assert len(set(recv)) < block and len(set(send)) < block
    m = fused(*args)
    assert m.shape == (n_edge, heads, 3 * c) and m.dtype == jnp.float32
    np.testing.assert_allclose(m, gate_message_reference(*clean), rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(m)).all() and not np.asarray(m[n_real:]).any()
    w = jax.random.normal(jax.random.PRNGKey(9), m.shape)
    grads = check_gradients(fused, gate_message_reference, args, (0, 1, 2, 3, 7, 8), w, ref_args=clean)
    for g in grads[2:4]:  # masked edges get no gradient at all
        assert not np.asarray(g[n_real:]).any()
    assert not np.asarray(grads[0][-1]).any() and not np.asarray(grads[1][-1]).any()  # nor their nodes
    with pytest.raises(ValueError, match="sender rows"):
        fused(args[0], args[0], *args[2:])  # a [..., 5C] table where [..., 4C] belongs


def test_gate_rows_gated_residual_keeps_the_output_for_the_backward_in_float32_only():
    """`gated_residual`: the custom VJP keeps the forward's output m where it kept ew3 (so the
    backward reads m, and ew3 is not held for it); with bfloat16 inputs the flag is dropped (m
    would be stored rounded to bfloat16): the gradients are then exactly those without it."""
    from dpf_jax.model.gate_kernel import _fused_rows_fwd

    args = random_rows_args(8, 40, 2, 16, 36)
    mask = args[6].astype(jnp.float32)
    plain = KernelOptions(block_edges=16, interpret=True, sorted_sums=True, receiver_slots=True)
    gated = dataclasses.replace(plain, gated_residual=True)
    for opts, kept in ((plain, args[2]), (gated, None)):
        m, residuals = _fused_rows_fwd(*args[:6], mask, *args[7:], opts)
        np.testing.assert_array_equal(residuals[2], m if kept is None else kept)
        assert residuals[2].shape == args[2].shape  # m and ew3 are both [E, H, 3C]
    bf16 = [a.astype(jnp.bfloat16) if a.dtype == jnp.float32 and a.ndim == 3 else a for a in args]
    w = jax.random.normal(jax.random.PRNGKey(2), (40, 2, 48))
    grads = [jax.grad(lambda *a, o=o: jnp.sum(fused_gate_rows(*a, opts=o).astype(jnp.float32) * w),
                      argnums=(0, 1, 2, 3, 7, 8))(*bf16) for o in (plain, gated)]
    for g_plain, g_gated in zip(*grads):
        np.testing.assert_array_equal(np.asarray(g_plain, np.float32), np.asarray(g_gated, np.float32))


def test_gate_rows_receiver_runs_write_every_edge_of_stray_receivers():
    """With receiver runs, each program writes its run's per-edge gradients; padding edges whose
    receiver lies past the node table (no run; no batch built here has them) are written by the
    last receiver's program, right after its own run inside the same block, as zeros: their
    e @ W3 and e gradients are exactly 0, not left unwritten (the interpreter leaves unwritten
    rows NaN), and every other gradient is that of the same batch with those edges on the last
    node."""
    n_node, n_edge, n_real = 8, 90, 80
    args = random_rows_args(n_node, n_edge, 2, 16, n_real)
    stray = list(args)
    stray[4] = args[4].at[n_real + 5:].set(n_node)  # sorted still: past every receiver; the last keeps 5
    opts = KernelOptions(block_edges=16, sorted_sums=True, receiver_runs=True)
    w = jax.random.normal(jax.random.PRNGKey(9), (n_edge, 2, 48))
    grad = jax.grad(lambda *a: jnp.sum(fused_gate_rows(*a, opts=opts) * w), argnums=(0, 1, 2, 3, 7, 8))
    grads_stray = grad(*stray)
    for g, g_stray in zip(grad(*args), grads_stray):
        assert np.isfinite(np.asarray(g_stray)).all()
        np.testing.assert_allclose(g_stray, g, rtol=1e-6, atol=1e-6)
    assert not np.asarray(grads_stray[2][n_real:]).any() and not np.asarray(grads_stray[3][n_real:]).any()


def scatter_result_types(text: str) -> list[str]:
    """Element type of each stablehlo.scatter's result in lowered MLIR text."""
    out = []
    for m in re.finditer(r"stablehlo\.scatter\"", text):
        signature = re.search(r"\}\) : \([^)]*\) -> tensor<[^>]*x(\w+)>", text[m.end():])
        out.append(signature.group(1))
    return out


def gate_rows_shapes(n_node, n_edge, heads=4, c=128):
    """Shapes of `fused_gate_rows`' arguments at the model's head and channel counts (lowering tests)."""
    f32, i32, sds = jnp.float32, jnp.int32, jax.ShapeDtypeStruct
    return (sds((n_node, heads, 5 * c), f32), sds((n_node, heads, 4 * c), f32), sds((n_edge, heads, 3 * c), f32),
            sds((n_edge, heads, c), f32), sds((n_edge,), i32), sds((n_edge,), i32), sds((n_edge,), jnp.bool_),
            sds((3 * c,), f32), sds((3 * c,), f32))


@pytest.mark.parametrize("keep,sums,flags", [(False, "xla", ""), (True, "xla", ""), (False, "atomic", ""),
                                             (False, "sorted", ""), (False, "runs", ""), (False, "slots", ""),
                                             (True, "slots", "joint mres"), (False, "sorted", "joint"),
                                             (True, "sorted", "joint mres")])
def test_gate_rows_kernel_triton_lowering_inside_data_parallel_step(keep, sums, flags):
    """The kernel pair lowers for Triton inside the data-parallel step's shard_map (where a custom
    VJP's cotangents must vary over the mesh like its inputs), with each way of summing the
    node-table gradients; `flags`: "joint" (`joint_edge_projection`: e and ew3 as one array,
    given apart here and joined by `fused_gate_rows`), "mres" (`gated_residual`)."""
    shapes = gate_rows_shapes(256, 1024)
    kernel = lambda *a, opts: fused_gate_rows(*a, opts=dataclasses.replace(  # noqa: E731
        opts, keep_tiles=keep, atomic_grads=sums == "atomic", sorted_sums=sums in ("sorted", "runs", "slots"),
        receiver_runs=sums == "runs", receiver_slots=sums == "slots", gated_residual="mres" in flags,
        joint_edge_projection="joint" in flags))
    text = lower_grad_in_shard_map(kernel, shapes, n_sharded=7, argnums=(0, 2, 7))
    names = re.findall(r'name = "(\w+)"', text)
    bwd = {"atomic": "edge_gate_rows_bwd_atomic", "runs": "edge_gate_rows_bwd_runs",
           "slots": "edge_gate_rows_bwd_slots"}.get(sums, "edge_gate_rows_bwd")
    assert "edge_gate_rows_fwd" in names and bwd in names
    # the gathers' transposes: XLA's float scatter-adds, or none left for XLA (in the backward
    # kernel, or segment-sum kernels whose bounds come from integer scatter-adds of counts: two
    # (with "slots" the receivers' over their slots), or with "runs" one, for the senders)
    assert names.count("segment_rows") == {"sorted": 2, "runs": 1, "slots": 2}.get(sums, 0)
    assert text.count("xla.gpu.triton") == 2 + names.count("segment_rows")
    assert ("f32" in scatter_result_types(text)) == (sums == "xla")


@pytest.mark.parametrize("tile,form", [("16x8x4", ""), ("16x8x4", "-runs"), ("16x8", ""), ("16x8x8x4", "-slots"),
                                       ("16x8x4x2", "")])
def test_gate_rows_backward_warps_reach_the_backward_kernels(tile, form):
    """A tile's third number (`backward_warps`) sets the warps of the backward pass's kernels only:
    the gate's backward kernel and the segment kernels get it, the forward keeps the tile's warps;
    a fourth (`segment_warps`) sets the segment kernels' apart."""
    shapes = gate_rows_shapes(64, 256)
    opts = KernelOptions.parse(f"pallas_gate_rows-{tile}-sorted{form}", interpret=False)
    text = lower_for_gpu(jax.grad(lambda *a: jnp.sum(fused_gate_rows(*a, opts=opts) ** 2), argnums=(0,)), *shapes)
    warps = re.findall(r'name = "(\w+)", num_stages = \d+ : i32, num_warps = (\d+)', text)
    bwd = "edge_gate_rows_bwd" + {"-runs": "_runs", "-slots": "_slots"}.get(form, "")
    numbers = tile.split("x")[1:] + [""] * 2
    back = numbers[1] or numbers[0]
    segment = numbers[2] or back
    assert sorted(warps) == sorted([("edge_gate_rows_fwd", "8"), (bwd, back)]
                                   + [("segment_rows", segment)] * (1 if form == "-runs" else 2))


def test_recomputing_gate_matches_autodiff_with_gradients():
    """gate_recompute.gate_message (written backward) against JAX's autodiff of the same maths:
    values and the gradients of every float input, with padding edges and repeated nodes."""
    from dpf_jax.model.gate_recompute import gate_message, gate_message_reference

    rng = np.random.default_rng(1)
    n_node, n_edge, H, C = 12, 80, 2, 16
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    args = (f(n_node, H, 5 * C), f(n_node, H, 4 * C), f(n_edge, H, 3 * C), f(n_edge, H, C),
            jnp.asarray(np.sort(rng.integers(0, 10, n_edge)).astype(np.int32)),
            jnp.asarray(rng.integers(0, 10, n_edge).astype(np.int32)), jnp.arange(n_edge) < 75,
            1 + 0.2 * f(3 * C), 0.2 * f(3 * C))
    out = gate_message(*args)
    np.testing.assert_allclose(out, gate_message_reference(*args), rtol=1e-6, atol=1e-6)
    assert not np.any(np.asarray(out[75:]))  # padding edges carry no message
    cot = f(n_edge, H, 3 * C)
    grads = check_gradients(gate_message, gate_message_reference, args, (0, 1, 2, 3, 7, 8), cot)
    # padding edges holding NaN (ew3, e) change nothing: their gradients are exactly 0
    nan_args = (*args[:2], args[2].at[75:].set(jnp.nan), args[3].at[75:].set(jnp.nan), *args[4:])
    nan_grads = jax.grad(lambda *a: jnp.sum(gate_message(*a) * cot), argnums=(0, 1, 2, 3, 7, 8))(*nan_args)
    for g, g_nan in zip(grads, nan_grads):
        np.testing.assert_allclose(g_nan, g, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="send_tab"):
        gate_message(args[0], args[0], *args[2:])


def test_conv_recomputing_gate_equals_xla_on_devices():
    """MatformerConv with edge_kernel "xla_recompute" inside the data-parallel shard_map (4 fake
    devices, the layer-norm parameters' per-device gradients summed): the same loss and
    gradients as the "xla" path (autodiff) in the same step."""
    from jax.sharding import PartitionSpec as P

    from dpf_jax.train.parallel import make_mesh

    rng = np.random.default_rng(0)
    n_dev, n_node, n_edge, C, H = 4, 16, 64, 16, 2
    recv = np.concatenate([np.sort(rng.integers(0, 14, n_edge)) for _ in range(n_dev)]).astype(np.int32)
    send = rng.integers(0, 14, n_dev * n_edge).astype(np.int32)
    node_mask = np.tile(np.arange(n_node) < 14, n_dev)
    edge_mask = np.tile(np.arange(n_edge) < 60, n_dev)
    x = rng.standard_normal((n_dev * n_node, C)).astype(np.float32)
    ea = rng.standard_normal((n_dev * n_edge, 8)).astype(np.float32)
    args = tuple(map(jnp.asarray, (x, ea, send, recv, node_mask, edge_mask)))
    conv = {k: MatformerConv(C, H, axis_name="data", precision="highest", edge_kernel=k)
            for k in ("xla", "xla_recompute")}
    v = conv["xla"].init(jax.random.PRNGKey(3), *(a[:n_node] if i in (0, 4) else a[:n_edge] for i, a in
                                                  enumerate(args)), train=False)
    mesh = make_mesh(n_dev)

    def loss(params, kernel):
        def per_device(params, x, ea, s, r, nm, em):
            y, _ = conv[kernel].apply({**v, "params": params}, x, ea, s, r, nm, em, train=True,
                                      mutable=["batch_stats"])
            return jax.lax.psum(jnp.sum(jnp.where(nm[:, None], y, 0.0) ** 2), "data")
        return jax.shard_map(per_device, mesh=mesh, in_specs=(P(),) + (P("data"),) * 6, out_specs=P())(
            params, *args)

    got = {k: jax.jit(jax.value_and_grad(loss), static_argnums=1)(v["params"], k) for k in conv}
    np.testing.assert_allclose(got["xla_recompute"][0], got["xla"][0], rtol=1e-5)
    flat_x = jax.tree_util.tree_leaves(got["xla"][1])
    floor = 1e-6 * max(float(np.abs(g).max()) for g in flat_x)
    for (path, gr), gx in zip(jax.tree_util.tree_leaves_with_path(got["xla_recompute"][1]), flat_x):
        np.testing.assert_allclose(gr, gx, rtol=2e-4, atol=2e-4 * float(np.abs(gx).max()) + floor,
                                   err_msg=jax.tree_util.keystr(path))


def test_recomputing_gate_needs_the_node_formulation():
    args = (jnp.ones((4, 8)), jnp.ones((6, 8)), jnp.zeros(6, jnp.int32), jnp.zeros(6, jnp.int32),
            jnp.ones(4, bool), jnp.ones(6, bool))
    with pytest.raises(ValueError, match="needs formulation 'node'"):
        MatformerConv(8, 2, formulation="edge", edge_kernel="xla_recompute").init(jax.random.PRNGKey(0), *args,
                                                                                 train=False)


def test_auto_edge_kernel_resolves_per_backend(monkeypatch):
    """model.edge_kernel = "auto" (the configs' default): the row-gathering gate kernel on an
    NVIDIA GPU with the node formulation, a power-of-two width and a remat policy that names no
    jax.numpy-path tensors; jax.numpy everywhere else (no Pallas interpreter on a CPU)."""
    from dpf_jax.model import layers

    monkeypatch.setattr(layers, "_on_nvidia_gpu", lambda: False)  # a CPU, or a ROCm build
    assert layers.resolve_edge_kernel("auto") == "xla"
    assert layers.resolve_edge_kernel("pallas_gate-16x4") == "pallas_gate-16x4"
    monkeypatch.setattr(layers, "_on_nvidia_gpu", lambda: True)
    assert layers.resolve_edge_kernel("auto") == layers.EDGE_KERNEL_AUTO_GPU
    # per padded budget (n_node, n_edge): the small kernel below AUTO_SUM_MIN_EDGES, whatever the density
    big = layers.AUTO_SUM_MIN_EDGES
    for n_node in (big // 12, big // 30):
        assert layers.resolve_edge_kernel("auto", budget=(n_node, big)) == layers.EDGE_KERNEL_AUTO_GPU
    assert layers.resolve_edge_kernel("auto", budget=(1000, big - 1)) == layers.EDGE_KERNEL_AUTO_GPU_SMALL
    assert layers.resolve_edge_kernel("auto", budget=(100, big - 1)) == layers.EDGE_KERNEL_AUTO_GPU_SMALL
    assert layers.resolve_edge_kernel("auto", "edge", budget=(1000, 30000)) == "xla"
    assert layers.resolve_edge_kernel("pallas_gate-16x4", budget=(1000, 30000)) == "pallas_gate-16x4"
    small, large = (KernelOptions.parse(k) for k in (layers.EDGE_KERNEL_AUTO_GPU_SMALL, layers.EDGE_KERNEL_AUTO_GPU))
    assert (small.message_sum, large.message_sum, large.message_sum_slots) == (False, True, True)
    assert (small.receiver_slots, large.receiver_slots, large.receiver_runs) == (False, True, False)
    # session 28: the large budgets' backward reads the forward's output, e and e @ W3 come as one array
    assert (large.keep_tiles, large.joint_edge_projection, large.gated_residual) == (True, True, True)
    # session 29: the small budgets' kernel with the same three flags
    assert (small.keep_tiles, small.joint_edge_projection, small.gated_residual) == (True, True, True)
    described = layers.describe_auto_edge_kernel(layers.EDGE_KERNEL_AUTO_GPU)
    assert layers.EDGE_KERNEL_AUTO_GPU in described and layers.EDGE_KERNEL_AUTO_GPU_SMALL in described
    assert layers.describe_auto_edge_kernel("xla") == "xla"
    assert layers.resolve_edge_kernel("auto", "node", 64, "dots") == layers.EDGE_KERNEL_AUTO_GPU
    assert layers.resolve_edge_kernel("auto", "edge") == "xla"
    assert layers.resolve_edge_kernel("auto", "node", 96) == "xla"  # the kernel's tiles want 2^k channels
    for policy in layers.NAMED_EDGE_TENSOR_POLICIES:
        assert layers.resolve_edge_kernel("auto", "node", 128, policy) == "xla"
    from dpf_jax.model.matformer import REMAT_POLICIES

    assert set(layers.NAMED_EDGE_TENSOR_POLICIES) < set(REMAT_POLICIES)
    from configs.base import get_config

    assert get_config().model.edge_kernel == "auto"


def test_on_nvidia_gpu_reads_the_backend(monkeypatch):
    from dpf_jax.model import layers

    assert layers._on_nvidia_gpu() == (jax.default_backend() == "gpu" and "rocm" not in
                                       str(jax.devices()[0].client.platform_version).lower())
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "cpu")
    assert not layers._on_nvidia_gpu()
