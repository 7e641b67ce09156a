"""Sums over the rows of [rows, features] arrays in two stages, and row broadcasts whose
gradient sums that way.

Why: a bias or BatchNorm parameter broadcast over the N nodes (or E edges) of a batch has as
gradient the sum of the rows of an [N, F] array, and XLA's GPU backend reduces such a column in
one pass, one thread block per tile of columns walking every row: with 128 columns that is a
handful of blocks on a GPU of 132 SMs. Traced on one H200 (session 30, issue #9's synthetic
fine-tuning step, B=256): the BatchNorm backward's fusions took ~31 us each for a [2752, 128]
array, the node projections' bias gradient 28 us for [2752, 1664], each a few us of memory
traffic. Summing groups of rows first ([N / g, g, F] -> [N / g, F], one block per group and
column tile) and then the partial sums spreads the work over the whole GPU.

In the step (one H200, session 30, one machine, a process each): the synthetic step 18.06 ->
17.77 ms, real pre-training at B=256 6.93 -> 6.77 ms; the first-epoch pre-training loss curve
stays within 3.0e-5 (first 10 steps) / 7.9e-5 (all 106) of the one-pass sums'. The sums
associate differently from one pass (float32 rounding); the values are the same sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dpf_jax.model.edge_kernel import _make_varying, _varying_axes

# rows summed by the first stage (the largest of these dividing the row count; none: one pass)
ROW_GROUPS = (32, 16, 8)


def _group(rows: int) -> int | None:
    return next((g for g in ROW_GROUPS if rows % g == 0 and rows > g), None)


def column_sum(x: jax.Array) -> jax.Array:
    """x.sum(axis=0) in float32 (cast back to x's dtype), as two reductions: groups of rows,
    then the groups' sums. `optimization_barrier` keeps XLA from folding them back into one."""
    rows = x.shape[0]
    xf = x.astype(jnp.float32)
    group = _group(rows)
    if group is None:
        return jnp.sum(xf, axis=0).astype(x.dtype)
    partial = jnp.sum(xf.reshape((rows // group, group) + x.shape[1:]), axis=1)
    return jnp.sum(jax.lax.optimization_barrier(partial), axis=0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_rows(v: jax.Array, rows: int) -> jax.Array:
    return jnp.broadcast_to(v, (rows,) + v.shape)


def _broadcast_rows_fwd(v, rows):
    return _broadcast_rows(v, rows), None


def _broadcast_rows_bwd(rows, _, g):
    return (column_sum(g),)


_broadcast_rows.defvjp(_broadcast_rows_fwd, _broadcast_rows_bwd)


def _varying_like(v: jax.Array, x: jax.Array) -> jax.Array:
    """v marked as varying over the mesh axes that x varies over (inside `shard_map`; elsewhere,
    and on JAX without varying-axis types, v itself).

    Why: a replicated parameter meeting per-device data is made varying where they meet, and
    the gradient's all-reduce sits where that happened. Left to the add, it happens on the
    broadcast [rows, F] array, so the cotangent is all-reduced before `column_sum` (whose
    barrier keeps XLA from moving the all-reduce past the sums): in CPU compiles of the
    four-device step a [rows, F] all-reduce per bias and BatchNorm parameter instead of its [F]
    gradient (session 30; the GPU program was not inspected). Marked here, on v, the
    all-reduce is of [F]. (The kernels' own helpers, which mark their parameters the same way.)"""
    return _make_varying(v, _varying_axes(x))


def broadcast_rows(v: jax.Array, like: jax.Array) -> jax.Array:
    """v [F...] repeated as the rows of `like` ([rows, F...]), to combine with it; its gradient
    is `column_sum` of the cotangent (instead of XLA's one-pass reduction). Reverse mode only:
    a `custom_vjp` (the training step differentiates in reverse; jvp / jacfwd through it fail)."""
    if v.shape != like.shape[1:]:
        raise ValueError(f"broadcast_rows: a vector of shape {v.shape} for rows of shape {like.shape[1:]}")
    return _broadcast_rows(_varying_like(v, like), like.shape[0])


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y + bias over y's last axis (any leading axes), the bias gradient by `column_sum`."""
    flat = y.reshape(-1, y.shape[-1])
    return (flat + broadcast_rows(bias.astype(y.dtype), flat)).reshape(y.shape)
