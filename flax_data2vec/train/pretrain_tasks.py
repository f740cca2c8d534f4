"""data2vec self-supervised pre-training as training tasks: student, EMA teacher and targets in one step.

The student is the encoder on the masked input plus a regression head; the teacher is an EMA copy
of the student's Transformer (`encoder` subtree) that reads the *unmasked* input in eval mode.
Audio: the CNN and feature projection are shared (the teacher reads the student's unmasked
projected features) and the positional convs are copied each step. Text: the embeddings are
shared. The teacher sees the full unmasked sentence, as the paper describes; fairseq's released
text code feeds it only the masked tokens (fairseq#4881, an open bug report), which we do not copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import pretrain as d2v
from .. import registry
from ..audio import AudioEncoder, FeatureEncoder, FeatureProjection, conv_output_lengths, feature_attention_mask
from ..layers import mask_to_bias_mask
from ..masking import compute_span_mask, compute_text_mask
from ..text import TextEmbeddings, TextEncoder
from . import data as data_lib
from .tasks import PRESETS, Task, _AudioTask, build_module
from .text_tasks import _TextTask


class AudioStudent(nn.Module):
    """The audio encoder on masked features + regression head; params named as `Data2VecAudioModel`'s."""

    config: Any
    pretrain: d2v.Data2VecPretrainConfig
    options: dict

    @nn.compact
    def __call__(self, input_values, attention_mask, mask, deterministic: bool = True):
        c, kw = self.config, dict(dtype=self.options["dtype"], param_dtype=self.options["param_dtype"])
        features = FeatureEncoder(c, **kw, name="feature_extractor")(input_values)
        frame_mask = None if attention_mask is None else feature_attention_mask(c, attention_mask,
                                                                                 features.shape[1])
        hidden, _ = FeatureProjection(c, **kw, name="feature_projection")(features, deterministic)
        embed = self.param("masked_spec_embed", nn.initializers.uniform(1.0), (c.hidden_size,), kw["param_dtype"])
        student_in = jnp.where(mask[:, :, None], embed.astype(hidden.dtype), hidden)
        last, _, _ = AudioEncoder(c, **self.options, name="encoder")(student_in, frame_mask, deterministic)
        pred = d2v.RegressionHead(c.hidden_size, self.pretrain.head_layers, self.pretrain.head_init_std, **kw,
                                  name="regression_head")(last)
        return pred, hidden, frame_mask


def audio_teacher_layers(encoder: AudioEncoder, teacher_params, hidden, frame_mask):
    """FFN outputs of every teacher layer on the unmasked features (eval mode, no gradient)."""
    _, _, extras = encoder.apply({"params": teacher_params}, jax.lax.stop_gradient(hidden), frame_mask, True)
    return [e[2] for e in extras]


class TextStudent(nn.Module):
    """The text encoder on masked tokens + regression head; params named as `Data2VecTextModel`'s."""

    config: Any
    pretrain: d2v.Data2VecPretrainConfig
    options: dict

    @nn.compact
    def __call__(self, input_ids, attention_mask, target_ids, deterministic: bool = True):
        c, kw = self.config, dict(dtype=self.options["dtype"], param_dtype=self.options["param_dtype"])
        embeddings = TextEmbeddings(c, **kw, name="embeddings")
        x = embeddings(input_ids, None, None, 0, deterministic)
        last, _, _ = TextEncoder(c, **self.options, name="encoder")(x, mask_to_bias_mask(attention_mask), None,
                                                                    None, deterministic)
        pred = d2v.RegressionHead(c.hidden_size, self.pretrain.head_layers, self.pretrain.head_init_std, **kw,
                                  name="regression_head")(last)
        teacher_in = jax.lax.stop_gradient(embeddings(target_ids, None, None, 0, True))
        return pred, teacher_in, attention_mask


def text_teacher_layers(encoder: TextEncoder, teacher_params, hidden, attention_mask):
    """FFN outputs of every teacher layer on the unmasked sentence's embeddings (eval mode)."""
    _, _, extras = encoder.apply({"params": teacher_params}, hidden, mask_to_bias_mask(attention_mask), None, None,
                                 True)
    return [e[2] for e in extras]


