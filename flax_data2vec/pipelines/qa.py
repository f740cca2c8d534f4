"""`question-answering` with transformers 4.x's rule (the task was removed from transformers 5).

Long contexts are cut into windows of `max_seq_len` tokens overlapping by `doc_stride`. In each window,
logits of tokens that are neither context nor the leading CLS are set to -10000 and softmaxed; spans score
p_start * p_end over context tokens with start <= end < start + `max_answer_len`; the best spans over all
windows win, mapped back to character offsets (whole words with `align_to_words`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .text import TextPipeline


def _probs(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    x = np.where(allowed, logits, -10000.0)
    e = np.exp(x - x.max())
    return e / e.sum()


def best_spans(p_start: np.ndarray, p_end: np.ndarray, context: np.ndarray, top_k: int, max_answer_len: int):
    """(start, end, score) of the top_k spans inside the context, start <= end < start + max_answer_len."""
    scores = np.triu(np.tril(np.outer(p_start, p_end), max_answer_len - 1))
    order = np.argsort(-scores.ravel(), kind="stable")
    out = []
    for flat in order:
        s, e = divmod(int(flat), scores.shape[1])
        if scores[s, e] <= 0:
            break
        if context[s] and context[e]:
            out.append((s, e, float(scores[s, e])))
            if len(out) == top_k:
                break
    return out


class QuestionAnsweringPipeline(TextPipeline):
    """`pipeline("question-answering")(question=..., context=...)`: {"score", "start", "end", "answer"}."""

    task = "question-answering"
    architectures = ("Data2VecTextForQuestionAnswering",)

    def forward_fn(self, params, ids, mask):
        out = self.module.apply({"params": params}, ids, mask)
        return jnp.stack([out.start_logits, out.end_logits], -1).astype(jnp.float32)

    def __call__(self, *args, question=None, context=None, **options):
        if question is not None or context is not None:
            if question is None or context is None:
                raise ValueError("question-answering needs both question= and context=")
            if isinstance(question, str):
                return super().__call__({"question": question, "context": context}, **options)
            return super().__call__([{"question": q, "context": c} for q, c in zip(question, context)], **options)
        if len(args) != 1:
            raise ValueError("question-answering takes question= and context=, or {'question', 'context'} dicts")
        return super().__call__(args[0], **options)

    def run(self, items: list, options: dict) -> list:
        top_k = options.pop("top_k", 1)
        stride, max_len = options.pop("doc_stride", 128), options.pop("max_seq_len", 384)
        max_answer_len = options.pop("max_answer_len", 15)
        impossible = options.pop("handle_impossible_answer", False)
        align = options.pop("align_to_words", True)
        if options:
            raise TypeError(f"unknown question-answering options: {sorted(options)}")
        for x in items:
            if not isinstance(x, dict) or not {"question", "context"} <= set(x):
                raise ValueError(f"each question-answering input needs 'question' and 'context', got {x!r}")
            if not x["question"].strip() or not x["context"].strip():
                raise ValueError("question and context must not be empty")
        max_len = min(max_len, self.max_length)
        windows, owner = [], []
        for i, x in enumerate(items):
            enc = self.tokenizer(x["question"], x["context"], truncation="only_second", max_length=max_len,
                                 stride=min(stride, max_len // 2), return_overflowing_tokens=True,
                                 return_offsets_mapping=True)
            for w in range(len(enc["input_ids"])):
                windows.append({"input_ids": enc["input_ids"][w], "offsets": enc["offset_mapping"][w],
                                "context": np.array([s == 1 for s in enc.sequence_ids(w)]), "encoding": enc[w]})
                owner.append(i)
        logits = self.batched(windows)
        per_item: list[list] = [[] for _ in items]
        for i, win, lg in zip(owner, windows, logits):
            per_item[i].append((win, lg[:len(win["input_ids"])]))
        return [self._answers(x["context"], wins, top_k, max_answer_len, impossible, align)
                for x, wins in zip(items, per_item)]

    def _answers(self, context: str, windows, top_k, max_answer_len, impossible, align):
        answers, null = [], 1.0
        cls = self.tokenizer.cls_token_id
        for win, lg in windows:
            allowed = win["context"].copy()
            allowed |= np.asarray(win["input_ids"]) == cls
            p_start, p_end = _probs(lg[:, 0], allowed), _probs(lg[:, 1], allowed)
            if impossible:
                null = min(null, float(p_start[0] * p_end[0]))
                p_start[0] = p_end[0] = 0.0
            for s, e, score in best_spans(p_start, p_end, win["context"], top_k, max_answer_len):
                start, end = self._chars(win, s, e, align)
                answers.append({"score": score, "start": start, "end": end, "answer": context[start:end]})
        if impossible:
            answers.append({"score": null, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
        return answers[0] if top_k == 1 else answers

    @staticmethod
    def _chars(win: dict, s: int, e: int, align: bool) -> tuple[int, int]:
        if align:
            enc = win["encoding"]
            try:
                return (enc.word_to_chars(enc.token_to_word(s), sequence_index=1)[0],
                        enc.word_to_chars(enc.token_to_word(e), sequence_index=1)[1])
            except (TypeError, ValueError):
                pass
        return int(win["offsets"][s][0]), int(win["offsets"][e][1])
