"""Denoising corruptions of crystal batches, as pure functions of a PRNG key.

Device side (jit-able, pure jnp; ../shared/DESIGN.md §4 "paper" variant)
-----------------------------------------------------------------------
Every corruption takes ``(key, graph, ...)`` and returns ``(perturbed graph, targets)``, where
``graph`` is ONE device's padded `jraph.GraphsTuple` in the layout of
`dpf_jax.data.batching` (no leading device axis: vmap / shard_map it yourself). Shapes never
change; padding nodes, edges and graphs (mask False) are never touched (bitwise).

* `mask_atoms`        — ⌈γ·n⌉ atoms of each crystal (≥ 1) get species 0 (the unknown token).
* `perturb_positions` — p̃ = p + σ·η, η ~ N(0, I₃) Å (paper Eq. 2), on all atoms or on an exact
  fraction of each crystal's atoms.
* `perturb_lattice`   — (a, b, c, α, β, γ) + σ·N(0, I₆) (paper Eq. 3), matrix rebuilt from the
  noisy parameters, fractional coordinates held fixed.
* `perturb`           — any combination, from a config (`PerturbConfig`).

Randomness is a pure function of the key and of each crystal's place in the GLOBAL batch
(`draw_noise`): the random bits of atom i (its index within its crystal) of crystal g are

    Threefry-2x32(key; block = (index_g | 2^31, 8·i + slot))       (lattice: a reserved counter)

i.e. the counter-based hash jax.random is built on, with a fixed slot per purpose (mask score,
position-subset score, position normals, lattice normals), so enabling one corruption never
changes another's noise, and `perturb` gives each corruption exactly the noise it gets alone.
``index_g`` is ``globals["index"]`` (int32 [G], the crystal's position in the global batch;
`dpf_jax.data.batching.pad_graphs(positions=...)` writes it), which makes the result
independent of how the global batch is split over devices: give every device the SAME step
key and each share gets exactly the noise the single-device batch would give (folding the
device index into the key instead gives valid but device-count-dependent noise). Without
``"index"`` the graph's position in this batch is used. The 2^31 bit keeps our hash blocks
apart from those jax.random hashes under the same key (fold_in, split), but better still pass
a key used for nothing else. Keys: raw `PRNGKey`s or typed `jax.random.key`s of the default
threefry2x32 implementation. Nodes must be grouped by graph in increasing graph order (true of
every jraph batch).

Order inside `perturb`: lattice, then positions, then masking. Position noise is therefore
added in the frame of the perturbed cell, so ``targets["displacement"]`` is exactly the
Gaussian noise σ·η present in the model's input, and the clean structure in the noisy cell is
``positions - displacement``.

Exact counts. ⌈γ·n⌉ is computed in integer arithmetic after rounding γ to the nearest p/q with
q ≤ 1000 (γ = 0.3 → 3/10), so n = 10 gives 3, never 4 from a float round-off. γ must be a
Python number (static under jit).

Lattice noise and degenerate cells. Noisy lengths are clipped to ≥ max(0.5·clean, 0.5 Å) and
angles to [1°, 179°]. If the noisy angles give a cell whose volume factor
``f = 1 − cos²α − cos²β − cos²γ + 2 cosα cosβ cosγ`` (V = abc·√f) is below
``MIN_VOLUME_FACTOR_RATIO`` (0.25) times the clean cell's — i.e. the angular part of the volume
more than halves, or the angles admit no cell at all — that crystal keeps its clean lattice and
positions (bitwise) for this draw, and its ``noisy_lattice_params`` equal the clean ones.
(Some real cells are extremely skewed, e.g. angles of 3.7° with f ≈ 8e-5, so the bound is
relative; such cells fall back often.) The rebuilt matrix uses pymatgen's
`Lattice.from_parameters` orientation (c along z, a in the xz plane), so a perturbed crystal
is also rigidly rotated relative to its input; the matrix is negated for left-handed input
cells so that chirality is preserved. Positions are rebuilt consistently (frac @ L̃ with
frac = pos @ inv(L) of the clean cell), so the model, which sees only relative geometry,
is unaffected by the rotation.

Topology under noise. By default edges (senders, receivers, integer images) stay those of the
clean structure and the geometry is recomputed on device (`dpf_jax.data.geometry`). To rebuild
the k-NN graph from the perturbed structure instead, corrupt on the host with
`perturb_crystals_host` (the SAME noise as the device functions for the same key and global
indices: it runs the very same jnp code, jitted, on an edge-free batch of the crystals on the
CPU; results agree with the device path to float32 rounding) and build the graph with
`rebuild_topology`; then batch the host targets with `batch_host_targets`.

Host side, the authors' released variant (DESIGN §4 "official")
----------------------------------------------------------------
`perturb_official_host(seed, crystal)` reproduces zjuKeLiu/DPF `matformer/data.py`
(`get_train_val_loaders(pre_train=True)`): mask max(1, ⌈0.3·n⌉) atoms to the unknown token,
fractional coordinates += U[0, 0.3)³ then wrapped mod 1, each lattice vector += U[0, 0.3)³ Å
(Cartesian), graph rebuilt from the corrupted cell (`rebuild_topology`). The noise is drawn
once per structure (at preprocessing, not per epoch), here deterministically from
(seed, crystal id) instead of the reference's unseeded global RNG. Targets are the clean
fractional coordinates (n, 3), the clean lattice matrix (9,) and the clean types. The
reference also drops single-atom structures from pre-training (`if len(elements) < 2:
continue`); that is a dataset filter (`official_keeps`), not part of the corruption.
"""

