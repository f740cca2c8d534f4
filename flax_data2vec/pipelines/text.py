"""Text pipelines: `fill-mask`, `text-classification` and `token-classification`, with transformers' outputs.

Tokenising runs on host threads; rows are padded (pad id, masked) to a few bucketed lengths, which leaves
every real token's output unchanged; logits come back to the host as numpy and are scored as transformers does.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .. import processors
from .base import Model, Pipeline, apply_function, bucket, length_batches, pad_rows, run_overlapped, softmax


class TextPipeline(Pipeline):
    """Shared: the checkpoint's tokenizer, length limit, bucketed batches of token ids."""

    def __init__(self, model: Model, *, tokenizer=None, **kw):
        self.tokenizer = processors.text_tokenizer(model.directory, tokenizer)
        super().__init__(model, **kw)
        c = self.config
        self.pad_id = c.pad_token_id if c.pad_token_id is not None else self.tokenizer.pad_token_id
        self.max_length = c.max_position_embeddings - (c.pad_token_id or 0) - 1  # positions start after pad

    def encode(self, text, text_pair=None, **kw) -> dict:
        """Token ids (and offsets when asked) of one input; over-long input is cut, with a warning."""
        enc = self.tokenizer(text, text_pair, **kw)
        if len(enc["input_ids"]) > self.max_length:
            warnings.warn(f"an input of {len(enc['input_ids'])} tokens is longer than the model's "
                          f"{self.max_length}; it is truncated to {self.max_length} tokens", stacklevel=4)
            enc = self.tokenizer(text, text_pair, truncation=True, max_length=self.max_length, **kw)
        return dict(enc)

    def batched(self, encodings: list[dict], extra=None) -> list:
        """Per encoding, the forward's numpy output row; `extra(batch) -> tuple of arrays` adds inputs."""
        lengths = [len(e["input_ids"]) for e in encodings]

        def prepare(idx):
            rows = [np.asarray(encodings[i]["input_ids"], np.int32) for i in idx]
            width = bucket(max(len(r) for r in rows), 16, 16, maximum=self.max_length)
            ids = pad_rows(rows, width, self.batch_size, self.pad_id)
            mask = pad_rows([np.ones(len(r), np.int32) for r in rows], width, self.batch_size, 0)
            mask[len(rows):, 0] = 1
            return idx, (ids, mask) + (extra([encodings[i] for i in idx], self.batch_size) if extra else ())

        def finish(prepared, out):
            idx, _ = prepared
            out = self.forward.fetch(out)
            return [(i, jax.tree_util.tree_map(lambda a, k=k: a[k], out)) for k, i in enumerate(idx)]

        done = run_overlapped(length_batches(lengths, self.batch_size), prepare,
                              lambda p: self.forward(*p[1]), finish, self.stats)
        rows = dict(r for batch in done for r in batch)
        return [rows[i] for i in range(len(encodings))]


class FillMaskPipeline(TextPipeline):
    """`fill-mask`: the top_k fillers of each mask token, with scores, token strings and filled sequences."""

    task = "fill-mask"
    architectures = ("Data2VecTextForMaskedLM",)
    MAX_MASKS = 4  # masks per row scored in one compiled call (more masks: a wider bucket)

    def forward_fn(self, params, ids, mask, positions):
        logits = self.module.apply({"params": params}, ids, mask, masked_positions=positions).logits
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def run(self, items: list, options: dict) -> list:
        top_k, targets = options.pop("top_k", 5), options.pop("targets", None)
        if options:
            raise TypeError(f"unknown fill-mask options: {sorted(options)}")
        mask_id = self.tokenizer.mask_token_id
        encodings = [self.encode(t) for t in items]
        for t, e in zip(items, encodings):
            if mask_id not in e["input_ids"]:
                raise ValueError(f"no mask token ({self.tokenizer.mask_token}) in {t!r}")
        target_ids = None if targets is None else np.array(self._target_ids(targets))

        def positions(batch, rows):
            where = [np.flatnonzero(np.asarray(e["input_ids"]) == mask_id) for e in batch]
            width = bucket(max(len(w) for w in where), self.MAX_MASKS, self.MAX_MASKS)
            return (pad_rows([w.astype(np.int32) for w in where], width, rows, 0),)
        probs = self.batched(encodings, positions)
        return [self._fillers(e, p, top_k, target_ids) for e, p in zip(encodings, probs)]

    def _target_ids(self, targets) -> list[int]:
        """Each target's vocabulary id, else its first token's (warned), as transformers picks them."""
        vocab = self.tokenizer.get_vocab()
        ids = []
        for t in [targets] if isinstance(targets, str) else targets:
            i = vocab.get(t)
            if i is None:
                pieces = self.tokenizer(t, add_special_tokens=False, max_length=1, truncation=True)["input_ids"]
                if not pieces:
                    warnings.warn(f"target {t!r} is not in the vocabulary and tokenizes to nothing; ignored",
                                  stacklevel=2)
                    continue
                i = pieces[0]
                warnings.warn(f"target {t!r} is not in the vocabulary; scoring its first token "
                              f"{self.tokenizer.convert_ids_to_tokens(i)!r} instead", stacklevel=2)
            ids.append(i)
        if not ids:
            raise ValueError(f"no usable targets in {targets!r}")
        return list(set(ids))

    def _fillers(self, enc: dict, probs: np.ndarray, top_k: int, target_ids) -> list:
        ids = np.asarray(enc["input_ids"])
        where = np.flatnonzero(ids == self.tokenizer.mask_token_id)
        probs = probs[:len(where)]
        if target_ids is not None:
            probs = probs[:, target_ids]
            top_k = min(top_k, len(target_ids))
        single = len(where) == 1
        result = []
        for m, row in enumerate(probs):
            best = np.argsort(-row, kind="stable")[:top_k]
            fills = []
            for b in best:
                token = int(target_ids[b]) if target_ids is not None else int(b)
                filled = ids.copy()
                filled[where[m]] = token
                filled = filled[filled != self.tokenizer.pad_token_id]
                fills.append({"score": float(row[b]), "token": token, "token_str": self.tokenizer.decode([token]),
                              "sequence": self.tokenizer.decode(filled, skip_special_tokens=single)})
            result.append(fills)
        return result[0] if single else result


