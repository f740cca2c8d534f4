"""data2vec v1 self-supervised pre-training as tasks: student, EMA teacher and targets in one jitted step.

Students and teacher targets are `flax_data2vec.pretrain_models`; the objective (masks, targets, loss, EMA,
schedules and the released defaults, each with its fairseq source) is `flax_data2vec.pretrain`. The
teacher sees the unmasked input (the paper); `--teacher-input masked` reproduces fairseq's released text
code (fairseq#4881).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ... import pretrain as d2v
from ... import pretrain_models as students
from ... import registry
from ...audio import conv_output_lengths
from ...masking import compute_span_mask, compute_text_mask
from .. import data as data_lib
from .. import models
from ..config import TrainConfig
from ..optim import make_optimizer
from ..task import Task, no_assets
from . import common


def pretrain_config(cfg: TrainConfig, released: d2v.Data2VecPretrainConfig, depth: int) -> d2v.Data2VecPretrainConfig:
    """The released config with the command line's overrides, sized to `cfg.max_steps` and the model's depth."""
    changes = {"max_updates": cfg.max_steps}
    if cfg.top_k > 0:
        changes["top_k"] = cfg.top_k
    elif released.top_k > depth:
        changes["top_k"] = depth
    if cfg.ema_anneal_steps > 0:
        changes["ema_anneal_end_step"] = cfg.ema_anneal_steps
    if cfg.mask_prob >= 0:
        changes["mask_prob"] = cfg.mask_prob
    if cfg.learning_rate:
        changes["lr"] = cfg.learning_rate
    if cfg.teacher_input:
        changes["teacher_input"] = cfg.teacher_input
    if cfg.tokens_per_sample > 0:
        changes["tokens_per_sample"] = cfg.tokens_per_sample
    if not cfg.train_data:  # the shipped clips are 0.5-2 s: the recipe's 2-s minimum would drop nearly all
        changes["min_sample_size"] = 0
    if released.warmup_steps:  # keep the released warm-up fraction (10k of 1M updates) on shorter runs
        fraction = round(released.warmup_steps * cfg.max_steps / released.max_updates)
        changes["warmup_steps"] = min(max(1, fraction), cfg.max_steps - 1)  # a 1-step run: no warm-up
    p = dataclasses.replace(released, **changes)
    if p.top_k > depth:
        raise ValueError(f"top_k={p.top_k} exceeds the model's {depth} layers")
    return p


def encoder_config(cfg: TrainConfig, architecture: str, changes: dict, tokenizer_size: int | None = None):
    """(config, loaded encoder params or None): a preset, or a checkpoint's encoder to continue pre-training."""
    model = models.build(dataclasses.replace(cfg, scan_layers=False), architecture, changes, tokenizer_size)
    return model.module.config, (model.params if model.pretrained else None), model.note


def _teacher_step(p: d2v.Data2VecPretrainConfig):
    """The EMA pieces of a task: init, update after each step, the decay as a metric."""
    def decay(step):
        return d2v.ema_decay(step, p.ema_decay, p.ema_end_decay, p.ema_anneal_end_step)

    def init_extra(params):
        return {"teacher": d2v.init_teacher(params["backbone"]["encoder"])}

    def after_update(extra, params, step):
        return {"teacher": d2v.ema_update(extra["teacher"], params["backbone"]["encoder"], decay(step),
                                          copy=p.ema_copy_predicate())}

    return dict(init_extra=init_extra, after_update=after_update, step_metrics=lambda s: {"ema_decay": decay(s)},
                check_health=collapse_check(p))


def collapse_check(p: d2v.PretrainBase):
    """A pre-training task's `check_health`: fairseq's collapse guard on the logged variances (v1 and 2.0)."""
    def check_health(metrics, step):
        problem = d2v.check_collapse(metrics.get("target_var", 1.0), metrics.get("pred_var", 1.0), step, p)
        if problem:
            raise RuntimeError(f"representation collapse: {problem}; stopping (lower the learning rate or "
                               f"raise --ema-anneal-steps)")
    return check_health


