"""Extractive question answering: Data2VecTextForQuestionAnswering on SQuAD-style data; eval exact match and F1.

A long context is cut into windows of `--max-text-tokens` (question + context), whose starts are `--doc-stride`
context tokens apart; a window's target is the answer's first and last token, or <s> (position 0) when the
answer is not inside it. At eval, the best span of each question (start <= end < start + 30, start + end
logits) is taken over all its windows and scored against every gold answer after SQuAD's normalisation.

The shipped default asks, of each passage of the Austen text with a title followed by a name, "Which name
follows the first Mr.?" (one question per distinct title; the answer is the run of capitalised words after the
title's first occurrence). Contexts: train on data/text/corpus.txt paragraphs and classify_train.jsonl
passages, eval on classify_eval.jsonl passages (other parts of the novels).
"""

from __future__ import annotations

import collections
import json
import os
import re
import string

import jax.numpy as jnp
import numpy as np

from ... import losses
from .. import models
from .. import sources as sources_lib
from ..config import REPO_DATA, TrainConfig
from ..task import Task
from . import common

MAX_ANSWER_TOKENS = 30  # a predicted span has end < start + 30 (SQuAD practice)
MAX_QUESTION_TOKENS = 64  # longer questions are cut (BERT's max_query_length)
TITLES = ("Mr.", "Mrs.", "Miss", "Lady", "Sir", "Colonel", "Captain", "Dr.")
TITLED_NAME = re.compile(r"\b(" + "|".join(re.escape(t) for t in TITLES) + r") ([A-Z][a-z]+(?: [A-Z][a-z]+)*)")


# ----------------------------------------------------------------------------- data
def title_questions(passages: list[str]) -> list[dict]:
    """SQuAD-style rows from plain passages: for each title's first occurrence, "Which name follows the first
    Mr.?" answered by the capitalised words after it."""
    rows = []
    for context in passages:
        asked = set()
        for match in TITLED_NAME.finditer(context):
            title = match.group(1)
            if title not in asked:
                asked.add(title)
                rows.append({"question": f"Which name follows the first {title}?", "context": context,
                             "answers": {"text": [match.group(2)], "answer_start": [match.start(2)]}})
    return rows


def qa_sources(cfg: TrainConfig) -> tuple[sources_lib.Split, sources_lib.Split]:
    """--train-data/--eval-data (JSONL or hf: with question/context/answers), or the shipped title questions."""
    if cfg.train_data:
        return sources_lib.train_eval_sources(cfg.train_data, cfg.eval_data, "text", qa=True)

    def passages(name: str) -> list[str]:
        with open(os.path.join(REPO_DATA, "text", name), encoding="utf-8") as f:
            return [json.loads(line)["text"] if name.endswith(".jsonl") else line.strip() for line in f if line.strip()]
    train = title_questions(passages("corpus.txt") + passages("classify_train.jsonl"))
    evaluation = title_questions(passages("classify_eval.jsonl"))
    return (sources_lib.Split(train, "data/text/corpus.txt + classify_train.jsonl (title questions)"),
            sources_lib.Split(evaluation, "data/text/classify_eval.jsonl (title questions)"))


class QADataset:
    """Question + context windows for `data.BatchIterator`. labels = (start, end, window id): the id lets eval
    map a batch row back to its question and the context characters of its tokens."""

    def __init__(self, rows: list[dict], tokenizer, *, max_length: int, doc_stride: int):
        if not tokenizer.is_fast:
            raise ValueError("question answering needs a fast tokenizer (character offsets); "
                             f"{type(tokenizer).__name__} is not one")
        self.rows, self.ids, self.labels = rows, [], []
        self.example, self.offsets, self.context_start = [], [], []  # per window
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        questions = [self._cut(r["question"], tokenizer) for r in rows]
        q_lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
        by_length = collections.defaultdict(list)
        for i, n in enumerate(q_lengths):
            by_length[n].append(i)
        for n, members in sorted(by_length.items()):  # one batched tokenizer call per question length
            room = max_length - n - specials
            if room < 1:
                raise ValueError(f"--max-text-tokens {max_length} leaves no room for the context after a "
                                 f"question of {n} tokens")
            enc = tokenizer([questions[i] for i in members], [rows[i]["context"] for i in members],
                            truncation="only_second", max_length=max_length, stride=room - min(doc_stride, room),
                            return_overflowing_tokens=True, return_offsets_mapping=True)
            for w, ids in enumerate(enc["input_ids"]):
                self._add_window(members[enc["overflow_to_sample_mapping"][w]], ids, enc.sequence_ids(w),
                                 enc["offset_mapping"][w])
        order = np.argsort(self.example, kind="stable")  # windows in question order
        for name in ("ids", "labels", "example", "offsets", "context_start"):
            setattr(self, name, [getattr(self, name)[i] for i in order])
        self.labels = [np.array([s, e, w], np.int32) for w, (s, e, _) in enumerate(self.labels)]
        self.lengths = np.array([len(i) for i in self.ids], dtype=np.int64)
        self.label_lengths = np.full(len(self.ids), 3)  # labels padded with -100 to one width per bucket
        self.pad_value = tokenizer.pad_token_id

    @staticmethod
    def _cut(question: str, tokenizer) -> str:
        """The question, cut after its first MAX_QUESTION_TOKENS tokens."""
        offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return question if len(offsets) <= MAX_QUESTION_TOKENS else question[:offsets[MAX_QUESTION_TOKENS - 1][1]]

    def _add_window(self, example: int, ids, sequence_ids, offsets) -> None:
        where = [i for i, s in enumerate(sequence_ids) if s == 1]
        first, last = where[0], where[-1]
        answer = self.rows[example]["answers"]
        char_start = answer["answer_start"][0]
        char_end = char_start + len(answer["text"][0])
        start = end = 0  # <s>: the answer is not in this window
        if offsets[first][0] <= char_start and offsets[last][1] >= char_end:
            start = max(i for i in where if offsets[i][0] <= char_start)
            end = min(i for i in where if offsets[i][1] >= char_end)
        self.ids.append(np.array(ids, np.int32))
        self.labels.append((start, end, 0))
        self.example.append(example)
        self.offsets.append(np.array([offsets[i] for i in where], np.int64))
        self.context_start.append(first)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int, rng: np.random.Generator | None = None) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


