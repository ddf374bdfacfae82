"""The optimizer: optax AdamW behind gradient clipping, with warmup + constant/cosine schedule."""

from __future__ import annotations

import optax

from jaxcov.config import OptimConfig


def learning_rate_schedule(config: OptimConfig, total_updates: int) -> optax.Schedule:
    """Linear warmup to `lr`, then constant or cosine decay to `lr * min_lr_ratio`."""
    warmup = min(config.warmup_steps, max(total_updates - 1, 0))
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
            decay_steps=max(total_updates, warmup + 1), end_value=config.lr * config.min_lr_ratio)
    if warmup == 0:
        return optax.constant_schedule(config.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup),
                                 optax.constant_schedule(config.lr)], [warmup])


def make_optimizer(config: OptimConfig, total_updates: int):
    """(optax transformation, schedule); the schedule maps an update count to its lr."""
    schedule = learning_rate_schedule(config, total_updates)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw), schedule
    return adamw, schedule
