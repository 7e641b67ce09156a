"""MatformerConv's attention gate in jax.numpy with a written backward that recomputes.

Per edge e = (j -> i) and head h ("node" formulation, C = channels, inv = 1 / sqrt(3C)), from
the node tables recv_tab = [q | q*k | v W1 + b] ([N, H, 5C]) and send_tab = [k | v W2]
([N, H, 4C]), gathered at the receiver i and the sender j, and the per-edge ew3 = e @ W3
([E, H, 3C]) and e ([E, H, C]):

    alpha = [qk_ii | q_i * k_j | q_i * e] * inv                                    [3C]
    m     = mask * (vm_i + vm_j + ew3) * sigmoid(LayerNorm_3C(alpha))               [3C]

Why (scripts/results/PERF_NOTES.md, session 9): the training step is bound by memory traffic
over per-edge [E, H, 3C] float32 tensors. JAX's autodiff of this chain keeps six of them per
edge and layer for the backward (alpha, its normalised form, the gate, ...:
scripts/saved_residuals.py), and the GPU program writes and reads them again around the
LayerNorm's reductions. Here the forward keeps only its inputs, which exist anyway (the node
tables are per node, e and ew3 are matmul operands/results), and the backward recomputes
alpha, the LayerNorm statistics and the gate from them and writes the gradients of its inputs
directly (node tables through two segment sums, as autodiff's gather transposes do). Unlike
the Pallas kernels (`gate_kernel.py`, which reads gathered tables XLA had to write out), this
is plain jax.numpy: XLA still fuses the gathers into their consumers. Same maths as the "xla"
path, float32 inside; `model.edge_kernel = "xla_recompute"`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dpf_jax.model.edge_kernel import _make_varying, _varying_axes

EPSILON = 1e-5  # torch.nn.LayerNorm's


def gate_terms(r, s, ew3, e, ln1_scale, ln1_bias):
    """From the gathered rows r = recv_tab[i] [E, H, 5C] and s = send_tab[j] [E, H, 4C], ew3 and
    e, in float32: q_i, k_j, e, LayerNorm's 1/std and normalised alpha, the gate, upd."""
    f32 = jnp.float32
    c = e.shape[-1]
    r, s, e = r.astype(f32), s.astype(f32), e.astype(f32)
    q, qk, vm_i = r[..., :c], r[..., c:2 * c], r[..., 2 * c:]
    k, vm_j = s[..., :c], s[..., c:]
    alpha = jnp.concatenate([qk, q * k, q * e], axis=-1) * (1.0 / math.sqrt(3 * c))
    d = alpha - alpha.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt((d * d).mean(-1, keepdims=True) + EPSILON)
    ahat = d * rstd
    gate = jax.nn.sigmoid(ahat * ln1_scale + ln1_bias)
    return q, k, e, rstd, ahat, gate, vm_i + vm_j + ew3.astype(f32)


def gate_reference(r, s, ew3, e, mask, ln1_scale, ln1_bias):
    """The gated message in jax.numpy, masked, from the gathered rows. Shapes: r [E, H, 5C],
    s [E, H, 4C], ew3 [E, H, 3C], e [E, H, C], mask [E]; ln1_* [3C]. Returns [E, H, 3C] in ew3's
    dtype, computed in float32 from the inputs as given, like the Pallas gate kernels
    (`gate_kernel.py`). (MatformerConv's "xla" path computes the same in float32; with bfloat16
    inputs it rounds the alpha products and upd to bfloat16 before the LayerNorm, this does not:
    results differ by about one bfloat16 step.)"""
    *_, gate, upd = gate_terms(r, s, ew3, e, ln1_scale, ln1_bias)
    return jnp.where(mask.astype(bool)[:, None, None], upd * gate, 0.0).astype(ew3.dtype)


def _gathered(recv_tab, send_tab, receivers, senders):
    """The node tables' rows at the receivers and senders, with the same gathers as
    dpf_jax.model.layers.gather (float32 rows, indices promised in bounds)."""
    return (recv_tab.astype(jnp.float32).at[receivers].get(mode="promise_in_bounds"),
            send_tab.astype(jnp.float32).at[senders].get(mode="promise_in_bounds"))


def _gate_terms(recv_tab, send_tab, ew3, e, receivers, senders, ln1_scale, ln1_bias):
    """`gate_terms` of the node tables gathered at the receivers and senders (`_gathered`)."""
    return gate_terms(*_gathered(recv_tab, send_tab, receivers, senders), ew3, e, ln1_scale, ln1_bias)