def _task(cfg, p, student, dummy, loaded, student_loss, train_data, eval_data, base_architecture, config,
          export_options, notes, save_assets=no_assets) -> Task:
    """The Task record shared by both modalities."""
    def init():
        params = registry.init_params(student, cfg.seed, dummy)  # one compiled init, not one compile per op
        return params if loaded is None else {**params, "backbone": loaded}

    def optimizer(params):
        schedule = d2v.make_lr_schedule(p)
        return make_optimizer(cfg, schedule, params, adam_eps=p.adam_eps, clip_norm=p.clip_norm), schedule

    def loss(params, extra, batch, rng, train):
        pred, targets = student_loss(params, extra, batch, rng, train)
        _, count, stats = d2v.data2vec_loss(pred, targets, batch["mask"], p.loss_beta, p.loss_scale)
        return stats["loss_sum"], count, {"target_var": stats["target_var"], "pred_var": stats["pred_var"]}

    def export(params):
        module = registry.model_class(base_architecture)(config=config, **export_options)
        return module, params["backbone"]

    return Task(name=cfg.task, architecture=base_architecture, module=student, init=init, optimizer=optimizer,
                loss=loss, eval_step=common.loss_eval_step(loss), eval_metrics=common.mean_eval_loss,
                train_data=train_data, eval_data=eval_data, export=export, save_assets=save_assets,
                identity={"task": cfg.task, "config": config.to_dict(), "pretrain": dataclasses.asdict(p)},
                notes=notes, **_teacher_step(p))


def span_masks(config, p: d2v.Data2VecPretrainConfig):
    """Host-side fairseq span masks over each batch's real frames (`compute_mask_indices`)."""
    def prepare(batch, rng):
        frames = int(conv_output_lengths(config, batch["input_values"].shape[1]))
        lengths = conv_output_lengths(config, batch["attention_mask"].sum(-1))
        padding = np.arange(frames)[None, :] >= lengths[:, None]
        mask = compute_span_mask((len(lengths), frames), rng, p.mask_prob, p.mask_length, p.min_masks,
                                 padding_mask=padding, require_same_masks=p.require_same_masks,
                                 mask_dropout=p.mask_dropout)
        return {**batch, "mask": mask & (batch["example_mask"][:, None] > 0)}
    return prepare


