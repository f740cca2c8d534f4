"""data2vec 2.0 pre-training: kept-token gather and restore, clones, masked loss, EMA, devices, learning, export,
resume after SIGTERM, bf16 / remat / scan, the frozen 2.0 encoder in fine-tuning."""

import json
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE_ENV, compiled_fast
from test_train import _final_state, losses, run_in_one_process
from test_train_tasks import gated_run

from flax_data2vec import pretrain as d2v
from flax_data2vec import pretrain2 as p2
from flax_data2vec import pretrain2_models as students
from flax_data2vec.layers import TransformerStack
from flax_data2vec.pretrain2_models import Decoder1d
from flax_data2vec.train.config import TrainConfig, parse_args
from flax_data2vec.train.loop import Trainer, train
from flax_data2vec.train.tasks import make_task

NO_DROPOUT = {"dropout": 0.0, "encoder_dropout": 0.0, "attention_dropout": 0.0, "post_mlp_drop": 0.0}
SMALL_TEXT = json.dumps({**NO_DROPOUT, "depth": 2, "embed_dim": 64, "num_heads": 4})
COMMON = ["--progress", "false", "--n-buckets", "1", "--batch-size", "8", "--async-checkpointing", "false"]
JOBS = {  # 30-step learning runs: the tiny presets (text: 2 blocks of 64, dropout off, 64-token blocks), 2 clones
    "pretrain2-audio": COMMON + ["--task", "pretrain2-audio", "--learning-rate", "1e-3", "--clone-batch", "4"],
    "pretrain2-text": COMMON + ["--task", "pretrain2-text", "--max-text-tokens", "64", "--tokens-per-sample", "64",
                                "--learning-rate", "2e-3", "--clone-batch", "2", "--model-config", SMALL_TEXT],
}
FINETUNE = {"pretrain2-audio": ("ctc", "Data2Vec2AudioForCTC"),
            "pretrain2-text": ("text-classification", "Data2Vec2TextForSequenceClassification")}
# devices, resume, bf16: 4 steps of a one-block audio student (small CNN and positional conv), 2 clones
SHORT = COMMON + ["--task", "pretrain2-audio", "--learning-rate", "1e-3", "--clone-batch", "2", "--max-steps", "4",
                  "--log-every", "1", "--eval-every", "1000", "--save-every", "2", "--model-config", json.dumps(
                      {"depth": 1, "embed_dim": 32, "num_heads": 2, "conv_pos_depth": 1, "conv_pos_groups": 4,
                       "feature_encoder_spec": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2})]


def train_here(args, on_log=None):
    """train_tpu.py's run in this process (no interpreter start-up): the summary."""
    return train(parse_args(args), on_log)


def evaluate_then_train(args) -> float:
    """train_here, evaluating the initial state first with the run's own compiled eval step (eval batches get the
    same masks at every evaluation): the eval loss before training, for a before/after comparison."""
    trainer = Trainer(parse_args(args))
    before = trainer.evaluate()["eval_loss"]
    trainer.run()
    return before


@pytest.fixture(scope="module")
def text_task():
    """The tiny pretrain2-text task, one batch of it, its params and teacher."""
    task = make_task(TrainConfig(task="pretrain2-text", max_text_tokens=32, tokens_per_sample=32, batch_size=2,
                                 clone_batch=3, max_steps=100, model_config=SMALL_TEXT))
    batch = {k: jnp.asarray(v) for k, v in next(iter(task.train_data())).items()}
    params = task.init()
    return task, batch, params, task.init_extra(params)


def calls_of(cls, fn, *args):
    """(first-argument shapes of every `cls.__call__` while `fn(*args)` is traced, the traced result)."""
    shapes = []

    def record(next_fun, args_, kwargs, context):
        if isinstance(context.module, cls) and context.method_name == "__call__":
            shapes.append(tuple(args_[0].shape))
        return next_fun(*args_, **kwargs)
    with nn.intercept_methods(record):
        out = jax.make_jaxpr(fn)(*args)
    return shapes, out


def test_masks_have_equal_counts_and_clones_differ():
    rng = np.random.default_rng(0)
    for p, length in ((p2.Data2Vec2PretrainConfig.audio(), 99), (p2.Data2Vec2PretrainConfig.text(), 64)):
        mask = p.sample_masks(4, length, rng)
        assert mask.shape == (4 * p.clone_batch, length)
        assert (mask.sum(-1) == p.masked_count(length)).all()  # int(T p) / T - int(T (1 - p)): static keep count
        for sample in mask.reshape(4, p.clone_batch, length):
            assert len({row.tobytes() for row in sample}) == p.clone_batch  # M different masks per sample
    block = p2.block_mask((200, 100), rng, 0.5, 5, 0.05)  # blocks: most masked frames have a masked neighbour
    assert (block[:, 1:] & block[:, :-1]).sum() > 0.6 * block.sum()


