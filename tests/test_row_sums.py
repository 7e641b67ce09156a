"""Two-stage sums over rows (dpf_jax/model/row_sums.py): the same sums as numpy's, gradients of
the row broadcast and bias add, and the two stages surviving XLA's simplifier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import all_reduced_elements
from dpf_jax.model.row_sums import add_bias, broadcast_rows, column_sum


@pytest.mark.parametrize("shape", [(2752, 128), (2944, 4, 96), (96, 7), (37, 5), (8, 3)])
def test_column_sum_equals_the_float64_sum(shape):
    """Row counts divisible by a group (two stages) and not (37: one pass; 8: a single group)."""
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = np.asarray(jax.jit(column_sum)(x))
    assert got.shape == shape[1:] and got.dtype == np.float32
    np.testing.assert_allclose(got, x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)


def test_column_sum_of_bfloat16_sums_in_float32():
    """bf16 rows are summed in float32 and rounded once: 4096 rows of 1 + 2^-7 (exact in bf16)
    sum to 4128 (exact in bf16 too), which a bf16 running sum could not reach."""
    x = jnp.full((4096, 3), 1.0 + 2.0 ** -7, jnp.bfloat16)
    got = column_sum(x)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.float32(4128.0))


def test_two_stages_stay_two_reductions_after_compilation():
    """optimization_barrier keeps XLA from folding the group sums and their sum into one reduce."""
    x = jnp.ones((2752, 128), jnp.float32)
    text = jax.jit(column_sum).lower(x).compile().as_text()
    assert text.count(" reduce(") >= 2, text[:3000]


def test_bias_and_row_broadcast_gradients_are_the_row_sums():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(96, 4, 16)).astype(np.float32)
    b = rng.normal(size=(16,)).astype(np.float32)
    w = rng.normal(size=(96, 4, 16)).astype(np.float32)

    def loss(bias, y):
        return jnp.sum(w * jnp.sin(add_bias(y, bias)))

    g_bias, g_y = jax.jit(jax.grad(loss, argnums=(0, 1)))(b, y)
    cot = w * np.cos(y + b)
    np.testing.assert_allclose(np.asarray(add_bias(y, b)), y + b, rtol=1e-6)
    np.testing.assert_allclose(g_bias, cot.astype(np.float64).sum((0, 1)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_y, cot, rtol=1e-5, atol=1e-6)

    v = rng.normal(size=(2, 5)).astype(np.float32)  # under vmap (trained runs stacked on an axis)
    rows = jnp.arange(64.0)[:, None] * jnp.ones((64, 5))
    g = jax.vmap(jax.grad(lambda v: jnp.sum(rows * broadcast_rows(v, rows))))(v)
    np.testing.assert_allclose(g, np.full((2, 5), np.arange(64.0).sum()), rtol=1e-6)
    with pytest.raises(ValueError, match="a vector of shape"):
        broadcast_rows(v[0], jnp.ones((64, 4, 5)))  # [F] against [rows, H, F]: not what it repeats


def test_bias_gradient_all_reduces_the_bias_not_its_rows():
    """A replicated bias added to per-device rows (inside shard_map, 4 devices): the gradient's
    all-reduce is of the [F] bias gradient. Marked varying only at the add, the bias would have
    its cotangent all-reduced as [rows, F] (the barrier of the two-stage sum stops XLA from
    moving the all-reduce past the sums)."""
    from jax.sharding import PartitionSpec as P

    from dpf_jax.train.parallel import AXIS, make_mesh, shard_map

    assert len(jax.devices()) >= 4, "conftest sets 4 fake CPU devices"
    mesh = make_mesh(4)
    x = jnp.arange(4 * 96 * 16, dtype=jnp.float32).reshape(4 * 96, 16) / 1000.0
    b = jnp.linspace(0.0, 1.0, 16)

    def loss(add):
        return shard_map(lambda b, x: jax.lax.psum(jnp.sum(add(x, b) ** 2), AXIS), mesh,
                         in_specs=(P(), P(AXIS)), out_specs=P())

    grad = jax.jit(jax.grad(loss(add_bias)))
    sizes = all_reduced_elements(grad.lower(b, x).compile().as_text())
    assert sizes and max(sizes) == 16, sizes
    np.testing.assert_allclose(grad(b, x), jax.grad(loss(lambda x, b: x + b))(b, x), rtol=1e-5)
