"""dpf_jax.model.message_sum_kernel: msg_layer_1 (LayerNorm_C), the edge weights and the receivers'
sums in one kernel pair, against brute force and jax.numpy, values and gradients.

On CPU the kernels run in Pallas' interpreter (their maths); their Triton lowering is checked too
(only the final compilation to GPU code needs a GPU)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_gpu, random_conv_inputs

from dpf_jax.model.edge_kernel import KernelOptions
from dpf_jax.model.layers import MatformerConv
from dpf_jax.model.message_sum_kernel import fused_message_sum, message_sum_reference


def random_case(n_node, n_edge, heads, c, n_real, seed=0):
    """Sorted receivers (node 0 and the last two have no edges, node 3 has 50: several blocks),
    edge counts 1-3, padding edges (weight 0) at the end whose pre holds NaN and inf."""
    rng = np.random.default_rng(seed)
    recv = np.sort(np.concatenate([rng.integers(1, n_node - 2, n_edge - 50), np.full(50, 3)])).astype(np.int32)
    pre = (3.0 * rng.standard_normal((n_edge, heads, c)) + 0.5).astype(np.float32)
    weight = rng.integers(1, 4, n_edge).astype(np.float32)
    weight[n_real:] = 0.0
    pre[n_real:][::2] = np.nan
    pre[n_real + 1:][::2] = np.inf
    b0, scale, bias = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
    return tuple(map(jnp.asarray, (pre, b0, scale, bias, weight, recv)))


def brute_force(pre, b0, scale, bias, weight, recv, n_node):
    """The layer's maths edge by edge in float64."""
    pre, b0, scale, bias, weight = (np.asarray(a, np.float64) for a in (pre, b0, scale, bias, weight))
    out = np.zeros((n_node,) + pre.shape[1:])
    for e, i in enumerate(np.asarray(recv)):
        if weight[e] == 0:
            continue
        x = pre[e] + b0
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + bias
        out[i] += weight[e] * y
    return out


@pytest.mark.parametrize("block,slots", [(16, False), (32, False), (16, True), (32, True)])
def test_values_and_gradients_against_brute_force_and_jax_numpy(block, slots):
    """One program per receiver, or per edge block (`slots`); 150 edges: not a whole number of blocks."""
    n_node, n_edge, heads, c, n_real = 11, 150, 2, 16, 140
    args = random_case(n_node, n_edge, heads, c, n_real)
    opts = KernelOptions(block_edges=block, interpret=True, message_sum=slots, message_sum_slots=slots)
    out = fused_message_sum(*args, n_node, opts)
    assert out.shape == (n_node, heads, c) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, brute_force(*args, n_node), rtol=1e-5, atol=1e-4)
    assert not np.asarray(out[0]).any() and not np.asarray(out[-2:]).any()  # no edges: exactly 0

    cot = jax.random.normal(jax.random.PRNGKey(1), out.shape)
    grad = lambda f, a: jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2, 3))(*a)  # noqa: E731
    # jax.numpy's gradient is NaN on the padding rows (0 x NaN in the LayerNorm's backward): it
    # runs on the same batch with those rows zeroed, which changes nothing else
    clean = (args[0].at[n_real:].set(0.0),) + args[1:]
    grads = {"kernel": grad(lambda *a: fused_message_sum(*a, n_node, opts), args),
             "jnp": grad(lambda *a: message_sum_reference(*a, n_node), clean)}
    for g, ref in zip(grads["kernel"], grads["jnp"]):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    d_pre = np.asarray(grads["kernel"][0])
    assert not d_pre[n_real:].any() and np.abs(d_pre[:n_real]).min(axis=-1).max() > 0  # padding: exactly 0


