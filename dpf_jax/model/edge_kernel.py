"""The per-edge message chain of MatformerConv as one fused Pallas (Triton) kernel pair.

Per edge e = (j -> i) and head h, with C = channels and inv = 1 / sqrt(3C):

    alpha = [qk_ii | q_i * k_j | q_i * e] * inv                                   [3C]
    m     = upd * sigmoid(LayerNorm_3C(alpha))        upd = v_i W1 + v_j W2 + e W3 + b  [3C]
    y     = mask * LayerNorm_C(m @ W0 + b0)                                       [C]

Why: on a GPU the XLA version of this chain is memory-bound. Every step of it is a pass over
an [E, H, 3C] float32 tensor (6 KB per edge and head-set), written by one fusion and read by
the next, and the backward pass reads most of them again (scripts/results/PERF_NOTES.md: the
top kernels of a training step are these passes; the matmuls are a small share). Here the
forward reads the inputs once and writes only y ([E, H, C]); the backward recomputes the
chain from the same inputs in registers and writes the input gradients, the gated message m
(for W0's gradient, one XLA matmul) and per-block partial sums for the LayerNorm parameters.
No [E, H, 3C] intermediate of the forward is stored for the backward.

`fused_edge_message` is a `jax.custom_vjp` function; `edge_message_reference` is the same maths
in plain jax.numpy (what MatformerConv's "xla" kernel computes) and the tests compare the two,
values and gradients. On a machine without a GPU the kernels run in Pallas' interpreter
(exact, slow: for tests), so CPU and GPU share one code path.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

EPS = 1e-5  # torch.nn.LayerNorm's default, as in layers.LayerNorm


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Static settings of the kernels (hashable: a custom_vjp non-differentiable argument).

    block_edges: edges per program (power of two, >= 16 for the in-kernel matmuls).
    num_warps: Triton warps per program (of the backward-pass kernels too, unless backward_warps).
    backward_warps: Triton warps of the backward pass's kernels (the backward kernels and the
      segment kernel), where they should differ from the forward's `num_warps`; 0: the same.
      Spelled as a third number of the tile ("16x8x4": forward 8 warps, backward 4).
    allow_tf32: in-kernel matmuls in TF32 (JAX's float32 default on the GPU) or full float32.
    interpret: run in Pallas' interpreter (exact, slow: tests). None = Triton on a GPU; on other
      backends the interpreter, except inside `shard_map` (the training step), where Pallas'
      interpreter cannot run (jax 0.10-0.11 check the varying mesh axes of every operation it
      evaluates): there the same maths runs as `edge_message_reference`.
    keep_tiles: the gate kernels (`gate_kernel.py`) load q_i, (qk)_ii, k_j and e once per
      program and keep them in registers, instead of reloading them (from L2) at each use:
      about half the loads of the backward, four more live [BE, C] tiles. Spelled
      "-keep" after the tile ("pallas_gate_rows-16x8-keep").
    atomic_grads: `pallas_gate_rows` only: the backward kernel adds the node-table gradients
      into the tables itself (atomic adds, after summing a block's edges that share a node)
      instead of writing per-edge gradients for XLA's scatter-adds. Spelled "-atomic" after
      the tile ("pallas_gate_rows-16x8-atomic"). The order of the float additions then varies
      from run to run, as it does in XLA's scatter-adds on a GPU. Measured slower (one H100,
      session 18: forward + backward 5.05 against 3.35 ms at 81,920 edges, synthetic
      fine-tuning step 37.91 against 30.63 ms), so not the default.
    sorted_sums: `pallas_gate_rows` only: the backward's node-table gradients are summed by
      `segment_kernel.segment_rows` (one program per node and head adds up that node's run of
      edges: receivers as the edges come, sorted by receiver; senders through a stable argsort)
      instead of XLA's float scatter-adds (one atomic per element). Fixed summation order.
      Spelled "-sorted" after the tile ("pallas_gate_rows-16x8-sorted"); the segment kernel
      uses the same block_edges and the backward-pass warps.
    receiver_runs: `pallas_gate_rows` with `sorted_sums` only: the backward kernel runs one program
      per (receiver, head) over that receiver's run of edges (receivers sorted) and sums the
      receiver table's gradient [d q | d qk | d upd] in registers, writing it once per node; the
      per-edge d q and d qk are never written and the receiver-side segment kernel is not run.
      The sender table's gradient stays with the segment kernel. Spelled "-runs" after
      "-sorted" ("pallas_gate_rows-16x8-sorted-runs").
    receiver_slots: `pallas_gate_rows` with `sorted_sums` only, instead of `receiver_runs`: the
      backward kernel keeps one program per (edge block, head) and sums the block's [d q | d qk |
      d upd] over the edges that share a receiver (masked sums, a loop over the block's receivers),
      writing one row per (block, receiver) pair ("slot", `segment_kernel.block_slots`); the
      segment kernel then adds each receiver's few slots. The per-edge d q and d qk are never
      written, no program loops over a receiver's run, and every slot row has one writer (no atomics: a
      fixed summation order). Spelled "-slots" after "-sorted" ("pallas_gate_rows-16x8-sorted-slots").
    message_sum: `pallas_gate_rows` only: msg_layer_1 (LayerNorm_C), the edge mask and count and
      the receivers' sums run as one kernel pair (`message_sum_kernel.py`: one program per
      receiver, all heads; the backward also sums d b0 and the LayerNorm's parameter gradients),
      instead of XLA's LayerNorm, scatter-add and reductions. Receivers must be sorted. Spelled
      "-sum" last ("pallas_gate_rows-16x8-sorted-sum"); its kernels use the tile's block_edges,
      the forward's warps and the backward warps.
    message_sum_slots: `message_sum` with one program per edge block instead of per receiver: the
      forward sums the block's edges per receiver into slots (as `receiver_slots`) that the
      segment kernel adds up; the backward reads each edge's d out row by its receiver. Spelled
      "-slotsum" last, instead of "-sum".
    segment_warps: Triton warps of the segment kernel (`segment_kernel.segment_rows`); 0: the
      backward warps. Spelled as a tile's fourth number ("16x8x8x4": forward 8, backward 8,
      segment kernel 4).
    gated_residual: `pallas_gate_rows` only: the backward kernel reads the forward's output m
      (upd * sigmoid(LayerNorm(alpha)), kept anyway as msg_layer_0's input) where it needs upd * g,
      instead of forming upd from the receiver row's vm_i, the sender row's vm_j and ew3: one
      [E, H, 3C] read in place of another plus two table-row gathers, and ew3 is no longer kept
      for the backward. Equal up to float32 rounding (m = upd * g rounded once). float32 inputs
      only: with bfloat16 ones m would be stored rounded to bfloat16, so `fused_gate_rows` then
      runs without the flag. Spelled "-mres" before "-sorted"
      ("pallas_gate_rows-16x8x4-mres-sorted-slots-slotsum").
    joint_edge_projection: `pallas_gate_rows` only, not with atomic_grads or receiver_runs: e and
      e @ W3 come as one [E, H, 4C] array, [e | e @ W3] per head (MatformerConv computes it as one
      matmul of edge_attr with lin_edge's and the folded W3's kernels side by side), and the
      backward writes its gradient [d e | d_upd] as one array (one matmul then for d edge_attr and
      one for the kernels' gradient, instead of two each and an add). Spelled "-joint" before
      "-sorted" ("pallas_gate_rows-16x8x4-joint-mres-sorted-slots-slotsum").
    """

    block_edges: int = 32
    num_warps: int = 4
    backward_warps: int = 0
    allow_tf32: bool = True
    interpret: bool | None = None
    keep_tiles: bool = False
    atomic_grads: bool = False
    sorted_sums: bool = False
    receiver_runs: bool = False
    message_sum: bool = False
    receiver_slots: bool = False
    message_sum_slots: bool = False
    segment_warps: int = 0
    gated_residual: bool = False
    joint_edge_projection: bool = False

    def __post_init__(self):
        if self.atomic_grads and self.sorted_sums:
            raise ValueError("KernelOptions: atomic_grads and sorted_sums are two ways to sum the same gradients; "
                             "choose one")
        if self.receiver_runs and not self.sorted_sums:
            raise ValueError("KernelOptions: receiver_runs sums the receiver side of sorted_sums in the backward "
                             "kernel; it needs sorted_sums")
        if self.receiver_slots and (not self.sorted_sums or self.receiver_runs):
            raise ValueError("KernelOptions: receiver_slots sums the receiver side of sorted_sums by edge blocks; it "
                             "needs sorted_sums and excludes receiver_runs")
        if self.message_sum_slots and not self.message_sum:
            raise ValueError("KernelOptions: message_sum_slots is a form of message_sum; it needs message_sum")
        if self.joint_edge_projection and (self.atomic_grads or self.receiver_runs):
            raise ValueError("KernelOptions: joint_edge_projection is not implemented with atomic_grads or "
                             "receiver_runs")
        if self.receiver_runs and self.keep_tiles:
            raise ValueError("KernelOptions: receiver_runs keeps the receiver's rows in registers already; "
                             "keep_tiles does not apply")

    @classmethod
    def parse(cls, spec: str, **kw) -> "KernelOptions":
        """From a config string: "pallas" / "pallas_node" / "pallas_gate" / "pallas_gate_rows"
        (defaults), with a tile, "pallas-<block_edges>x<num_warps>" (or
        "-<block_edges>x<num_warps>x<backward_warps>", or "...x<backward_warps>x<segment_warps>"),
        then for the gate kernels optionally "-keep" (`keep_tiles`) and for "pallas_gate_rows"
        "-joint" (`joint_edge_projection`), "-mres" (`gated_residual`) and "-atomic" (`atomic_grads`)
        or "-sorted" (`sorted_sums`), the latter optionally followed by "-runs" (`receiver_runs`) or
        "-slots" (`receiver_slots`), and last "-sum" (`message_sum`) or "-slotsum"
        (`message_sum_slots`); the kernel family is the caller's business."""
        name, *rest = spec.split("-")
        flags = rest[1:]
        last = flags[-1:] if name == "pallas_gate_rows" and flags[-1:] in (["sum"], ["slotsum"]) else []
        flags = flags[:len(flags) - len(last)]
        allowed = {"pallas_gate": {"keep"},
                   "pallas_gate_rows": {"keep", "joint", "mres", "atomic", "sorted", "runs", "slots"}}.get(name, set())
        if (name not in ("pallas", "pallas_node", "pallas_gate", "pallas_gate_rows")
                or not set(flags) <= allowed or len(set(flags)) != len(flags) or {"atomic", "sorted"} <= set(flags)
                or any(f in flags and flags[-2:] != ["sorted", f] for f in ("runs", "slots"))):
            raise ValueError(f"edge kernel {spec!r}: expected 'pallas', 'pallas_node', 'pallas_gate' or "
                             "'pallas_gate_rows', optionally with '-<block_edges>x<num_warps>' (then for the "
                             "gate kernels '-keep', for 'pallas_gate_rows' '-joint', '-mres' and '-atomic' or "
                             "'-sorted', the latter optionally followed by '-runs' or '-slots', and last '-sum' "
                             "or '-slotsum'; a tile may add 'x<backward_warps>' and then 'x<segment_warps>')")
        if rest:
            try:
                block, warps, *back = (int(t) for t in rest[0].split("x"))
                if len(back) > 2 or min([block, warps, *back]) < 1:
                    raise ValueError
            except ValueError:
                raise ValueError(f"edge kernel {spec!r}: tile must look like 32x4 (or 32x8x4: backward "
                                 "warps; 32x8x8x4: and segment-kernel warps)") from None
            back = back + [0] * (2 - len(back))
            kw.update(block_edges=block, num_warps=warps, backward_warps=back[0], segment_warps=back[1],
                      keep_tiles="keep" in flags, atomic_grads="atomic" in flags, sorted_sums="sorted" in flags,
                      receiver_runs="runs" in flags, receiver_slots="slots" in flags, message_sum=bool(last),
                      message_sum_slots=last == ["slotsum"], gated_residual="mres" in flags,
                      joint_edge_projection="joint" in flags)
        return cls(**kw)

    def check(self, channels: int, who: str) -> None:
        """Triton's shape rules for these kernels: powers of two, >= 16 rows for the dots."""
        pow2 = lambda n: n >= 1 and not n & (n - 1)  # noqa: E731
        if not (pow2(channels) and pow2(self.block_edges) and self.block_edges >= 16 and pow2(self.num_warps)
                and all(w == 0 or pow2(w) for w in (self.backward_warps, self.segment_warps))):
            raise ValueError(f"{who}: channels ({channels}), block_edges ({self.block_edges}), num_warps "
                             f"({self.num_warps}), backward_warps ({self.backward_warps}, 0: num_warps) and "
                             f"segment_warps ({self.segment_warps}, 0: backward warps) must be powers of two, "
                             "block_edges >= 16 (Triton)")

    def resolved_interpret(self) -> bool:
        if self.interpret is not None:
            return self.interpret
        return jax.default_backend() != "gpu"


