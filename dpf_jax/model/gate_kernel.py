"""MatformerConv's attention gate as one Pallas (Triton) kernel pair; the matmuls stay in XLA.

Per edge e = (j -> i) and head h ("node" formulation, C = channels, inv = 1 / sqrt(3C)), from
the gathered node tables r = recv_tab[i] = [q_i | qk_ii | vm_i] ([5C]) and s = send_tab[j] =
[k_j | vm_j] ([4C]), ew3 = e @ W3 ([3C]) and e ([C]):

    alpha = [qk_ii | q_i * k_j | q_i * e] * inv                                    [3C]
    m     = mask * (vm_i + vm_j + ew3) * sigmoid(LayerNorm_3C(alpha))               [3C]

XLA then runs msg_layer_0 (m @ W0 + b0), LayerNorm_C and the edge mask, as in the "xla" path.

Why this split (scripts/results/PERF_NOTES.md, sessions 2 and 5): the training step is bound
by memory traffic over per-edge [E, H, 3C] tensors, which XLA writes and reads in ~15 passes
per layer; `edge_kernel.py` fused the whole chain including msg_layer_0 and lost in the step:
its in-kernel [16-32, 128] x [128, 128] matmuls are too small for the tensor cores, its
inputs had to be sliced out of the gathered tables (copies), and its gradients concatenated
back for the scatter-adds (more copies). Here the kernels are elementwise work plus row
reductions only, they read the gathered tables and e @ W3 as XLA produced them, and the
backward writes the tables' gradients in their own layout (d_r [E, H, 5C], d_s [E, H, 4C])
plus d(ew3) and the alpha part of d(e): per edge and layer (HC = H x C floats) the forward
moves 13 HC in and 3 HC out, the backward 16 HC in and 13 HC out. No [E, H, 3C] intermediate
of the gate is stored for the backward; the LayerNorm statistics are recomputed.
`gate_reference` (`gate_recompute.py`) is the same maths in jax.numpy; the tests compare values
and gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dpf_jax.model.edge_kernel import (BlockTiles, KernelOptions, _alpha_stats, _chunk, _compiler_params, _dot,
                                       _gate, _make_varying, _masked, _out_struct, _pad_edges, _varying_axes)
from dpf_jax.model.gate_recompute import gate_message_reference, gate_reference  # the kernels' jax.numpy twins
from dpf_jax.model.segment_kernel import block_slots, run_bounds, segment_bounds, segment_rows, sort_order


class TableTiles(BlockTiles):
    """`edge_kernel.BlockTiles` read from one block of the gathered tables: q_i, qk_ii = r's
    first two C chunks, k_j = s's first, upd chunk kk = vm_i + vm_j + ew3 (chunk kk of each)."""

    def __init__(self, r_ref, s_ref, ew3_ref, e_ref, c, inv, keep=False, gated=False, joint=False):
        self.r_ref, self.s_ref, self.ew3_ref, self.e_ref = r_ref, s_ref, ew3_ref, e_ref
        self.c, self.inv = c, inv
        self.keep, self._kept = keep, {}  # KernelOptions.keep_tiles: load q, qk, k, e once
        # KernelOptions.gated_residual (backward only): ew3_ref holds the forward's output m instead
        self.gated = gated
        # KernelOptions.joint_edge_projection: e_ref's rows are [e | ew3] (4C), and so are ew3_ref's
        # unless it holds m: ew3's chunks start at column C
        self.ew3_start = c if joint and not gated else 0

    def _once(self, name, load):
        if not self.keep:
            return load()
        if name not in self._kept:
            self._kept[name] = load()
        return self._kept[name]

    def _load(self, ref, start):
        from jax.experimental import pallas as pl

        return ref[:, pl.ds(start, self.c)].astype(jnp.float32)

    def q(self):
        return self._once("q", lambda: self._load(self.r_ref, 0))

    def qk(self):
        return self._once("qk", lambda: self._load(self.r_ref, self.c))

    def k(self):
        return self._once("k", lambda: self._load(self.s_ref, 0))

    def e(self):
        return self._once("e", lambda: self._load(self.e_ref, 0))

    def upd(self, kk):
        c = self.c
        if self.gated:
            raise ValueError("gate tiles: with gated_residual the ew3 input holds m; upd cannot be formed")
        return self._load(self.r_ref, (2 + kk) * c) + self._load(self.s_ref, (1 + kk) * c) + \
            self._load(self.ew3_ref, self.ew3_start + kk * c)

    def gated_grad(self, kk, dm, g):
        """dm * upd * g for chunk kk (the backward's d(pre-sigmoid) before its g' factor): with
        `gated`, dm * m, m the forward's output chunk (= upd * g where the mask is 1, where dm is
        masked anyway), read instead of upd's three chunks (the sender rows' vm_j, the receiver
        rows' vm_i and ew3)."""
        if self.gated:
            return dm * self._load(self.ew3_ref, kk * self.c)
        return dm * self.upd(kk) * g


def _gate_forward(t, mask_ref, g1_ref, b1_ref, m_ref, c):
    """m = mask * upd * sigmoid(LayerNorm_3C(alpha)) for one block, chunk by chunk."""
    from jax.experimental import pallas as pl

    mu, rstd = _alpha_stats(t, c)
    for kk in range(3):
        ahat = (t.alpha(kk) - mu[:, None]) * rstd[:, None]
        m = t.upd(kk) * _gate(kk, ahat, g1_ref, b1_ref, c)
        m_ref[:, pl.ds(kk * c, c)] = _masked(mask_ref, m).astype(m_ref.dtype)


def _fwd_kernel(r_ref, s_ref, ew3_ref, e_ref, mask_ref, g1_ref, b1_ref, m_ref, *, c, inv, keep):
    _gate_forward(TableTiles(r_ref, s_ref, ew3_ref, e_ref, c, inv, keep), mask_ref, g1_ref, b1_ref, m_ref, c)


