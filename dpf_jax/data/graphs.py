"""Periodic k-nearest-neighbour graphs of crystals, as the reference Matformer builds them.

Edge convention (used everywhere downstream): edge e goes from `senders[e]` to `receivers[e]`
and its displacement vector is

    vec[e] = frac[receivers[e]] @ L + images[e] @ L - frac[senders[e]] @ L      (Å)

i.e. from the sender atom to the periodic image `images[e]` of the receiver atom. Geometry is
never stored: the model recomputes it from positions, lattice and the integer images, so that
perturbed positions or lattices get exact new geometry on device.

How the reference builds its graph (jarvis-tools 2026.6.12, `jarvis.core.graphs`, the code the
reference Matformer calls with cutoff 8 Å, 12 neighbours, `use_canonize=True`,
`use_lattice=True`), and what we reproduce bit for bit:

* `Atoms.get_all_neighbors(r)`: for every atom i, every atom j and every lattice translation
  n of a box large enough to hold the cutoff sphere, the distance
  ``d = sqrt(sum(((n @ L + c_j) - c_i) ** 2))`` is computed with ``c = frac @ round(L, 5)``
  (jarvis' `Lattice` rounds the matrix to 5 decimals for Cartesian coordinates, while the
  image translation uses the unrounded matrix). A neighbour is kept when
  ``0.15 Å < d <= r`` (``bond_tol``; pairs closer than 0.15 Å, including an atom and itself,
  are silently dropped there; we raise for pairs closer than ``min_distance`` instead).
* `nearest_neighbor_edges`: if any atom has fewer than `max_neighbors` neighbours within the
  cutoff, the whole search is repeated with the cutoff grown to ``max(a, b, c)`` (lengths of
  the 5-decimal-rounded lattice vectors, rounded to 6 decimals) when the cutoff is below it,
  else to twice the cutoff, until every atom has enough. Then for every atom the neighbours
  are sorted by distance and all with ``d <= d_(k)`` are kept, ``d_(k)`` being the k-th
  smallest distance: ties at the k-th shell are all kept, compared exactly in floating point
  (no tolerance; which members of a symmetric shell survive can depend on the last bit, which
  is why we replicate the reference arithmetic, see below).
* Canonization: the neighbour ``(i, j, n)`` becomes the key ``(min(i, j), max(i, j))`` with
  image ``n`` if ``j >= i`` else ``-n``, added to a set per key. So ``(i, j, n)`` and
  ``(j, i, -n)`` are one undirected edge, but for a self-image edge (``i == j``) the images
  ``n`` and ``-n`` stay two distinct set entries.
* Lattice edges (the reference Matformer's ``use_lattice=True``): the images (0,0,1), (0,1,0),
  (1,0,0), (0,1,1), (1,0,1), (1,1,0) are added to the set of key ``(i, i)`` of every atom
  (a set union: an image already found by the k-NN search is not added twice).
* `build_undirected_edgedata`: every set entry ``(a, b, n)`` is emitted in both directions,
  ``a -> b`` with image ``n`` and ``b -> a`` with image ``-n``.

Consequences we reproduce by default: a self-image edge whose images ``n`` and ``-n`` are
both in the set is emitted twice in each direction (6,672 exact duplicate directed edges out of
114,958 in the shipped JARVIS subset). Pass ``dedup_self_images=True`` to keep one copy.

The reference bug we fix: the reference Matformer (`nearest_neighbor_edges_submit`) forgets
``use_lattice`` when it recurses after growing the cutoff, so structures that need a larger
cutoff lose their lattice self-loops. We always add them (as does the shipped reference
edge set, `../shared/reference_graphs/`).

Rounding decides ties. On about half of the shipped structures (477 of 940 JARVIS, 2,379 of
5,221 MP) some atom has a neighbour left out although its computed distance is within 1e-6 Å
of its k-th distance: a shell of symmetry-equivalent neighbours whose distances differ only in
the last bits, of which the reference keeps part. We reproduce that by default;
``tie_tolerance=1e-6`` keeps whole shells instead (then the graph no longer matches the
reference, but is invariant under translations and changes of unit cell). None of the shipped
structures needs the cutoff growth at 8 Å.

Search. Candidates come from a bounded lattice-image search over all atom pairs in numpy
(`method="numpy"`, fastest for small cells) or from pymatgen's Cython cell-list
`find_points_in_spheres` (`method="pymatgen"`, fastest for large cells); `"auto"` picks by
the size of the image search. Either way the candidates' distances are then computed the
reference's way, so both give the same graph.

Exactness. The candidate distances are computed with the same floating-point operations as
jarvis-tools: ``frac @ round(L, 5)`` is the same numpy call; ``images @ L`` (one matrix
product) gives bitwise the same translations as jarvis' per-image ``np.dot(image, L)`` (checked
with this numpy/OpenBLAS on all 6,161 shipped lattices and 11^3 images each; both use FMA, so a
naive three-term sum would not); the squared components are summed in numpy's order for a
length-3 ``np.sum``, ``(x0 + x1) + x2``. So the cutoff and k-th-shell comparisons come out as in
the reference. (The reference itself is only reproducible on a BLAS that rounds these 3x3
products the same way.) The search is complete for any fractional coordinates (jarvis' image
box can miss neighbours when unwrapped coordinates span more than one cell; for wrapped
coordinates, as in every shipped dataset, both are complete and agree).

Deviation by design: the reference grows the cutoff without limit; we raise `CrystalError`
once it would pass ``max_cutoff`` (128 Å), e.g. for an isolated atom in a huge vacuum box.

Merging equal edges (`merge_equivalent_edges`, ``build_crystal_graph(merge_edges=...)``). A
Matformer message depends only on the receiver, the sender and the edge *length* (its edge
feature is an RBF of |vec|), so edges that agree in all three carry the same message, and the
receiver's sum counts it once per edge. Keeping one of them with a count (``counts``; the model
multiplies each message by it) gives the same sums with fewer edges to process. Levels:

* ``"mirror"``: the duplicate copies above, plus every self-image edge ``i -> i`` with image
  ``-n`` merged into its mirror with image ``n`` (lengths ``|n L|`` and ``|-n L|`` are equal for
  any lattice, and a self-image vector does not depend on the atom's position). Exact under
  every perturbation of positions and lattice. Shipped data: 70% (JARVIS), 74% (MP, the
  pre-training corpus) of the edges remain; 81% of the synthetic benchmark crystals'.
* ``"distance"``: every group with the same receiver, sender and float32 length (float64
  length rounded to float32: the precision the model computes lengths in), e.g. the six
  symmetry-equivalent images of one neighbour in a rocksalt cell. Exact only while the
  geometry stays as built (fine-tuning, prediction, type-masking pre-training), since a
  perturbation changes equal lengths by different amounts. Shipped data: 47% (JARVIS),
  60% (MP), 48% (pre-training corpus) of the edges remain (`scripts/merge_stats.py`).
* ``"atoms"``: also atoms with equal features computed once (`merge_equivalent_atoms`), then
  edges by distance: 33% (JARVIS), 30% (MP) of the edges, for a model whose output is a mean
  over atoms (property regression); per-atom outputs are lost.

Vector-valued sums over edges (the pre-training position head, sum of w_e * vec_e / |vec_e|)
use ``net`` instead: the members with the representative's image minus those with the opposite
image. A mirror group contributes zero (its ``+n`` and ``-n`` terms cancel, as they do edge by
edge up to rounding). ``"distance"`` groups hold vectors of other directions too, so their
graphs carry no ``net`` and the position head refuses them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from dpf_jax.data.records import Crystal, CrystalError, validate_crystal  # noqa: F401  (CrystalError re-exported)

# The reference Matformer's lattice self-loop images (`use_lattice=True`).
LATTICE_IMAGES = np.array([(0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)], dtype=np.int64)
# jarvis-tools `get_all_neighbors(bond_tol=0.15)`: neighbours at d <= this are dropped.
JARVIS_BOND_TOL = 0.15
# Largest number of float64 pair distances the numpy search evaluates at once (~100 MB peak).
_CHUNK_PAIRS = 1 << 21
# "auto" uses the numpy image search up to this many (atom, atom, image) triples per pass and
# pymatgen's cell-list search (Cython) above it; measured crossover on one core, see
# scripts/results/bench_graphs.md.
_AUTO_NUMPY_MAX_TRIPLES = 100_000
_METHODS = ("auto", "numpy", "pymatgen")
# Levels of `merge_equivalent_edges` (see the module docstring), least to most merging.
MERGE_LEVELS = ("none", "mirror", "distance", "atoms")
# Images are decoded through a lookup table of (2 off + 1)^3 rows up to this offset (~0.8 MB).
_MAX_TABLE_OFF = 20


@dataclasses.dataclass(frozen=True, eq=False)
class CrystalGraph:
    """A crystal plus its directed edge list (both directions of every undirected edge).

    Edges are sorted by receiver (then sender), so a batch built by concatenation is sorted too
    and segment sums may use `indices_are_sorted=True`. A merged graph
    (`merge_equivalent_edges`) keeps one edge per group of equal ones: `num_edges` counts those,
    `counts` / `num_reference_edges` the reference edges they stand for (use these, not the
    edge list, for neighbour counts).
    """

    crystal: Crystal
    senders: np.ndarray  # (E,) int32
    receivers: np.ndarray  # (E,) int32
    images: np.ndarray  # (E, 3) int32
    # After `merge_equivalent_edges`: how many reference edges each edge stands for, and its
    # net count for vector sums (see the module docstring); None: one each (no merging). A
    # "distance"-merged graph has counts but no net (its groups hold unrelated vectors).
    counts: np.ndarray | None = None  # (E,) int32
    net: np.ndarray | None = None  # (E,) int32
    # After "atoms" merging: the atom each edge's geometry starts from (its sender is that atom's
    # class representative, whose features are the same), and each atom's class size if it
    # represents its class, else 0 (its features are then not computed from any message).
    sources: np.ndarray | None = None  # (E,) int32; None: the senders
    node_counts: np.ndarray | None = None  # (N,) int32; None: ones

    @property
    def num_nodes(self) -> int:
        return self.crystal.num_atoms

    @property
    def num_edges(self) -> int:
        return int(self.senders.shape[0])

    @property
    def num_reference_edges(self) -> int:
        """Edges of the unmerged graph (= num_edges when nothing was merged; after "atoms"
        merging each representative's edges count once per atom of its class)."""
        if self.counts is None:
            return self.num_edges
        if self.node_counts is None:
            return int(self.counts.sum())
        return int(np.sum(self.counts.astype(np.int64) * self.node_counts[self.receivers]))

    def edge_counts(self) -> np.ndarray:
        """(E,) int32 `counts`, ones when nothing was merged."""
        return np.ones(self.num_edges, np.int32) if self.counts is None else self.counts

    @property
    def has_net(self) -> bool:
        """Whether vector sums over edges are defined (unmerged or "mirror"-merged)."""
        return self.counts is None or self.net is not None

    def edge_net(self) -> np.ndarray:
        """(E,) int32 `net`, ones when nothing was merged. Raises for "distance"-merged graphs."""
        if not self.has_net:
            raise ValueError(f"{self.crystal.id}: a 'distance'-merged graph has no net edge counts (its merged "
                             "edges stand for vectors of other directions); vector sums over edges need 'mirror'")
        return np.ones(self.num_edges, np.int32) if self.net is None else self.net

    def edge_vectors(self) -> np.ndarray:
        """(E, 3) float64 displacement vectors in Å (see the module docstring)."""
        lat = self.crystal.lattice
        f = self.crystal.frac_coords
        return (f[self.receivers] + self.images - f[self.edge_sources()]) @ lat

    def edge_sources(self) -> np.ndarray:
        """(E,) the atom each edge's vector starts from: `sources`, else the senders."""
        return self.senders if self.sources is None else self.sources

    def atom_counts(self) -> np.ndarray:
        """(N,) int32 `node_counts`, ones when atoms were not merged."""
        return np.ones(self.num_nodes, np.int32) if self.node_counts is None else self.node_counts


def _jarvis_max_length(lattice: np.ndarray) -> float:
    """max(a, b, c) exactly as jarvis' `Lattice(L).a/.b/.c` (5-decimal matrix, 6-decimal lengths)."""
    lat_r = np.around(lattice, decimals=5)
    return max(round(x, 6) for x in np.sqrt(np.sum(lat_r**2, axis=1)).tolist())


@functools.lru_cache(maxsize=256)
def _box(m0: int, m1: int, m2: int):
    """All translations n with |n_k| <= m_k, as int64 and float64 (K, 3) arrays (read-only)."""
    g = np.mgrid[-m0 : m0 + 1, -m1 : m1 + 1, -m2 : m2 + 1].reshape(3, -1).T
    gi = np.ascontiguousarray(g, dtype=np.int64)
    gf = gi.astype(np.float64)
    gi.setflags(write=False)
    gf.setflags(write=False)
    return gi, gf


def _image_search_box(lattice: np.ndarray, frac: np.ndarray, cart: np.ndarray, r: float):
    """Lattice translations that can bring some atom j within r of some atom i.

    Per axis, |(n + f_j - f_i)_k| <= r / spacing_k bounds n_k (spacing_k: distance between
    lattice planes k); of that box, translations longer than r + the diagonal of the atoms'
    bounding box go. Returns (box int64 (K, 3), translations box @ L (K, 3), index of n = 0).
    """
    (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = lattice.tolist()
    # |b x c|, |c x a|, |a x b| over |det| = 1 / interplanar spacing of axes a, b, c
    bc = ((b1 * c2 - b2 * c1), (b2 * c0 - b0 * c2), (b0 * c1 - b1 * c0))
    ca = ((c1 * a2 - c2 * a1), (c2 * a0 - c0 * a2), (c0 * a1 - c1 * a0))
    ab = ((a1 * b2 - a2 * b1), (a2 * b0 - a0 * b2), (a0 * b1 - a1 * b0))
    vol = abs(a0 * bc[0] + a1 * bc[1] + a2 * bc[2])
    spread = (frac.max(axis=0) - frac.min(axis=0)).tolist()
    # margin: the reference's Cartesian coordinates use the 5-decimal lattice (<= ~1e-5 Å per
    # cell of coordinate difference off the exact geometry), plus float rounding
    r_search = r + 1e-3 * (1.0 + max(spread))
    m = [
        int(math.floor(r_search * math.sqrt(x * x + y * y + z * z) / vol + sp))
        for (x, y, z), sp in zip((bc, ca, ab), spread)
    ]
    box, boxf = _box(*m)
    t = boxf @ lattice  # bitwise the same as jarvis' per-image np.dot(image, L)
    ext = cart.max(axis=0) - cart.min(axis=0)
    reach = r_search + math.sqrt(float(ext @ ext))
    keep = np.einsum("ij,ij->i", t, t) <= reach * reach
    box, t = box[keep], t[keep]
    zero = int(np.count_nonzero(keep[: _box_center(m)]))  # index of n = 0 among the kept
    return box, t, zero


def _box_center(m) -> int:
    """Index of n = (0, 0, 0) in `_box(*m)`."""
    return (m[0] * (2 * m[1] + 1) + m[1]) * (2 * m[2] + 1) + m[2]


def _distances(t: np.ndarray, cart: np.ndarray, rows: slice) -> np.ndarray:
    """(R, K, n) distances d[a, k, j] from atom rows[a] to image k of atom j, jarvis-exact.

    jarvis computes sqrt(np.sum(((n @ L + c_j) - c_i) ** 2, axis=-1)); np.sum over a length-3
    axis adds (x0 + x1) + x2, which is what we do, so every distance is bitwise the same.
    """
    ct = np.ascontiguousarray(cart.T)  # (3, n)
    p = t.T[:, :, None] + ct[:, None, :]  # (3, K, n): image k of atom j
    z = p[:, None, :, :] - ct[:, rows, None, None]  # (3, R, K, n)
    z *= z
    d = z[0] + z[1]
    d += z[2]
    return np.sqrt(d, out=d)


@functools.lru_cache(maxsize=None)
def _have_pymatgen() -> bool:
    """"auto" falls back to the (chunked, identical) numpy search where pymatgen is missing,
    e.g. on a GPU image that lacks it."""
    try:
        from pymatgen.optimization.neighbors import find_points_in_spheres  # noqa: F401
    except ImportError:
        return False
    return True


def _knn(crystal, lattice, frac, cart, r, max_neighbors, min_distance, check_overlap, method, tie_tolerance):
    """jarvis `get_all_neighbors(r)` followed by the k-th-shell selection of every atom.

    Returns ((i, j, image), None, None) with the kept neighbours (image `image` of atom j is a
    neighbour of atom i), or (None, atom, count) when `atom` has only `count` < max_neighbors
    neighbours within r (the caller grows r).
    """
    n = frac.shape[0]
    box, t, zero = _image_search_box(lattice, frac, cart, r)
    big = box.shape[0] * n * n > _AUTO_NUMPY_MAX_TRIPLES
    if method == "pymatgen" or (method == "auto" and big and _have_pymatgen()):
        return _knn_pymatgen(crystal, lattice, cart, r, max_neighbors, min_distance, check_overlap, tie_tolerance)
    per_row = box.shape[0] * n
    rows_per_chunk = max(1, _CHUNK_PAIRS // per_row)
    drop_close = min_distance <= JARVIS_BOND_TOL  # else the overlap check already excludes them
    found = []
    for start in range(0, n, rows_per_chunk):  # a single pass unless the cell is large
        stop = min(n, start + rows_per_chunk)
        d = _distances(t, cart, slice(start, stop))
        ar = np.arange(stop - start)
        d[ar, zero, ar + start] = np.inf  # an atom is not its own neighbour
        if check_overlap and d.min() < min_distance:
            a, k, j = np.unravel_index(int(np.argmin(d)), d.shape)
            _raise_overlap(crystal, start + int(a), int(j), box[k], float(d[a, k, j]), min_distance)
        dd = d.reshape(stop - start, per_row)
        if drop_close:
            dd[dd <= JARVIS_BOND_TOL] = np.inf
        counts = np.count_nonzero(dd <= r, axis=1)
        if counts.min() < max_neighbors:
            a = int(np.argmin(counts))
            return None, start + a, int(counts[a])
        kth = np.partition(dd, max_neighbors - 1, axis=1)[:, max_neighbors - 1]
        if tie_tolerance:
            kth = np.minimum(kth + tie_tolerance, r)
        a, flat = np.nonzero(dd <= kth[:, None])
        kimg, j = np.divmod(flat, n)
        found.append((a + start if start else a, j, box[kimg]))
    if len(found) == 1:
        return found[0], None, None
    return tuple(np.concatenate(x) for x in zip(*found)), None, None


def _knn_pymatgen(crystal, lattice, cart, r, max_neighbors, min_distance, check_overlap, tie_tolerance):
    """As `_knn`, with pymatgen's `find_points_in_spheres` (cell lists) finding the candidates.

    pymatgen only proposes candidates (cutoff r + 1e-5 Å); their distances are recomputed with
    jarvis' arithmetic, and the cutoff and k-th-shell comparisons use those, as in `_knn`.
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    n = cart.shape[0]
    pts = np.ascontiguousarray(cart)
    ci, pj, img, _ = find_points_in_spheres(
        pts, pts, float(r) + 1e-5, np.ones(3, dtype=np.int64), np.ascontiguousarray(lattice), 1e-8
    )
    z = (img @ lattice + cart[pj]) - cart[ci]  # == np.dot(image, L) per row, bitwise
    z *= z
    d = z[:, 0] + z[:, 1]
    d += z[:, 2]
    np.sqrt(d, out=d)
    d[(ci == pj) & ~img.any(axis=1)] = np.inf  # an atom is not its own neighbour
    if check_overlap and d.size and d.min() < min_distance:
        e = int(np.argmin(d))
        _raise_overlap(crystal, int(ci[e]), int(pj[e]), img[e], float(d[e]), min_distance)
    ok = (d <= r) & (d > JARVIS_BOND_TOL)
    ci, pj, img, d = ci[ok], pj[ok], img[ok], d[ok]
    counts = np.bincount(ci, minlength=n)
    if counts.min() < max_neighbors:
        a = int(np.argmin(counts))
        return None, a, int(counts[a])
    order = np.lexsort((d, ci))
    kth = d[order[np.cumsum(counts) - counts + (max_neighbors - 1)]]
    if tie_tolerance:
        kth = kth + tie_tolerance
    keep = d <= kth[ci]
    return (ci[keep], pj[keep], np.rint(img[keep]).astype(np.int64)), None, None


def _raise_overlap(crystal, i, j, image, d, min_distance):
    image = tuple(int(round(float(x))) for x in image)
    if i == j:
        msg = f"atom {i} and its own periodic image {image} overlap"
    else:
        msg = f"atoms {min(i, j)} and {max(i, j)} overlap"
    where = f", periodic image {image}" if i != j and any(image) else ""
    raise CrystalError(crystal.id, f"{msg} (d={d:.4g} Å < {min_distance:g} Å{where})")


def build_crystal_graph(
    crystal: Crystal,
    cutoff: float = 8.0,
    max_neighbors: int = 12,
    use_lattice: bool = True,
    min_distance: float = 0.5,
    *,
    max_cutoff: float = 128.0,
    dedup_self_images: bool = False,
    tie_tolerance: float = 0.0,
    method: str = "auto",
    merge_edges: str = "none",
) -> CrystalGraph:
    """Builds the reference Matformer graph of `crystal` (../shared/DESIGN.md §2).

    Reproduces exactly the directed-edge multiset of jarvis-tools
    `nearest_neighbor_edges(cutoff, max_neighbors, use_canonize=True)` + the reference's lattice
    self-loops + `build_undirected_edgedata` (see the module docstring for the semantics),
    with one deliberate difference: the reference Matformer drops the lattice self-loops when it
    has to grow the cutoff (its recursion forgets ``use_lattice``); we keep them. Duplicate
    self-image edges (an atom's images ``n`` and ``-n`` both in the canonical edge set, hence
    each directed self-image edge twice) are reproduced by default, as in the reference;
    ``dedup_self_images=True`` keeps one copy of each.

    Args:
      crystal: the structure (validated with `validate_crystal` first).
      cutoff: initial neighbour cutoff in Å.
      max_neighbors: k; every atom keeps its neighbours up to and including the k-th shell.
      use_lattice: add the six lattice self-loop images (both directions) for every atom.
      min_distance: raise `CrystalError` if two atoms, or an atom and a periodic image of any
        atom (itself included), are closer than this (Å). Must not exceed `cutoff`.
      max_cutoff: the reference grows the cutoff without limit until every atom has k
        neighbours; we raise `CrystalError` instead once it would exceed this (Å).
      dedup_self_images: drop the duplicate copies of self-image edges (not the reference).
      tie_tolerance: keep every neighbour with d <= d_(k) + tie_tolerance (Å). The reference
        uses 0 (exact float comparison), so which members of a symmetric k-th shell it keeps
        depends on rounding noise; a small value (1e-6) keeps whole shells, giving a graph
        invariant under translations and changes of unit cell (not the reference).
      method: candidate search. "numpy": bounded lattice-image search, all atom pairs
        (fastest for small cells); "pymatgen": pymatgen's Cython cell-list search (fastest
        for large cells); "auto" (default) picks by the size of the image search. Distances
        are recomputed the reference's way in both, so all give the same graph.
      merge_edges: "none" (the reference edge list, default), "mirror" or "distance": edges
        with equal messages kept once with a count (`merge_equivalent_edges`; same model
        output, fewer edges); "atoms": equal atoms computed once too (property regression).

    Returns:
      A `CrystalGraph` with int32 senders, receivers and (E, 3) images, sorted by receiver,
      then sender, then image (with `counts` and `net` when merged).

    Raises:
      CrystalError: invalid record, overlapping atoms, or an atom that keeps fewer than
        `max_neighbors` neighbours up to `max_cutoff`.
    """
    validate_crystal(crystal)
    if max_neighbors < 1:
        raise ValueError(f"max_neighbors must be >= 1, got {max_neighbors}")
    if not 0 < cutoff <= max_cutoff:
        raise ValueError(f"need 0 < cutoff <= max_cutoff, got cutoff={cutoff}, max_cutoff={max_cutoff}")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if min_distance > cutoff:
        raise ValueError(f"min_distance ({min_distance}) must not exceed cutoff ({cutoff})")
    if merge_edges not in MERGE_LEVELS:
        raise ValueError(f"merge_edges must be one of {MERGE_LEVELS}, got {merge_edges!r}")
    lattice = crystal.lattice
    frac = crystal.frac_coords
    n = frac.shape[0]
    cart = np.dot(frac, np.around(lattice, decimals=5))  # jarvis' Atoms.cart_coords, same call

    r = float(cutoff)
    found, atom, count = _knn(crystal, lattice, frac, cart, r, max_neighbors, min_distance, True, method, tie_tolerance)
    while found is None:  # the reference's cutoff growth
        longest = _jarvis_max_length(lattice)
        r_new = longest if r < longest else 2 * r
        if r_new > max_cutoff:
            raise CrystalError(
                crystal.id,
                f"atom {atom} has only {count} neighbour(s) within {r:g} Å (fewer than "
                f"max_neighbors={max_neighbors}); growing the cutoff to {r_new:g} Å would exceed "
                f"max_cutoff={max_cutoff:g} Å (isolated atom or too much vacuum?)",
            )
        r = r_new
        found, atom, count = _knn(crystal, lattice, frac, cart, r, max_neighbors, min_distance, False, method, tie_tolerance)
    i, j, img = found

    # Canonize (i, j, n) -> (min(i, j), max(i, j), +-n) and encode as one int64:
    # code = pair * base^3 + digits(n), pair = a * n_atoms + b, digits(n) = (n + off) . (base^2, base, 1).
    off = int(np.abs(img).max()) + 1
    base = 2 * off + 1
    b3 = base**3
    mid = off * (base * base + base + 1)  # digits of the zero image
    iw = img @ np.array([base * base, base, 1], dtype=np.int64)  # digits(n) - mid
    swap = j < i
    codes = (np.minimum(i, j) * n + np.maximum(i, j)) * b3 + mid
    codes += np.where(swap, -iw, iw)
    if use_lattice:
        codes = np.concatenate([codes, _lattice_codes(n, off)])
    codes.sort()
    codes = codes[np.concatenate(([True], codes[1:] != codes[:-1]))]  # the canonical edge set
    pair, digits = np.divmod(codes, b3)
    a, b = np.divmod(pair, n)
    neg = 2 * mid - digits  # digits of -image
    if dedup_self_images:
        partner = pair * b3 + neg
        pos = np.searchsorted(codes, partner).clip(max=codes.size - 1)
        keep = (a != b) | (digits > neg) | (codes[pos] != partner)
        a, b, pair, digits, neg = a[keep], b[keep], pair[keep], digits[keep], neg[keep]

    # Both directions: (receiver b, sender a, image n) and (receiver a, sender b, image -n).
    directed = np.concatenate([(b * n + a) * b3 + digits, pair * b3 + neg])
    directed.sort()
    rs, digits = np.divmod(directed, b3)
    if n < 46_340:  # n * n fits in int32
        receivers, senders = np.divmod(rs.astype(np.int32), np.int32(n))
    else:
        receivers, senders = (x.astype(np.int32) for x in np.divmod(rs, n))
    if off <= _MAX_TABLE_OFF:
        images = _digit_table(off)[digits]
    else:
        images = np.empty((digits.size, 3), dtype=np.int32)
        images[:, 0], rest = np.divmod(digits, base * base)
        images[:, 1], images[:, 2] = np.divmod(rest, base)
        images -= off
    graph = CrystalGraph(crystal=crystal, senders=senders, receivers=receivers, images=images)
    return merge_equivalent_edges(graph, merge_edges)


def merge_equivalent_edges(graph: CrystalGraph, level: str) -> CrystalGraph:
    """`graph` with each group of edges that carry the same message kept once (module docstring).

    level: "none" (returns `graph`), "mirror" (identical edges and the mirrored self-images
    ``i -> i`` with ``n`` and ``-n``; exact under any perturbation), "distance" (same
    receiver, sender and float32 length; exact for the geometry as built) or "atoms"
    (`merge_equivalent_atoms`, then "distance"; exact for a mean over atoms). The first edge of
    each group stands for it, so the edges keep their order (sorted by receiver); `counts`
    sums the members' counts and, under "mirror", `net` their net counts, each member signed +1
    if its image is the representative's and -1 if it is the opposite one ("distance": no `net`).
    Merging a "mirror"- or "distance"-merged graph again composes (counts add up); "atoms"
    needs the unmerged graph (`merge_equivalent_atoms`).
    """
    if level not in MERGE_LEVELS:
        raise ValueError(f"merge level must be one of {MERGE_LEVELS}, got {level!r}")
    if level == "none":
        return graph
    if level == "atoms":
        graph, level = merge_equivalent_atoms(graph), "distance"
    n_edge = graph.num_edges
    # (always a merged graph, groups of one included, so a dataset's graphs share one layout)
    r, s, img = graph.receivers, graph.senders, graph.images.astype(np.int64)
    # a self-image edge's image up to sign: the sign that makes its first non-zero entry positive
    lead = img[np.arange(n_edge), np.argmax(img != 0, axis=1)]
    flip = (r == s) & (lead < 0)
    if level == "mirror":
        key = np.column_stack([r, s, np.where(flip[:, None], -img, img)])
    else:
        key = np.column_stack([r, s, _edge_lengths32(graph).view(np.int32)])
    _, first, group = np.unique(key, axis=0, return_index=True, return_inverse=True)
    group = group.reshape(-1)
    # renumber the groups in edge order, so the representatives keep the sorted edge order
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    group, keep = rank[group], first[order]
    counts = np.bincount(group, weights=graph.edge_counts(), minlength=keep.size).astype(np.int32)
    net = None
    if level == "mirror" and graph.has_net:  # every member's image is +-(the representative's)
        sign = np.where(np.all(img == img[keep][group], axis=1), 1, -1)
        net = np.bincount(group, weights=sign * graph.edge_net(), minlength=keep.size).astype(np.int32)
    return dataclasses.replace(graph, senders=graph.senders[keep], receivers=graph.receivers[keep],
                               images=graph.images[keep], counts=counts, net=net,
                               sources=None if graph.sources is None else graph.sources[keep])


def _edge_lengths32(graph: CrystalGraph) -> np.ndarray:
    """(E,) float32 edge lengths (float64 geometry rounded to the precision the model uses):
    the length key of "distance" merging and of `atom_classes`."""
    return np.sqrt(np.sum(graph.edge_vectors() ** 2, axis=1)).astype(np.float32)


def _edge_length_ids(graph: CrystalGraph) -> np.ndarray:
    """(E,) int: equal ids for edges of equal float32 length."""
    return np.unique(_edge_lengths32(graph).view(np.int32), return_inverse=True)[1].reshape(-1)


def atom_classes(graph: CrystalGraph) -> np.ndarray:
    """(N,) int class of each atom by colour refinement (1-Weisfeiler-Lehman) on species and
    incoming edges labelled by float32 length: start from the species, then split atoms whose
    multisets of (sender's class, edge length) differ, until nothing splits. Atoms of one class
    get equal features in every layer of a network whose messages depend only on (receiver,
    sender, length), as Matformer's do (by induction over the layers). Symmetry-equivalent atoms
    usually share a class; where rounding gives their equivalent edges different float32
    lengths they do not, which costs speed, not exactness. Classes are numbered by their first
    atom. Needs an unmerged graph (each edge counted once)."""
    n = graph.num_nodes
    r, src = graph.receivers.astype(np.int64), graph.edge_sources().astype(np.int64)
    length_id = _edge_length_ids(graph)
    colors = np.unique(graph.crystal.numbers, return_inverse=True)[1].reshape(-1)
    bounds = np.searchsorted(r, np.arange(n + 1))  # edges are sorted by receiver
    n_colors = int(colors.max()) + 1 if n else 0
    while True:
        key = colors[src] * (int(length_id.max(initial=0)) + 1) + length_id
        key = key[np.lexsort((key, r))]  # each receiver's keys, sorted: its multiset
        seen: dict = {}
        new = np.array([seen.setdefault((int(colors[i]), key[bounds[i]:bounds[i + 1]].tobytes()), len(seen))
                        for i in range(n)], np.int64)
        if len(seen) == n_colors:  # a refinement: the same count means the same partition
            break
        colors, n_colors = new, len(seen)
    first = np.unique(colors, return_index=True)[1]
    order = np.empty(first.size, np.int64)
    order[np.argsort(first, kind="stable")] = np.arange(first.size)
    return order[colors]


def merge_equivalent_atoms(graph: CrystalGraph) -> CrystalGraph:
    """`graph` with each class of `atom_classes` computed once: only the edges into a class's
    first atom (its representative) are kept, each sending from the representative of its
    sender's class (same features) while its geometry still starts from the real sender
    (`sources`); `node_counts` gives each representative its class size (others 0), the weight
    of its features in BatchNorm statistics and the per-crystal mean. The other atoms stay in
    the graph as positions only. Exact for a model whose output sums or averages over atoms
    (a property regressor); not for per-atom outputs. Usually followed by distance merging
    (level "atoms" of `merge_equivalent_edges`)."""
    if graph.counts is not None or graph.node_counts is not None:
        raise ValueError(f"{graph.crystal.id}: merging equal atoms needs the unmerged graph (its classes count each "
                         "edge once); build it with merge_edges='atoms' instead of merging a merged graph again")
    cls = atom_classes(graph)
    first = np.unique(cls, return_index=True)[1]  # representative atom of each class
    rep = first[cls]
    is_rep = rep == np.arange(graph.num_nodes)
    node_counts = np.where(is_rep, np.bincount(cls, minlength=first.size)[cls], 0).astype(np.int32)
    keep = is_rep[graph.receivers]
    return dataclasses.replace(
        graph, senders=rep[graph.senders[keep]].astype(np.int32), receivers=graph.receivers[keep],
        images=graph.images[keep], counts=graph.edge_counts()[keep], net=None,
        sources=graph.edge_sources()[keep].astype(np.int32), node_counts=node_counts)


@functools.lru_cache(maxsize=64)
def _digit_table(off: int) -> np.ndarray:
    """(base^3, 3) int32: the image whose digits (see build_crystal_graph) are the row index."""
    base = 2 * off + 1
    g = np.mgrid[0:base, 0:base, 0:base].reshape(3, -1).T - off
    table = np.ascontiguousarray(g, dtype=np.int32)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=256)
def _lattice_codes(n: int, off: int) -> np.ndarray:
    """Canonical codes of the lattice self-loops (i, i, LATTICE_IMAGES) of atoms 0..n-1."""
    base = 2 * off + 1
    digits = (LATTICE_IMAGES + off) @ np.array([base * base, base, 1], dtype=np.int64)
    codes = (np.arange(n, dtype=np.int64) * (n + 1) * base**3)[:, None] + digits[None, :]
    codes = codes.ravel()
    codes.setflags(write=False)
    return codes
