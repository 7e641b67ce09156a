"""What is trained: property regression (fine-tuning) or denoising (pre-training).

An objective builds its Flax model and, per device share of a batch, turns model outputs into
named `(sum, count)` loss terms. The step sums both across devices and divides once, so a
loss is the mean over the whole global batch however it is split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from dpf_jax.model.heads import DenoisingModel
from dpf_jax.model.layers import (BATCH_NORM_STATS, describe_auto_edge_kernel, resolve_edge_kernel,
                                  resolve_fold_edge_weights)
from dpf_jax.model.matformer import MatformerEncoder, MatformerRegressor
from dpf_jax.tasks import losses, perturb
from dpf_jax.tasks.rebuild import targets_from_batch
from dpf_jax.train.parallel import AXIS

Terms = Mapping[str, tuple[jax.Array, jax.Array]]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_PRECISIONS = {"default": None, "highest": "highest", "high": "high", "bf16": None}


def model_kwargs(model_cfg: ml_collections.ConfigDict, axis_name: str | None) -> dict:
    """Encoder fields shared by the regression and denoising models."""
    precision = model_cfg.get("precision", "default")
    if precision not in _PRECISIONS:
        raise ValueError(f"model.precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    bn_stats = model_cfg.get("batch_norm_stats", "gathered")  # configs saved before the key: base.py default
    if bn_stats not in BATCH_NORM_STATS:
        raise ValueError(f"model.batch_norm_stats must be one of {BATCH_NORM_STATS}, got {bn_stats!r}")
    dtype = jnp.bfloat16 if precision == "bf16" else _DTYPES[model_cfg.get("dtype", "float32")]
    return dict(num_layers=model_cfg.num_layers, channels=model_cfg.channels, heads=model_cfg.heads,
                rbf_bins=model_cfg.rbf_bins, cutoff=model_cfg.cutoff, axis_name=axis_name,
                dtype=dtype, precision=_PRECISIONS[precision],
                formulation=model_cfg.get("formulation", "node"), edge_kernel=model_cfg.get("edge_kernel", "auto"),
                remat=model_cfg.get("remat", "none"),
                batch_norm_stats=bn_stats, fold_edge_weights=model_cfg.get("fold_edge_weights", False))


def _edge_kernel(kw: dict) -> tuple[str, str, str]:
    """(the configured name, the kernel `layers.resolve_edge_kernel` runs, its label for logs) from
    the encoder's keyword arguments: "auto" labelled by its rule where the kernel depends on each
    padded budget (`layers.describe_auto_edge_kernel`)."""
    name = kw["edge_kernel"]
    kernel = resolve_edge_kernel(name, kw["formulation"], kw["channels"], kw["remat"])
    return name, kernel, describe_auto_edge_kernel(kernel) if name == "auto" else kernel


def resolved_edge_kernel(model_cfg: ml_collections.ConfigDict) -> str:
    """`model.edge_kernel` as the encoder runs it on this backend, for logs and reports: a named
    kernel as named; "auto" resolved by `layers.resolve_edge_kernel` from the encoder's own
    settings and defaults, and where that depends on each padded budget (a GPU), the rule
    (`layers.describe_auto_edge_kernel`)."""
    return _edge_kernel(model_kwargs(model_cfg, None))[2]


def describe_compute(model_cfg: ml_collections.ConfigDict) -> str:
    """The compute settings a run's log states: matmul precision and the edge kernel as it runs,
    e.g. "precision default, edge kernel pallas_gate_rows-16x8-sorted-sum per padded budget: ...
    (model.edge_kernel=auto), lin_edge folded into e @ W3"."""
    kw = model_kwargs(model_cfg, None)
    name, kernel, label = _edge_kernel(kw)
    how = f" (model.edge_kernel={name})" if kernel != name else ""
    fold = resolve_fold_edge_weights(kw["fold_edge_weights"], kw["formulation"], kernel)
    folded = ", lin_edge folded into e @ W3" if fold else ""
    return f"precision {model_cfg.get('precision', 'default')}, edge kernel {label}{how}{folded}"


@dataclasses.dataclass
class RegressionObjective:
    """MSE on standardised targets; MAE reported in the target's own units."""

    model_cfg: ml_collections.ConfigDict
    name: str = "regression"

    def make_model(self, axis_name: str | None = AXIS):
        return MatformerRegressor(encoder=MatformerEncoder(**model_kwargs(self.model_cfg, axis_name)))

    def prepare(self, key, graph, stats):
        del key
        return graph, {}

    def loss_terms(self, outputs, graph, targets, stats) -> tuple[Terms, Any]:
        del targets
        mask = graph.globals["mask"]
        target = (graph.globals["target"] - stats["target_mean"]) / stats["target_std"]
        pred_std = outputs.astype(jnp.float32)
        sq = losses.regression_sq_error(pred_std, target, mask)
        pred = pred_std * stats["target_std"] + stats["target_mean"]
        ae = losses.regression_abs_error(pred, graph.globals["target"], mask)
        return {"mse": sq, "mae": ae}, pred

    def total_loss(self, terms) -> jax.Array:
        s, c = terms["mse"]
        return s / jnp.maximum(c, 1.0)