# ----------------------------------------------------------------------------- scoring
def best_span(start_logits: np.ndarray, end_logits: np.ndarray, max_tokens: int = MAX_ANSWER_TOKENS):
    """(score, start, end) maximising start + end logits over start <= end < start + max_tokens."""
    n = len(start_logits)
    scores = start_logits[:, None] + end_logits[None, :]
    offset = np.arange(n)[None, :] - np.arange(n)[:, None]
    scores = np.where((offset >= 0) & (offset < max_tokens), scores, -np.inf)
    s, e = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return float(scores[s, e]), int(s), int(e)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_and_f1(prediction: str, answers: list[str]) -> tuple[float, float]:
    """SQuAD exact match and token F1 of one prediction, each the best over the gold answers."""
    def f1(gold: str) -> float:
        p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
        common_tokens = sum((collections.Counter(p) & collections.Counter(g)).values())
        if not p or not g:
            return float(p == g)
        if common_tokens == 0:
            return 0.0
        precision, recall = common_tokens / len(p), common_tokens / len(g)
        return 2 * precision * recall / (precision + recall)
    exact = max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)
    return exact, max(f1(a) for a in answers)


def predictions(dataset: QADataset, outputs: list[dict]) -> dict[int, str]:
    """Question index -> predicted answer text: the best span over the question's windows."""
    best: dict[int, tuple[float, str]] = {}
    for o in outputs:
        starts, ends, labels, real = (np.asarray(o[k]) for k in ("start_logits", "end_logits", "labels",
                                                                 "example_mask"))
        for row in np.flatnonzero(real):
            w = int(labels[row, 2])
            c0, offsets = dataset.context_start[w], dataset.offsets[w]
            score, s, e = best_span(starts[row, c0:c0 + len(offsets)], ends[row, c0:c0 + len(offsets)])
            q = dataset.example[w]
            if q not in best or score > best[q][0]:
                best[q] = (score, dataset.rows[q]["context"][offsets[s][0]:offsets[e][1]])
    return {q: text for q, (_, text) in best.items()}


# ----------------------------------------------------------------------------- the task
def make_question_answering(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    arch = "Data2VecTextForQuestionAnswering"
    train, evaluation = qa_sources(cfg)
    tokenizer = common.tokenizer_for(cfg, [t for r in train.rows for t in (r["question"], r["context"])])
    kw = dict(max_length=cfg.max_text_tokens, doc_stride=cfg.doc_stride)
    train_ds, eval_ds = QADataset(train.rows, tokenizer, **kw), QADataset(evaluation.rows, tokenizer, **kw)
    train_data, eval_data = common.text_iterators(cfg, train_ds, eval_ds, shard_index, num_shards)
    model = models.build(cfg, arch, {**common.tokenizer_changes(cfg, tokenizer),
                                     "id2label": {0: "LABEL_0", 1: "LABEL_1"}},  # start, end
                         tokenizer_size=len(tokenizer))
    apply = common.forward(model.module, "input_ids")

    def scored(params, batch, rng, train):
        """Start/end logits and the (sum, count) of their cross-entropies over real rows."""
        out = apply(params, batch, rng, train)
        ignored = out.start_logits.shape[-1]  # padding rows: positions past the end are ignored
        real = batch["example_mask"] > 0
        (s_sum, s_count), (e_sum, e_count) = losses.span_loss_sums(
            out.start_logits, out.end_logits, jnp.where(real, batch["labels"][:, 0], ignored),
            jnp.where(real, batch["labels"][:, 1], ignored))
        return out, s_sum + e_sum, s_count + e_count

    def loss(params, extra, batch, rng, train):
        _, total, count = scored(params, batch, rng, train)
        return total, count, {}

    def eval_step(params, extra, batch):
        out, total, count = scored(params, batch, None, False)
        return {"loss_sum": total, "count": count, "start_logits": out.start_logits, "end_logits": out.end_logits,
                "labels": batch["labels"], "example_mask": batch["example_mask"]}

    def eval_metrics(outputs):
        predicted = predictions(eval_ds, outputs)
        scores = [exact_and_f1(predicted.get(q, ""), r["answers"]["text"]) for q, r in enumerate(eval_ds.rows)]
        metrics = common.mean_eval_loss(outputs)
        metrics["eval_exact_match"] = float(np.mean([s[0] for s in scores]))
        metrics["eval_f1"] = float(np.mean([s[1] for s in scores]))
        first = eval_ds.rows[0]
        metrics["eval_example"] = f"{first['question']!r} -> {predicted.get(0, '')!r} ({first['answers']['text'][0]!r})"
        return metrics

    return common.fine_tuning_task(cfg, arch, model, (train, evaluation), (train_data, eval_data), (loss, eval_step),
                                   eval_metrics, lr=1e-4, best=("eval_f1", "max"),
                                   save_assets=tokenizer.save_pretrained,
                                   data_detail=f"; {len(train_ds)} / {len(eval_ds)} windows")

