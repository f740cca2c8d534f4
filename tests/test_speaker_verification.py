"""--task speaker-verification: equal error rate, trial pairs, AM-softmax (sum, count), and a real run."""

import dataclasses
import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_train import run

from flax_data2vec import losses
from flax_data2vec.train.tasks import speaker_verification as sv


def brute_force_eer(scores, targets, points=200_001):
    """FAR and FRR at every threshold, joined by straight lines and sampled finely: where they meet."""
    curve = [(np.mean(scores[targets] < t), np.mean(scores[~targets] >= t))
             for t in np.r_[np.inf, np.unique(scores)[::-1]]]
    frr, far = np.array(curve).T
    s = np.linspace(0, len(curve) - 1, points)
    frr, far = np.interp(s, np.arange(len(curve)), frr), np.interp(s, np.arange(len(curve)), far)
    k = np.argmin(np.abs(frr - far))
    return (frr[k] + far[k]) / 2


def test_equal_error_rate():
    targets = np.array([True, True, False, False])
    assert sv.equal_error_rate(np.array([0.9, 0.8, 0.1, 0.2]), targets) == 0.0
    assert sv.equal_error_rate(np.array([0.1, 0.2, 0.9, 0.8]), targets) == 1.0
    assert sv.equal_error_rate(np.zeros(4), targets) == 0.5  # one tied score: chance
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = np.round(rng.standard_normal(40), 1)  # ties included
        targets = rng.random(40) < 0.3
        assert sv.equal_error_rate(scores + targets, targets) == pytest.approx(
            brute_force_eer(scores + targets, targets), abs=1e-3)
    assert np.isnan(sv.equal_error_rate(np.zeros(3), np.ones(3, bool)))


def test_trial_pairs():
    i, j = sv.trial_pairs(5)
    assert list(zip(i, j)) == list(itertools.combinations(range(5), 2))
    a, b = sv.trial_pairs(100, max_trials=50), sv.trial_pairs(100, max_trials=50)
    assert len(a[0]) == 50 and all(a[0] < a[1]) and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_am_softmax_sum_skips_ignored_rows_and_matches_the_mean():
    rng = np.random.default_rng(0)
    hidden, weight = jnp.asarray(rng.standard_normal((4, 6))), jnp.asarray(rng.standard_normal((6, 3)))
    labels = jnp.array([0, 2, -100, 1])
    total, count = losses.am_softmax_sum(hidden, weight, labels)
    kept, kept_count = losses.am_softmax_sum(hidden[jnp.array([0, 1, 3])], weight, labels[jnp.array([0, 1, 3])])
    assert float(count) == 3 and float(total) == pytest.approx(float(kept), rel=1e-6)
    # the margin is subtracted at the true class only: with margin 0 it is the scaled-cosine cross-entropy
    plain, _ = losses.am_softmax_sum(hidden, weight, labels, margin=0.0)
    direct, _ = losses.cross_entropy_sum(30.0 * losses.cosine_scores(hidden, weight), labels)
    assert float(plain) == pytest.approx(float(direct), rel=1e-6) and float(total) > float(plain)


def test_the_probe_is_a_training_aid_only(fast_compile):
    """--speaker-probe-weight adds the probe's params beside the module's, its loss to the objective and its
    metrics to the logs; the export drops it. Weight 0: AM-softmax alone, no probe params."""
    import jax

    from flax_data2vec.train.config import TrainConfig
    from flax_data2vec.train.tasks import make_task
    cfg = TrainConfig(task="speaker-verification", progress=False)
    with_probe = make_task(cfg)
    params = with_probe.init()
    assert params[sv.PROBE]["kernel"].shape == (128, 16)
    module, exported = with_probe.export(params)
    assert sv.PROBE not in exported and set(exported) == set(params) - {sv.PROBE}
    batch = next(with_probe.train_data())
    total, count, metrics = jax.jit(with_probe.loss, static_argnums=4)(params, None, batch, None, False)
    assert {"probe_loss", "probe_accuracy", "am_softmax"} <= set(metrics)
    combined = metrics["am_softmax"] + cfg.speaker_probe_weight * metrics["probe_loss"]
    np.testing.assert_allclose(float(total), float(count) * float(combined), rtol=1e-5)
    alone = make_task(dataclasses.replace(cfg, speaker_probe_weight=0.0))
    plain = alone.init()
    assert sv.PROBE not in plain and set(plain) == set(exported)
    total0, count0, metrics0 = jax.jit(alone.loss, static_argnums=4)(plain, None, batch, None, False)
    assert "probe_loss" not in metrics0 and float(total0) == pytest.approx(float(count0 * metrics0["am_softmax"]),
                                                                            rel=1e-5)


STEPS = 300
EER_BOUND = 0.45  # chance: 0.5


def test_speaker_verification_learns(tmp_path):
    """The shipped default from scratch, STEPS steps: the eval EER (all 4,950 pairs of the 100 eval clips)
    falls well below chance (0.5) and the probe's train accuracy above 1.5x chance (1/16); the exported model
    loads as the x-vector head, without the probe."""
    out = tmp_path / "speakers"
    run(["--task", "speaker-verification", "--max-steps", str(STEPS), "--eval-every", str(STEPS),
         "--log-every", "25", "--n-buckets", "1", "--progress", "false", "--async-checkpointing", "false",
         "--output-dir", str(out)])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = [r for r in rows if "loss" in r]
    final = [r for r in rows if "eval_eer" in r][-1]
    assert logged[-1]["loss"] < logged[0]["loss"] and final["eval_trials"] == 4950
    assert final["eval_eer"] < EER_BOUND, final
    assert np.mean([r["probe_accuracy"] for r in logged[-2:]]) > 1.5 / 16, logged[-2:]  # chance: 1 / 16
    import flax_data2vec
    module, params = flax_data2vec.load(str(out))
    assert type(module).__name__ == "Data2VecAudioForXVector" and sv.PROBE not in params