def edge_message_reference(qk, q, k, e, upd, mask, ln1_scale, ln1_bias, w0, b0, ln2_scale, ln2_bias,
                           precision=None):
    """The chain in jax.numpy. Shapes: qk, q, k, e [E, H, C]; upd [E, H, 3C]; mask [E];
    ln1_* [3C]; w0 [3C, C]; b0, ln2_* [C]. Returns float32 [E, H, C]."""
    f32 = jnp.float32
    c = q.shape[-1]
    inv = 1.0 / math.sqrt(3 * c)
    q, k, e, qk, upd = (t.astype(f32) for t in (q, k, e, qk, upd))
    alpha = jnp.concatenate([qk, q * k, q * e], axis=-1) * inv
    mu = alpha.mean(-1, keepdims=True)
    d = alpha - mu
    ahat = d * jax.lax.rsqrt((d * d).mean(-1, keepdims=True) + EPS)
    m = upd * jax.nn.sigmoid(ahat * ln1_scale + ln1_bias)
    acc = jnp.einsum("ehk,kc->ehc", m, w0, precision=precision) + b0
    mu2 = acc.mean(-1, keepdims=True)
    d2 = acc - mu2
    y = d2 * jax.lax.rsqrt((d2 * d2).mean(-1, keepdims=True) + EPS) * ln2_scale + ln2_bias
    return jnp.where(mask.astype(bool)[:, None, None], y, 0.0)


