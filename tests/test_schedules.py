"""Learning-rate schedules: values at stage boundaries against fairseq's closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_data2vec.schedules import tri_stage_phases, tri_stage_schedule, warmup_cosine, warmup_linear


def _fairseq_tri_stage(step, peak, total, ratios, init_scale, final_scale):
    """Direct transcription of the tri_stage rules (stage decided as fairseq's _decide_stage)."""
    w, h, d = (int(total * r) for r in ratios)
    init, final = init_scale * peak, final_scale * peak
    if step < w:
        return init + (peak - init) / w * step
    if step < w + h:
        return peak
    if step <= w + h + d:
        return peak * math.exp(math.log(final_scale) / d * (step - w - h))
    return final


@pytest.mark.parametrize("ratios,init_scale,final_scale,total",
                         [((0.1, 0.4, 0.5), 0.01, 0.05, 1000), ((0.03, 0.9, 0.07), 0.01, 0.01, 400_000)])
def test_tri_stage_boundaries(ratios, init_scale, final_scale, total):
    peak = 5e-4
    sched = tri_stage_schedule(peak, total, ratios, init_scale, final_scale)
    w, h, d = tri_stage_phases(total, ratios)
    steps = [0, 1, w // 2, w - 1, w, w + h // 2, w + h - 1, w + h, w + h + d // 2, w + h + d - 1,
             w + h + d, w + h + d + 1, 2 * total]
    for s in steps:  # rtol 1e-4: optax evaluates the schedules in float32
        np.testing.assert_allclose(float(sched(s)), _fairseq_tri_stage(s, peak, total, ratios, init_scale,
                                                                        final_scale), rtol=1e-4, err_msg=str(s))
    assert float(sched(0)) == pytest.approx(init_scale * peak, rel=1e-4)
    assert float(sched(w)) == pytest.approx(peak, rel=1e-6)
    assert float(sched(w + h + d)) == pytest.approx(final_scale * peak, rel=1e-4)


def test_tri_stage_data2vec_audio_phases_and_jit():
    assert tri_stage_phases(400_000, (0.03, 0.9, 0.07)) == (12_000, 360_000, 28_000)
    sched = tri_stage_schedule(5e-4, 400_000, (0.03, 0.9, 0.07), 0.01, 0.01)
    out = jax.jit(sched)(jnp.asarray(6_000))
    assert float(out) == pytest.approx(5e-6 + (5e-4 - 5e-6) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        tri_stage_schedule(1.0, 100, (0.5, 0.4, 0.2))


def test_warmup_cosine_values():
    peak, warm, total = 2e-4, 10_000, 1_000_000
    sched = warmup_cosine(peak, warm, total)
    assert float(sched(0)) == 0.0
    assert float(sched(warm // 2)) == pytest.approx(peak / 2, rel=1e-5)
    assert float(sched(warm)) == pytest.approx(peak, rel=1e-6)
    mid = warm + (total - warm) // 2
    assert float(sched(mid)) == pytest.approx(peak / 2, rel=1e-4)
    quarter = warm + (total - warm) // 4
    assert float(sched(quarter)) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-4)
    assert float(sched(total)) == pytest.approx(0.0, abs=1e-12)
    assert float(sched(total + 10)) == pytest.approx(0.0, abs=1e-12)


def test_warmup_linear_values():
    sched = warmup_linear(1e-3, 100, 1100, end_value=1e-5)
    assert float(sched(0)) == 0.0
    assert float(sched(50)) == pytest.approx(5e-4, rel=1e-6)
    assert float(sched(100)) == pytest.approx(1e-3, rel=1e-6)
    assert float(sched(600)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-5)
    assert float(sched(1100)) == pytest.approx(1e-5, rel=1e-5)
    assert float(sched(5000)) == pytest.approx(1e-5, rel=1e-5)
    with pytest.raises(ValueError):
        warmup_linear(1e-3, 100, 100)
