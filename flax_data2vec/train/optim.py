"""Train state and optimizer: optax AdamW + schedule + clipping + freezing + non-finite step skipping."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import struct, traverse_util

from ..schedules import tri_stage_schedule, warmup_cosine, warmup_linear
from .config import TrainConfig


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


def param_labels(params, label: Callable[[tuple[str, ...]], str]) -> Any:
    """The label ('train', 'frozen' or 'delayed') of every parameter, for `optax.multi_transform`."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: label(k) for k in flat})


def train_everything(path: tuple[str, ...]) -> str:
    return "train"


def make_optimizer(cfg: TrainConfig, schedule: optax.Schedule, params,
                   label: Callable[[tuple[str, ...]], str] = train_everything,
                   adam_eps: float | None = None, clip_norm: float | None = None,
                   decay_mask: Callable | None = None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; a step whose gradients are not finite is skipped and counted.

    `label(path)` sorts params: 'train'; 'frozen' (never change); 'delayed' (unchanged for the first
    `cfg.freeze_encoder_steps` updates, weight decay included, with their Adam state untouched meanwhile,
    as fairseq's `freeze_finetune_updates` leaves them out of the optimizer; `optax.conditionally_mask`).
    `decay_mask(params)` (optax.adamw's `mask`): where weight decay applies; None: everywhere.
    """
    clip = cfg.clip_norm if clip_norm is None else clip_norm

    def adamw(lr):
        return optax.adamw(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps if adam_eps is None else adam_eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)
    delay = cfg.freeze_encoder_steps
    # the delayed AdamW's own step count starts when the gate opens: shift its schedule to the global step
    delayed = optax.transforms.conditionally_mask(adamw(lambda count: schedule(count + delay)),
                                                  lambda count: count >= delay)
    transforms = {"train": adamw(schedule), "frozen": optax.set_to_zero(), "delayed": delayed}
    tx = optax.multi_transform(transforms, param_labels(params, label))
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)


def skipped_steps(opt_state) -> jax.Array:
    """How many steps `apply_if_finite` has skipped so far."""
    return opt_state.total_notfinite