def test_gather_and_restore():
    rng = np.random.default_rng(1)
    mask = p2.random_mask((3, 10), rng, 0.4)
    ids = p2.mask_ids(mask)
    x = jnp.asarray(rng.normal(size=(3, 10, 4)), jnp.float32)
    kept = p2.keep_tokens(x, ids.ids_keep)
    for r in range(3):  # the kept tokens are the unmasked ones, in their order
        np.testing.assert_array_equal(kept[r], x[r][~mask[r]])
    keys = p2.row_keys(jnp.asarray(ids.seeds), 1)
    full = p2.restore_tokens(kept, ids.ids_restore, 0.01, keys)
    np.testing.assert_array_equal(full[~mask], x[~mask])  # back at their positions
    noise = np.asarray(full[mask])
    assert 0.003 < noise.std() < 0.03 and np.abs(noise - np.asarray(x[mask])).min() >= 0  # N(0, 0.01) slots
    # each row's noise and dropout come from its own seed: the same row draws the same numbers in any batch
    alone = p2.restore_tokens(kept[1:2], ids.ids_restore[1:2], 0.01, keys[1:2])
    np.testing.assert_array_equal(alone[0], full[1])
    dropped = p2.row_dropout(jnp.ones((3, 4, 50)), 0.5, keys)
    np.testing.assert_array_equal(p2.row_dropout(jnp.ones((1, 4, 50)), 0.5, keys[2:]), dropped[2:])
    assert set(np.unique(dropped)) == {0.0, 2.0} and abs(float((dropped == 0).mean()) - 0.5) < 0.1
    with pytest.raises(ValueError, match="same number of masked"):
        p2.mask_ids(np.eye(3, dtype=bool) | np.array([[0, 0, 1]], bool))


def test_student_sees_only_kept_tokens_and_decoder_input(text_task):
    task, batch, params, _ = text_task
    student, masks = task.module, students.device_masks(batch)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    captured = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, Decoder1d):
            captured["decoder_in"] = args[0]
        if isinstance(context.module, TransformerStack):
            captured["blocks"], captured["blocks_out"] = args[0].shape, out[0]
        return out
    with nn.intercept_methods(record):
        pred, _, _ = student.apply({"params": params}, ids, attn, masks)
    rows, keep = masks.ids_keep.shape
    assert captured["blocks"] == (rows, keep, student.config.embed_dim)  # the encoder runs on K tokens only
    dec, enc = np.asarray(captured["decoder_in"]), np.asarray(captured["blocks_out"])
    for r in range(rows):  # decoder input: encoder outputs at kept positions, noise at masked ones, in order
        np.testing.assert_allclose(dec[r, masks.ids_keep[r]], enc[r], atol=1e-6)
        assert np.abs(dec[r, masks.ids_masked[r]]).max() < 0.1
    # masked tokens are invisible: changing them leaves every prediction unchanged
    clones = rows // ids.shape[0]
    hidden = np.asarray(masks.mask).reshape(ids.shape[0], clones, -1).all(1)  # masked in every clone
    changed = jnp.where(jnp.asarray(hidden), 5, ids)
    assert hidden.any()
    again, _, _ = student.apply({"params": params}, changed, attn, masks)
    np.testing.assert_allclose(again, pred, atol=1e-5)