# ------------------------------------------------------------------------------------ kernels
# Refs of one program: qk/q/k/e/y [BE, C] (head squeezed), upd [BE, 3C], mask [BE],
# ln1_* [3C], w0 [3C, C], b0/ln2_* [C]. Every load/store is [BE, C], [C, C], [C] or [BE]
# (power-of-two sizes, as the Triton lowering requires); the 3C axis is walked in 3 chunks.

def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _row_mean(x):
    return jnp.sum(x, axis=1) / x.shape[1]


def _chunk(ref, kk, c):
    from jax.experimental import pallas as pl

    return ref[pl.ds(kk * c, c)]


def _dot(a, b, trans_b=False, allow_tf32=True):
    try:  # jax >= 0.10: the Triton dot lives in pallas.triton
        from jax.experimental.pallas.triton import dot
    except ImportError:  # older jax
        from jax.experimental.pallas import dot
    return dot(a, b, trans_b=trans_b, allow_tf32=allow_tf32)


def _masked(mask_ref, x):
    # `where`, not a product: a padding edge holding inf/NaN must still give exactly 0
    return jnp.where(mask_ref[...][:, None] != 0, x, 0.0)


class BlockTiles:
    """The [BE, C] float32 tiles one program (edge block x head) works on, loaded on demand:
    q_i, k_j, e, alpha's three chunks and upd's three chunks. Reloads, not values kept alive,
    keep the backward kernel's live registers few. This class reads them from per-edge blocks
    (this module's inputs); `gather_kernel.GatherTiles` reads them from node tables."""

    def __init__(self, qk_ref, q_ref, k_ref, e_ref, upd_ref, c, inv):
        self.qk_ref, self.q_ref, self.k_ref, self.e_ref, self.upd_ref = qk_ref, q_ref, k_ref, e_ref, upd_ref
        self.c, self.inv = c, inv

    def q(self):
        return self.q_ref[...].astype(jnp.float32)

    def k(self):
        return self.k_ref[...].astype(jnp.float32)

    def e(self):
        return self.e_ref[...].astype(jnp.float32)

    def qk(self):
        return self.qk_ref[...].astype(jnp.float32)

    def alpha(self, kk):
        """Chunk kk of alpha = [qk | q*k | q*e] * inv."""
        if kk == 0:
            return self.qk() * self.inv
        return self.q() * (self.k() if kk == 1 else self.e()) * self.inv

    def upd(self, kk):
        from jax.experimental import pallas as pl

        return self.upd_ref[:, pl.ds(kk * self.c, self.c)].astype(jnp.float32)


