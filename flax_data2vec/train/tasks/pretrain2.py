"""data2vec 2.0 self-supervised pre-training as tasks: M masks per sample, the student on kept tokens, a
convolutional decoder, one EMA teacher pass per sample; one jitted step.

Students, decoder and teacher are `flax_data2vec.pretrain2_models`; masks, config (released defaults with
their fairseq sources) and token moves are `flax_data2vec.pretrain2`; targets, loss, EMA and the collapse
guard are v1's (`flax_data2vec.pretrain`). The export is a `Data2Vec2AudioModel` / `Data2Vec2TextModel`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ... import pretrain as d2v
from ... import pretrain2 as p2
from ... import pretrain2_models as students
from ... import registry
from ...audio import conv_output_lengths
from ...data2vec2 import Data2Vec2AudioModel, Data2Vec2TextModel
from .. import data as data_lib
from .. import models
from ..config import TrainConfig
from ..optim import make_optimizer
from ..task import Task, no_assets
from . import common
from .pretrain import collapse_check, encoder_config, pretrain_config

# The tiny preset's decoder: narrower (the recipes' 384 / 768 at base), and text's 2 layers deep, not 5: the yaml's
# 5 non-residual conv layers under a tiny encoder leave its loss flat for ~40 steps (measured on the shipped text,
# 2-block encoder: eval loss 35.6 -> 30.5 in 30 steps with 5 layers, -> 18.3 with 2)
TINY_DECODER = {"audio": dict(decoder_dim=64), "text": dict(decoder_dim=128, decoder_layers=2)}


def pretrain2_config(cfg: TrainConfig, released: p2.Data2Vec2PretrainConfig, depth: int):
    """The released config with the command line's overrides (v1's sizing to --max-steps, plus --clone-batch)."""
    if cfg.teacher_input:
        raise ValueError("--teacher-input is a data2vec v1 option; 2.0 teachers always see the unmasked input")
    if cfg.model == "tiny":
        released = dataclasses.replace(released, **TINY_DECODER[released.modality])
    p = pretrain_config(cfg, released, depth)
    return dataclasses.replace(p, clone_batch=cfg.clone_batch) if cfg.clone_batch > 0 else p


def clone_masks(p: p2.Data2Vec2PretrainConfig, length_of):
    """Host-side: M masks per sample at the batch's length, their sort ids (static counts per length) and each
    row's seed of the decoder's randomness (so that every device layout draws the same numbers)."""
    def prepare(batch, rng):
        length = length_of(batch)
        if p.keep_count(length) < 1 or p.masked_count(length) < 1:
            raise ValueError(f"a batch of {length} positions leaves {p.keep_count(length)} kept and "
                             f"{p.masked_count(length)} masked at mask_prob {p.mask_prob}; both must be >= 1")
        mask = p.sample_masks(len(batch["example_mask"]), length, rng)
        ids = p2.mask_ids(mask, p2.draw_seeds(len(mask), rng))
        return {**batch, **ids._asdict()}
    return prepare


def _task(cfg, p, student, dummy, loaded, inputs_key, train_data, eval_data, export_class, config, notes,
          save_assets=no_assets) -> Task:
    """The Task record shared by both modalities."""
    audio = p.modality == "audio"

    def decay(step):
        return d2v.ema_decay(step, p.ema_decay, p.ema_end_decay, p.ema_anneal_end_step)

    def init():
        params = registry.init_params(student, cfg.seed, dummy)
        return params if loaded is None else {**params, **loaded}

    def optimizer(params):
        schedule = p2.make_lr_schedule(p)
        return make_optimizer(cfg, schedule, params, adam_eps=p.adam_eps, clip_norm=p.clip_norm,
                              decay_mask=p2.decay_mask), schedule

    def loss(params, extra, batch, rng, train):
        masks = students.device_masks(batch)
        pred, local, key_mask = student.apply({"params": params}, batch[inputs_key], batch["attention_mask"], masks,
                                              deterministic=not train, rngs={"dropout": rng} if train else None)
        y = students.masked_targets(students.targets(student, extra["teacher"], local, key_mask, p), masks)
        weights = students.masked_weights(masks, batch["example_mask"], key_mask)
        _, count, stats = d2v.data2vec_loss(pred, y, weights, p.loss_beta, p.loss_scale)
        return stats["loss_sum"], count, {"target_var": stats["target_var"], "pred_var": stats["pred_var"]}

    def init_extra(params):
        return {"teacher": d2v.init_teacher(students.teacher_params(params, audio))}

    def after_update(extra, params, step):
        return {"teacher": d2v.ema_update(extra["teacher"], students.teacher_params(params, audio), decay(step))}

    def export(params):
        return export_class(config=config), students.encoder_params(params)

    return Task(name=cfg.task, architecture=export_class.__name__, module=student, init=init, optimizer=optimizer,
                loss=loss, eval_step=common.loss_eval_step(loss), eval_metrics=common.mean_eval_loss,
                train_data=train_data, eval_data=eval_data, export=export, save_assets=save_assets,
                identity={"task": cfg.task, "config": config.to_dict(), "pretrain": dataclasses.asdict(p)},
                notes=notes, init_extra=init_extra, after_update=after_update,
                step_metrics=lambda s: {"ema_decay": decay(s)}, check_health=collapse_check(p))


def _options(cfg: TrainConfig, audio: bool) -> dict:
    options = models.module_options(cfg, audio=audio)
    options.pop("frame_multiple", None)
    return {**options, "param_dtype": jnp.float32}


def make_pretrain2_audio(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    """`pretrain2-audio`: 8 block masks per clip (p=0.5, length 5), student on kept frames, Decoder1d, targets =
    the teacher's top-8 instance-normed FFN outputs (base_audio_only_task.yaml)."""
    released = p2.Data2Vec2PretrainConfig.audio()
    config, loaded, note = encoder_config(cfg, "Data2Vec2AudioModel", {})
    p = pretrain2_config(cfg, released, config.depth)
    train, evaluation = common.shipped_speech(cfg, need_text=False)
    kw = dict(max_samples=p.max_sample_size, crop=True, min_samples=p.min_sample_size)
    train_ds, eval_ds = data_lib.AudioDataset(train.rows, **kw), data_lib.AudioDataset(evaluation.rows, **kw)
    frames = clone_masks(p, lambda b: int(conv_output_lengths(config, b["input_values"].shape[1])))
    train_data, eval_data = common.audio_iterators(cfg, train_ds, eval_ds, shard_index, num_shards, prepare=frames,
                                                   crop_to_shortest=p.crop_to_shortest)
    student = students.Data2Vec2AudioStudent(config, **_options(cfg, True), pretrain=p)
    x = jnp.zeros((1, config.front_end().receptive_field + 2 * config.inputs_to_logits_ratio))
    length = int(conv_output_lengths(config, x.shape[1]))
    masks = students.MaskIds(*p2.mask_ids(p.sample_masks(1, length, np.random.default_rng(0))))
    crops = (f"batches cropped to their shortest clip (fairseq pad=False); clips under {p.min_sample_size} samples "
             f"skipped: {train_ds.dropped_short} train, {eval_ds.dropped_short} eval; {p.clone_batch} masks per clip")
    return _task(cfg, p, student, (x, None, masks), loaded, "input_values", train_data, eval_data,
                 Data2Vec2AudioModel, config, (note, common.data_note(train, evaluation), crops))