class _PretrainTask(Task):
    """Shared step logic; subclasses give the student class, data and masks."""

    best_metric: str = "eval_loss"

    def _pretrain_config(self, base: d2v.Data2VecPretrainConfig) -> d2v.Data2VecPretrainConfig:
        cfg, changes = self.cfg, {"max_updates": self.cfg.max_steps}
        if cfg.top_k > 0:
            changes["top_k"] = cfg.top_k
        if cfg.ema_anneal_steps > 0:
            changes["ema_anneal_end_step"] = cfg.ema_anneal_steps
        if cfg.mask_prob >= 0:
            changes["mask_prob"] = cfg.mask_prob
        if cfg.learning_rate:
            changes["lr"] = cfg.learning_rate
        if base.warmup_steps:  # keep the released warm-up fraction (10k of 1M updates) on shorter runs
            changes["warmup_steps"] = max(1, round(base.warmup_steps * cfg.max_steps / base.max_updates))
        if base.top_k > self.config.num_hidden_layers and "top_k" not in changes:
            changes["top_k"] = self.config.num_hidden_layers
        return dataclasses.replace(base, **changes)

    def _build(self, student_cls, config):
        cfg = self.cfg
        self.config = config
        self.pretrain = self._pretrain_config(self.released)
        if self.pretrain.top_k > config.num_hidden_layers:
            raise ValueError(f"top_k={self.pretrain.top_k} exceeds the model's {config.num_hidden_layers} layers")
        options = dict(dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32, param_dtype=jnp.float32,
                       scan_layers=cfg.scan_layers, remat=cfg.remat,
                       attention_implementation=cfg.attention_implementation or None)
        self.student = student_cls(config, self.pretrain, options)
        self.teacher_encoder = self.encoder_cls(config, **options)
        params = self.student.init({"params": jax.random.PRNGKey(cfg.seed)}, *self._dummy())["params"]
        if self.encoder_params is not None:  # continue pre-training a checkpoint: its encoder, a fresh head
            params = {**self.encoder_params, "regression_head": params["regression_head"]}
        self.params = params
        self.module = self.student
        self.optimizer_overrides = dict(adam_eps=self.pretrain.adam_eps, clip_norm=self.pretrain.clip_norm)

    def identity(self) -> dict:
        return {"task": self.cfg.task, "config": self.config.to_dict(), "pretrain": dataclasses.asdict(self.pretrain)}

    def frozen(self, path) -> bool:  # pre-training trains everything, the CNN included
        return False

    def delayed(self, path) -> bool:
        return False

    def make_schedule(self):
        return d2v.make_lr_schedule(self.pretrain)

    def init_extra(self, params):
        return {"teacher": d2v.init_teacher(params["encoder"])}

    def after_update(self, extra, params, step):
        p = self.pretrain
        decay = d2v.ema_decay(step, p.ema_decay, p.ema_end_decay, p.ema_anneal_end_step)
        teacher = d2v.ema_update(extra["teacher"], params["encoder"], decay, copy=p.ema_copy_predicate())
        return {"teacher": teacher}

    def step_metrics(self, step):
        p = self.pretrain
        return {"ema_decay": d2v.ema_decay(step, p.ema_decay, p.ema_end_decay, p.ema_anneal_end_step)}

    def loss(self, params, extra, batch, rng, train):
        pred, teacher_in, mask_for_teacher = self.student.apply(
            {"params": params}, *self._student_inputs(batch), deterministic=not train,
            rngs={"dropout": rng} if train else None)
        layers = self.teacher_layers(self.teacher_encoder, extra["teacher"], teacher_in, mask_for_teacher)
        targets = d2v.make_targets(layers, self.pretrain.top_k, self.pretrain.target_norm,
                                   final_norm=self.pretrain.final_target_norm)
        _, sample_size, stats = d2v.data2vec_loss(pred, targets, batch["mask"], self.pretrain.loss_beta,
                                                  self.pretrain.loss_scale)
        return stats["loss_sum"], sample_size, {"target_var": stats["target_var"], "pred_var": stats["pred_var"]}

    def check_health(self, metrics, step):
        problem = d2v.check_collapse(metrics.get("target_var", 1.0), metrics.get("pred_var", 1.0), step,
                                     self.pretrain)
        if problem:
            raise RuntimeError(f"representation collapse: {problem}; stopping (lower the learning rate or "
                               f"raise --ema-anneal-steps)")

    def export(self, params):
        module = registry.model_class(self.base_architecture)(config=self.config, **self._export_options())
        return module, {k: v for k, v in params.items() if k != "regression_head"}

    def _export_options(self):
        return {}


def _encoder_from(cfg, architecture, config_changes):
    """(config, encoder params or None) for `cfg.model`: a preset or a checkpoint's encoder."""
    module, params, _ = build_module(dataclasses.replace(cfg, scan_layers=False), architecture, config_changes)
    return module.config, (None if cfg.model in PRESETS else params)