def _alpha_stats(t, c):
    """Row mean and 1/std of alpha over its 3C entries (two passes: mean, squared deviations)."""
    mu = sum(jnp.sum(t.alpha(kk), axis=1) for kk in range(3)) / (3 * c)
    var = 0.0
    for kk in range(3):
        d = t.alpha(kk) - mu[:, None]
        var = var + jnp.sum(d * d, axis=1)
    return mu, jax.lax.rsqrt(var / (3 * c) + EPS)


def _gate(kk, ahat, g1_ref, b1_ref, c):
    return _sigmoid(ahat * _chunk(g1_ref, kk, c)[None, :] + _chunk(b1_ref, kk, c)[None, :])


def _pre_norm_output(t, g1_ref, b1_ref, w0_ref, b0_ref, c, allow_tf32, mask_ref=None, m_ref=None):
    """acc = (upd * gate) @ W0 + b0 [BE, C], chunk by chunk, and alpha's row statistics;
    writes the gated message m (masked) to `m_ref` on the way when given (W0's gradient)."""
    from jax.experimental import pallas as pl

    mu, rstd = _alpha_stats(t, c)
    acc = None
    for kk in range(3):
        ahat = (t.alpha(kk) - mu[:, None]) * rstd[:, None]
        mk = t.upd(kk) * _gate(kk, ahat, g1_ref, b1_ref, c)
        if m_ref is not None:
            m_ref[:, pl.ds(kk * c, c)] = _masked(mask_ref, mk).astype(m_ref.dtype)
        part = _dot(mk, w0_ref[pl.ds(kk * c, c), :].astype(jnp.float32), allow_tf32=allow_tf32)
        acc = part if acc is None else acc + part
    return acc + b0_ref[...].astype(jnp.float32)[None, :], mu, rstd