from __future__ import annotations

import dataclasses
import fractions
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import jraph
import numpy as np

try:
    from jax.extend.random import threefry_2x32
except ImportError:  # pragma: no cover - older/newer layouts
    from jax._src.prng import threefry_2x32

from dpf_jax.data.records import Crystal

# Counter layout of the per-crystal random stream (see `draw_noise`): atom i of a crystal owns
# counters 8*i + slot; the lattice owns LATTICE_COUNTER + slot. Fixed per purpose, so enabling
# one corruption never changes the noise of another.
SLOT_MASK_SCORE = 0
SLOT_POSITION_SCORE = 1
SLOT_POSITION_NORMAL = (2, 3)  # 2 words (x, y) + 1 word (z)
ATOM_SLOTS = 8
LATTICE_COUNTER = 0xFFFFFF00  # + 0, 1, 2: 6 words

MIN_ANGLE, MAX_ANGLE = 1.0, 179.0  # degrees
MIN_LENGTH = 0.5  # Å
MIN_LENGTH_RATIO = 0.5  # of the clean length
MIN_VOLUME_FACTOR_RATIO = 0.25  # of the clean cell's volume factor

TargetDict = dict[str, jnp.ndarray]


# --------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class PerturbConfig:
    """Which corruptions `perturb` applies (0 or None = off). Hashable: usable as a static arg.

    mask_fraction: γ, fraction of each crystal's atoms whose type is masked (⌈γ·n⌉, ≥ 1).
    position_scale: σ in Å of the Gaussian position noise.
    position_fraction: fraction of each crystal's atoms that get position noise (1 = all).
    lattice_scale: σ of the Gaussian noise on (a, b, c in Å, α, β, γ in degrees).
    """

    mask_fraction: float = 0.0
    position_scale: float = 0.0
    position_fraction: float = 1.0
    lattice_scale: float = 0.0

    @classmethod
    def from_config(cls, cfg: Any) -> "PerturbConfig":
        """From a PerturbConfig, a mapping or an attribute object (e.g. ml_collections)."""
        if isinstance(cfg, cls):
            return cfg

        def get(name, default):
            if isinstance(cfg, Mapping):
                v = cfg.get(name, default)
            else:
                v = getattr(cfg, name, default)
            return default if v is None else float(v)

        return cls(
            mask_fraction=get("mask_fraction", 0.0),
            position_scale=get("position_scale", 0.0),
            position_fraction=get("position_fraction", 1.0),
            lattice_scale=get("lattice_scale", 0.0),
        )

    @property
    def enabled(self) -> bool:
        return self.mask_fraction > 0 or self.position_scale > 0 or self.lattice_scale > 0


# --------------------------------------------------------------------------------------------
# helpers shared by the corruptions


def _as_key(key_or_seed):
    if isinstance(key_or_seed, (int, np.integer)):
        return jax.random.PRNGKey(int(key_or_seed))
    return key_or_seed


def _rational(fraction: float) -> tuple[int, int]:
    """fraction ≈ p/q with q ≤ 1000 (exact for the usual 0.15, 0.3, 0.5, 0.7, ...)."""
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    f = fractions.Fraction(fraction).limit_denominator(1000)
    if f == 0:
        f = fractions.Fraction(1, 1000)
    return f.numerator, f.denominator


def exact_count(n, fraction: float):
    """⌈fraction·n⌉ clipped to [1, n] (0 where n == 0), in integer arithmetic; numpy or jnp n."""
    p, q = _rational(fraction)
    xp = jnp if isinstance(n, jax.Array) else np
    n = xp.asarray(n).astype(xp.int32)
    k = (n * p + (q - 1)) // q
    return xp.where(n > 0, xp.clip(k, 1, xp.maximum(n, 1)), 0).astype(xp.int32)


