"""Train state and optimizer: optax AdamW + schedule + clipping + freezing + non-finite step skipping."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util

from .config import TrainConfig
from .schedules import tri_stage_schedule, warmup_cosine, warmup_linear


@struct.dataclass
class TrainState:
    """Everything a step changes; a pytree, so it is checkpointed, sharded and donated whole.

    extra: task-owned state that is not optimised (the EMA teacher in data2vec pre-training).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    extra: Any = None


def make_schedule(cfg: TrainConfig, default_lr: float, default_schedule: str,
                  default_ratios: tuple[float, float, float] = (0.1, 0.4, 0.5)) -> optax.Schedule:
    """The learning-rate schedule over `cfg.max_steps` (task defaults where the config says 0/auto/())."""
    lr = cfg.learning_rate or default_lr
    kind = default_schedule if cfg.schedule == "auto" else cfg.schedule
    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    if kind == "tri_stage":
        return tri_stage_schedule(lr, cfg.max_steps, tuple(cfg.tri_stage_ratios) or default_ratios)
    if kind == "cosine":
        return warmup_cosine(lr, warmup, cfg.max_steps)
    if kind == "linear":
        return warmup_linear(lr, warmup, cfg.max_steps)
    return optax.constant_schedule(lr)


def _gate_until(step_count: int) -> optax.GradientTransformation:
    """Zero the updates (before Adam sees them) for the first `step_count` steps."""
    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        open_ = (state.count >= step_count).astype(jnp.float32)
        updates = jax.tree_util.tree_map(lambda u: u * open_.astype(u.dtype), updates)
        return updates, optax.ScaleByScheduleState(count=state.count + 1)
    return optax.GradientTransformation(init, update)


def param_labels(params, frozen: Callable[[tuple[str, ...]], bool],
                 delayed: Callable[[tuple[str, ...]], bool]) -> Any:
    """'frozen' / 'delayed' / 'train' label per parameter, for `optax.multi_transform`."""
    flat = traverse_util.flatten_dict(params)
    labels = {k: ("frozen" if frozen(k) else "delayed" if delayed(k) else "train") for k in flat}
    return traverse_util.unflatten_dict(labels)


def make_optimizer(cfg: TrainConfig, schedule: optax.Schedule, params,
                   frozen: Callable[[tuple[str, ...]], bool] = lambda p: False,
                   delayed: Callable[[tuple[str, ...]], bool] = lambda p: False,
                   adam_eps: float | None = None, clip_norm: float | None = None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; `frozen` params never change, `delayed` ones wait
    `cfg.freeze_encoder_steps`; a step whose gradients are not finite is skipped and counted."""
    clip = cfg.clip_norm if clip_norm is None else clip_norm
    adamw = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps if adam_eps is None else adam_eps,
                        weight_decay=cfg.weight_decay)
    transforms = {"train": adamw, "frozen": optax.set_to_zero(),
                  "delayed": optax.chain(_gate_until(cfg.freeze_encoder_steps), adamw)}
    tx = optax.multi_transform(transforms, param_labels(params, frozen, delayed))
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)


def skipped_steps(opt_state) -> jax.Array:
    """How many steps `apply_if_finite` has skipped so far."""
    return opt_state.total_notfinite
