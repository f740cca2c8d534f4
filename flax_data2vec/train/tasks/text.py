"""Text fine-tuning tasks: sentence(-pair) classification (accuracy) and masked-LM (perplexity)."""

from __future__ import annotations

import math

import numpy as np

from ... import losses
from ...masking import compute_text_mask
from .. import data as data_lib
from .. import models
from .. import sources as sources_lib
from ..config import TrainConfig
from ..task import Task
from . import common


def make_text_classification(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    """Sentence classification (pairs too): Data2VecTextForSequenceClassification; eval accuracy."""
    arch = "Data2VecTextForSequenceClassification"
    train, evaluation = common.read_sources(cfg, "text", "text/classify_train.jsonl", "text/classify_eval.jsonl",
                                            need_label=True)
    label_map = sources_lib.label_map(train)
    tokenizer = common.tokenizer_for(cfg, [t for r in train.rows for t in (r["text"], r.get("text_pair", ""))])
    kw = dict(max_length=cfg.max_text_tokens, label_map=label_map)
    train_data, eval_data = common.text_iterators(
        cfg, data_lib.TextDataset(train.rows, tokenizer, **kw), data_lib.TextDataset(evaluation.rows, tokenizer, **kw),
        shard_index, num_shards)
    model = models.build(cfg, arch, {**common.tokenizer_changes(cfg, tokenizer), "id2label": label_map.id2label,
                                     "problem_type": "single_label_classification"}, tokenizer_size=len(tokenizer))
    return common.fine_tuning_task(
        cfg, arch, model, (train, evaluation), (train_data, eval_data),
        common.classification_steps(common.forward(model.module, "input_ids")), common.classification_eval,
        lr=1e-4, best=("eval_accuracy", "max"), save_assets=tokenizer.save_pretrained)


def bert_masks(tokenizer):
    """Host-side BERT masking (15 %, 80/10/10) with the scored positions gathered to a static (batch, k),
    so the LM head and its vocabulary matmul run on the ~15 % masked tokens only."""
    def prepare(batch: dict, rng: np.random.Generator) -> dict:
        ids = batch["input_ids"]
        masked, mask = compute_text_mask(ids, rng, mask_token_id=tokenizer.mask_token_id,
                                         special_ids=tokenizer.all_special_ids, attention_mask=batch["attention_mask"],
                                         vocab_size=len(tokenizer), bert_style=True)
        mask &= batch["example_mask"][:, None].astype(bool)
        k = int(0.15 * ids.shape[1]) + 1  # the sampler masks at most int(0.15 n + u) <= this per row
        positions = np.zeros((ids.shape[0], k), np.int32)
        targets = np.full((ids.shape[0], k), data_lib.IGNORE_INDEX, np.int32)
        for row in range(ids.shape[0]):
            where = np.flatnonzero(mask[row])[:k]
            positions[row, :len(where)] = where
            targets[row, :len(where)] = ids[row, where]
        return {**batch, "input_ids": masked, "positions": positions, "labels": targets}
    return prepare


def make_mlm(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    """Masked-LM fine-tuning (BERT-style 15 %, 80/10/10): Data2VecTextForMaskedLM; eval perplexity."""
    arch = "Data2VecTextForMaskedLM"
    train, evaluation = common.read_sources(cfg, "text", "text/corpus.txt")  # no eval set: every 20th line held out
    tokenizer = common.tokenizer_for(cfg, [r["text"] for r in train.rows])
    kw = dict(max_length=cfg.max_text_tokens, split_long=True)
    train_data, eval_data = common.text_iterators(
        cfg, data_lib.TextDataset(train.rows, tokenizer, **kw), data_lib.TextDataset(evaluation.rows, tokenizer, **kw),
        shard_index, num_shards, prepare=bert_masks(tokenizer))
    model = models.build(cfg, arch, common.tokenizer_changes(cfg, tokenizer), tokenizer_size=len(tokenizer))
    apply = common.forward(model.module, "input_ids")

    def loss(params, extra, batch, rng, train):
        out = apply(params, batch, rng, train, masked_positions=batch["positions"])
        return (*losses.cross_entropy_sum(out.logits, batch["labels"]), {})

    def eval_metrics(outputs):
        metrics = common.mean_eval_loss(outputs)
        return {**metrics, "eval_perplexity": math.exp(min(metrics["eval_loss"], 50.0))}

    return common.fine_tuning_task(cfg, arch, model, (train, evaluation), (train_data, eval_data),
                                   (loss, common.loss_eval_step(loss)), eval_metrics, lr=1e-4,
                                   save_assets=tokenizer.save_pretrained)