@dataclasses.dataclass
class DenoisingObjective:
    """Weighted sum of the enabled denoising losses (types, positions, lattice)."""

    model_cfg: ml_collections.ConfigDict
    pretrain_cfg: ml_collections.ConfigDict
    name: str = "denoising"

    @property
    def enabled(self) -> dict:
        p = self.pretrain_cfg
        return {"types": bool(p.mask_fraction), "positions": bool(p.position_scale),
                "lattice": bool(p.lattice_scale)}

    def make_model(self, axis_name: str | None = AXIS):
        e = self.enabled
        return DenoisingModel(encoder=MatformerEncoder(**model_kwargs(self.model_cfg, axis_name)),
                              types=e["types"], positions=e["positions"], lattice=e["lattice"])

    def perturb_cfg(self) -> dict:
        p = self.pretrain_cfg
        return {"mask_fraction": p.mask_fraction, "position_scale": p.position_scale,
                "position_fraction": p.position_fraction, "lattice_scale": p.lattice_scale}

    def prepare(self, key, graph, stats):
        del stats
        if self.pretrain_cfg.rebuild_topology:  # perturbed (and re-graphed) by the input pipeline
            return graph, targets_from_batch(graph)
        return perturb.perturb(key, graph, self.perturb_cfg())

    def loss_terms(self, outputs, graph, targets, stats) -> tuple[Terms, Any]:
        terms = {}
        if "type_logits" in outputs:
            s, c, correct = losses.masked_type_loss(outputs["type_logits"], targets["species"],
                                                    targets["type_mask"])
            terms["type_ce"] = (s, c)
            terms["type_acc"] = (correct, c)
        if "displacement" in outputs:
            terms["position_mse"] = losses.position_loss(outputs["displacement"], targets["displacement"],
                                                         targets["position_mask"])
        if "lattice" in outputs:
            terms["lattice_mse"] = losses.lattice_loss(outputs["lattice"], targets["lattice_params"],
                                                       targets["lattice_mask"], stats["lattice_mean"],
                                                       stats["lattice_std"])
        return terms, None

    def total_loss(self, terms) -> jax.Array:
        p = self.pretrain_cfg
        weights = {"type_ce": p.type_weight, "position_mse": p.position_weight, "lattice_mse": p.lattice_weight}
        total = 0.0
        for name, w in weights.items():
            if name in terms:
                s, c = terms[name]
                total = total + w * s / jnp.maximum(c, 1.0)
        return total


# ----------------------------------------------------------------- corruption = "official"

@dataclasses.dataclass
class OfficialDenoisingObjective:
    """The authors' released pre-training (DESIGN §4, `dpf_jax.tasks.official`): the input
    pipeline (`OfficialBatcher`) already corrupted every crystal once and rebuilt its graph;
    loss = CE(masked atoms) + L1(clean fractional coordinates) + L1(clean lattice matrix),
    unweighted (the `pretrain.*_weight` and noise-scale fields are not used)."""

    model_cfg: ml_collections.ConfigDict
    pretrain_cfg: ml_collections.ConfigDict
    name: str = "denoising_official"

    def make_model(self, axis_name: str | None = AXIS):
        return DenoisingModel(encoder=MatformerEncoder(**model_kwargs(self.model_cfg, axis_name)),
                              types=True, positions=False, lattice=False, official=True)

    def prepare(self, key, graph, stats):
        del key, stats
        return graph, targets_from_batch(graph)

    def loss_terms(self, outputs, graph, targets, stats) -> tuple[Terms, Any]:
        del stats
        s, c, correct = losses.masked_type_loss(outputs["type_logits"], targets["species"], targets["type_mask"])
        terms = {"type_ce": (s, c), "type_acc": (correct, c),
                 "frac_l1": losses.l1_loss(outputs["frac_coords"], targets["frac_coords"], graph.nodes["mask"]),
                 "lattice_l1": losses.l1_loss(outputs["lattice9"], targets["lattice"], targets["lattice_mask"])}
        return terms, None

    def total_loss(self, terms) -> jax.Array:
        total = 0.0
        for name in ("type_ce", "frac_l1", "lattice_l1"):
            if name in terms:
                s, c = terms[name]
                total = total + s / jnp.maximum(c, 1.0)
        return total