def test_teacher_runs_once_per_sample_and_targets_repeat(text_task):
    task, batch, params, extra = text_task
    shapes, _ = calls_of(TransformerStack, lambda p: task.loss(p, extra, batch, jax.random.PRNGKey(0), True)[0],
                         params)
    b, rows = batch["input_ids"].shape[0], batch["ids_keep"].shape[0]
    assert rows == 3 * b
    assert sorted(s[0] for s in shapes) == sorted([b, rows])  # one teacher pass (B rows), one student (B M rows)
    masks = students.device_masks(batch)
    y = jnp.asarray(np.random.default_rng(0).normal(size=(b, batch["input_ids"].shape[1], 4)), jnp.float32)
    got = students.masked_targets(y, masks)
    for r in range(rows):
        np.testing.assert_array_equal(got[r], y[r // 3][masks.ids_masked[r]])


def test_loss_only_on_masked_positions_of_real_rows():
    rng = np.random.default_rng(2)
    ids = p2.mask_ids(p2.block_mask((4, 20), rng, 0.5, 3))
    masks = students.MaskIds(*map(jnp.asarray, ids))
    y = jnp.asarray(rng.normal(size=(2, 20, 8)), jnp.float32)
    example_mask = jnp.asarray([1.0, 0.0])  # the second sample is padding

    def loss(full_pred):
        w = students.masked_weights(masks, example_mask, None)
        pred = d2v.gather_positions(full_pred, masks.ids_masked)
        return d2v.data2vec_loss(pred, students.masked_targets(y, masks), w)[:2]
    full = jnp.asarray(rng.normal(size=(4, 20, 8)), jnp.float32)
    count, grad = loss(full)[1], jax.grad(lambda f: loss(f)[0])(full)
    assert count == 2 * 10  # 2 clones of the real sample x int(20 * 0.5) masked frames
    g = np.abs(np.asarray(grad)).sum(-1)
    assert (g[np.asarray(~ids.mask)] == 0).all() and (g[2:] == 0).all()  # kept frames and padding rows: nothing
    assert (g[:2][ids.mask[:2]] > 0).all()


def test_ema_schedule_and_no_gradient_into_teacher(text_task):
    task, batch, params, extra = text_task
    n = 100_000  # base_text_only_task.yaml: 0.9999 -> 0.99999 over 100k updates
    got = [float(task.step_metrics(s)["ema_decay"]) for s in (0, n // 2, n, 2 * n)]
    np.testing.assert_allclose(got, [0.9999, (0.9999 + 0.99999) / 2, 0.99999, 0.99999], rtol=0, atol=1e-7)
    a = p2.Data2Vec2PretrainConfig.audio()  # base_audio_only_task.yaml: 0.999 -> 0.99999 over 75k
    got = [float(d2v.ema_decay(s, a.ema_decay, a.ema_end_decay, a.ema_anneal_end_step)) for s in (0, 37_500, 75_000,
                                                                                                  150_000)]
    np.testing.assert_allclose(got, [0.999, (0.999 + 0.99999) / 2, 0.99999, 0.99999], rtol=0, atol=1e-7)
    grads = jax.grad(lambda t: task.loss(params, {"teacher": t}, batch, jax.random.PRNGKey(0), True)[0])(
        extra["teacher"])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads))
    assert set(extra["teacher"]) == {"blocks"}  # text: ema_encoder_only
    moved = task.after_update(extra, jax.tree_util.tree_map(lambda v: v + 1.0, params), n)
    leaf = jax.tree_util.tree_leaves(extra["teacher"])[0]
    np.testing.assert_allclose(jax.tree_util.tree_leaves(moved["teacher"])[0], leaf + (1 - 0.99999), atol=1e-5)


def test_optimizer_skips_decay_where_fairseq_does():
    params = {"blocks": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "alibi_scale": jnp.ones((4, 4)),
              "norm": {"scale": jnp.ones(2)}}
    assert jax.tree_util.tree_leaves(p2.decay_mask(params)) == [False, False, True, False]  # sorted: alibi, bias, ...


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """task -> (output directory, eval loss of the initial state) of its 30-step run (run on first use)."""
    done = {}

    def get(task):
        if task not in done:
            out = tmp_path_factory.mktemp(task) / "pre"
            before = evaluate_then_train(JOBS[task] + ["--max-steps", "30", "--log-every", "5", "--eval-every", "30",
                                                       "--output-dir", str(out)])
            done[task] = out, before
        return done[task]
    return get


@pytest.mark.parametrize("task", sorted(JOBS))
def test_pretraining2_learns_and_fine_tunes(tmp_path, task, pretrained):
    out, before = pretrained(task)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged, after = [r for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    # the same held-out blocks / clips with the same masks, before and after 30 steps: down by >= 30 %
    assert after < 0.7 * before, (before, after, [r["loss"] for r in logged])
    if task == "pretrain2-audio":  # and the training loss (text's moves with each batch's target variance)
        assert logged[-1]["loss"] < 0.7 * logged[0]["loss"], [r["loss"] for r in logged]
    assert all(r["target_var"] > 0.1 for r in logged)  # above fairseq's collapse threshold
    assert {"learning_rate", "pred_var", "ema_decay"} <= set(logged[0])

    import flax_data2vec as fd
    kind, head = FINETUNE[task]
    module, _ = fd.load(str(out), architecture=head)
    assert type(module).__name__ == head
    ft = tmp_path / "ft"
    args = ["--task", kind, "--model", str(out), "--max-steps", "2", "--log-every", "1", "--eval-every", "1000",
            "--batch-size", "4", "--n-buckets", "1", "--progress", "false", "--output-dir", str(ft)]
    if kind == "text-classification":
        args += ["--max-text-tokens", "64"]
    with compiled_fast():  # 2 steps: compile-bound
        train_here(args)
    assert fd.load(str(ft / "model"))[0].__class__.__name__ == head
    assert len(losses(ft)) == 2 and all(np.isfinite(losses(ft)))
    if kind == "ctc":  # 2.0 heads have no SpecAugment: --mask-time-prob is refused by name, not a TypeError
        from flax_data2vec.train import models
        with pytest.raises(ValueError, match="--mask-time-prob 0.05: .* data2vec 2.0 model"):
            models.build(TrainConfig(task="ctc", model=str(out), mask_time_prob=0.05), "Data2VecAudioForCTC", {})


def test_frozen_2_0_encoder_is_bitwise_unchanged(pretrained):
    """--freeze-encoder-steps gates the 2.0 encoder (`data2vec2_text`), not only v1's; the head trains meanwhile
    (3 steps: compile-bound)."""
    from flax_data2vec import registry
    from flax_data2vec.train.optim import param_labels
    from flax_data2vec.train.tasks import common
    for head, prefix in (("Data2Vec2AudioForCTC", "data2vec2_audio"),
                         ("Data2Vec2TextForSequenceClassification", "data2vec2_text")):
        module = registry.model_class(head)(config=registry.config_class(head)(depth=1))
        labels = param_labels(registry.abstract_params(module), common.fine_tuning_labels(
            TrainConfig(freeze_encoder_steps=2), head, False))
        assert set(jax.tree_util.tree_leaves(labels[prefix])) == {"delayed"}, head
        assert "delayed" not in jax.tree_util.tree_leaves({k: v for k, v in labels.items() if k != prefix}), head
    cfg = TrainConfig(task="text-classification", model=str(pretrained("pretrain2-text")[0]), learning_rate=1e-2,
                      freeze_encoder_steps=2, max_steps=10, batch_size=4, n_buckets=1, max_text_tokens=16)
    with compiled_fast():  # after the (shared) pre-training run, which trains at full optimisation
        frozen, head_moved, moved = gated_run(cfg, "data2vec2_text", 2)
    assert all(frozen), "a frozen 2.0 encoder weight moved"
    assert head_moved
    assert any(moved), "the encoder did not train after the gate opened"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One uninterrupted 4-step single-device run: what the device, resume and bf16 runs are compared with (all
    compile-bound, so all compiled with most XLA optimisations off)."""
    out = tmp_path_factory.mktemp("short") / "one"
    with compiled_fast():
        train_here(SHORT + ["--output-dir", str(out)])
    return out


def test_pretraining2_devices_agree(tmp_path, short_run):
    """Clones, student, teacher, decoder noise and EMA in one step: 1 device == 8-device jit mesh == pmap."""
    run_in_one_process([SHORT + ["--output-dir", str(tmp_path / "mesh")],
                        SHORT + ["--output-dir", str(tmp_path / "pmap"), "--parallel", "pmap"]],
                       {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", **FAST_COMPILE_ENV}, timeout=2400)
    ref = losses(short_run)
    assert len(ref) == 4
    for name in ("mesh", "pmap"):  # the decoder's dropout and slot noise are per-row (host seeds), not per-device
        np.testing.assert_allclose(losses(tmp_path / name), ref, rtol=2e-5, err_msg=name)


def test_pretraining2_resumes_exactly_after_sigterm(tmp_path, short_run, fast_compile):
    """SIGTERM after step 2 leaves a checkpoint (teacher, data position, masks' rng); the rerun ends bitwise equal."""
    out = tmp_path / "term"
    args = SHORT + ["--output-dir", str(out), "--save-every", "1000"]  # only the signal saves

    def stop_after_two(row):
        if row.get("step") == 2 and "loss" in row:
            os.kill(os.getpid(), signal.SIGTERM)
    summary = train_here(args, stop_after_two)
    assert summary.get("stopped") and int(_final_state(out)["step"]) == 2
    assert not (out / "model").exists()
    train_here(args)
    a, b = _final_state(short_run), _final_state(out)
    assert int(a["step"]) == int(b["step"]) == 4
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r] == [1, 2, 3, 4]
    assert losses(out) == losses(short_run)


def test_pretraining2_bf16_remat_scan(tmp_path, short_run, fast_compile):
    """bf16 compute, remat and scanned layers: the same run, finite losses close to float32's, a loadable export."""
    out = tmp_path / "bf16"
    train_here(SHORT + ["--output-dir", str(out), "--dtype", "bfloat16", "--remat", "--scan-layers"])
    got, ref = losses(out), losses(short_run)
    assert all(np.isfinite(got)) and len(got) == 4
    np.testing.assert_allclose(got, ref, rtol=5e-2)
    import flax_data2vec as fd
    assert type(fd.load(str(out))[0]).__name__ == "Data2Vec2AudioModel"