def _graph_layout(graph: jraph.GraphsTuple):
    """(graph index per node, number of graphs, first node of each graph, real atoms per graph)."""
    node_graph = graph.nodes["graph"]
    n_graph = graph.n_node.shape[0]
    n_nodes = node_graph.shape[0]
    ones = jnp.ones((n_nodes,), jnp.int32)
    count = jax.ops.segment_sum(ones, node_graph, n_graph)  # all nodes (padding too)
    start = jnp.cumsum(count) - count
    n_real = jax.ops.segment_sum(graph.nodes["mask"].astype(jnp.int32), node_graph, n_graph)
    return node_graph, n_graph, start, n_real


def _global_index(graph: jraph.GraphsTuple) -> jnp.ndarray:
    n_graph = graph.n_node.shape[0]
    idx = graph.globals.get("index") if isinstance(graph.globals, Mapping) else None
    if idx is None:
        return jnp.arange(n_graph, dtype=jnp.int32)
    return jnp.asarray(idx).astype(jnp.int32)


def _key_words(key) -> jnp.ndarray:
    """uint32[2] Threefry key words of a raw `PRNGKey` or a typed `jax.random.key`."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = jnp.asarray(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"perturbations need a single threefry2x32 key (uint32[2]); got {key.dtype}{list(key.shape)}")
    return key


# The high word of every hashed block has this bit set, so our blocks never coincide with the
# blocks jax.random itself hashes under the same key (fold_in(key, d) hashes (0, d); split and
# bits hash small counters), whatever else the caller derives from the key.
_DOMAIN_BIT = 0x80000000


def hash_blocks(key, hi: jnp.ndarray, lo: jnp.ndarray) -> jnp.ndarray:
    """uint32[M, 2]: Threefry-2x32 (the hash behind jax.random) of the blocks (hi | 2^31, lo)
    under `key`: 64 pseudo-random bits per block, one batched hash call."""
    hi = (hi.astype(jnp.uint32) & jnp.uint32(0x7FFFFFFF)) | jnp.uint32(_DOMAIN_BIT)
    m = hi.shape[0]
    out = threefry_2x32(_key_words(key), jnp.concatenate([hi, lo.astype(jnp.uint32)]))
    return jnp.stack([out[:m], out[m:]], axis=1)


def _words_to_uniform(w):
    """uint32 → float32 uniform in [0, 1) (23 random mantissa bits, as jax.random.uniform)."""
    bits = (w >> jnp.uint32(9)) | jnp.uint32(0x3F800000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32) - 1.0


def _words_to_normal(w):
    """uint32 → float32 standard normal, by jax.random.normal's method (√2·erfinv(U(−1, 1)))."""
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = jnp.maximum(lo, _words_to_uniform(w) * 2.0 - 1.0)
    return jnp.sqrt(2.0).astype(jnp.float32) * jax.lax.erf_inv(u)


def draw_noise(key, graph: jraph.GraphsTuple, *, mask_score: bool = False, position_score: bool = False,
               position_normal: bool = False, lattice_normal: bool = False) -> dict[str, jnp.ndarray]:
    """All the randomness of the corruptions, as a pure function of (key, global crystal index,
    atom index within the crystal).

    Counter-based (the Random123 scheme jax.random is built on): the 64 random bits of counter
    c of crystal g are Threefry-2x32(key; block = (index_g | 2^31, c)) (`hash_blocks`); atom i
    owns counters 8·i + slot, the lattice LATTICE_COUNTER + slot. Everything is one batched
    hash call (a short jit compile). Returns the requested subset of
      "mask_score" f32[N] U[0,1), "position_score" f32[N] U[0,1),
      "position_normal" f32[N,3] N(0,1), "lattice_normal" f32[G,6] N(0,1).
    """
    index = _global_index(graph)
    node_graph, n_graph, start, _ = _graph_layout(graph)
    n_nodes = node_graph.shape[0]
    local = (jnp.arange(n_nodes, dtype=jnp.int32) - start[node_graph]).astype(jnp.uint32)
    his, los, parts = [], [], []
    atom_slots = []
    if mask_score:
        atom_slots.append(("mask_score", SLOT_MASK_SCORE))
    if position_score:
        atom_slots.append(("position_score", SLOT_POSITION_SCORE))
    if position_normal:
        atom_slots += [("position_normal_0", SLOT_POSITION_NORMAL[0]), ("position_normal_1", SLOT_POSITION_NORMAL[1])]
    for name, slot in atom_slots:
        his.append(index[node_graph])
        los.append(local * jnp.uint32(ATOM_SLOTS) + jnp.uint32(slot))
        parts.append((name, n_nodes))
    if lattice_normal:
        for slot in range(3):
            his.append(index)
            los.append(jnp.full((n_graph,), LATTICE_COUNTER + slot, jnp.uint32))
            parts.append((f"lattice_{slot}", n_graph))
    if not parts:
        return {}
    words = hash_blocks(key, jnp.concatenate(his), jnp.concatenate(los))  # [M, 2]
    chunks, o = {}, 0
    for name, size in parts:
        chunks[name] = words[o:o + size]
        o += size
    out = {}
    if mask_score:
        out["mask_score"] = _words_to_uniform(chunks["mask_score"][:, 0])
    if position_score:
        out["position_score"] = _words_to_uniform(chunks["position_score"][:, 0])
    if position_normal:
        w = jnp.concatenate([chunks["position_normal_0"], chunks["position_normal_1"][:, :1]], axis=1)
        out["position_normal"] = _words_to_normal(w)
    if lattice_normal:
        w = jnp.concatenate([chunks[f"lattice_{s}"] for s in range(3)], axis=1)
        out["lattice_normal"] = _words_to_normal(w)
    return out


