"""data2vec pre-training through train_tpu.py: learning, health signals, export into heads, devices agree."""

import json

import numpy as np
import pytest
from conftest import FAST_COMPILE_ENV
from test_train import losses, run, run_in_one_process

TEXT_NO_DROPOUT = json.dumps({"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
COMMON = ["--progress", "false", "--n-buckets", "1", "--batch-size", "8", "--async-checkpointing", "false"]
JOBS = {
    "pretrain-audio": COMMON + ["--task", "pretrain-audio", "--learning-rate", "1e-3"],
    "pretrain-text": COMMON + ["--task", "pretrain-text", "--max-text-tokens", "64", "--tokens-per-sample", "64",
                               "--learning-rate", "1e-3",
                               "--model-config", TEXT_NO_DROPOUT],
}
FINETUNE = {"pretrain-audio": ("ctc", "Data2VecAudioForCTC"),
            "pretrain-text": ("text-classification", "Data2VecTextForSequenceClassification")}


@pytest.mark.parametrize("task", sorted(JOBS))
def test_pretraining_learns_and_fine_tunes(tmp_path, task):
    out = tmp_path / "pre"
    run(JOBS[task] + ["--max-steps", "30", "--log-every", "5", "--eval-every", "30", "--output-dir", str(out)])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = [r for r in rows if "loss" in r]
    assert logged[-1]["loss"] < 0.7 * logged[0]["loss"], [r["loss"] for r in logged]
    assert all(r["target_var"] > 0.1 for r in logged)  # above fairseq's collapse threshold
    assert all(0.999 <= r["ema_decay"] < 0.9999 for r in logged)
    assert {"learning_rate", "pred_var"} <= set(logged[0])

    import flax_data2vec as fd
    kind, head = FINETUNE[task]
    module, params = fd.load(str(out), architecture=head)
    assert type(module).__name__ == head

    ft = tmp_path / "ft"
    args = ["--task", kind, "--model", str(out), "--max-steps", "4", "--log-every", "1", "--eval-every", "4",
            "--batch-size", "8", "--n-buckets", "1", "--progress", "false", "--output-dir", str(ft)]
    if kind == "text-classification":
        args += ["--max-text-tokens", "64"]
    run(args, FAST_COMPILE_ENV)  # 4 steps: compile-bound
    assert len(losses(ft)) == 4


def test_pretraining_devices_agree(tmp_path):
    """Student, teacher and EMA in one step: 1 device == 8-device jit mesh == pmap."""
    two_layers = json.dumps({**json.loads(TEXT_NO_DROPOUT), "num_hidden_layers": 2})  # top_k 2: still a mean
    args = JOBS["pretrain-text"] + ["--max-steps", "3", "--log-every", "1", "--eval-every", "1000",
                                    "--model-config", two_layers]  # the later --model-config wins
    run(args + ["--output-dir", str(tmp_path / "one")], FAST_COMPILE_ENV)  # 3 steps: compile-bound
    eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", **FAST_COMPILE_ENV}
    run_in_one_process([args + ["--output-dir", str(tmp_path / "mesh")],
                        args + ["--output-dir", str(tmp_path / "pmap"), "--parallel", "pmap"]], eight)
    ref = losses(tmp_path / "one")
    for name in ("mesh", "pmap"):
        np.testing.assert_allclose(losses(tmp_path / name), ref, rtol=2e-5, err_msg=name)


def test_collapse_guard_stops_the_run():
    from flax_data2vec.train.config import TrainConfig
    from flax_data2vec.train.tasks import make_task
    task = make_task(TrainConfig(task="pretrain-audio", max_steps=10_000))
    task.check_health({"target_var": 0.5, "pred_var": 0.5}, 6000)
    task.check_health({"target_var": 0.01, "pred_var": 0.5}, 4000)  # fairseq checks only after 5000 updates
    with pytest.raises(RuntimeError, match="collapse: target var"):
        task.check_health({"target_var": 0.01, "pred_var": 0.5}, 6000)
    with pytest.raises(RuntimeError, match="collapse: pred var"):
        task.check_health({"target_var": 0.5, "pred_var": 0.001}, 6000)


def test_a_one_step_run_has_no_warm_up():
    """--max-steps 1 sizes the released warm-up fraction to 0 steps, so the cosine schedule is valid."""
    from flax_data2vec import pretrain as d2v
    from flax_data2vec import pretrain2 as p2
    from flax_data2vec.train.config import TrainConfig
    from flax_data2vec.train.tasks.pretrain import pretrain_config
    from flax_data2vec.train.tasks.pretrain2 import pretrain2_config
    for task, released in [("pretrain-text", d2v.Data2VecPretrainConfig.text()),
                           ("pretrain2-audio", p2.Data2Vec2PretrainConfig.audio())]:
        cfg = TrainConfig(task=task, max_steps=1)
        make = pretrain2_config if task.startswith("pretrain2") else pretrain_config
        p = make(cfg, released, depth=4)
        assert p.warmup_steps == 0 and p.max_updates == 1
        schedule = (p2 if task.startswith("pretrain2") else d2v).make_lr_schedule(p)
        assert np.isfinite(float(schedule(0)))
