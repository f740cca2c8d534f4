"""Per-word tags (NER, POS, ...): Data2VecTextForTokenClassification; eval token accuracy, and entity F1
(seqeval) when the tags are IOB-style. The shipped default is truecasing: lower-cased words of the shipped
corpus tagged O / Cap / UPPER by their original case (tagging every word O scores ~0.89)."""

from __future__ import annotations

import os

import numpy as np

from .. import data as data_lib
from .. import models
from .. import sources as sources_lib
from ..config import REPO_DATA, TrainConfig
from ..task import Task
from . import common


def tagged_sources(cfg: TrainConfig) -> tuple[sources_lib.Split, sources_lib.Split]:
    """--train-data rows {tokens, tags}, or the truecasing examples of the shipped corpus (every 20th held out)."""
    if cfg.train_data:
        return common.read_sources(cfg, "text", "", tagged=True)
    lines = [r["text"] for r in data_lib.load_text_lines(os.path.join(REPO_DATA, "text/corpus.txt"))]
    return sources_lib.Split(data_lib.truecasing_rows(lines), "data/text/corpus.txt (truecasing)").holdout()


def is_iob(names: list[str]) -> bool:
    return all(n == "O" or n[:2] in ("B-", "I-", "E-", "S-") for n in names)


def make_token_classification(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    arch = "Data2VecTextForTokenClassification"
    train, evaluation = tagged_sources(cfg)
    label_map = sources_lib.label_map(train)
    names, iob = label_map.names, is_iob(label_map.names)
    if iob:
        try:
            import seqeval  # noqa: F401
        except ImportError:
            raise ImportError("entity F1 for IOB tags needs seqeval: pip install seqeval "
                              "(or pip install 'flax_data2vec[hf]')") from None
    tokenizer = common.tokenizer_for(cfg, [" ".join(r["tokens"]) for r in train.rows])
    kw = dict(max_length=cfg.max_text_tokens)
    train_data, eval_data = common.text_iterators(
        cfg, data_lib.TaggedTextDataset(train.rows, tokenizer, label_map, **kw),
        data_lib.TaggedTextDataset(evaluation.rows, tokenizer, label_map, **kw), shard_index, num_shards)
    model = models.build(cfg, arch, {**common.tokenizer_changes(cfg, tokenizer), "id2label": label_map.id2label},
                         tokenizer_size=len(tokenizer))
    loss, eval_step = common.labelling_steps(common.forward(model.module, "input_ids"))

    def eval_metrics(outputs):
        refs, hyps = [], []
        for o in outputs:
            pred, labels = np.asarray(o["pred"]), np.asarray(o["labels"])
            for row in range(len(pred)):
                where = np.flatnonzero(labels[row] >= 0)
                if len(where):
                    refs.append([names[i] for i in labels[row, where]])
                    hyps.append([names[i] for i in pred[row, where]])
        metrics = common.mean_eval_loss(outputs)
        total = sum(len(r) for r in refs)
        metrics["eval_accuracy"] = sum(a == b for r, h in zip(refs, hyps) for a, b in zip(r, h)) / max(total, 1)
        if iob:
            from seqeval.metrics import f1_score
            metrics["eval_f1"] = float(f1_score(refs, hyps)) if refs else float("nan")
        return metrics

    return common.fine_tuning_task(cfg, arch, model, (train, evaluation), (train_data, eval_data), (loss, eval_step),
                                   eval_metrics, lr=1e-4, best=("eval_f1" if iob else "eval_accuracy", "max"),
                                   save_assets=tokenizer.save_pretrained)