def _select_exact(score, graph: jraph.GraphsTuple, fraction: float) -> jnp.ndarray:
    """bool[N]: the ⌈fraction·n⌉ (≥ 1) real atoms of each crystal with the lowest `score`
    (uniform scores → a uniformly random subset, drawn without replacement)."""
    node_graph, _, start, n_real = _graph_layout(graph)
    mask = graph.nodes["mask"]
    score = jnp.where(mask, score, 2.0)  # padding sorts after every real atom
    n_nodes = node_graph.shape[0]
    order = jnp.lexsort((score, node_graph))  # by graph, then score (stable)
    rank_sorted = jnp.arange(n_nodes, dtype=jnp.int32) - start[node_graph[order]]
    rank = jnp.zeros((n_nodes,), jnp.int32).at[order].set(rank_sorted)
    k = exact_count(n_real, fraction)
    return mask & (rank < k[node_graph])


# --------------------------------------------------------------------------------------------
# lattice parameters


def _lattice_params(lattice, xp):
    lengths = xp.sqrt(xp.sum(lattice * lattice, axis=-1))
    a, b, c = lattice[..., 0, :], lattice[..., 1, :], lattice[..., 2, :]

    def angle(u, v, lu, lv):
        cos = xp.sum(u * v, axis=-1) / (lu * lv)
        return xp.degrees(xp.arccos(xp.clip(cos, -1.0, 1.0)))

    la, lb, lc = lengths[..., 0], lengths[..., 1], lengths[..., 2]
    angles = xp.stack([angle(b, c, lb, lc), angle(a, c, la, lc), angle(a, b, la, lb)], axis=-1)
    return xp.concatenate([lengths, angles], axis=-1)


def _lattice_from_params(params, xp):
    a, b, c = params[..., 0], params[..., 1], params[..., 2]
    al, be, ga = (xp.radians(params[..., i]) for i in (3, 4, 5))
    ca, cb, cg = xp.cos(al), xp.cos(be), xp.cos(ga)
    sa, sb = xp.sin(al), xp.sin(be)
    val = xp.clip((ca * cb - cg) / (sa * sb), -1.0, 1.0)
    gs = xp.arccos(val)
    zero = xp.zeros_like(a)
    va = xp.stack([a * sb, zero, a * cb], axis=-1)
    vb = xp.stack([-b * sa * xp.cos(gs), b * sa * xp.sin(gs), b * ca], axis=-1)
    vc = xp.stack([zero, zero, c], axis=-1)
    return xp.stack([va, vb, vc], axis=-2)


def _volume_factor(params, xp):
    ca, cb, cg = (xp.cos(xp.radians(params[..., i])) for i in (3, 4, 5))
    return 1.0 - ca * ca - cb * cb - cg * cg + 2.0 * ca * cb * cg


def lattice_params(lattice: jnp.ndarray) -> jnp.ndarray:
    """[..., 3, 3] rows = lattice vectors → [..., 6] (a, b, c in Å; α, β, γ in degrees).

    α = ∠(b, c), β = ∠(a, c), γ = ∠(a, b), as pymatgen's `Lattice.parameters`.
    """
    return _lattice_params(jnp.asarray(lattice), jnp)


