"""Optimiser: AdamW with PyTorch's OneCycleLR (learning rate and Adam β1 cycling), clipped.

The reference Matformer trains with `torch.optim.AdamW` and `OneCycleLR(max_lr, pct_start=0.3)`,
whose defaults also cycle β1 between 0.95 and 0.85 (`cycle_momentum=True`). We reproduce both
schedules exactly (cosine annealing, `div_factor` 25, `final_div_factor` 1e4) so that from-scratch
accuracy can be compared with the reference on equal terms.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def _cos_anneal(start, end, pct):
    return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)


def one_cycle(total_steps: int, peak: float, low: float, high: float, pct_start: float = 0.3):
    """A two-phase cosine schedule: low → peak over pct_start of the steps, then peak → high.

    Mirrors torch's OneCycleLR(three_phase=False): phase ends at pct_start·T − 1 and T − 1.
    """
    total_steps = max(int(total_steps), 2)
    end1 = max(float(pct_start * total_steps) - 1.0, 1.0)
    end2 = float(total_steps - 1)

    def schedule(step):
        step = jnp.minimum(jnp.asarray(step, jnp.float32), end2)
        first = _cos_anneal(low, peak, step / end1)
        second = _cos_anneal(peak, high, (step - end1) / jnp.maximum(end2 - end1, 1.0))
        return jnp.where(step <= end1, first, second)

    return schedule


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW + one-cycle LR (+ β1 cycling) + global-norm clipping, from `config.optim`."""
    max_lr = cfg.learning_rate
    init_lr = max_lr / cfg.div_factor
    lr = one_cycle(total_steps, max_lr, init_lr, init_lr / cfg.final_div_factor, cfg.pct_start)
    if cfg.cycle_momentum:
        # β1 runs opposite to the learning rate: 0.95 → 0.85 → 0.95.
        b1 = one_cycle(total_steps, cfg.base_momentum, cfg.max_momentum, cfg.max_momentum, cfg.pct_start)
    else:
        b1 = cfg.max_momentum
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr, b1=b1, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(adamw)
    tx = optax.chain(*parts)
    # One update over the concatenated parameters instead of one per leaf: elementwise the same
    # maths (the clipping norm sums in another order), far fewer kernel launches per step.
    return optax.flatten(tx) if cfg.get("flatten", False) else tx