@pytest.mark.parametrize("slots", [False, True])
def test_edges_past_the_table_get_zero_gradients_and_add_nothing(slots):
    """Receivers past the node table (no batch built here has them) count nowhere; their rows of
    d pre are still written, as zeros, by the last receiver's program (the interpreter would leave
    an unwritten row NaN), or by their own block's (`slots`)."""
    n_node, n_edge, heads, c = 8, 90, 2, 16
    pre, b0, scale, bias, weight, recv = random_case(n_node, n_edge, heads, c, n_edge, seed=2)
    stray = recv.at[80:].set(n_node)  # still sorted; 10 edges point past the table
    opts = KernelOptions(block_edges=16, interpret=True, message_sum=slots, message_sum_slots=slots)
    f = lambda p, r: fused_message_sum(p, b0, scale, bias, weight, r, n_node, opts)  # noqa: E731
    np.testing.assert_allclose(f(pre, stray), message_sum_reference(pre, b0, scale, bias, weight, stray, n_node),
                               rtol=1e-5, atol=1e-4)
    d_pre = jax.grad(lambda p: jnp.sum(f(p, stray) ** 2))(pre)
    assert np.isfinite(np.asarray(d_pre)).all() and not np.asarray(d_pre[80:]).any()
    assert np.abs(np.asarray(d_pre[:80])).sum() > 0


def test_bad_shapes_and_empty_inputs():
    args = random_case(6, 60, 1, 16, 60)
    opts = KernelOptions(block_edges=16, interpret=True)
    with pytest.raises(ValueError, match="weight, receivers"):
        fused_message_sum(args[0], *args[1:4], args[4][:5], args[5], 6, opts)
    with pytest.raises(ValueError, match="powers of two"):
        fused_message_sum(jnp.zeros((4, 1, 24)), *(jnp.zeros(24),) * 3, jnp.ones(4), jnp.zeros(4, jnp.int32), 2, opts)
    out = fused_message_sum(jnp.zeros((0, 2, 16)), *(jnp.zeros(16),) * 3, jnp.ones(0), jnp.zeros(0, jnp.int32), 3,
                            opts)
    assert out.shape == (3, 2, 16) and not out.any()
    out = fused_message_sum(jnp.zeros((5, 2, 16)), *(jnp.zeros(16),) * 3, jnp.ones(5), jnp.zeros(5, jnp.int32), 0,
                            opts)
    assert out.shape == (0, 2, 16)


def test_a_layer_without_nodes_or_edges():
    """MatformerConv with the message-sum kernels on an empty batch: empty outputs, no error."""
    conv = MatformerConv(16, 2, edge_kernel="pallas_gate_rows-16x4-sorted-sum")
    for n_node, n_edge in ((0, 0), (3, 0)):
        args = (jnp.zeros((n_node, 16)), jnp.zeros((n_edge, 8)), jnp.zeros(n_edge, jnp.int32),
                jnp.zeros(n_edge, jnp.int32), jnp.ones(n_node, bool), jnp.ones(n_edge, bool))
        variables = conv.init(jax.random.PRNGKey(0), *args, train=False)
        assert conv.apply(variables, *args, train=False).shape == (n_node, 16)


@pytest.mark.parametrize("slots", [False, True])
def test_runs_stacked_by_vmap_give_each_runs_sums_and_gradients(slots):
    """Multirun (dpf_jax.train.multirun) vmaps the step over independent runs: under vmap the
    kernel pair gives each run its own sums and gradients."""
    cases = [random_case(9, 80, 2, 16, 72, seed=s) for s in (6, 7)]
    stacked = [jnp.stack(x) for x in zip(*cases)]
    opts = KernelOptions(block_edges=16, interpret=True, message_sum=slots, message_sum_slots=slots)
    cot = jax.random.normal(jax.random.PRNGKey(2), (9, 2, 16))

    def value_and_grads(*a):
        return jax.value_and_grad(lambda *b: jnp.sum(fused_message_sum(*b, 9, opts) * cot), argnums=(0, 1, 2, 3))(*a)

    values, grads = jax.vmap(value_and_grads)(*stacked)
    for r, case in enumerate(cases):
        value, grad = value_and_grads(*case)
        np.testing.assert_allclose(values[r], value, rtol=1e-5)
        for g, ref in zip(grads, grad):
            np.testing.assert_allclose(g[r], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["pallas_gate_rows-16x4-sorted-sum", "pallas_gate_rows-16x4-sorted-runs-sum",
                                    "pallas_gate_rows-16x4-sorted-slots-slotsum"])