def make_pretrain2_text(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    """`pretrain2-text`: 8 random masks per block (48 %), student on kept tokens, the 5-layer conv decoder with a
    2-layer projection, targets = top-12 instance-normed FFN outputs (base_text_only_task.yaml)."""
    released = p2.Data2Vec2PretrainConfig.text()
    train, evaluation = common.read_sources(cfg, "text", "text/corpus.txt")
    tokenizer = common.tokenizer_for(cfg, [r["text"] for r in train.rows])
    config, loaded, note = encoder_config(cfg, "Data2Vec2TextModel", common.tokenizer_changes(cfg, tokenizer))
    if config.prenet_depth:
        raise ValueError("prenet_depth > 0 is not supported for text pre-training (0 in the 2.0 text recipes)")
    p = pretrain2_config(cfg, released, config.depth)
    blocks = dict(tokens_per_sample=min(p.tokens_per_sample, config.max_source_positions))
    train_ds = data_lib.PackedTextDataset([r["text"] for r in train.rows], tokenizer, **blocks)
    eval_ds = data_lib.PackedTextDataset([r["text"] for r in evaluation.rows], tokenizer, **blocks)
    train_data, eval_data = common.text_iterators(cfg, train_ds, eval_ds, shard_index, num_shards,
                                                  prepare=clone_masks(p, lambda b: b["input_ids"].shape[1]))
    student = students.Data2Vec2TextStudent(config, **_options(cfg, False), pretrain=p)
    ids = jnp.full((1, 8), config.bos_token_id or 0, jnp.int32)
    masks = students.MaskIds(*p2.mask_ids(p.sample_masks(1, 8, np.random.default_rng(0))))
    return _task(cfg, p, student, (ids, jnp.ones_like(ids), masks), loaded, "input_ids", train_data, eval_data,
                 Data2Vec2TextModel, config,
                 (note, common.data_note(train, evaluation), f"text packed in blocks of {blocks['tokens_per_sample']} "
                  f"tokens: {len(train_ds)} train, {len(eval_ds)} eval; {p.clone_batch} masks per block"),
                 save_assets=tokenizer.save_pretrained)