def lattice_from_params(params: jnp.ndarray) -> jnp.ndarray:
    """[..., 6] → [..., 3, 3], pymatgen `Lattice.from_parameters` orientation (vesta=False):
    a = (a sinβ, 0, a cosβ), b = (−b sinα cosγ*, b sinα sinγ*, b cosα), c = (0, 0, c)."""
    return _lattice_from_params(jnp.asarray(params), jnp)


def lattice_params_np(lattice: np.ndarray) -> np.ndarray:
    """numpy float64 `lattice_params`."""
    return _lattice_params(np.asarray(lattice, np.float64), np)


def lattice_from_params_np(params: np.ndarray) -> np.ndarray:
    """numpy float64 `lattice_from_params`."""
    return _lattice_from_params(np.asarray(params, np.float64), np)


def _det3(m):
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))


def _inv3(m):
    """Batched 3x3 inverse via the adjugate (rows of the inverse's transpose = cross products)."""
    a, b, c = m[..., 0, :], m[..., 1, :], m[..., 2, :]
    adj_t = jnp.stack([jnp.cross(b, c), jnp.cross(c, a), jnp.cross(a, b)], axis=-2)
    det = jnp.sum(a * adj_t[..., 0, :], axis=-1)
    return jnp.swapaxes(adj_t, -1, -2) / det[..., None, None]


def _matmul3(x, y):
    return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)


# --------------------------------------------------------------------------------------------
# device-side corruptions


def mask_atoms(key, graph: jraph.GraphsTuple, fraction: float, *, noise=None
               ) -> tuple[jraph.GraphsTuple, TargetDict]:
    """Sets the species of ⌈fraction·n⌉ (≥ 1, ≤ n) random atoms of each crystal to 0.

    Returns (graph, {"species": int32[N] original Z, "mask": bool[N] masked real atoms}).
    `noise`: a `draw_noise` result to reuse (internal; `key` is then ignored).
    """
    if noise is None:
        noise = draw_noise(key, graph, mask_score=True)
    selected = _select_exact(noise["mask_score"], graph, fraction)
    species = graph.nodes["species"]
    new_species = jnp.where(selected, jnp.zeros_like(species), species)
    targets = {"species": species.astype(jnp.int32), "mask": selected}
    return graph._replace(nodes={**graph.nodes, "species": new_species}), targets


def perturb_positions(key, graph: jraph.GraphsTuple, scale, fraction: float = 1.0, *, noise=None
                      ) -> tuple[jraph.GraphsTuple, TargetDict]:
    """p̃ = p + scale·η, η ~ N(0, I₃) Å, on all real atoms (fraction 1) or ⌈fraction·n⌉ per crystal.

    Returns (graph, {"displacement": f32[N,3] the noise added (0 where unperturbed),
    "mask": bool[N] perturbed real atoms}); clean positions = positions − displacement.
    """
    partial = float(fraction) < 1.0
    if noise is None:
        noise = draw_noise(key, graph, position_score=partial, position_normal=True)
    mask = graph.nodes["mask"]
    selected = _select_exact(noise["position_score"], graph, fraction) if partial else mask
    pos = graph.nodes["positions"]
    eta = noise["position_normal"]
    disp = jnp.where(selected[:, None], jnp.asarray(scale, jnp.float32) * eta, 0.0).astype(pos.dtype)
    new_pos = jnp.where(selected[:, None], pos + disp, pos)
    targets = {"displacement": disp, "mask": selected}
    return graph._replace(nodes={**graph.nodes, "positions": new_pos}), targets