def chain_forward(t, mask_ref, g1_ref, b1_ref, w0_ref, b0_ref, g2_ref, b2_ref, y_ref, c, allow_tf32):
    """Kernel body of the forward (both kernel families): y = mask * LayerNorm_C(acc)."""
    acc, _, _ = _pre_norm_output(t, g1_ref, b1_ref, w0_ref, b0_ref, c, allow_tf32)
    d2 = acc - _row_mean(acc)[:, None]
    xhat2 = d2 * jax.lax.rsqrt(_row_mean(d2 * d2) + EPS)[:, None]
    y = xhat2 * g2_ref[...][None, :] + b2_ref[...][None, :]
    y_ref[...] = _masked(mask_ref, y).astype(y_ref.dtype)


def chain_backward(t, mask_ref, g1_ref, b1_ref, w0_ref, b0_ref, g2_ref, b2_ref, dy_ref, m_ref, dacc_ref,
                   part_ref, c, inv, allow_tf32, on_dupd):
    """Kernel body of the backward (both families), up to d(alpha): writes m, d_acc and the
    per-block partial sums of the LayerNorm parameter gradients ([8, C]: d ln1 scale chunks,
    d ln1 bias chunks, d ln2 scale, d ln2 bias), calls `on_dupd(kk, d_upd chunk)` and returns
    d(alpha)'s three chunks [BE, C]. Every per-edge value is masked: a padding edge's
    gradients are exactly 0 even when its inputs hold inf/NaN (0 * inf would leak NaN)."""
    from jax.experimental import pallas as pl

    f32 = jnp.float32
    # pass 1: the forward again, up to the pre-LayerNorm output (writes m)
    acc, mu, rstd = _pre_norm_output(t, g1_ref, b1_ref, w0_ref, b0_ref, c, allow_tf32, mask_ref, m_ref)
    d2 = acc - _row_mean(acc)[:, None]
    rstd2 = jax.lax.rsqrt(_row_mean(d2 * d2) + EPS)
    xhat2 = d2 * rstd2[:, None]
    dy = _masked(mask_ref, dy_ref[...].astype(f32))
    # LayerNorm_C backward
    part_ref[6, :] = jnp.sum(_masked(mask_ref, dy * xhat2), axis=0)
    part_ref[7, :] = jnp.sum(dy, axis=0)
    dx2 = dy * g2_ref[...][None, :]
    dacc = _masked(mask_ref, rstd2[:, None] * (dx2 - _row_mean(dx2)[:, None]
                                               - xhat2 * _row_mean(dx2 * xhat2)[:, None]))
    dacc_ref[...] = dacc.astype(dacc_ref.dtype)
    # pass 2: through the matmul, the gate and the sigmoid, chunk by chunk (alpha, the gate and
    # upd recomputed / reloaded per chunk); keeps d(ahat) per chunk for the LayerNorm backward
    dahat, m1, m2 = [], 0.0, 0.0
    for kk in range(3):
        ahat = (t.alpha(kk) - mu[:, None]) * rstd[:, None]
        g = _gate(kk, ahat, g1_ref, b1_ref, c)
        dm = _dot(dacc, w0_ref[pl.ds(kk * c, c), :].astype(f32), trans_b=True, allow_tf32=allow_tf32)
        on_dupd(kk, _masked(mask_ref, dm * g))
        s = _masked(mask_ref, dm * t.upd(kk) * g * (1.0 - g))  # d(pre-sigmoid)
        part_ref[kk, :] = jnp.sum(_masked(mask_ref, s * ahat), axis=0)
        part_ref[3 + kk, :] = jnp.sum(s, axis=0)
        dah = s * _chunk(g1_ref, kk, c)[None, :]
        m1 = m1 + jnp.sum(dah, axis=1)
        m2 = m2 + jnp.sum(_masked(mask_ref, dah * ahat), axis=1)
        dahat.append(dah)
    m1, m2 = m1 / (3 * c), m2 / (3 * c)
    # pass 3: LayerNorm_3C backward (row means over all three chunks), then the 1/sqrt(3C)
    da = []
    for kk in range(3):
        ahat = (t.alpha(kk) - mu[:, None]) * rstd[:, None]
        da.append(_masked(mask_ref, rstd[:, None] * (dahat[kk] - m1[:, None] - ahat * m2[:, None]) * inv))
    return da


