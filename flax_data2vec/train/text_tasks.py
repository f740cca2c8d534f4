"""Text fine-tuning tasks: sequence classification (accuracy) and masked-LM (perplexity)."""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
import optax

from ..masking import compute_text_mask
from . import data as data_lib
from . import sources as sources_lib
from .config import REPO_DATA
from .tasks import PRESETS, ClassificationMixin, Task, build_module


def masked_cross_entropy(logits, labels, keep):
    """(sum, count) of the cross-entropy over the positions where `keep` holds (labels elsewhere unused)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(keep, labels, 0))
    return jnp.where(keep, ce, 0.0).sum(), keep.sum().astype(jnp.float32)


class _TextTask(Task):
    default_lr: float = 1e-4

    def _tokenizer(self, train_rows: list[dict]):
        """--tokenizer, else the checkpoint's tokenizer, else (presets) a small BPE trained on the training
        text (for the shipped data: on the whole shipped corpus)."""
        cfg = self.cfg
        if cfg.tokenizer:
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(cfg.tokenizer)
        if cfg.model not in PRESETS:
            from transformers import AutoTokenizer

            from ..hub import training_output_model
            source = training_output_model(cfg.model) if os.path.isdir(cfg.model) else cfg.model
            try:
                return AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as e:
                raise ValueError(f"no tokenizer found with model {cfg.model!r}; pass --tokenizer") from e
        if not cfg.train_data:
            train_rows = data_lib.load_text_lines(os.path.join(REPO_DATA, "text/corpus.txt"))
        lines = (t for r in train_rows for t in (r["text"], r.get("text_pair", "")))
        return data_lib.build_small_bpe_tokenizer(lines, vocab_size=2000)

    def _iterators(self, train_ds, eval_ds, shard_index, num_shards):
        cfg = self.cfg
        multiple = 128 if cfg.attention_implementation == "cudnn" else 8  # cuDNN attention: T % 128 == 0
        self.train_iter = data_lib.BatchIterator(train_ds, cfg.batch_size, n_buckets=cfg.n_buckets,
                                                 multiple=multiple, seed=cfg.seed, shard_index=shard_index,
                                                 num_shards=num_shards)
        self.eval_iter_factory = lambda: data_lib.BatchIterator(
            eval_ds, cfg.eval_batch_size, n_buckets=cfg.n_buckets, multiple=multiple, shuffle=False, num_epochs=1,
            drop_remainder=False, shard_index=shard_index, num_shards=num_shards)

    def _model(self, changes: dict):
        tok = self.tokenizer
        changes = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                   "eos_token_id": tok.eos_token_id, **changes}
        if self.cfg.model in PRESETS:
            changes["vocab_size"] = len(tok)
        self.module, self.params, self.source = build_module(self.cfg, self.architecture, changes)

    def save_assets(self, directory):
        self.tokenizer.save_pretrained(directory)


class TextClassificationTask(ClassificationMixin, _TextTask):
    """Sentence classification: Data2VecTextForSequenceClassification; eval accuracy."""

    architecture: str = "Data2VecTextForSequenceClassification"
    input_key = "input_ids"
    best_metric: str = "eval_accuracy"
    best_mode: str = "max"

    def setup(self, shard_index=0, num_shards=1):
        cfg = self.cfg
        train, evaluation = self.sources("text/classify_train.jsonl", "text/classify_eval.jsonl", need_label=True)
        train_rows, eval_rows = train.rows, evaluation.rows
        self.label_map = sources_lib.label_map(train)
        self.tokenizer = self._tokenizer(train_rows)
        kw = dict(max_length=cfg.max_text_tokens, label_map=self.label_map)
        self._iterators(data_lib.TextDataset(train_rows, self.tokenizer, **kw),
                        data_lib.TextDataset(eval_rows, self.tokenizer, **kw), shard_index, num_shards)
        self._model(dict(id2label=self.label_map.id2label, problem_type="single_label_classification"))



class TokenClassificationTask(_TextTask):
    """Per-word tags (NER, POS, ...): Data2VecTextForTokenClassification; eval token accuracy, and entity F1
    (seqeval) when the tags are IOB-style. The shipped default is truecasing: lower-cased words of the
    shipped corpus tagged O / Cap / UPPER by their original case."""

    architecture: str = "Data2VecTextForTokenClassification"
    best_mode: str = "max"

    def setup(self, shard_index=0, num_shards=1):
        cfg = self.cfg
        if cfg.train_data:
            train, evaluation = self.sources("", tagged=True)
        else:
            lines = [r["text"] for r in data_lib.load_text_lines(os.path.join(REPO_DATA, "text/corpus.txt"))]
            train, evaluation = sources_lib.Source(data_lib.truecasing_rows(lines), "data/text/corpus.txt "
                                                   "(truecasing)").holdout()
            self.note_data(train, evaluation)
        self.label_map = sources_lib.label_map(train)
        self.iob = all(n == "O" or n[:2] in ("B-", "I-", "E-", "S-") for n in self.label_map.names)
        self.best_metric = "eval_f1" if self.iob else "eval_accuracy"
        if self.iob:
            try:
                import seqeval  # noqa: F401
            except ImportError:
                raise ImportError("entity F1 for IOB tags needs seqeval: pip install seqeval "
                                  "(or pip install 'flax_data2vec[hf]')") from None
        text = [{"text": " ".join(r["tokens"])} for r in train.rows]
        self.tokenizer = self._tokenizer(text)
        kw = dict(max_length=cfg.max_text_tokens)
        self._iterators(data_lib.TaggedTextDataset(train.rows, self.tokenizer, self.label_map, **kw),
                        data_lib.TaggedTextDataset(evaluation.rows, self.tokenizer, self.label_map, **kw),
                        shard_index, num_shards)
        self._model(dict(id2label=self.label_map.id2label))

    def _logits(self, params, batch, rng, train):
        out = self.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                deterministic=not train, rngs={"dropout": rng} if train else None)
        labels = batch["labels"]  # (batch, w) with w <= seq: pad to the token axis
        labels = jnp.pad(labels, ((0, 0), (0, out.logits.shape[1] - labels.shape[1])), constant_values=-100)
        keep = (labels >= 0) & (batch["example_mask"][:, None] > 0)
        return out.logits.astype(jnp.float32), labels, keep

    def loss(self, params, extra, batch, rng, train):
        return (*masked_cross_entropy(*self._logits(params, batch, rng, train)), {})

    def eval_outputs(self, params, extra, batch):
        logits, labels, keep = self._logits(params, batch, None, False)
        total, count = masked_cross_entropy(logits, labels, keep)
        return {"loss_sum": total, "count": count, "pred": jnp.argmax(logits, -1), "labels": labels, "keep": keep}

    def eval_metrics(self, outputs):
        metrics = super().eval_metrics(outputs)
        names = self.label_map.names
        refs, hyps = [], []
        for o in outputs:
            pred, labels, keep = (np.asarray(o[k]) for k in ("pred", "labels", "keep"))
            for row in range(len(pred)):
                where = np.flatnonzero(keep[row])
                if len(where):
                    refs.append([names[i] for i in labels[row, where]])
                    hyps.append([names[i] for i in pred[row, where]])
        total = sum(len(r) for r in refs)
        metrics["eval_accuracy"] = sum(a == b for r, h in zip(refs, hyps) for a, b in zip(r, h)) / max(total, 1)
        if self.iob:
            from seqeval.metrics import f1_score
            metrics["eval_f1"] = float(f1_score(refs, hyps)) if refs else float("nan")
        return metrics


class MLMTask(_TextTask):
    """Masked-LM fine-tuning (BERT-style 15 %, 80/10/10): Data2VecTextForMaskedLM; eval perplexity."""

    architecture: str = "Data2VecTextForMaskedLM"
    default_schedule: str = "linear"

    def setup(self, shard_index=0, num_shards=1):
        cfg = self.cfg
        train, evaluation = self.sources("text/corpus.txt")  # no eval set given: every 20th line held out
        train_rows, eval_rows = train.rows, evaluation.rows
        self.tokenizer = self._tokenizer(train_rows)
        kw = dict(max_length=cfg.max_text_tokens, split_long=True)
        self._iterators(data_lib.TextDataset(train_rows, self.tokenizer, **kw),
                        data_lib.TextDataset(eval_rows, self.tokenizer, **kw), shard_index, num_shards)
        self._model({})

    def prepare(self, batch, rng):
        """BERT masking on the host; the scored positions are gathered to a static (batch, k) so that the
        LM head and its vocabulary matmul run on the ~15 % masked tokens only."""
        tok = self.tokenizer
        ids = batch["input_ids"]
        masked, mask = compute_text_mask(ids, rng, mask_token_id=tok.mask_token_id,
                                         special_ids=tok.all_special_ids, attention_mask=batch["attention_mask"],
                                         vocab_size=len(tok), bert_style=True)
        mask &= batch["example_mask"][:, None].astype(bool)
        k = int(0.15 * ids.shape[1]) + 1  # the sampler masks at most int(0.15 n + u) <= this per row
        positions = np.zeros((ids.shape[0], k), np.int32)
        targets = np.full((ids.shape[0], k), -100, np.int32)
        for row in range(ids.shape[0]):
            where = np.flatnonzero(mask[row])[:k]
            positions[row, :len(where)] = where
            targets[row, :len(where)] = ids[row, where]
        return {**batch, "input_ids": masked, "positions": positions, "labels": targets}

    def eval_batches(self):
        rng = np.random.default_rng([self.cfg.seed, 12345])  # the same masks at every evaluation
        return (self.prepare(b, rng) for b in super().eval_batches())

    def loss(self, params, extra, batch, rng, train):
        out = self.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                masked_positions=batch["positions"], deterministic=not train,
                                rngs={"dropout": rng} if train else None)
        return (*masked_cross_entropy(out.logits, batch["labels"], batch["labels"] >= 0), {})

    def eval_metrics(self, outputs):
        metrics = super().eval_metrics(outputs)
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        return metrics