class TextClassificationPipeline(TextPipeline):
    """`text-classification`: labels with scores; sentence pairs as {"text", "text_pair"} dicts."""

    task = "text-classification"
    architectures = ("Data2VecTextForSequenceClassification",)

    def forward_fn(self, params, ids, mask):
        return self.module.apply({"params": params}, ids, mask).logits.astype(jnp.float32)

    def __call__(self, inputs, **options):
        out = super().__call__(inputs, **options)
        legacy = "top_k" not in {**self.defaults, **options}
        return [out] if isinstance(inputs, str) and legacy else out

    def run(self, items: list, options: dict) -> list:
        legacy = "top_k" not in options
        top_k, function = options.pop("top_k", 1), options.pop("function_to_apply", None)
        if options:
            raise TypeError(f"unknown text-classification options: {sorted(options)}")
        encodings = [self.encode(**self._text(x)) for x in items]
        logits = self.batched(encodings)
        return [self._labels(row, top_k, function, legacy) for row in logits]

    @staticmethod
    def _text(x) -> dict:
        if isinstance(x, str):
            return {"text": x}
        if isinstance(x, dict) and "text" in x and set(x) <= {"text", "text_pair"}:
            return dict(x)
        if isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(s, str) for s in x):
            return {"text": x[0], "text_pair": x[1]}
        raise ValueError(f"text-classification takes a string or {{'text': ..., 'text_pair': ...}}, got {x!r}")

    def _labels(self, logits: np.ndarray, top_k, function, legacy: bool):
        c = self.config
        if function is None:
            if c.problem_type == "regression":
                function = "none"
            elif c.problem_type == "multi_label_classification" or c.num_labels == 1:
                function = "sigmoid"
            else:
                function = "softmax"
        scores = apply_function(logits, function)
        id2label = dict(c.id2label)
        if top_k == 1 and legacy:
            return {"label": id2label[int(scores.argmax())], "score": float(scores.max())}
        ranked = [{"label": id2label[i], "score": float(s)} for i, s in enumerate(scores)]
        ranked.sort(key=lambda d: d["score"], reverse=True)
        return ranked if top_k is None else ranked[:top_k]


class TokenClassificationPipeline(TextPipeline):
    """`token-classification`: per-token labels or entity groups (`aggregation_strategy`), with char offsets."""

    task = "token-classification"
    architectures = ("Data2VecTextForTokenClassification",)

    def forward_fn(self, params, ids, mask):
        return self.module.apply({"params": params}, ids, mask).logits.astype(jnp.float32)

    def run(self, items: list, options: dict) -> list:
        strategy = str(getattr(s := options.pop("aggregation_strategy", "none"), "value", s)).lower()
        ignore = options.pop("ignore_labels", None)
        if options:
            raise TypeError(f"unknown token-classification options: {sorted(options)}")
        if strategy not in ("none", "simple", "first", "average", "max"):
            raise ValueError(f"aggregation_strategy must be none, simple, first, average or max, got {strategy!r}")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("token-classification needs a fast tokenizer (character offsets)")
        encodings = [self.encode(t, return_offsets_mapping=True, return_special_tokens_mask=True) for t in items]
        logits = self.batched(encodings)
        from .tagging import entities
        return [entities(self.tokenizer, dict(self.config.id2label), t, e, softmax(lg[:len(e["input_ids"])]),
                         strategy, ["O"] if ignore is None else ignore) for t, e, lg in zip(items, encodings, logits)]