def gate_message_reference(recv_tab, send_tab, ew3, e, receivers, senders, mask, ln1_scale, ln1_bias):
    """`gate_reference` of the node tables gathered at the receivers and senders; JAX's
    autodiff for the backward."""
    return gate_reference(*_gathered(recv_tab, send_tab, receivers, senders), ew3, e, mask, ln1_scale, ln1_bias)


@jax.custom_vjp
def _gate_message(recv_tab, send_tab, ew3, e, receivers, senders, mask, ln1_scale, ln1_bias):
    return gate_message_reference(recv_tab, send_tab, ew3, e, receivers, senders, mask, ln1_scale, ln1_bias)


def _forward(*args):
    return _gate_message(*args), args  # residuals: the inputs only


def _backward(args, dm):
    recv_tab, send_tab, ew3, e, receivers, senders, mask, ln1_scale, ln1_bias = args
    c = e.shape[-1]
    q, k, e32, rstd, ahat, gate, upd = _gate_terms(recv_tab, send_tab, ew3, e, receivers, senders,
                                                   ln1_scale, ln1_bias)
    real = mask.astype(bool)[:, None, None]
    masked = lambda x: jnp.where(real, x, 0.0)  # noqa: E731  (a padding edge's gradients are exactly 0)
    dm = masked(dm.astype(jnp.float32))
    dupd = masked(dm * gate)
    dz = dm * upd * gate * (1.0 - gate)  # d(pre-sigmoid)
    dah = dz * ln1_scale
    # LayerNorm_3C backward, then alpha = [qk | q*k | q*e] * inv
    dalpha = rstd * (dah - dah.mean(-1, keepdims=True) - ahat * (dah * ahat).mean(-1, keepdims=True))
    dalpha = masked(dalpha * (1.0 / math.sqrt(3 * c)))
    dqk, da_k, da_e = dalpha[..., :c], dalpha[..., c:2 * c], dalpha[..., 2 * c:]
    # the gathers' transposes, as autodiff writes them: float32 scatter-adds, no sortedness hint
    # (slow on the GPU with one: dpf_jax.model.layers.gather)
    d_recv = jnp.zeros(recv_tab.shape, jnp.float32).at[receivers].add(
        jnp.concatenate([masked(da_k * k + da_e * e32), dqk, dupd], axis=-1), mode="promise_in_bounds")
    d_send = jnp.zeros(send_tab.shape, jnp.float32).at[senders].add(
        jnp.concatenate([masked(da_k * q), dupd], axis=-1), mode="promise_in_bounds")
    zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731  (integer / bool inputs)
    return (d_recv.astype(recv_tab.dtype), d_send.astype(send_tab.dtype), dupd.astype(ew3.dtype),
            masked(da_e * q).astype(e.dtype), zero(receivers), zero(senders), zero(mask),
            jnp.sum(masked(dz * ahat), axis=(0, 1)).astype(ln1_scale.dtype),
            jnp.sum(masked(dz), axis=(0, 1)).astype(ln1_bias.dtype))


_gate_message.defvjp(_forward, _backward)


def gate_message(recv_tab, send_tab, ew3, e, receivers, senders, mask, ln1_scale, ln1_bias):
    """`gate_message_reference` with the recomputing backward. Shapes: recv_tab [N, H, 5C],
    send_tab [N, H, 4C], ew3 [E, H, 3C], e [E, H, C], receivers / senders [E] (in [0, N)),
    mask [E]; ln1_* [3C]. Returns [E, H, 3C] in ew3's dtype."""
    c = e.shape[-1]
    if recv_tab.shape[-1] != 5 * c or send_tab.shape[-1] != 4 * c or ew3.shape[-1] != 3 * c:
        raise ValueError(f"gate_message: recv_tab [..., {5 * c}], send_tab [..., {4 * c}], ew3 [..., {3 * c}] "
                         f"expected, got {recv_tab.shape}, {send_tab.shape}, {ew3.shape}")
    # inside shard_map the replicated LayerNorm parameters meet per-device edges: mark them
    # varying, so their per-device gradients are summed over devices by autodiff
    axes = tuple(sorted(set().union(*(_varying_axes(a) for a in (recv_tab, send_tab, ew3, e)))))
    ln1_scale, ln1_bias = (_make_varying(p, axes) for p in (ln1_scale, ln1_bias))
    return _gate_message(recv_tab, send_tab, ew3, e, receivers, senders, mask, ln1_scale, ln1_bias)