def _gate_backward(t, mask, g1_ref, b1_ref, load_dm, c, inv, store_dupd, store_grad):
    """The gate's backward on one block of edges. Hands over each per-edge gradient as soon as it
    is formed: d_upd chunk by chunk to `store_dupd(kk, d_upd)`, then through alpha = [qk | q*k |
    q*e] * inv the gradients of (qk)_ii, k_j, e and q_i to `store_grad(name, x)` with name "qk",
    "k", "e", "q" (in that order). Returns the LayerNorm parameters' sums over the block (six [C]
    rows: d ln1 scale per C chunk, then d ln1 bias per chunk; `_store_partials` writes them).
    mask: the block's [BE] edge mask; load_dm(kk): chunk kk of d m, [BE, C]. Every per-edge value
    is masked (a padding edge holding inf/NaN gets exactly 0).

    Why hand them over instead of returning them: the LayerNorm backward needs the three chunks'
    d ahat alive until their row means are known; holding d alpha's three chunks and q, k, e on
    top until the end made the receiver-run kernel spill more (session 26: 255 registers per
    thread, 12.5% occupancy on an H100). Emitted one chunk at a time, each tile dies at once:
    fewer spill bytes (`scripts/kernel_registers.py`); timed alone and in the training step, no
    difference beyond the run-to-run spread (session 26). Same operations on the same values,
    so the same numbers."""
    masked = lambda x: jnp.where(mask[:, None] != 0, x, 0.0)  # noqa: E731 - as edge_kernel._masked
    mu, rstd = _alpha_stats(t, c)
    dahat, scale_sums, bias_sums, m1, m2 = [], [], [], 0.0, 0.0
    for kk in range(3):
        ahat = (t.alpha(kk) - mu[:, None]) * rstd[:, None]
        g = _gate(kk, ahat, g1_ref, b1_ref, c)
        dm = masked(load_dm(kk).astype(jnp.float32))
        store_dupd(kk, masked(dm * g))
        sg = masked(t.gated_grad(kk, dm, g) * (1.0 - g))  # d(pre-sigmoid)
        dah = sg * _chunk(g1_ref, kk, c)[None, :]
        scale_sums.append(jnp.sum(masked(sg * ahat), axis=0))
        bias_sums.append(jnp.sum(sg, axis=0))
        m1 = m1 + jnp.sum(dah, axis=1)
        m2 = m2 + jnp.sum(masked(dah * ahat), axis=1)
        dahat.append(dah)
    m1, m2 = m1 / (3 * c), m2 / (3 * c)
    q, d_q = t.q(), None
    for kk in range(3):  # LayerNorm_3C backward, then alpha = [qk | q*k | q*e] * inv, chunk by chunk
        # alpha's chunk as BlockTiles.alpha forms it, keeping the loaded k or e for d q below
        other = t.qk() if kk == 0 else (t.k() if kk == 1 else t.e())
        alpha = other * inv if kk == 0 else q * other * inv
        ahat = (alpha - mu[:, None]) * rstd[:, None]
        da = masked(rstd[:, None] * (dahat[kk] - m1[:, None] - ahat * m2[:, None]) * inv)
        if kk == 0:
            store_grad("qk", da)
            continue
        store_grad("k" if kk == 1 else "e", masked(da * q))
        d_q = da * other if d_q is None else d_q + da * other
    store_grad("q", masked(d_q))
    return scale_sums + bias_sums


def _store_partials(part_ref, sums, c):
    """The backward kernels' [8, C] block of LayerNorm-parameter partial sums: d ln1 scale in rows
    0-2 (one per C chunk), d ln1 bias in rows 3-5, rows 6-7 zero (a power-of-two block)."""
    for row, x in enumerate(sums):
        part_ref[row, :] = x
    zeros = jnp.zeros((c,), jnp.float32)
    part_ref[6, :] = zeros
    part_ref[7, :] = zeros


def _block_dm(dm_ref, c):
    """load_dm for a kernel whose d m input is this block's [BE, 3C] rows."""
    from jax.experimental import pallas as pl

    return lambda kk: dm_ref[:, pl.ds(kk * c, c)]


def _bwd_kernel(r_ref, s_ref, ew3_ref, e_ref, mask_ref, g1_ref, b1_ref, dm_ref,
                dr_ref, ds_ref, dew3_ref, de_ref, part_ref, *, c, inv, keep):
    """Gradients of m's inputs in the gathered tables' layout (see `_gate_backward`)."""
    from jax.experimental import pallas as pl

    def store_dupd(kk, dupd):  # d_upd is the gradient of vm_i, vm_j and ew3 alike
        dr_ref[:, pl.ds((2 + kk) * c, c)] = dupd.astype(dr_ref.dtype)
        ds_ref[:, pl.ds((1 + kk) * c, c)] = dupd.astype(ds_ref.dtype)
        dew3_ref[:, pl.ds(kk * c, c)] = dupd.astype(dew3_ref.dtype)

    def store_grad(name, x):  # d q and d qk: the receiver rows' first two chunks, d k the sender rows'
        ref, col = {"q": (dr_ref, 0), "qk": (dr_ref, c), "k": (ds_ref, 0), "e": (de_ref, None)}[name]
        if col is None:
            ref[...] = x.astype(ref.dtype)
        else:
            ref[:, pl.ds(col, c)] = x.astype(ref.dtype)

    t = TableTiles(r_ref, s_ref, ew3_ref, e_ref, c, inv, keep)
    sums = _gate_backward(t, mask_ref[...], g1_ref, b1_ref, _block_dm(dm_ref, c), c, inv, store_dupd, store_grad)
    _store_partials(part_ref, sums, c)


def _block_specs(c, be):
    from jax.experimental import pallas as pl

    rows = lambda width: pl.BlockSpec((be, None, width), lambda i, h: (i, h, 0))  # noqa: E731
    edges = pl.BlockSpec((be,), lambda i, h: (i,))
    vec3 = pl.BlockSpec((3 * c,), lambda i, h: (0,))
    inputs = [rows(5 * c), rows(4 * c), rows(3 * c), rows(c), edges, vec3, vec3]
    return inputs, rows, _partials_spec(c)


def _partials_spec(c):
    """The backward kernels' per-program partial sums [programs along the grid's first axis (edge
    blocks, or receivers with `receiver_runs`), heads, 8, C]: one [8, C] block per program, rows
    as `_store_partials` writes them."""
    from jax.experimental import pallas as pl

    return pl.BlockSpec((None, None, 8, c), lambda i, h: (i, h, 0, 0))


def _ln1_grads(part, g1, b1):
    """d ln1 scale, d ln1 bias [3C] from the partial sums of every program (rows 0-2, 3-5)."""
    part = part.sum(axis=(0, 1))  # [8, C]
    c3 = g1.shape[0]
    return part[0:3].reshape(c3).astype(g1.dtype), part[3:6].reshape(c3).astype(b1.dtype)


def _padded(args, be):
    n_edge = args[0].shape[0]
    n_pad = (-n_edge) % be
    return (_pad_edges(args, n_pad) if n_pad else list(args)), n_edge, n_edge + n_pad


