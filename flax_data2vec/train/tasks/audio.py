"""Speech fine-tuning tasks: CTC recognition (CER/WER) and utterance classification (accuracy)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from ...audio import conv_output_lengths
from ...ctc import ctc_loss
from .. import data as data_lib
from .. import models
from .. import sources as sources_lib
from ..config import TrainConfig
from ..task import Task
from . import common


def _audio_datasets(cfg: TrainConfig, train, evaluation, **kw):
    max_samples = int(cfg.max_audio_seconds * 16000)
    return (data_lib.AudioDataset(train.rows, max_samples=max_samples, **kw),
            data_lib.AudioDataset(evaluation.rows, max_samples=max_samples, **kw))


def ctc_vocab(cfg: TrainConfig, texts: list[str]) -> data_lib.CharVocab:
    """The checkpoint's vocab.json when it has one, else every character of the training transcripts."""
    path = os.path.join(cfg.model, "vocab.json")
    if cfg.model not in models.PRESETS and os.path.isfile(path):
        return data_lib.CharVocab.load(path)
    return data_lib.CharVocab.from_texts(texts)


def make_ctc(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    """Speech recognition: Data2VecAudioForCTC on characters; eval CER and WER (jiwer)."""
    arch = "Data2VecAudioForCTC"
    train, evaluation = common.shipped_speech(cfg)
    vocab = ctc_vocab(cfg, [r.get("text", "") for r in train.rows])
    train_ds, eval_ds = _audio_datasets(cfg, train, evaluation, vocab=vocab)
    train_data, eval_data = common.audio_iterators(cfg, train_ds, eval_ds, shard_index, num_shards)
    model = common.audio_model(cfg, arch, dict(vocab_size=len(vocab), pad_token_id=0, ctc_zero_infinity=True))
    module, apply = model.module, common.forward(model.module)
    # eval as flax_data2vec.pipeline transcribes: padding-invariant (v1; 2.0 has no switch): eval CER = pipeline CER
    invariant = hasattr(module, "padding_invariant")
    eval_apply = common.forward(module.clone(padding_invariant=True) if invariant else module)

    def per_sequence(params, batch, rng, train):
        out = (apply if train else eval_apply)(params, batch, rng, train)
        lengths = conv_output_lengths(module.config, batch["attention_mask"].sum(-1))
        nll = ctc_loss(out.logits, lengths, batch["labels"], module.config.pad_token_id, "none",
                       zero_infinity=True, implementation=cfg.ctc_implementation)
        return nll * batch["example_mask"], out.logits, lengths

    def loss(params, extra, batch, rng, train):
        nll, _, _ = per_sequence(params, batch, rng, train)
        return nll.sum(), batch["example_mask"].sum(), {}

    def eval_step(params, extra, batch):
        nll, logits, lengths = per_sequence(params, batch, None, False)
        return {"loss_sum": nll.sum(), "count": batch["example_mask"].sum(), "pred": jnp.argmax(logits, -1),
                "lengths": lengths, "labels": batch["labels"], "example_mask": batch["example_mask"]}

    def eval_metrics(outputs):
        import jiwer
        refs, hyps = [], []
        for o in outputs:
            pred, lengths, labels, w = (np.asarray(o[k]) for k in ("pred", "lengths", "labels", "example_mask"))
            for i in np.nonzero(w)[0]:
                hyps.append(vocab.decode(pred[i, :lengths[i]]))
                refs.append(vocab.decode([t for t in labels[i] if t >= 0], collapse=False))
        metrics = common.mean_eval_loss(outputs)
        metrics["eval_cer"] = float(jiwer.cer(refs, hyps)) if refs else float("nan")
        metrics["eval_wer"] = float(jiwer.wer(refs, hyps)) if refs else float("nan")
        metrics["eval_example"] = f"{refs[0]!r} -> {hyps[0]!r}" if refs else ""
        return metrics

    from_scratch = cfg.model in models.PRESETS  # 1e-3 and a longer hold; fine-tuning: fairseq base_960h
    return common.fine_tuning_task(cfg, arch, model, (train, evaluation), (train_data, eval_data), (loss, eval_step),
                                   eval_metrics, lr=1e-3 if from_scratch else 1e-4, schedule="tri_stage",
                                   ratios=(0.1, 0.7, 0.2) if from_scratch else (0.1, 0.4, 0.5),
                                   best=("eval_cer", "min"), save_assets=vocab.save)


def make_audio_classification(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    """Utterance classification: Data2VecAudioForSequenceClassification; eval accuracy."""
    arch = "Data2VecAudioForSequenceClassification"
    train, evaluation = common.shipped_speech(cfg, need_text=False, need_label=True)
    label_map = sources_lib.label_map(train)
    train_ds, eval_ds = _audio_datasets(cfg, train, evaluation, label_map=label_map)
    train_data, eval_data = common.audio_iterators(cfg, train_ds, eval_ds, shard_index, num_shards)
    model = common.audio_model(cfg, arch, dict(id2label=label_map.id2label))
    return common.fine_tuning_task(cfg, arch, model, (train, evaluation), (train_data, eval_data),
                                   common.classification_steps(common.forward(model.module)),
                                   common.classification_eval, lr=3e-4, best=("eval_accuracy", "max"))