def _fwd_kernel(qk_ref, q_ref, k_ref, e_ref, upd_ref, mask_ref, g1_ref, b1_ref, w0_ref, b0_ref, g2_ref, b2_ref,
                y_ref, *, c, inv, allow_tf32):
    t = BlockTiles(qk_ref, q_ref, k_ref, e_ref, upd_ref, c, inv)
    chain_forward(t, mask_ref, g1_ref, b1_ref, w0_ref, b0_ref, g2_ref, b2_ref, y_ref, c, allow_tf32)


def _bwd_kernel(qk_ref, q_ref, k_ref, e_ref, upd_ref, mask_ref, g1_ref, b1_ref, w0_ref, b0_ref, g2_ref, b2_ref,
                dy_ref, dqk_ref, dq_ref, dk_ref, de_ref, dupd_ref, m_ref, dacc_ref, part_ref,
                *, c, inv, allow_tf32):
    from jax.experimental import pallas as pl

    t = BlockTiles(qk_ref, q_ref, k_ref, e_ref, upd_ref, c, inv)

    def store_dupd(kk, dupd):
        dupd_ref[:, pl.ds(kk * c, c)] = dupd.astype(dupd_ref.dtype)

    da = chain_backward(t, mask_ref, g1_ref, b1_ref, w0_ref, b0_ref, g2_ref, b2_ref, dy_ref, m_ref, dacc_ref,
                        part_ref, c, inv, allow_tf32, store_dupd)
    q, k, e = t.q(), t.k(), t.e()  # alpha = [qk | q*k | q*e] * inv
    dqk_ref[...] = da[0].astype(dqk_ref.dtype)
    dq_ref[...] = _masked(mask_ref, da[1] * k + da[2] * e).astype(dq_ref.dtype)
    dk_ref[...] = _masked(mask_ref, da[1] * q).astype(dk_ref.dtype)
    de_ref[...] = _masked(mask_ref, da[2] * q).astype(de_ref.dtype)


# ----------------------------------------------------------------------------------- wrappers