def _forward(args, opts: KernelOptions):
    from jax.experimental import pallas as pl

    r, s, ew3, e, mask, g1, b1 = args
    heads, c = e.shape[1], e.shape[2]
    be = opts.block_edges
    edge_args, n_edge, ne = _padded([r, s, ew3, e, mask], be)
    in_specs, rows, _ = _block_specs(c, be)
    m = pl.pallas_call(
        functools.partial(_fwd_kernel, c=c, inv=1.0 / math.sqrt(3 * c), keep=opts.keep_tiles),
        grid=(ne // be, heads), in_specs=in_specs, out_specs=rows(3 * c),
        out_shape=_out_struct(e, (ne, heads, 3 * c), ew3.dtype),
        compiler_params=_compiler_params(opts), interpret=opts.resolved_interpret(), name="edge_gate_fwd",
    )(*edge_args, g1, b1)
    return m[:n_edge] if ne != n_edge else m


def _backward(args, dm, opts: KernelOptions):
    from jax.experimental import pallas as pl

    r, s, ew3, e, mask, g1, b1 = args
    heads, c = e.shape[1], e.shape[2]
    be = opts.block_edges
    edge_args, n_edge, ne = _padded([r, s, ew3, e, mask, dm], be)
    in_specs, rows, partials = _block_specs(c, be)
    sds = functools.partial(_out_struct, dm)
    n_blocks = ne // be
    out_shape = [sds((ne, heads, 5 * c), r.dtype), sds((ne, heads, 4 * c), s.dtype),
                 sds((ne, heads, 3 * c), ew3.dtype), sds((ne, heads, c), e.dtype),
                 sds((n_blocks, heads, 8, c), jnp.float32)]
    *edge_args, dm_p = edge_args
    dr, ds, dew3, de, part = pl.pallas_call(
        functools.partial(_bwd_kernel, c=c, inv=1.0 / math.sqrt(3 * c), keep=opts.keep_tiles),
        grid=(n_blocks, heads), in_specs=in_specs + [rows(3 * c)],
        out_specs=[rows(5 * c), rows(4 * c), rows(3 * c), rows(c), partials], out_shape=out_shape,
        compiler_params=_compiler_params(opts, backward=True), interpret=opts.resolved_interpret(),
        name="edge_gate_bwd",
    )(*edge_args, g1, b1, dm_p)
    if ne != n_edge:
        dr, ds, dew3, de = (x[:n_edge] for x in (dr, ds, dew3, de))
    return (dr, ds, dew3, de, jnp.zeros_like(mask), *_ln1_grads(part, g1, b1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused(r, s, ew3, e, mask, g1, b1, opts):
    return _forward((r, s, ew3, e, mask, g1, b1), opts)


def _fused_fwd(r, s, ew3, e, mask, g1, b1, opts):
    args = (r, s, ew3, e, mask, g1, b1)
    return _forward(args, opts), args  # residuals: the inputs only (they exist anyway)


def _fused_bwd(opts, args, dm):
    return _backward(args, dm, opts)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _check(recv_rows, send_rows, ew3, e, opts: KernelOptions, who: str) -> None:
    """Raises unless the receiver / sender rows are [..., 5C] / [..., 4C], ew3 [..., 3C] and the
    tile suits Triton (C = e's last axis)."""
    c = e.shape[-1]
    if recv_rows.shape[-1] != 5 * c or send_rows.shape[-1] != 4 * c or ew3.shape[-1] != 3 * c:
        raise ValueError(f"{who}: [..., {5 * c}] receiver rows, [..., {4 * c}] sender rows and ew3 [..., {3 * c}] "
                         f"expected, got {recv_rows.shape}, {send_rows.shape}, {ew3.shape}")
    opts.check(c, who)


def _call_fused(fused, per_edge, params, opts: KernelOptions, reference):
    """`fused(*per_edge, *params, opts)` with the parameters in float32 and everything marked
    varying over the mesh axes any per-edge input varies over (inside `shard_map`: the custom
    VJP then returns per-device parameter gradients that autodiff sums); `reference()` instead
    where no GPU is present inside shard_map (the interpreter cannot run there, see KernelOptions)."""
    axes = tuple(sorted(set().union(*(_varying_axes(a) for a in per_edge))))
    if opts.interpret is None and jax.default_backend() != "gpu" and axes:
        return reference()
    per_edge = tuple(_make_varying(a, axes) for a in per_edge)
    params = [_make_varying(p.astype(jnp.float32), axes) for p in params]
    return fused(*per_edge, *params, opts)


def fused_gate(r, s, ew3, e, mask, ln1_scale, ln1_bias, opts: KernelOptions = KernelOptions()):
    """`gate_reference` as the kernel pair (same arguments and result)."""
    _check(r, s, ew3, e, opts, "fused_gate")
    if e.shape[0] == 0:
        return jnp.zeros(ew3.shape, ew3.dtype)
    return _call_fused(_fused, (r, s, ew3, e, mask.astype(jnp.float32)), (ln1_scale, ln1_bias), opts,
                       lambda: gate_reference(r, s, ew3, e, mask, ln1_scale, ln1_bias))


# ------------------------------------------- the same gate reading the node tables row by row

class RowTiles(TableTiles):
    """`TableTiles` read from the node tables themselves through the block's receiver and sender
    indices (`tab_ref[rows, h, chunk]`: a [BE, C] gather load; a node's rows are read by its
    ~25-36 edges, mostly from L2), so XLA never writes the gathered tables out."""

    def __init__(self, recv_ref, send_ref, rt_ref, st_ref, ew3_ref, e_ref, c, inv, keep=False, gated=False,
                 joint=False):
        from jax.experimental import pallas as pl

        super().__init__(rt_ref, st_ref, ew3_ref, e_ref, c, inv, keep, gated, joint)
        self.h = pl.program_id(1)
        self.rows_r, self.rows_s = recv_ref[...], send_ref[...]  # [BE] node rows of this block's edges

    def _load(self, ref, start):
        """A C chunk of the receiver's or sender's table row; per-edge refs (ew3) as TableTiles."""
        from jax.experimental import pallas as pl

        if ref is self.r_ref:
            rows = self.rows_r
        elif ref is self.s_ref:
            rows = self.rows_s
        else:
            return super()._load(ref, start)
        return ref[rows, self.h, pl.ds(start, self.c)].astype(jnp.float32)


def _rows_fwd_kernel(recv_ref, send_ref, mask_ref, rt_ref, st_ref, ew3_ref, e_ref, g1_ref, b1_ref, m_ref, *, c, inv,
                     keep, joint):
    t = RowTiles(recv_ref, send_ref, rt_ref, st_ref, ew3_ref, e_ref, c, inv, keep, joint=joint)
    _gate_forward(t, mask_ref, g1_ref, b1_ref, m_ref, c)


def _edge_grad_refs(outs, joint, c, de_at):
    """A backward kernel's output refs, d_upd first and d e at position `de_at`, and the column
    where d_upd starts: with `joint` (`KernelOptions.joint_edge_projection`) one [E, H, 4C] output
    holds [d e | d_upd], the gradient of the joint [e | ew3] input, and the list has no separate
    d e: that output stands in its place too (d e at column 0, d_upd from column C)."""
    if joint:
        outs = (*outs[:de_at], outs[0], *outs[de_at:])
        return tuple(outs), c
    return tuple(outs), 0


def _rows_bwd_kernel(recv_ref, send_ref, mask_ref, rt_ref, st_ref, ew3_ref, e_ref, g1_ref, b1_ref, dm_ref, *outs,
                     c, inv, keep, gated, joint):
    """Per-edge gradients, each written once: d_upd (= d vm_i = d vm_j = d ew3), d q_i, d qk_ii,
    d k_j, d e (outputs d_upd, d q, d qk, d k, d e, partials; joint: [d e | d_upd], d q, d qk, d k,
    partials); `_rows_backward` sums them into the node tables (the gathers' transposes: XLA's
    scatter-adds, or the segment kernel with `sorted_sums`)."""
    from jax.experimental import pallas as pl

    (dupd_ref, dq_ref, dqk_ref, dk_ref, de_ref, part_ref), col = _edge_grad_refs(outs, joint, c, 4)

    def store_dupd(kk, dupd):
        dupd_ref[:, pl.ds(col + kk * c, c)] = dupd.astype(dupd_ref.dtype)

    def store_grad(name, x):
        ref = {"q": dq_ref, "qk": dqk_ref, "k": dk_ref, "e": de_ref}[name]
        ref[:, pl.ds(0, c)] = x.astype(ref.dtype)

    t = RowTiles(recv_ref, send_ref, rt_ref, st_ref, ew3_ref, e_ref, c, inv, keep, gated, joint)
    sums = _gate_backward(t, mask_ref[...], g1_ref, b1_ref, _block_dm(dm_ref, c), c, inv, store_dupd, store_grad)
    _store_partials(part_ref, sums, c)


def _block_sums(rows, be):
    """For a block's node rows [BE]: same [BE, BE] (1.0 where two edges share the node) and
    first [BE] (the edge is its node's first in the block). same @ x sums x over each edge's
    node; only a node's first edge then adds the sum, so the block adds each node once."""
    import jax.lax as lax

    same = rows[:, None] == rows[None, :]
    earlier = lax.broadcasted_iota(jnp.int32, (be, be), 1) < lax.broadcasted_iota(jnp.int32, (be, be), 0)
    first = jnp.sum(jnp.where(same & earlier, 1, 0), axis=1) == 0
    return same.astype(jnp.float32), first


def _add_rows(table_ref, rows, same, first, trash, h, start, x, c, masked):
    """table[row of each edge, h, start:start + C] += the block's sum of x over that row's edges,
    once per row: an atomic add, so the blocks of other programs can add to the same rows.
    Only each row's first edge adds: `masked` (Triton) by the atomic's mask; otherwise (Pallas'
    interpreter, which has no masked atomics) the other edges add to the scratch row `trash`,
    which keeps the targets of one call distinct, so the interpreter's add-by-assignment is exact.
    (On the GPU, adds to one scratch row from every block would serialise.)"""
    import jax.lax as lax
    import jax.experimental.pallas.triton as plgpu

    sums = _dot(same, x, allow_tf32=False)  # exact float32: 0/1 weights
    cols = start + lax.broadcasted_iota(jnp.int32, (1, c), 1)
    # every index an array (not a slice): the form the interpreter can run too
    if masked:
        plgpu.atomic_add(table_ref, (rows[:, None], h, cols), sums,
                         mask=jnp.broadcast_to(first[:, None], sums.shape))
    else:
        plgpu.atomic_add(table_ref, (jnp.where(first, rows, trash)[:, None], h, cols), sums)


def _rows_bwd_atomic_kernel(recv_ref, send_ref, mask_ref, rt_ref, st_ref, ew3_ref, e_ref, g1_ref, b1_ref, dm_ref,
                            drt_in_ref, dst_in_ref, dupd_ref, de_ref, part_ref, drt_ref, dst_ref, *, c, inv, keep,
                            gated, joint, masked):
    """`_rows_bwd_kernel` with the node tables' gradients added here (`KernelOptions.atomic_grads`):
    d_rt [N + 1, H, 5C] += [d q | d qk | d_upd] at the receiver rows, d_st [N + 1, H, 4C] +=
    [d k | d_upd] at the sender rows (row N: scratch). Per-edge outputs: d_upd (the gradient of
    e @ W3) and d e only. drt_in / dst_in: the zero tables aliased to drt / dst."""
    del drt_in_ref, dst_in_ref  # the same buffers as drt_ref / dst_ref
    assert not joint  # KernelOptions refuses joint_edge_projection with atomic_grads
    t = RowTiles(recv_ref, send_ref, rt_ref, st_ref, ew3_ref, e_ref, c, inv, keep, gated)
    be = t.rows_r.shape[0]
    same_r, first_r = _block_sums(t.rows_r, be)
    same_s, first_s = _block_sums(t.rows_s, be)
    trash_r, trash_s = drt_ref.shape[0] - 1, dst_ref.shape[0] - 1
    add_r = lambda start, x: _add_rows(drt_ref, t.rows_r, same_r, first_r, trash_r, t.h, start, x, c,  # noqa: E731
                                       masked)
    add_s = lambda start, x: _add_rows(dst_ref, t.rows_s, same_s, first_s, trash_s, t.h, start, x, c,  # noqa: E731
                                       masked)

    def store_dupd(kk, dupd):  # the gradient of vm_i, vm_j and e @ W3 alike
        from jax.experimental import pallas as pl

        dupd_ref[:, pl.ds(kk * c, c)] = dupd.astype(dupd_ref.dtype)
        add_r((2 + kk) * c, dupd)
        add_s((1 + kk) * c, dupd)

    def store_grad(name, x):  # d q, d qk: the receiver rows' first two chunks; d k the sender rows'
        if name == "e":
            de_ref[...] = x.astype(de_ref.dtype)
        else:
            (add_s if name == "k" else add_r)(c if name == "qk" else 0, x)

    sums = _gate_backward(t, mask_ref[...], g1_ref, b1_ref, _block_dm(dm_ref, c), c, inv, store_dupd, store_grad)
    _store_partials(part_ref, sums, c)


def _full(shape):
    from jax.experimental import pallas as pl

    return pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))


def _rows_call(kernel, name, args, extra, out_shape, out_specs, opts, *, backward, tables=(), aliases=None,
               vectors=()):
    """pallas_call over (edge blocks, heads), the edge axis padded to the block size (padding
    edges: index 0, mask 0). `extra`: more per-edge [E, H, w] inputs; `vectors`: per-edge [E
    padded] arrays given at the padded length (as `segment_kernel.block_slots` makes them), after
    `extra`; `tables`: whole arrays passed last (`aliases`: input -> output index, see
    `pallas_call`); `backward`: a backward-pass kernel (its warps: `KernelOptions.backward_warps`).
    Returns the outputs, the edge count and the padded edge count."""
    from jax.experimental import pallas as pl

    rt, st, ew3, e, recv, send, mask, g1, b1 = args
    heads, c = rt.shape[1], rt.shape[2] // 5
    be = opts.block_edges
    edge_args, n_edge, ne = _padded([recv, send, mask, ew3, e, *extra], be)
    rows = lambda width: pl.BlockSpec((be, None, width), lambda i, h: (i, h, 0))  # noqa: E731
    edges = pl.BlockSpec((be,), lambda i, h: (i,))
    vec3 = pl.BlockSpec((3 * c,), lambda i, h: (0,))
    in_specs = ([edges] * 3 + [_full(rt.shape), _full(st.shape), rows(ew3.shape[-1]), rows(e.shape[-1]), vec3, vec3]
                + [rows(x.shape[-1]) for x in extra] + [edges] * len(vectors) + [_full(t.shape) for t in tables])
    recv_p, send_p, mask_p, ew3_p, e_p, *extra_p = edge_args
    # backward kernels: with gated_residual, `ew3` is the forward's output m (`_fused_rows_fwd`); with
    # joint_edge_projection `e` (and in the forward `ew3`) is the joint [e | ew3] array
    flags = dict(keep=opts.keep_tiles, joint=opts.joint_edge_projection)
    if backward:
        flags["gated"] = opts.gated_residual
    outs = pl.pallas_call(
        functools.partial(kernel, c=c, inv=1.0 / math.sqrt(3 * c), **flags),
        grid=(ne // be, heads), in_specs=in_specs, out_specs=out_specs(rows, be),
        out_shape=out_shape(ne, ne // be, heads, c), compiler_params=_compiler_params(opts, backward),
        interpret=opts.resolved_interpret(), name=name, input_output_aliases=aliases or {},
    )(recv_p, send_p, mask_p, rt, st, ew3_p, e_p, g1, b1, *extra_p, *vectors, *tables)
    return outs, n_edge, ne


def _rows_forward(args, opts):
    e, ew3 = args[3], args[2]
    c = args[0].shape[-1] // 5
    m, n_edge, ne = _rows_call(_rows_fwd_kernel, "edge_gate_rows_fwd", args, [],
                               lambda ne, nb, h, c: _out_struct(e, (ne, h, 3 * c), ew3.dtype),
                               lambda rows, be: rows(3 * c), opts, backward=False)
    return m[:n_edge] if ne != n_edge else m


def _rows_cotangents(args, d_rt, d_st, dupd, de, part):
    """The custom VJP's cotangents of (rt, st, ew3, e, recv, send, mask, g1, b1): the node
    tables' gradients, d_upd (the gradient of e @ W3), d e, none for the indices, zero for the
    mask, and the LayerNorm parameters' from the programs' partial sums. With de None
    (`joint_edge_projection`: ew3 and e are one [e | ew3] array given twice), `dupd` is that
    array's whole gradient [d e | d_upd]: it goes to the ew3 place, zeros to the e place (autodiff
    adds the two; XLA drops the add of zeros)."""
    rt, st, ew3, e, recv, send, mask, g1, b1 = args
    # zeros varying like e inside shard_map (a custom VJP's cotangent must match its primal's type)
    de = _make_varying(jnp.zeros(e.shape, e.dtype), _varying_axes(e)) if de is None else de.astype(e.dtype)
    return (d_rt.astype(rt.dtype), d_st.astype(st.dtype), dupd.astype(ew3.dtype), de, None, None,
            jnp.zeros_like(mask), *_ln1_grads(part, g1, b1))


def _dupd_width(joint, c):
    """Width of the per-edge backward kernels' first output: d_upd [E, H, 3C], or with `joint`
    [d e | d_upd] [E, H, 4C] (see `_edge_grad_refs`)."""
    return 4 * c if joint else 3 * c


def _dupd_part(dupd, joint, c):
    """d_upd as a `segment_rows` part: the array, or with `joint` its columns C:4C."""
    return (dupd, c, 3 * c) if joint else dupd


def _rows_backward_atomic(args, dm, opts):
    """`_rows_backward` with the node-table gradients summed inside the kernel."""
    rt, st, e = args[0], args[1], args[3]
    f32 = jnp.float32
    axes = _varying_axes(dm)
    # one scratch row past the end of each table (used by the interpreter, see `_add_rows`)
    zeros = [_make_varying(jnp.zeros((t.shape[0] + 1,) + t.shape[1:], f32), axes) for t in (rt, st)]

    def out_shape(ne, nb, h, c):
        sds = functools.partial(_out_struct, dm)
        return ([sds((ne, h, 3 * c), f32), sds((ne, h, c), f32), sds((nb, h, 8, c), f32)]
                + [sds(z.shape, f32) for z in zeros])

    def out_specs(rows, be):
        c = e.shape[2]
        return [rows(3 * c), rows(c), _partials_spec(c)] + [_full(z.shape) for z in zeros]

    # inputs: recv, send, mask, rt, st, ew3, e, g1, b1, dm, then the two zero tables
    kernel = functools.partial(_rows_bwd_atomic_kernel, masked=not opts.resolved_interpret())
    outs, n_edge, ne = _rows_call(kernel, "edge_gate_rows_bwd_atomic", args, [dm], out_shape,
                                  out_specs, opts, backward=True, tables=zeros, aliases={10: 3, 11: 4})
    dupd, de, part, d_rt, d_st = outs
    if ne != n_edge:
        dupd, de = dupd[:n_edge], de[:n_edge]
    return _rows_cotangents(args, d_rt[:-1], d_st[:-1], dupd, de, part)  # the scratch rows dropped


def _store_slot_sums(ref, slot, h, start, x, c):
    """ref[p, h, start:start + C] = the sum of x's rows (the block's edges) in slot p, for each slot
    p of the block (`segment_kernel.block_slots`: consecutive ids, each wholly inside the block, so
    each row has this one writer). A loop over the block's few slots (on the synthetic batches 1.5
    on average), each a masked sum over the block's rows. Against a [BE, BE] 0/1 matrix product
    (exact float32, as `_add_rows`; session 27, H100s, E = 81,920, forward + backward): the gate
    pair at 16x8 3.04 against 3.66 ms (two machines), the message-sum pair 0.46 against 0.60 (one
    machine, two processes)."""
    from jax.experimental import pallas as pl

    first_slot = jnp.min(slot)
    local = slot - first_slot

    def store_one(k, carry):
        ref[first_slot + k, h, pl.ds(start, c)] = jnp.sum(jnp.where((local == k)[:, None], x, 0.0),
                                                          axis=0).astype(ref.dtype)
        return carry

    jax.lax.fori_loop(0, jnp.max(local) + 1, store_one, 0)


def _rows_bwd_slots_kernel(recv_ref, send_ref, mask_ref, rt_ref, st_ref, ew3_ref, e_ref, g1_ref, b1_ref, dm_ref,
                           slot_ref, *outs, c, inv, keep, gated, joint):
    """`_rows_bwd_kernel` with the receiver side summed per block (`KernelOptions.receiver_slots`):
    per edge it writes d_upd (= d vm_j = d ew3), d k_j and d e; the receiver rows' gradient [d q |
    d qk | d vm_i] is summed over the block's edges that share a slot (`segment_kernel.block_slots`:
    the block's edges of one receiver) and written to the slot's row of dslot [n_slots, H, 5C]
    (`_store_slot_sums`). A slot lies in one block, so each row has one writer. Outputs d_upd,
    d k, d e, partials, slots (joint: [d e | d_upd], d k, partials, slots)."""
    from jax.experimental import pallas as pl

    (dupd_ref, dk_ref, de_ref, part_ref, dslot_ref), col = _edge_grad_refs(outs, joint, c, 2)
    t = RowTiles(recv_ref, send_ref, rt_ref, st_ref, ew3_ref, e_ref, c, inv, keep, gated, joint)
    slot = slot_ref[...]

    def add_slots(start, x):  # the block's sums per slot, one row each
        _store_slot_sums(dslot_ref, slot, t.h, start, x, c)

    def store_dupd(kk, dupd):  # the gradient of vm_i, vm_j and e @ W3 alike
        dupd_ref[:, pl.ds(col + kk * c, c)] = dupd.astype(dupd_ref.dtype)
        add_slots((2 + kk) * c, dupd)

    def store_grad(name, x):  # d q and d qk: the receiver row's first two chunks; d k, d e per edge
        if name in ("k", "e"):
            ref = dk_ref if name == "k" else de_ref
            ref[:, pl.ds(0, c)] = x.astype(ref.dtype)
        else:
            add_slots(c if name == "qk" else 0, x)

    sums = _gate_backward(t, mask_ref[...], g1_ref, b1_ref, _block_dm(dm_ref, c), c, inv, store_dupd, store_grad)
    _store_partials(part_ref, sums, c)


def _rows_backward_slots(args, dm, opts):
    """`_rows_backward` with the receiver table's gradient summed per (edge block, receiver) slot in
    the backward kernel and then per receiver by the segment kernel (`KernelOptions.receiver_slots`);
    the sender side as with `sorted_sums`."""
    rt, st, recv, send = args[0], args[1], args[4], args[5]
    n_node, heads, c = rt.shape[0], rt.shape[1], rt.shape[2] // 5
    joint = opts.joint_edge_projection
    f32 = jnp.float32
    slot, slot_node = block_slots(recv, opts.block_edges, n_node)
    n_slots = slot_node.shape[0]
    d_e = [] if joint else [None]  # joint: d e is part of the first output

    def out_shape(ne, nb, h, c):
        sds = functools.partial(_out_struct, dm)
        return ([sds((ne, h, _dupd_width(joint, c)), f32), sds((ne, h, c), f32)]
                + [sds((ne, h, c), f32) for _ in d_e] + [sds((nb, h, 8, c), f32), sds((n_slots, h, 5 * c), f32)])

    def out_specs(rows, be):
        return ([rows(_dupd_width(joint, c)), rows(c)] + [rows(c) for _ in d_e]
                + [_partials_spec(c), _full((n_slots, heads, 5 * c))])

    outs, n_edge, ne = _rows_call(_rows_bwd_slots_kernel, "edge_gate_rows_bwd_slots", args, [dm], out_shape,
                                  out_specs, opts, backward=True, vectors=[slot])
    dupd, dk, *d_e, part, dslot = outs
    de = d_e[0] if d_e else None
    if ne != n_edge:
        dupd, dk, de = (None if x is None else x[:n_edge] for x in (dupd, dk, de))
    # each receiver's slots: a run of slot rows (slots ascend with the receiver); unused rows are not read
    d_rt, = segment_rows([dslot], None, segment_bounds(slot_node, n_node), c, opts)
    d_st = _sender_sums(dk, _dupd_part(dupd, joint, c), send, st.shape[0], c, opts)
    return _rows_cotangents(args, d_rt, d_st, dupd, de, part)


class RunTiles(TableTiles):
    """`TableTiles` for a block of one receiver's run of edges (`_rows_bwd_runs_kernel`): the
    receiver's row chunks (q_i, qk_ii, vm_i) are values loaded once per program and broadcast to
    the block; k_j and vm_j are gather loads of the sender table's rows, ew3 and e loads of the
    block's edge positions `pos` (whole per-edge arrays, indexed in the kernel)."""

    def __init__(self, recv_chunks, st_ref, ew3_ref, e_ref, send_rows, pos, h, c, inv, gated=False):
        super().__init__(None, st_ref, ew3_ref, e_ref, c, inv, gated=gated)
        self.recv_chunks, self.send_rows, self.pos, self.h = recv_chunks, send_rows, pos, h

    def _recv(self, chunk):
        return jnp.broadcast_to(self.recv_chunks[chunk][None, :], (self.pos.shape[0], self.c))

    def _load(self, ref, start):
        from jax.experimental import pallas as pl

        rows = self.send_rows if ref is self.s_ref else self.pos
        return ref[rows, self.h, pl.ds(start, self.c)].astype(jnp.float32)

    def q(self):
        return self._recv(0)

    def qk(self):
        return self._recv(1)

    def e(self):
        return self._load(self.e_ref, 0)

    def upd(self, kk):
        return (self._recv(2 + kk) + self._load(self.s_ref, (1 + kk) * self.c)
                + self._load(self.ew3_ref, self.ew3_start + kk * self.c))


def _store_edge_rows(ref, pos, inside, h, start, x, c, masked):
    """ref[pos, h, start:start + C] = x for the block's lanes with `inside` (the run, and for the
    last receiver the tail after it): a masked store (Triton); otherwise (Pallas' interpreter,
    which has no masked stores) the other lanes write to the scratch row past the end of `ref`,
    which the caller drops."""
    from jax.experimental import pallas as pl
    import jax.experimental.pallas.triton as plgpu

    if masked:
        plgpu.store(ref.at[pos, h, pl.ds(start, c)], x.astype(ref.dtype),
                    mask=jnp.broadcast_to(inside[:, None], x.shape))
    else:
        ref[jnp.where(inside, pos, ref.shape[0] - 1), h, pl.ds(start, c)] = x.astype(ref.dtype)


def _rows_bwd_runs_kernel(start_ref, stop_ref, end_ref, send_ref, mask_ref, rt_ref, st_ref, ew3_ref, e_ref, g1_ref,
                          b1_ref, dm_ref, dupd_ref, dk_ref, de_ref, drt_ref, part_ref, *, c, inv, be, n_rows, masked,
                          gated):
    """One program per (receiver n, head h) over n's run of edge positions start:stop, in blocks
    of BE (receivers sorted: `segment_bounds`). Per edge it writes d_upd (= d vm_j = d ew3), d k_j
    and d e, like `_rows_bwd_kernel`; the receiver row's gradient [d q | d qk | d vm_i] is the
    sum over the run, kept in registers and written once: drt [N, H, 5C] is the table's gradient
    itself. The last receiver's program also covers end_ref's tail stop:end (edges whose receiver
    is past the table, which no batch built here has) with mask 0: defensive, so that every
    per-edge output of this kernel is written; the forward would still read such rows out of
    bounds."""
    from jax.experimental import pallas as pl

    h = pl.program_id(1)
    start, stop, end = start_ref[...], stop_ref[...], end_ref[...]
    lane = jax.lax.broadcasted_iota(jnp.int32, (be,), 0)
    node = pl.program_id(0)
    recv_chunks = [rt_ref[node, h, pl.ds(q * c, c)].astype(jnp.float32) for q in range(5)]

    def add_block(i, sums):
        pos = start + i * be + lane
        inside, in_run = pos < end, pos < stop
        pos = jnp.minimum(pos, n_rows - 1)  # a valid row to load; outside the run, masked off
        mask = jnp.where(in_run, mask_ref[pos], 0.0)
        t = RunTiles(recv_chunks, st_ref, ew3_ref, e_ref, send_ref[pos], pos, h, c, inv, gated)
        store = lambda ref, col, x: _store_edge_rows(ref, pos, inside, h, col, x, c, masked)  # noqa: E731
        upd_sums, recv_sums = [], {}

        def store_dupd(kk, dupd):
            store(dupd_ref, kk * c, dupd)
            upd_sums.append(jnp.sum(dupd, axis=0))

        def store_grad(name, x):  # d k, d e per edge; d q, d qk summed over the run
            if name in ("k", "e"):
                store(dk_ref if name == "k" else de_ref, 0, x)
            else:
                recv_sums[name] = jnp.sum(x, axis=0)

        ln_sums = _gate_backward(t, mask, g1_ref, b1_ref, lambda kk: dm_ref[pos, h, pl.ds(kk * c, c)], c, inv,
                                 store_dupd, store_grad)
        block = [recv_sums["q"], recv_sums["qk"], *upd_sums, *ln_sums]
        return tuple(a + b for a, b in zip(sums, block))

    n_blocks = (end - start + be - 1) // be
    sums = jax.lax.fori_loop(0, n_blocks, add_block, tuple(jnp.zeros((c,), jnp.float32) for _ in range(11)))
    for q in range(5):
        drt_ref[pl.ds(q * c, c)] = sums[q].astype(drt_ref.dtype)
    _store_partials(part_ref, sums[5:], c)


def _rows_backward_runs(args, dm, opts):
    """`_rows_backward` with the receiver table's gradient summed over each receiver's run inside
    the backward kernel (`KernelOptions.receiver_runs`); the sender side as with `sorted_sums`."""
    from jax.experimental import pallas as pl

    rt, st, ew3, e, recv, send, mask, g1, b1 = args
    n_node, heads, c = rt.shape[0], e.shape[1], e.shape[2]
    n_edge = e.shape[0]
    f32 = jnp.float32
    masked = not opts.resolved_interpret()
    start, stop, end = run_bounds(recv, n_node)  # end: the last receiver's program also writes any tail
    rows_out = n_edge + (not masked)  # the interpreter's scratch row (see `_store_edge_rows`)
    sds = functools.partial(_out_struct, dm)
    whole = lambda shape: pl.BlockSpec(shape, lambda n, h: (0,) * len(shape))  # noqa: E731
    scalar = pl.BlockSpec((None,), lambda n, h: (n,))
    inputs = [send, mask, rt, st, ew3, e]  # whole arrays, indexed in the kernel
    out_shape = [sds((rows_out, heads, 3 * c), f32), sds((rows_out, heads, c), f32), sds((rows_out, heads, c), f32),
                 sds((n_node, heads, 5 * c), f32), sds((n_node, heads, 8, c), f32)]
    vec3 = pl.BlockSpec((3 * c,), lambda n, h: (0,))
    dupd, dk, de, d_rt, part = pl.pallas_call(
        functools.partial(_rows_bwd_runs_kernel, c=c, inv=1.0 / math.sqrt(3 * c), be=opts.block_edges,
                          n_rows=n_edge, masked=masked, gated=opts.gated_residual),
        grid=(n_node, heads),
        in_specs=[scalar] * 3 + [whole(a.shape) for a in inputs] + [vec3, vec3, whole(dm.shape)],
        out_specs=[whole(o.shape) for o in out_shape[:3]]
        + [pl.BlockSpec((None, None, 5 * c), lambda n, h: (n, h, 0)), _partials_spec(c)],
        out_shape=out_shape, compiler_params=_compiler_params(opts, backward=True),
        interpret=opts.resolved_interpret(), name="edge_gate_rows_bwd_runs",
    )(start, stop, end, *inputs, g1, b1, dm)
    if not masked:
        dupd, dk, de = dupd[:n_edge], dk[:n_edge], de[:n_edge]
    return _rows_cotangents(args, d_rt, _sender_sums(dk, dupd, send, st.shape[0], c, opts), dupd, de, part)


def _sender_sums(dk, dupd, send, n_node, c, opts):
    """The sender table's gradient [N, H, 4C]: [d k | d_upd] summed over each sender's edges by the
    segment kernel, through the edges' order by sender (`sorted_sums`). dupd: a `segment_rows` part
    (an array or a column window of one)."""
    d_st = segment_rows([dk, dupd], sort_order(send), segment_bounds(send, n_node), c, opts)
    return jnp.concatenate(d_st, axis=-1)


def _rows_backward(args, dm, opts):
    if opts.atomic_grads:
        return _rows_backward_atomic(args, dm, opts)
    if opts.receiver_runs:
        return _rows_backward_runs(args, dm, opts)
    if opts.receiver_slots:
        return _rows_backward_slots(args, dm, opts)
    rt, st, recv, send = args[0], args[1], args[4], args[5]
    c = rt.shape[2] // 5
    joint = opts.joint_edge_projection
    f32 = jnp.float32
    d_e = [] if joint else [None]  # joint: d e is part of the first output

    def out_shape(ne, nb, h, c):
        sds = functools.partial(_out_struct, dm)
        return ([sds((ne, h, _dupd_width(joint, c)), f32)] + [sds((ne, h, c), f32)] * (3 + len(d_e))
                + [sds((nb, h, 8, c), f32)])

    def out_specs(rows, be):
        return [rows(_dupd_width(joint, c))] + [rows(c)] * (3 + len(d_e)) + [_partials_spec(c)]

    outs, n_edge, ne = _rows_call(_rows_bwd_kernel, "edge_gate_rows_bwd", args, [dm], out_shape, out_specs, opts,
                                  backward=True)
    dupd, dq, dqk, dk, *d_e, part = outs
    de = d_e[0] if d_e else None
    if ne != n_edge:
        dupd, dq, dqk, dk, de = (None if x is None else x[:n_edge] for x in (dupd, dq, dqk, dk, de))
    dupd_part = _dupd_part(dupd, joint, c)
    if opts.sorted_sums:  # the gathers' transposes as runs of edges per node (segment_kernel.py)
        # receivers: the edges' own order (sorted by receiver, as segment sums elsewhere assume)
        d_rt = segment_rows([dq, dqk, dupd_part], None, segment_bounds(recv, rt.shape[0]), c, opts)
        d_st = _sender_sums(dk, dupd_part, send, st.shape[0], c, opts)
        return _rows_cotangents(args, jnp.concatenate(d_rt, axis=-1), d_st, dupd, de, part)
    # the gathers' transposes: float32 scatter-adds, no sortedness hint (see layers.gather); XLA
    # fuses each concatenation into its scatter
    d_upd = dupd[..., c:] if joint else dupd
    d_rt = jnp.zeros(rt.shape, f32).at[recv].add(jnp.concatenate([dq, dqk, d_upd], axis=-1), mode="promise_in_bounds")
    d_st = jnp.zeros(st.shape, f32).at[send].add(jnp.concatenate([dk, d_upd], axis=-1), mode="promise_in_bounds")
    return _rows_cotangents(args, d_rt, d_st, dupd, de, part)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _fused_rows(rt, st, ew3, e, recv, send, mask, g1, b1, opts):
    return _rows_forward((rt, st, ew3, e, recv, send, mask, g1, b1), opts)


def _fused_rows_fwd(rt, st, ew3, e, recv, send, mask, g1, b1, opts):
    args = (rt, st, ew3, e, recv, send, mask, g1, b1)
    m = _rows_forward(args, opts)
    if opts.gated_residual:  # m in ew3's place: the backward reads m's chunks instead of upd's
        return m, (rt, st, m, e, recv, send, mask, g1, b1)
    return m, args  # residuals: the inputs (node tables, no per-edge copies)


def _fused_rows_bwd(opts, args, dm):
    return _rows_backward(args, dm, opts)


_fused_rows.defvjp(_fused_rows_fwd, _fused_rows_bwd)


def fused_gate_rows(recv_tab, send_tab, ew3, e, receivers, senders, mask, ln1_scale, ln1_bias,
                    opts: KernelOptions = KernelOptions()):
    """`gate_recompute.gate_message_reference` as a kernel pair that gathers the node-table rows
    itself (`model.edge_kernel = "pallas_gate_rows"`): same arguments, [E, H, 3C] in ew3's dtype.

    Against `fused_gate` (which reads gathered tables [E, H, 5C] / [E, H, 4C] that XLA must write
    first), per edge and layer (HC = heads x channels floats) the forward moves ew3 and e in
    (4 HC) and m out (3 HC), the backward additionally dm in (3 HC) and d_upd, d q, d qk, d k, d e
    out (7 HC); the node rows come through the cache. The gathers' transposes (those per-edge
    gradients summed into the node tables) are XLA's scatter-adds; with `opts.atomic_grads` atomic
    adds in the backward kernel; with `opts.sorted_sums` `segment_kernel.segment_rows` over each
    node's run of edges, and with `opts.receiver_runs` too the receiver side in the backward kernel
    itself, one program per receiver (then d q and d qk are not written: 5 HC out per edge, plus one
    [H, 5C] row per node), or with `opts.receiver_slots` the receiver side summed per (edge block,
    receiver) slot in the backward kernel and the slots per receiver by the segment kernel (d q and
    d qk not written either; one [H, 5C] row per slot). With sorted_sums, receivers must be sorted
    (as the batches built here are; `batching.graph_to_jraph` checks). With
    `opts.joint_edge_projection`, ew3 is the joint [E, H, 4C] array [e | e @ W3] and e is None (one
    array in, and one gradient out, for both; ew3 and e given apart are concatenated first)."""
    if opts.gated_residual and ew3.dtype != jnp.float32:
        # m is stored in ew3's dtype: a bfloat16 m would round upd * g where the kernel otherwise
        # forms it in float32, so the backward forms upd as without the flag
        opts = dataclasses.replace(opts, gated_residual=False)
    if opts.joint_edge_projection:  # ew3 is the joint [e | e @ W3] array: given in both places
        if e is not None:  # given apart: joined here (a copy; MatformerConv computes the joint array)
            ew3, e = jnp.concatenate([e, ew3.astype(e.dtype)], axis=-1), None
        c = recv_tab.shape[-1] // 5
        if ew3.shape[-1] != 4 * c:
            raise ValueError(f"fused_gate_rows: joint [e | e @ W3] rows [..., {4 * c}] expected, got {ew3.shape}")
        joint = ew3
        ew3, e = joint[..., c:], joint[..., :c]  # for the shape checks and the reference only
    _check(recv_tab, send_tab, ew3, e, opts, "fused_gate_rows")
    if e.shape[0] == 0:
        return jnp.zeros(ew3.shape, ew3.dtype)
    receivers, senders = receivers.astype(jnp.int32), senders.astype(jnp.int32)
    edge_in = (joint, joint) if opts.joint_edge_projection else (ew3, e)
    per_edge = (recv_tab, send_tab, *edge_in, receivers, senders, mask.astype(jnp.float32))
    return _call_fused(_fused_rows, per_edge, (ln1_scale, ln1_bias), opts, lambda: gate_message_reference(
        recv_tab, send_tab, ew3, e, receivers, senders, mask, ln1_scale, ln1_bias))