def perturb_lattice(key, graph: jraph.GraphsTuple, scale, *, noise=None
                    ) -> tuple[jraph.GraphsTuple, TargetDict]:
    """Gaussian noise on (a, b, c, α, β, γ); fractional coordinates held fixed (module doc).

    Returns (graph, {"lattice_params": f32[G,6] clean, "noisy_params": f32[G,6] used (clean on
    fallback), "mask": bool[G] real graphs}).
    """
    if noise is None:
        noise = draw_noise(key, graph, lattice_normal=True)
    gmask = graph.globals["mask"]
    lat = graph.globals["lattice"]
    dtype = lat.dtype
    lat32 = lat.astype(jnp.float32)
    clean = lattice_params(lat32)
    noisy = clean + jnp.asarray(scale, jnp.float32) * noise["lattice_normal"]
    min_len = jnp.maximum(MIN_LENGTH_RATIO * clean[:, :3], MIN_LENGTH)
    noisy = jnp.concatenate([jnp.maximum(noisy[:, :3], min_len),
                             jnp.clip(noisy[:, 3:], MIN_ANGLE, MAX_ANGLE)], axis=1)
    ok = (_volume_factor(noisy, jnp) >= MIN_VOLUME_FACTOR_RATIO * _volume_factor(clean, jnp))
    ok = ok & jnp.all(jnp.isfinite(noisy), axis=1) & gmask
    noisy = jnp.where(ok[:, None], noisy, clean)
    handed = jnp.where(_det3(lat32) < 0, -1.0, 1.0)
    new_lat = (lattice_from_params(noisy) * handed[:, None, None]).astype(dtype)
    new_lat = jnp.where(ok[:, None, None], new_lat, lat)
    # positions: p̃ = (p @ inv(L)) @ L̃ = p @ (inv(L) @ L̃), per graph. Elementwise products,
    # not matmuls, so that no TF32 matmul on GPU rounds the coordinates.
    transform = _matmul3(_inv3(lat32), new_lat.astype(jnp.float32))
    node_graph = graph.nodes["graph"]
    pos = graph.nodes["positions"]
    moved = jnp.sum(pos.astype(jnp.float32)[:, :, None] * transform[node_graph], axis=1).astype(pos.dtype)
    node_ok = ok[node_graph] & graph.nodes["mask"]
    new_pos = jnp.where(node_ok[:, None], moved, pos)
    targets = {"lattice_params": clean, "noisy_params": noisy, "mask": gmask}
    return (graph._replace(nodes={**graph.nodes, "positions": new_pos},
                           globals={**graph.globals, "lattice": new_lat}), targets)


def perturb(key, graph: jraph.GraphsTuple, cfg) -> tuple[jraph.GraphsTuple, TargetDict]:
    """Applies the corruptions enabled in `cfg` (lattice, then positions, then masking).

    `cfg`: a `PerturbConfig`, a mapping or an attribute object with mask_fraction,
    position_scale, position_fraction, lattice_scale (0/None = off); static under jit
    (`jax.jit(perturb, static_argnames="cfg")` with a PerturbConfig, or a closure).

    Returns (graph, targets) with the keys of the enabled corruptions only:
      masking:   "species" int32[N] clean Z, "type_mask" bool[N]
      positions: "displacement" f32[N,3], "position_mask" bool[N]
      lattice:   "lattice_params" f32[G,6] clean, "noisy_lattice_params" f32[G,6],
                 "lattice_mask" bool[G]
    Each corruption gets exactly the noise it gets when called alone with the same key.
    """
    cfg = PerturbConfig.from_config(cfg)
    targets: TargetDict = {}
    partial = cfg.position_scale > 0 and cfg.position_fraction < 1.0
    noise = draw_noise(key, graph, mask_score=cfg.mask_fraction > 0, position_score=partial,
                       position_normal=cfg.position_scale > 0, lattice_normal=cfg.lattice_scale > 0)
    if cfg.lattice_scale > 0:
        graph, t = perturb_lattice(key, graph, cfg.lattice_scale, noise=noise)
        targets.update(lattice_params=t["lattice_params"], noisy_lattice_params=t["noisy_params"],
                       lattice_mask=t["mask"])
    if cfg.position_scale > 0:
        graph, t = perturb_positions(key, graph, cfg.position_scale, cfg.position_fraction, noise=noise)
        targets.update(displacement=t["displacement"], position_mask=t["mask"])
    if cfg.mask_fraction > 0:
        graph, t = mask_atoms(key, graph, cfg.mask_fraction, noise=noise)
        targets.update(species=t["species"], type_mask=t["mask"])
    return graph, targets


# --------------------------------------------------------------------------------------------
# host side: the same noise on Crystal records, for rebuilding the topology


def _host_batch(crystals: Sequence[Crystal], indices: Sequence[int]) -> jraph.GraphsTuple:
    """Edge-free padded batch of `crystals` (node count padded to a power of two ≥ 16 and the
    graph count to a power of two, so only a few shapes are ever compiled)."""
    n = [c.num_atoms for c in crystals]
    total = int(sum(n))
    n_pad = max(16, 1 << int(np.ceil(np.log2(total + 1))))
    g_pad = max(2, 1 << int(np.ceil(np.log2(len(crystals) + 1))))
    species = np.zeros(n_pad, np.int32)
    pos = np.zeros((n_pad, 3), np.float32)
    mask = np.zeros(n_pad, bool)
    lattice = np.tile(np.eye(3, dtype=np.float32), (g_pad, 1, 1))
    n_node = np.zeros(g_pad, np.int32)
    index = np.full(g_pad, -1, np.int32)
    gmask = np.zeros(g_pad, bool)
    o = 0
    for g, (c, i) in enumerate(zip(crystals, indices)):
        species[o:o + c.num_atoms] = c.numbers
        pos[o:o + c.num_atoms] = c.cart_coords
        mask[o:o + c.num_atoms] = True
        lattice[g] = c.lattice
        n_node[g] = c.num_atoms
        index[g] = i
        gmask[g] = True
        o += c.num_atoms
    n_node[len(crystals)] = n_pad - total  # padding graph holds the padding nodes
    graph_index = np.repeat(np.arange(g_pad, dtype=np.int32), n_node)
    return jraph.GraphsTuple(
        nodes={"species": species, "positions": pos, "graph": graph_index, "mask": mask},
        edges={"images": np.zeros((0, 3), np.int32), "mask": np.zeros(0, bool)},
        senders=np.zeros(0, np.int32), receivers=np.zeros(0, np.int32),
        globals={"lattice": lattice, "target": np.zeros(g_pad, np.float32), "index": index,
                 "mask": gmask},
        n_node=n_node, n_edge=np.zeros(g_pad, np.int32))


