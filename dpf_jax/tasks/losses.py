"""Masked losses as (sum, count) pairs (pure jnp).

Every loss returns the SUM of its per-entry terms over the entries where `mask` is True, and
the COUNT of those entries, both float32 scalars. The training step adds them over its
micro-batches / devices (`jax.lax.psum` of both under shard_map, or a plain sum of a sharded
batch under jit) and divides once at the end:

    loss = psum(sum) / max(psum(count), 1)

This gives the exact mean over every real entry of the global batch, however the crystals are
split over devices and however much padding each share holds (a mean per device followed by a
mean over devices would weight a device holding few atoms as much as one holding many).
Masked-out entries contribute exactly zero to the value AND to the gradient, even if the
prediction or target there is inf or NaN (inputs are zeroed with `where` before any arithmetic,
never multiplied by the mask).

What counts as one entry:
  regression_*:      one scalar of `pred` (mask broadcast over trailing dims: [G] or [G, k]);
  masked_type_loss:  one masked atom;
  position_loss:     one perturbed atom (the term is the squared norm |pred − target|² of its
                     3-vector, so the mean is 3× the per-component MSE);
  lattice_loss:      one lattice parameter (6 per real crystal): the mean is the MSE of the
                     normalised parameters.
  l1_loss:           one scalar component (mask broadcast over trailing dims), so the mean is
                     PyTorch's `L1Loss()` (mean over every element): the "official" variant's
                     fractional-coordinate (3 per atom) and lattice-matrix (9 per crystal) losses.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpf_jax.tasks.perturb import lattice_params_np

NUM_SPECIES_CLASSES = 95  # Z = 1..95 → class Z − 1


def _broadcast_mask(mask, like):
    mask = jnp.asarray(mask, bool)
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim)), like.shape)


def _masked_sum(values, mask):
    m = _broadcast_mask(mask, values)
    total = jnp.sum(jnp.where(m, values, 0.0).astype(jnp.float32))
    return total, jnp.sum(m).astype(jnp.float32)


def _clean(x, mask):
    """x as float32 with masked-out entries replaced by 0 BEFORE any arithmetic, so that inf or
    NaN there (uninitialised padding, a diverged head) reaches neither the value nor the
    gradient (the "double where" idiom)."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.where(_broadcast_mask(mask, x), x, 0.0)


def regression_sq_error(pred, target, mask):
    """(Σ (pred − target)², count) over masked entries; pred/target [G] or [G, k], mask [G]."""
    diff = _clean(pred, mask) - _clean(target, mask)
    return _masked_sum(jnp.square(diff), mask)


def regression_abs_error(pred, target, mask):
    """(Σ |pred − target|, count) over masked entries; shapes as `regression_sq_error`."""
    diff = _clean(pred, mask) - _clean(target, mask)
    return _masked_sum(jnp.abs(diff), mask)


def masked_type_loss(logits, species, mask):
    """Cross-entropy of the true type of masked atoms.

    logits [N, C] (C = 95: class = Z − 1), species [N] int clean Z, mask bool [N].
    Returns (Σ cross-entropy, number of atoms, number predicted correctly (argmax)).
    Atoms whose Z is outside 1..C (never in the shipped data, max Z = 94) are left out of all
    three numbers.
    """
    logits = jnp.asarray(logits, jnp.float32)
    num_classes = logits.shape[-1]
    cls = jnp.asarray(species, jnp.int32) - 1
    valid = jnp.asarray(mask, bool) & (cls >= 0) & (cls < num_classes)
    cls = jnp.where(valid, cls, 0)
    logits = _clean(logits, valid)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, cls[:, None], axis=-1)[:, 0]
    ce = jnp.sum(jnp.where(valid, nll, 0.0))
    correct = jnp.sum(valid & (jnp.argmax(logits, axis=-1) == cls)).astype(jnp.float32)
    return ce, jnp.sum(valid).astype(jnp.float32), correct


def position_loss(pred, displacement, mask):
    """(Σ_atoms |pred − displacement|², number of atoms) over masked atoms; pred [N, 3]."""
    per_atom = jnp.sum(jnp.square(_clean(pred, mask) - _clean(displacement, mask)), axis=-1)
    return _masked_sum(per_atom, mask)


def l1_loss(pred, target, mask):
    """(Σ |pred − target| over every component of the masked rows, number of components).

    pred/target [N, k] (or [N]), mask bool [N]: e.g. fractional coordinates [N, 3] with the node
    mask, or lattice matrices [G, 9] with the graph mask. No periodic wrapping (as the reference).
    """
    diff = _clean(pred, mask) - _clean(target, mask)
    return _masked_sum(jnp.abs(diff), mask)


def normalise_lattice_params(params, mean, std):
    return (jnp.asarray(params, jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def denormalise_lattice_params(pred, mean, std):
    """Head output (normalised units) → (a, b, c Å, α, β, γ degrees)."""
    return jnp.asarray(pred, jnp.float32) * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)


def lattice_loss(pred, clean_params, mask, mean, std):
    """(Σ over the 6 parameters of real crystals of (pred − (clean − mean)/std)², 6 · crystals).

    pred [G, 6] is in normalised units (the head predicts normalised parameters); clean_params
    [G, 6] raw (Å, degrees); mask [G]; mean, std [6] from `lattice_param_stats` (training set).
    """
    target = normalise_lattice_params(_clean(clean_params, mask), mean, std)
    diff = _clean(pred, mask) - jnp.where(_broadcast_mask(mask, target), target, 0.0)
    return _masked_sum(jnp.square(diff), mask)


def lattice_param_stats(lattices: Sequence[np.ndarray], min_std: float = 1e-3
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(mean [6], std [6]) float32 of (a, b, c, α, β, γ) over the given 3x3 lattices (numpy).

    Population std (ddof 0), floored at `min_std` so a constant parameter cannot divide by 0.
    """
    lat = np.asarray([np.asarray(l, np.float64) for l in lattices])
    if lat.ndim != 3 or lat.shape[1:] != (3, 3) or lat.shape[0] == 0:
        raise ValueError(f"need a non-empty list of 3x3 lattices, got shape {lat.shape}")
    p = lattice_params_np(lat)
    return p.mean(0).astype(np.float32), np.maximum(p.std(0), min_std).astype(np.float32)