def make_pretrain_audio(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    """`pretrain-audio`: span masks over frames (p=0.65, length 10), targets = top-8 instance-normed FFN outputs."""
    released = d2v.Data2VecPretrainConfig.audio()
    changes = {"mask_time_prob": max(cfg.mask_time_prob, 0.05)}  # the student needs masked_spec_embed
    if cfg.model == "base":  # base_librispeech.yaml's regularisation (the presets are transformers' defaults)
        changes.update(layerdrop=released.encoder_layerdrop, activation_dropout=released.activation_dropout)
    config, loaded, note = encoder_config(cfg, "Data2VecAudioModel", changes)
    p = pretrain_config(cfg, released, config.num_hidden_layers)
    train, evaluation = common.shipped_speech(cfg, need_text=False)
    kw = dict(max_samples=p.max_sample_size, crop=True, min_samples=p.min_sample_size)
    train_ds, eval_ds = data_lib.AudioDataset(train.rows, **kw), data_lib.AudioDataset(evaluation.rows, **kw)
    train_data, eval_data = common.audio_iterators(cfg, train_ds, eval_ds, shard_index, num_shards,
                                                   prepare=span_masks(config, p), crop_to_shortest=p.crop_to_shortest)
    crops = (f"batches cropped to their shortest clip (fairseq pad=False); clips under {p.min_sample_size} samples "
             f"skipped: {train_ds.dropped_short} train, {eval_ds.dropped_short} eval")
    options = models.module_options(cfg, audio=True)
    options.pop("frame_multiple", None)
    options["param_dtype"] = jnp.float32
    student = students.AudioStudent(config, p, options)
    x = jnp.zeros((1, config.receptive_field + 2 * config.inputs_to_logits_ratio))
    dummy = (x, None, jnp.zeros((1, int(conv_output_lengths(config, x.shape[1]))), bool))

    def student_loss(params, extra, batch, rng, train):
        pred, projected, frame_mask = student.apply({"params": params}, batch["input_values"],
                                                    batch["attention_mask"], batch["mask"], deterministic=not train,
                                                    rngs={"dropout": rng} if train else None)
        return pred, students.audio_targets(config, options, p, extra["teacher"], projected, frame_mask)

    return _task(cfg, p, student, dummy, loaded, student_loss, train_data, eval_data, "Data2VecAudioModel", config,
                 {}, (note, common.data_note(train, evaluation), crops))


def text_span_masks(tokenizer, p: d2v.Data2VecPretrainConfig):
    """Host-side span masks of the released text recipe (35 %, length 4), all masked tokens -> <mask>."""
    def prepare(batch, rng):
        masked, mask = compute_text_mask(batch["input_ids"], rng, mask_token_id=tokenizer.mask_token_id,
                                         special_ids=tokenizer.all_special_ids, attention_mask=batch["attention_mask"],
                                         mask_prob=p.mask_prob, mask_length=p.mask_length,
                                         leave_unmasked_prob=p.leave_unmasked_prob,
                                         random_token_prob=p.random_token_prob, vocab_size=len(tokenizer))
        return {**batch, "input_ids": masked, "target_ids": batch["input_ids"],
                "mask": mask & (batch["example_mask"][:, None] > 0)}
    return prepare


def make_pretrain_text(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    """`pretrain-text`: span masks (35 %, length 4), targets = top-10 layer-normed FFN outputs, smooth L1."""
    released = d2v.Data2VecPretrainConfig.text()
    train, evaluation = common.read_sources(cfg, "text", "text/corpus.txt")  # no eval set: every 20th line held out
    tokenizer = common.tokenizer_for(cfg, [r["text"] for r in train.rows])
    config, loaded, note = encoder_config(cfg, "Data2VecTextModel", common.tokenizer_changes(cfg, tokenizer),
                                          len(tokenizer))
    p = pretrain_config(cfg, released, config.num_hidden_layers)
    blocks = dict(tokens_per_sample=min(p.tokens_per_sample, config.max_position_embeddings - 2))
    train_ds = data_lib.PackedTextDataset([r["text"] for r in train.rows], tokenizer, **blocks)
    eval_ds = data_lib.PackedTextDataset([r["text"] for r in evaluation.rows], tokenizer, **blocks)
    train_data, eval_data = common.text_iterators(cfg, train_ds, eval_ds, shard_index, num_shards,
                                                  prepare=text_span_masks(tokenizer, p))
    options = {**models.module_options(cfg, audio=False), "param_dtype": jnp.float32}
    student = students.TextStudent(config, p, options)
    ids = jnp.full((1, 4), config.bos_token_id or 0, jnp.int32)
    if loaded is not None:
        loaded = {k: v for k, v in loaded.items() if k != "pooler"}

    def student_loss(params, extra, batch, rng, train):
        pred = student.apply({"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=not train,
                             rngs={"dropout": rng} if train else None)
        ids, mask = students.text_teacher_input(batch["target_ids"], batch["attention_mask"], batch["mask"],
                                                config.pad_token_id, p.teacher_input)
        return pred, students.text_targets(config, options, p, params["backbone"]["embeddings"], extra["teacher"],
                                           ids, mask)

    return _task(cfg, p, student, (ids, jnp.ones_like(ids)), loaded, student_loss, train_data, eval_data,
                 "Data2VecTextModel", config, {"add_pooling_layer": False},
                 (note, common.data_note(train, evaluation), f"text packed in blocks of {blocks['tokens_per_sample']} "
                  f"tokens (fairseq complete_doc): {len(train_ds)} train, {len(eval_ds)} eval"),
                 save_assets=tokenizer.save_pretrained)