_perturb_cpu = jax.jit(perturb, static_argnames="cfg")


def perturb_crystals_host(key, crystals: Sequence[Crystal], cfg, indices: Sequence[int] | None = None
                          ) -> list[tuple[Crystal, dict[str, np.ndarray]]]:
    """Host version of `perturb` on Crystal records: the same noise for the same key and indices.

    `key`: the step key the device would get (a jax key, or an int seed → `PRNGKey(seed)`);
    `indices`: each crystal's position in the global batch (default 0, 1, ...). Runs the jnp
    `perturb` (jitted) on the CPU on an edge-free batch of these crystals: the random draws are
    those of the device path, and the results agree with it to float32 rounding (positions and
    lattice are float32, as in a device batch). Feed the rebuilt graphs to the model WITHOUT
    perturbing them again on device.

    Returns per crystal (perturbed Crystal, targets) with numpy targets keyed as `perturb`'s:
    node targets (n,) / (n, 3), lattice targets (6,) and a scalar "lattice_mask". The Crystal's
    masked atoms have number 0; its frac_coords = positions @ inv(noisy lattice) (not wrapped).
    """
    crystals = list(crystals)
    return [(perturbed_crystal(c, *arrays), t)
            for c, (arrays, t) in zip(crystals, perturb_arrays_host(key, crystals, cfg, indices))]


def perturb_arrays_host(key, crystals: Sequence[Crystal], cfg, indices: Sequence[int] | None = None
                        ) -> list[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]]:
    """The numbers behind `perturb_crystals_host`, per crystal ((lattice, positions, species),
    targets): the one batched jitted call, without building Crystal records (which
    `perturbed_crystal` does, e.g. in a worker process)."""
    cfg = PerturbConfig.from_config(cfg)
    crystals = list(crystals)
    if not crystals:
        return []
    indices = list(range(len(crystals))) if indices is None else [int(i) for i in indices]
    batch = _host_batch(crystals, indices)
    cpu = jax.devices("cpu")[0]
    key = _as_key(key)
    with jax.default_device(cpu):
        batch = jax.device_put(batch, cpu)
        key = jax.device_put(key, cpu)
        out, targets = _perturb_cpu(key, batch, cfg=cfg)
        out, targets = jax.device_get((out, targets))
    lattices = np.asarray(out.globals["lattice"])
    positions, species = np.asarray(out.nodes["positions"]), np.asarray(out.nodes["species"])
    targets = {name: np.asarray(v) for name, v in targets.items()}
    result = []
    o = 0
    for g, c in enumerate(crystals):
        sl = slice(o, o + c.num_atoms)
        o += c.num_atoms
        t = {name: v[g] if name.startswith("lattice") or name == "noisy_lattice_params" else v[sl]
             for name, v in targets.items()}
        result.append(((lattices[g], positions[sl], species[sl]), t))
    return result


def perturbed_crystal(clean: Crystal, lattice, positions, species) -> Crystal:
    """The Crystal record of a perturbed crystal: float64 lattice and positions, frac_coords =
    positions @ inv(lattice) (not wrapped), masked atoms with number 0."""
    lat = np.asarray(lattice, np.float64)
    pos = np.asarray(positions, np.float64)
    return clean.replace(lattice=lat, frac_coords=pos @ np.linalg.inv(lat), numbers=np.asarray(species))


def perturb_crystal_host(key, crystal: Crystal, cfg, index: int = 0) -> tuple[Crystal, dict[str, np.ndarray]]:
    """`perturb_crystals_host` for one crystal at global batch position `index`."""
    return perturb_crystals_host(key, [crystal], cfg, [index])[0]