def test_conv_with_the_message_sum_equals_xla_with_merged_edge_counts(kernel):
    """MatformerConv with the kernel pair against the "xla" path on a batch with merged edges
    (edge counts 1-3) and padding edges: same parameter tree, loss and gradients."""
    C, H = 16, 2
    args = random_conv_inputs(4, channels=C)
    count = jnp.asarray(np.random.default_rng(5).integers(1, 4, args[1].shape[0]).astype(np.float32))
    convs = {k: MatformerConv(C, H, precision="highest", edge_kernel=k) for k in ("xla", kernel)}
    variables = {k: c.init(jax.random.PRNGKey(3), *args, train=False, edge_count=count) for k, c in convs.items()}
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, *variables.values()))
    v = variables["xla"]

    def loss(params, conv, x):
        y, _ = conv.apply({**v, "params": params}, x, *args[1:], train=True, edge_count=count,
                          mutable=["batch_stats"])
        return jnp.sum(jnp.where(args[4][:, None], y, 0.0) ** 2)

    (lx, gx), (lk, gk) = (jax.value_and_grad(loss, argnums=(0, 2))(v["params"], c, args[0]) for c in convs.values())
    np.testing.assert_allclose(lk, lx, rtol=1e-5)
    floor = 1e-6 * max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(gx))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gk), jax.tree_util.tree_leaves(gx)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(np.abs(b).max()) + floor,
                                   err_msg=jax.tree_util.keystr(path))


def message_sum_shapes(n_node, n_edge, heads=4, c=128):
    f32, sds = jnp.float32, jax.ShapeDtypeStruct
    return (sds((n_edge, heads, c), f32), sds((c,), f32), sds((c,), f32), sds((c,), f32), sds((n_edge,), f32),
            sds((n_edge,), jnp.int32))


@pytest.mark.parametrize("form", ["sum", "slotsum"])
def test_triton_lowering_inside_data_parallel_step_with_its_warps(form):
    """Lowered for the GPU inside the data-parallel shard_map (per-device edges, replicated
    parameters whose gradients autodiff sums): one forward and one backward Triton kernel (with
    "slotsum" also the segment kernel adding the slots, with the segment warps), no float
    scatter-add left to XLA, the forward with the tile's warps and the backward with the
    backward warps."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    n_node = 128  # per device
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    opts = KernelOptions.parse(f"pallas_gate_rows-16x8x4x2-sorted-{form}", interpret=False)
    specs = (P("data"), P(), P(), P(), P("data"), P("data"))

    def per_device(pre, b0, scale, bias, weight, recv):
        return jax.lax.psum(jnp.sum(fused_message_sum(pre, b0, scale, bias, weight, recv, n_node, opts) ** 2), "data")

    loss = lambda *a: jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P())(*a)  # noqa: E731
    text = lower_for_gpu(jax.grad(loss, argnums=(0, 1, 2, 3)), *message_sum_shapes(2 * n_node, 2 * 1024))
    warps = re.findall(r'name = "(\w+)", num_stages = \d+ : i32, num_warps = (\d+)', text)
    if form == "sum":
        assert sorted(warps) == [("message_sum_bwd", "4"), ("message_sum_fwd", "8")]
    else:
        assert sorted(warps) == [("message_sum_slots_bwd", "4"), ("message_sum_slots_fwd", "8"), ("segment_rows", "2")]
    assert text.count("xla.gpu.triton") == len(warps)
    # no float scatter-add left to XLA: the only scatters are segment_bounds' integer counts
    scatters = re.findall(r"stablehlo\.scatter\".*?-> tensor<[^>]*x(\w+)>", text, flags=re.S)
    assert scatters and set(scatters) == {"i32"}