def _specs(n_edge_blocks, heads, c, be):
    from jax.experimental import pallas as pl

    del n_edge_blocks, heads
    per_head = pl.BlockSpec((be, None, c), lambda i, h: (i, h, 0))
    per_head3 = pl.BlockSpec((be, None, 3 * c), lambda i, h: (i, h, 0))
    edges = pl.BlockSpec((be,), lambda i, h: (i,))
    vec3 = pl.BlockSpec((3 * c,), lambda i, h: (0,))
    vec = pl.BlockSpec((c,), lambda i, h: (0,))
    mat = pl.BlockSpec((3 * c, c), lambda i, h: (0, 0))
    partials = pl.BlockSpec((None, None, 8, c), lambda i, h: (i, h, 0, 0))
    inputs = [per_head, per_head, per_head, per_head, per_head3, edges, vec3, vec3, mat, vec, vec, vec]
    return inputs, per_head, per_head3, partials


def _compiler_params(opts: KernelOptions, backward: bool = False, segment: bool = False):
    """Triton settings of a forward kernel, of a backward-pass one (`opts.backward_warps`), or of
    the segment kernel (`segment`: `opts.segment_warps`, else the backward warps)."""
    from jax.experimental.pallas import triton as plgpu

    warps = (opts.backward_warps or opts.num_warps) if backward or segment else opts.num_warps
    warps = (opts.segment_warps or warps) if segment else warps
    return plgpu.CompilerParams(num_warps=warps, num_stages=1)


def _varying_axes(x) -> tuple:
    """Mesh axes over which `x` varies inside `shard_map` (() outside one / on old jax)."""
    aval = jax.typeof(x) if hasattr(jax, "typeof") else None
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return tuple(sorted(mat.varying))
    return tuple(sorted(getattr(aval, "vma", None) or ()))


def _make_varying(x, axes: tuple):
    """`x` marked as varying over `axes` (inside shard_map, replicated parameters meeting
    per-device edges: the custom VJP then returns per-device parameter gradients, and autodiff
    sums them over devices where the parameters entered shard_map)."""
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):  # jax >= 0.10
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)


def _out_struct(like, shape, dtype):
    """ShapeDtypeStruct of a kernel output varying like `like` (required inside shard_map)."""
    mat = getattr(jax.typeof(like), "mat", None) if hasattr(jax, "typeof") else None
    if mat is not None:
        try:
            return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
        except TypeError:
            pass
    return jax.ShapeDtypeStruct(shape, dtype)


