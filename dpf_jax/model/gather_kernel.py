"""MatformerConv's per-edge work with the gathers inside the kernels ("node" formulation).

`dpf_jax.model.edge_kernel` fuses the chain after the gathers; XLA still writes the gathered
per-edge tables ([E, H, 9C]), e @ W3 and upd ([E, H, 3C] each) to memory and reads them back.
Here the kernels read the node tables themselves, row by row through the edge indices (a
node's row is read by its ~25 edges, mostly from L2), and compute e @ W3 in registers:

    recv_tab [N, H, 5C] = [q | q*k | v W1 + b],  send_tab [N, H, 4C] = [k | v W2]   (per node)
    per edge (i = receiver, j = sender), head h, with inv = 1 / sqrt(3C):
        alpha = [qk_i | q_i * k_j | q_i * e] * inv
        upd   = vm_i + vm_j + e @ W3
        y     = mask * LayerNorm_C((upd * sigmoid(LayerNorm_3C(alpha))) @ W0 + b0)

The forward reads e and writes y per edge (2 HC floats, HC = heads x channels) plus the table
rows; the backward writes the per-edge table gradients d_recv [E, H, 5C] and d_send [E, H, 4C]
(summed into the nodes by XLA scatter-adds, as the gathers' own transposes would), d_e, and
what the weight gradients need (m, d_upd, d_acc: one XLA matmul each). Same maths as
`node_message_reference` (tested, values and gradients).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dpf_jax.model.edge_kernel import (BlockTiles, KernelOptions, _compiler_params, _dot, _make_varying, _masked,
                                       _out_struct, _pad_edges, _varying_axes, chain_backward, chain_forward,
                                       edge_message_reference)


def node_message_reference(recv_tab, send_tab, e, receivers, senders, mask, w3, ln1_scale, ln1_bias, w0, b0,
                           ln2_scale, ln2_bias, precision=None):
    """The same in jax.numpy: gathers, then `edge_message_reference`. float32 [E, H, C]."""
    c = e.shape[-1]
    f32 = jnp.float32
    r = recv_tab.astype(f32)[receivers]
    s = send_tab.astype(f32)[senders]
    upd = r[..., 2 * c:] + s[..., c:] + jnp.einsum("ehc,cd->ehd", e.astype(f32), w3, precision=precision)
    return edge_message_reference(r[..., c:2 * c], r[..., :c], s[..., :c], e, upd, mask, ln1_scale, ln1_bias,
                                  w0, b0, ln2_scale, ln2_bias, precision=precision)


# ------------------------------------------------------------------------------------ kernels

class GatherTiles(BlockTiles):
    """`edge_kernel.BlockTiles` read from the node tables through the block's edge indices
    (`tab_ref[rows, h, chunk]`: a [BE, C] gather load), with upd = vm_i + vm_j + e @ W3
    computed in registers."""

    def __init__(self, recv_ref, send_ref, e_ref, rt_ref, st_ref, w3_ref, c, inv, allow_tf32):
        from jax.experimental import pallas as pl

        self.pl = pl
        self.h = pl.program_id(1)
        self.r, self.s = recv_ref[...], send_ref[...]  # [BE] node rows of this block's edges
        self.e_ref, self.rt, self.st, self.w3_ref = e_ref, rt_ref, st_ref, w3_ref
        self.c, self.inv, self.allow_tf32 = c, inv, allow_tf32

    def _row(self, tab, rows, chunk):
        return tab[rows, self.h, self.pl.ds(chunk * self.c, self.c)].astype(jnp.float32)

    def q(self):
        return self._row(self.rt, self.r, 0)

    def qk(self):
        return self._row(self.rt, self.r, 1)

    def k(self):
        return self._row(self.st, self.s, 0)

    def w3(self, kk):
        return self.w3_ref[:, self.pl.ds(kk * self.c, self.c)].astype(jnp.float32)

    def upd(self, kk):
        ew3 = _dot(self.e(), self.w3(kk), allow_tf32=self.allow_tf32)
        return self._row(self.rt, self.r, 2 + kk) + self._row(self.st, self.s, 1 + kk) + ew3


def _fwd_kernel(recv_ref, send_ref, mask_ref, e_ref, rt_ref, st_ref, w3_ref, g1_ref, b1_ref, w0_ref, b0_ref,
                g2_ref, b2_ref, y_ref, *, c, inv, allow_tf32):
    t = GatherTiles(recv_ref, send_ref, e_ref, rt_ref, st_ref, w3_ref, c, inv, allow_tf32)
    chain_forward(t, mask_ref, g1_ref, b1_ref, w0_ref, b0_ref, g2_ref, b2_ref, y_ref, c, allow_tf32)


def _bwd_kernel(recv_ref, send_ref, mask_ref, e_ref, rt_ref, st_ref, w3_ref, g1_ref, b1_ref, w0_ref, b0_ref,
                g2_ref, b2_ref, dy_ref, dr_ref, ds_ref, de_ref, m_ref, dupd_ref, dacc_ref, part_ref,
                *, c, inv, allow_tf32):
    from jax.experimental import pallas as pl

    t = GatherTiles(recv_ref, send_ref, e_ref, rt_ref, st_ref, w3_ref, c, inv, allow_tf32)
    de_parts = []

    def store_dupd(kk, dupd):  # d_upd feeds both tables' value parts and, through W3, e
        dupd_ref[:, pl.ds(kk * c, c)] = dupd.astype(dupd_ref.dtype)
        dr_ref[:, pl.ds((2 + kk) * c, c)] = dupd.astype(dr_ref.dtype)
        ds_ref[:, pl.ds((1 + kk) * c, c)] = dupd.astype(ds_ref.dtype)
        de_parts.append(_dot(dupd, t.w3(kk), trans_b=True, allow_tf32=allow_tf32))

    da = chain_backward(t, mask_ref, g1_ref, b1_ref, w0_ref, b0_ref, g2_ref, b2_ref, dy_ref, m_ref, dacc_ref,
                        part_ref, c, inv, allow_tf32, store_dupd)
    q, k, e = t.q(), t.k(), t.e()  # alpha = [qk_i | q_i*k_j | q_i*e] * inv
    dr_ref[:, pl.ds(0, c)] = _masked(mask_ref, da[1] * k + da[2] * e).astype(dr_ref.dtype)  # d q_i
    dr_ref[:, pl.ds(c, c)] = da[0].astype(dr_ref.dtype)  # d (q k)_i
    ds_ref[:, pl.ds(0, c)] = _masked(mask_ref, da[1] * q).astype(ds_ref.dtype)  # d k_j
    de_ref[...] = _masked(mask_ref, da[2] * q + sum(de_parts)).astype(de_ref.dtype)


# ----------------------------------------------------------------------------------- wrappers

def _call(kernel_body, name, args, extra_in, out_shape, out_specs_fn, opts, *, backward):
    """pallas_call over (edge blocks, heads) with the edge axis padded to the block size."""
    from jax.experimental import pallas as pl

    rt, st, e, recv, send, mask, w3, g1, b1, w0, b0, g2, b2 = args
    n_edge, heads, c = e.shape
    n_node = rt.shape[0]
    be = opts.block_edges
    n_pad = (-n_edge) % be
    edge_args = [recv, send, mask, e, *extra_in]
    if n_pad:
        edge_args = _pad_edges(edge_args, n_pad)
    n_blocks = (n_edge + n_pad) // be
    per_edge = pl.BlockSpec((be,), lambda i, h: (i,))
    per_head = pl.BlockSpec((be, None, c), lambda i, h: (i, h, 0))
    full = lambda shape: pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))  # noqa: E731
    in_specs = ([per_edge, per_edge, per_edge, per_head]
                + [full((n_node, heads, 5 * c)), full((st.shape[0], heads, 4 * c)), full((c, 3 * c)),
                   full((3 * c,)), full((3 * c,)), full((3 * c, c)), full((c,)), full((c,)), full((c,))]
                + [per_head] * len(extra_in))
    kernel = functools.partial(kernel_body, c=c, inv=1.0 / math.sqrt(3 * c), allow_tf32=opts.allow_tf32)
    ne = n_edge + n_pad
    outs = pl.pallas_call(
        kernel, grid=(n_blocks, heads), in_specs=in_specs, out_specs=out_specs_fn(be, c),
        out_shape=out_shape(ne, n_blocks, heads, c), compiler_params=_compiler_params(opts, backward),
        interpret=opts.resolved_interpret(), name=name,
    )(*edge_args[:4], rt, st, w3, g1, b1, w0, b0, g2, b2, *edge_args[4:])
    return outs, n_pad


def _forward(args, opts):
    from jax.experimental import pallas as pl

    e = args[2]
    y, n_pad = _call(_fwd_kernel, "node_message_fwd", args, [],
                     lambda ne, nb, h, c: _out_struct(e, (ne, h, c), jnp.float32),
                     lambda be, c: pl.BlockSpec((be, None, c), lambda i, h: (i, h, 0)), opts, backward=False)
    return y[:e.shape[0]] if n_pad else y


def _backward(args, dy, opts):
    from jax.experimental import pallas as pl

    rt, st, e, recv, send, mask, w3, g1, b1, w0, b0, g2, b2 = args
    n_edge, heads, c = e.shape
    f32 = jnp.float32

    def out_shape(ne, nb, h, c):
        sds = functools.partial(_out_struct, dy)
        return [sds((ne, h, 5 * c), f32), sds((ne, h, 4 * c), f32), sds((ne, h, c), e.dtype),
                sds((ne, h, 3 * c), f32), sds((ne, h, 3 * c), f32), sds((ne, h, c), f32), sds((nb, h, 8, c), f32)]

    def out_specs(be, c):
        w = lambda width: pl.BlockSpec((be, None, width), lambda i, h: (i, h, 0))  # noqa: E731
        return [w(5 * c), w(4 * c), w(c), w(3 * c), w(3 * c), w(c),
                pl.BlockSpec((None, None, 8, c), lambda i, h: (i, h, 0, 0))]

    outs, n_pad = _call(_bwd_kernel, "node_message_bwd", args, [dy], out_shape, out_specs, opts, backward=True)
    dr, ds, de, m, dupd, dacc, part = outs
    if n_pad:
        dr, ds, de, m, dupd, dacc = (x[:n_edge] for x in (dr, ds, de, m, dupd, dacc))
    precision = None if opts.allow_tf32 else jax.lax.Precision.HIGHEST
    # the gathers' transposes (float32 scatter-adds, no sortedness hint: see layers.gather)
    d_rt = jnp.zeros(rt.shape, f32).at[recv].add(dr, mode="promise_in_bounds").astype(rt.dtype)
    d_st = jnp.zeros(st.shape, f32).at[send].add(ds, mode="promise_in_bounds").astype(st.dtype)
    dw3 = jnp.einsum("ehc,ehk->ck", e.astype(f32), dupd, precision=precision)
    dw0 = jnp.einsum("ehk,ehc->kc", m, dacc, precision=precision)
    part = part.sum(axis=(0, 1))
    return (d_rt, d_st, de, None, None, jnp.zeros_like(mask), dw3.astype(w3.dtype),
            part[0:3].reshape(3 * c).astype(g1.dtype), part[3:6].reshape(3 * c).astype(b1.dtype),
            dw0.astype(w0.dtype), dacc.sum(axis=(0, 1)).astype(b0.dtype), part[6].astype(g2.dtype),
            part[7].astype(b2.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(13,))
def _fused(rt, st, e, recv, send, mask, w3, g1, b1, w0, b0, g2, b2, opts):
    return _forward((rt, st, e, recv, send, mask, w3, g1, b1, w0, b0, g2, b2), opts)


def _fused_fwd(rt, st, e, recv, send, mask, w3, g1, b1, w0, b0, g2, b2, opts):
    args = (rt, st, e, recv, send, mask, w3, g1, b1, w0, b0, g2, b2)
    return _forward(args, opts), args  # residuals: the inputs (node tables, not per-edge copies)


def _fused_bwd(opts, args, dy):
    return _backward(args, dy, opts)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_node_message(recv_tab, send_tab, e, receivers, senders, mask, w3, ln1_scale, ln1_bias, w0, b0,
                       ln2_scale, ln2_bias, opts: KernelOptions = KernelOptions()):
    """`node_message_reference` as the fused kernel pair (float32 [E, H, C])."""
    f32 = jnp.float32
    c = e.shape[-1]
    if recv_tab.shape[-1] != 5 * c or send_tab.shape[-1] != 4 * c or w3.shape != (c, 3 * c):
        raise ValueError(f"fused_node_message: recv_tab [..., {5 * c}], send_tab [..., {4 * c}], w3 [{c}, {3 * c}] "
                         f"expected, got {recv_tab.shape}, {send_tab.shape}, {w3.shape}")
    opts.check(c, "fused_node_message")
    if e.shape[0] == 0:
        return jnp.zeros(e.shape, f32)
    receivers, senders = receivers.astype(jnp.int32), senders.astype(jnp.int32)
    per_edge = (recv_tab, send_tab, e, receivers, senders, mask.astype(f32))
    axes = tuple(sorted(set().union(*(_varying_axes(a) for a in per_edge))))
    if opts.interpret is None and jax.default_backend() != "gpu" and axes:
        # no GPU and inside shard_map: Pallas' interpreter cannot run here (see KernelOptions)
        precision = None if opts.allow_tf32 else jax.lax.Precision.HIGHEST
        return node_message_reference(recv_tab, send_tab, e, receivers, senders, mask, w3, ln1_scale, ln1_bias,
                                      w0, b0, ln2_scale, ln2_bias, precision=precision)
    per_edge = tuple(_make_varying(a, axes) for a in per_edge)
    params = [_make_varying(p.astype(f32), axes) for p in (w3, ln1_scale, ln1_bias, w0, b0, ln2_scale, ln2_bias)]
    return _fused(*per_edge, *params, opts)
