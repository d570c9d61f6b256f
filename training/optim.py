"""optax chains from ``OptimConfig``: schedule, global-norm clipping, AdamW.

Weight decay applies to matrices only (kernels and embeddings), not to norms or biases.
"""

from __future__ import annotations

import jax
import optax

from jaxkv.training.config import OptimConfig

__all__ = ["make_schedule", "make_optimizer"]


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    warm = min(cfg.warmup_steps, cfg.total_steps)
    low = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.lr, warmup_steps=warm,
            decay_steps=max(cfg.total_steps, warm + 1), end_value=low)
    warmup = optax.linear_schedule(0.0, cfg.lr, max(warm, 1))
    if cfg.schedule == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(cfg.lr)], [warm])
    decay_steps = max(1, int(round(cfg.total_steps * cfg.decay_fraction)))
    stable_end = max(warm, cfg.total_steps - decay_steps)
    # a warmup longer than the stable part shortens the decay, which still ends at total_steps
    return optax.join_schedules(
        [warmup, optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, low, max(1, cfg.total_steps - stable_end))],
        [warm, stable_end])


def _decay_mask(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