class AudioPretrainTask(_PretrainTask, _AudioTask):
    """`pretrain-audio`: span masks over frames (p=0.65, length 10), targets = top-8 instance-normed FFN outputs."""

    released = d2v.Data2VecPretrainConfig.audio()
    base_architecture = "Data2VecAudioModel"
    encoder_cls = AudioEncoder
    teacher_layers = staticmethod(audio_teacher_layers)

    def setup(self, shard_index=0, num_shards=1):
        cfg = self.cfg
        train, evaluation = self._read(need_text=False)
        rows, eval_rows = train.rows, evaluation.rows
        max_samples = int(cfg.max_audio_seconds * 16000)
        kw = dict(max_samples=max_samples, crop=True)
        self._iterators(data_lib.AudioDataset(rows, **kw), data_lib.AudioDataset(eval_rows, **kw), shard_index,
                        num_shards)
        config, self.encoder_params = _encoder_from(cfg, self.base_architecture,
                                                    {"mask_time_prob": max(cfg.mask_time_prob, 0.05)})
        self._build(AudioStudent, config)
        self.source = f"{cfg.model} ({'random init' if cfg.model in PRESETS else 'encoder loaded'})"

    def _dummy(self):
        x = jnp.zeros((1, self.config.receptive_field + 2 * self.config.inputs_to_logits_ratio))
        frames = int(conv_output_lengths(self.config, x.shape[1]))
        return x, None, jnp.zeros((1, frames), bool)

    def _student_inputs(self, batch):
        return batch["input_values"], batch["attention_mask"], batch["mask"]

    def prepare(self, batch, rng):
        c, p = self.config, self.pretrain
        frames = int(conv_output_lengths(c, batch["input_values"].shape[1]))
        lengths = conv_output_lengths(c, batch["attention_mask"].sum(-1))
        padding = np.arange(frames)[None, :] >= lengths[:, None]
        mask = compute_span_mask((len(lengths), frames), rng, p.mask_prob, p.mask_length, p.min_masks,
                                 padding_mask=padding, require_same_masks=p.require_same_masks,
                                 mask_dropout=p.mask_dropout)
        return {**batch, "mask": mask & (batch["example_mask"][:, None] > 0)}

    def eval_batches(self):
        rng = np.random.default_rng([self.cfg.seed, 12345])
        return (self.prepare(b, rng) for b in super().eval_batches())


class TextPretrainTask(_PretrainTask, _TextTask):
    """`pretrain-text`: span masks (35 %, length 4), targets = top-10 layer-normed FFN outputs, smooth L1."""

    released = d2v.Data2VecPretrainConfig.text()
    base_architecture = "Data2VecTextModel"
    encoder_cls = TextEncoder
    teacher_layers = staticmethod(text_teacher_layers)

    def setup(self, shard_index=0, num_shards=1):
        cfg = self.cfg
        train, evaluation = self.sources("text/corpus.txt")  # no eval set given: every 20th line held out
        rows, eval_rows = train.rows, evaluation.rows
        self.tokenizer = self._tokenizer(rows)
        kw = dict(max_length=cfg.max_text_tokens, split_long=True)
        self._iterators(data_lib.TextDataset(rows, self.tokenizer, **kw),
                        data_lib.TextDataset(eval_rows, self.tokenizer, **kw), shard_index, num_shards)
        tok = self.tokenizer
        changes = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                   "eos_token_id": tok.eos_token_id}
        if cfg.model in PRESETS:
            changes["vocab_size"] = len(tok)
        config, self.encoder_params = _encoder_from(cfg, self.base_architecture, changes)
        self._build(TextStudent, config)
        self.source = f"{cfg.model} ({'random init' if cfg.model in PRESETS else 'encoder loaded'})"

    def _export_options(self):
        return {"add_pooling_layer": False}

    def _dummy(self):
        ids = jnp.full((1, 4), self.config.bos_token_id or 0, jnp.int32)
        return ids, jnp.ones_like(ids), ids

    def _student_inputs(self, batch):
        return batch["input_ids"], batch["attention_mask"], batch["target_ids"]

    def prepare(self, batch, rng):
        tok, p = self.tokenizer, self.pretrain
        masked, mask = compute_text_mask(batch["input_ids"], rng, mask_token_id=tok.mask_token_id,
                                         special_ids=tok.all_special_ids, attention_mask=batch["attention_mask"],
                                         mask_prob=p.mask_prob, mask_length=p.mask_length,
                                         leave_unmasked_prob=p.leave_unmasked_prob,
                                         random_token_prob=p.random_token_prob, vocab_size=len(tok))
        return {**batch, "input_ids": masked, "target_ids": batch["input_ids"],
                "mask": mask & (batch["example_mask"][:, None] > 0)}

    def eval_batches(self):
        rng = np.random.default_rng([self.cfg.seed, 12345])
        return (self.prepare(b, rng) for b in Task.eval_batches(self))