def rebuild_topology(perturbed: Crystal, clean_numbers: np.ndarray | None = None, *,
                     min_distance: float = 0.0, **graph_kwargs):
    """k-NN graph (`build_crystal_graph`) of a perturbed crystal; its crystal keeps masked Z = 0.

    The topology does not depend on the species, so masked atoms (Z = 0, which
    `validate_crystal` rejects) are given `clean_numbers` (or Z = 1) just for the build.
    `min_distance` defaults to 0: noise may bring atoms closer than the 0.5 Å sanity bound of
    clean data (pairs closer than 0.15 Å are dropped by the reference builder anyway).
    """
    from dpf_jax.data.graphs import build_crystal_graph

    numbers = np.asarray(perturbed.numbers)
    fill = np.ones_like(numbers) if clean_numbers is None else np.asarray(clean_numbers, np.int32)
    stand_in = perturbed.replace(numbers=np.where(numbers > 0, numbers, fill))
    graph = build_crystal_graph(stand_in, min_distance=min_distance, **graph_kwargs)
    return dataclasses.replace(graph, crystal=perturbed)


def batch_host_targets(targets: Sequence[Mapping[str, np.ndarray]], n_node: int, n_graph: int
                       ) -> dict[str, np.ndarray]:
    """Concatenates per-crystal host targets in the node/graph layout of
    `dpf_jax.data.batching.pad_graphs` (crystal order, padding zeros / False at the end)."""
    out: dict[str, np.ndarray] = {}
    if not targets:
        return out
    for name in targets[0]:
        vals = [np.asarray(t[name]) for t in targets]
        per_graph = vals[0].ndim == 0 or name in ("lattice_params", "noisy_lattice_params", "lattice")
        if per_graph:
            stacked = np.stack(vals)
            size = n_graph
        else:
            stacked = np.concatenate(vals)
            size = n_node
        pad = np.zeros((size - stacked.shape[0],) + stacked.shape[1:], stacked.dtype)
        out[name] = np.concatenate([stacked, pad])
    return out


# --------------------------------------------------------------------------------------------
# the authors' released variant ("official")

OFFICIAL_MASK_RATIO = 0.3
OFFICIAL_POSITION_NOISE = 0.3
OFFICIAL_LATTICE_NOISE = 0.3


def official_keeps(crystal: Crystal) -> bool:
    """The reference drops structures with fewer than 2 atoms from masked pre-training."""
    return crystal.num_atoms >= 2


def official_rng(seed: int, crystal_id: str) -> np.random.Generator:
    """Deterministic per (seed, crystal id), stable across processes (CRC32 of the id)."""
    return np.random.default_rng([int(seed), zlib.crc32(str(crystal_id).encode("utf-8"))])


def perturb_official_host(seed: int, crystal: Crystal, mask_ratio: float = OFFICIAL_MASK_RATIO,
                          position_noise: float = OFFICIAL_POSITION_NOISE,
                          lattice_noise: float = OFFICIAL_LATTICE_NOISE
                          ) -> tuple[Crystal, dict[str, np.ndarray]]:
    """zjuKeLiu/DPF corruption of one crystal (module doc), deterministic per (seed, crystal.id).

    Any of the three may be turned off with None / 0. Returns (corrupted Crystal, targets):
      "species" int32 (n,) clean Z; "mask" bool (n,) masked atoms;
      "frac_coords" float64 (n, 3) clean fractional coordinates (as stored);
      "lattice" float64 (9,) clean lattice matrix, row-major (rows = vectors).
    Masked atoms get Z = 0 (the reference's "X" token). Build the graph with `rebuild_topology`.
    """
    rng = official_rng(seed, crystal.id)
    n = crystal.num_atoms
    numbers = np.array(crystal.numbers, np.int32)
    mask = np.zeros(n, bool)
    if mask_ratio:
        # the reference: max(1, math.ceil(n * mask_ratio)) with random.sample
        k = min(n, max(1, int(np.ceil(n * float(mask_ratio)))))
        mask[rng.choice(n, size=k, replace=False)] = True
        numbers = np.where(mask, 0, numbers).astype(np.int32)
    frac = np.array(crystal.frac_coords, np.float64)
    if position_noise:
        frac = (frac + rng.random((n, 3)) * float(position_noise)) % 1.0
    lattice = np.array(crystal.lattice, np.float64)
    if lattice_noise:
        lattice = lattice + rng.random((3, 3)) * float(lattice_noise)
    targets = {
        "species": np.array(crystal.numbers, np.int32),
        "mask": mask,
        "frac_coords": np.array(crystal.frac_coords, np.float64),
        "lattice": np.array(crystal.lattice, np.float64).reshape(9),
    }
    return crystal.replace(numbers=numbers, frac_coords=frac, lattice=lattice), targets
