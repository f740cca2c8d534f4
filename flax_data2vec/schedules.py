"""Learning-rate schedules built from optax pieces: fairseq tri-stage, warm-up + cosine, warm-up + linear.

Each function returns an ``optax.Schedule`` (step -> lr) that works on traced integer steps.
"""

from __future__ import annotations

import optax


def tri_stage_phases(total_steps: int, phase_ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """(warm-up, hold, decay) step counts: ``int(total_steps * ratio)`` each, as fairseq computes them."""
    if len(phase_ratios) != 3 or abs(sum(phase_ratios) - 1.0) > 1e-6:
        raise ValueError(f"phase_ratios must be three numbers summing to 1, got {phase_ratios}")
    warmup, hold, decay = (int(total_steps * r) for r in phase_ratios)
    return warmup, hold, decay


def tri_stage_schedule(peak_lr: float, total_steps: int,
                       phase_ratios: tuple[float, float, float] = (0.1, 0.4, 0.5),
                       init_lr_scale: float = 0.01, final_lr_scale: float = 0.05) -> optax.Schedule:
    """fairseq ``tri_stage`` scheduler (wav2vec 2.0 / data2vec).

    Stage 1: linear from ``init_lr_scale * peak_lr`` to ``peak_lr`` over the warm-up steps; stage 2:
    ``peak_lr``; stage 3: ``peak_lr * exp(-k * t)`` with ``k = -ln(final_lr_scale) / decay_steps``,
    reaching ``final_lr_scale * peak_lr`` at the end of the decay; afterwards constant at that value.
    Defaults are the wav2vec 2.0 fine-tuning ones; data2vec audio pre-training uses
    ``phase_ratios=(0.03, 0.9, 0.07)`` and ``final_lr_scale=0.01``.
    """
    warmup, hold, decay = tri_stage_phases(total_steps, phase_ratios)
    init_lr, final_lr = init_lr_scale * peak_lr, final_lr_scale * peak_lr
    stages = [
        optax.linear_schedule(init_lr, peak_lr, warmup) if warmup > 0 else optax.constant_schedule(peak_lr),
        optax.constant_schedule(peak_lr),
        optax.exponential_decay(peak_lr, transition_steps=max(decay, 1), decay_rate=final_lr_scale,
                                end_value=final_lr),
        optax.constant_schedule(final_lr),
    ]
    return optax.join_schedules(stages, [warmup, warmup + hold, warmup + hold + decay])


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, init_value: float = 0.0,
                  end_value: float = 0.0) -> optax.Schedule:
    """Linear warm-up from ``init_value`` to ``peak_lr``, then cosine to ``end_value`` at ``total_steps``.

    fairseq ``cosine`` with ``warmup_init_lr = min_lr = 0`` and period ``max_update - warmup_updates``
    (data2vec text: 10k warm-up, 1M updates). ``total_steps`` counts the warm-up; constant afterwards.
    """
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    return optax.warmup_cosine_decay_schedule(init_value, peak_lr, warmup_steps, total_steps, end_value)


def warmup_linear(peak_lr: float, warmup_steps: int, total_steps: int, init_value: float = 0.0,
                  end_value: float = 0.0) -> optax.Schedule:
    """Linear warm-up to ``peak_lr``, then linear decay to ``end_value`` at ``total_steps``.

    fairseq ``polynomial_decay`` with power 1 / transformers ``get_linear_schedule_with_warmup``.
    """
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    return optax.join_schedules(
        [optax.linear_schedule(init_value, peak_lr, warmup_steps),
         optax.linear_schedule(peak_lr, end_value, total_steps - warmup_steps)],
        [warmup_steps])