def _pad_edges(arrays, n_pad):
    return [jnp.pad(a, [(0, n_pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]


def _forward(args, opts: KernelOptions):
    from jax.experimental import pallas as pl

    qk, q, k, e, upd, mask, g1, b1, w0, b0, g2, b2 = args
    n_edge, heads, c = q.shape
    be = opts.block_edges
    n_pad = (-n_edge) % be
    edge_args = _pad_edges([qk, q, k, e, upd, mask], n_pad) if n_pad else [qk, q, k, e, upd, mask]
    n_blocks = (n_edge + n_pad) // be
    in_specs, per_head, _, _ = _specs(n_blocks, heads, c, be)
    kernel = functools.partial(_fwd_kernel, c=c, inv=1.0 / math.sqrt(3 * c), allow_tf32=opts.allow_tf32)
    y = pl.pallas_call(
        kernel, grid=(n_blocks, heads), in_specs=in_specs, out_specs=per_head,
        out_shape=_out_struct(q, (n_edge + n_pad, heads, c), jnp.float32),
        compiler_params=_compiler_params(opts), interpret=opts.resolved_interpret(), name="edge_message_fwd",
    )(*edge_args, g1, b1, w0, b0, g2, b2)
    return y[:n_edge] if n_pad else y


def _backward(args, dy, opts: KernelOptions):
    from jax.experimental import pallas as pl

    qk, q, k, e, upd, mask, g1, b1, w0, b0, g2, b2 = args
    n_edge, heads, c = q.shape
    be = opts.block_edges
    n_pad = (-n_edge) % be
    edge_args = [qk, q, k, e, upd, mask, dy]
    if n_pad:
        edge_args = _pad_edges(edge_args, n_pad)
    n_blocks = (n_edge + n_pad) // be
    in_specs, per_head, per_head3, partials = _specs(n_blocks, heads, c, be)
    ne = n_edge + n_pad
    sds = functools.partial(_out_struct, dy)
    out_shape = [sds((ne, heads, c), qk.dtype), sds((ne, heads, c), q.dtype), sds((ne, heads, c), k.dtype),
                 sds((ne, heads, c), e.dtype), sds((ne, heads, 3 * c), upd.dtype),
                 sds((ne, heads, 3 * c), jnp.float32), sds((ne, heads, c), jnp.float32),
                 sds((n_blocks, heads, 8, c), jnp.float32)]
    out_specs = [per_head, per_head, per_head, per_head, per_head3, per_head3, per_head, partials]
    kernel = functools.partial(_bwd_kernel, c=c, inv=1.0 / math.sqrt(3 * c), allow_tf32=opts.allow_tf32)
    *edge_args, dy_p = edge_args
    outs = pl.pallas_call(
        kernel, grid=(n_blocks, heads), in_specs=in_specs + [per_head], out_specs=out_specs,
        out_shape=out_shape, compiler_params=_compiler_params(opts, backward=True),
        interpret=opts.resolved_interpret(), name="edge_message_bwd",
    )(*edge_args, g1, b1, w0, b0, g2, b2, dy_p)
    dqk, dq, dk, de, dupd, m, dacc, part = outs
    if n_pad:
        dqk, dq, dk, de, dupd, m, dacc = (t[:n_edge] for t in (dqk, dq, dk, de, dupd, m, dacc))
    precision = None if opts.allow_tf32 else jax.lax.Precision.HIGHEST
    dw0 = jnp.einsum("ehk,ehc->kc", m, dacc, precision=precision)  # padding edges: dacc = 0
    part = part.sum(axis=(0, 1))  # [8, C]
    dg1, db1 = part[0:3].reshape(3 * c), part[3:6].reshape(3 * c)
    db0 = dacc.sum(axis=(0, 1))
    return (dqk, dq, dk, de, dupd, jnp.zeros_like(mask), dg1.astype(g1.dtype), db1.astype(b1.dtype),
            dw0.astype(w0.dtype), db0.astype(b0.dtype), part[6].astype(g2.dtype), part[7].astype(b2.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(12,))
def _fused(qk, q, k, e, upd, mask, g1, b1, w0, b0, g2, b2, opts):
    return _forward((qk, q, k, e, upd, mask, g1, b1, w0, b0, g2, b2), opts)


def _fused_fwd(qk, q, k, e, upd, mask, g1, b1, w0, b0, g2, b2, opts):
    args = (qk, q, k, e, upd, mask, g1, b1, w0, b0, g2, b2)
    return _forward(args, opts), args  # residuals: the inputs only (they exist anyway)


def _fused_bwd(opts, args, dy):
    return _backward(args, dy, opts)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_edge_message(qk, q, k, e, upd, mask, ln1_scale, ln1_bias, w0, b0, ln2_scale, ln2_bias,
                       opts: KernelOptions = KernelOptions()):
    """`edge_message_reference` as the fused kernel pair (same arguments; float32 [E, H, C]).
    Parameters are used in float32; qk, q, k, e, upd may be float32 or bfloat16."""
    f32 = jnp.float32
    c = q.shape[-1]
    if upd.shape[-1] != 3 * c or w0.shape != (3 * c, c):
        raise ValueError(f"fused_edge_message: upd [..., {3 * c}] and w0 [{3 * c}, {c}] expected, got "
                         f"{upd.shape} and {w0.shape}")
    opts.check(c, "fused_edge_message")
    if q.shape[0] == 0:  # no edges: nothing to launch (and a zero-size grid is not allowed)
        return jnp.zeros(q.shape, jnp.float32)
    edge_args = (qk, q, k, e, upd, mask.astype(f32))
    axes = tuple(sorted(set().union(*(_varying_axes(a) for a in edge_args))))
    if opts.interpret is None and jax.default_backend() != "gpu" and axes:
        # no GPU and inside shard_map: the interpreter cannot run here (see KernelOptions)
        precision = None if opts.allow_tf32 else jax.lax.Precision.HIGHEST
        return edge_message_reference(qk, q, k, e, upd, mask, ln1_scale, ln1_bias, w0, b0, ln2_scale, ln2_bias,
                                      precision=precision)
    edge_args = tuple(_make_varying(a, axes) for a in edge_args)
    params = [_make_varying(p.astype(f32), axes) for p in (ln1_scale, ln1_bias, w0, b0, ln2_scale, ln2_bias)]
    return _fused(*edge_args, *params, opts)
