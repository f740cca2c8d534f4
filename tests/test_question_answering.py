"""--task question-answering: the shipped title questions, doc_stride windows, span choice, SQuAD scoring. The real
run that learns (80 steps: exact match above 0.1) is notebook 04's, checked by tests/test_notebooks.py."""

import json
import os

import numpy as np
import pytest

from flax_data2vec.train import data as data_lib
from flax_data2vec.train import sources as sources_lib
from flax_data2vec.train.tasks import question_answering as qa

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "text", "corpus.txt")


@pytest.fixture(scope="module")
def tokenizer():
    with open(CORPUS, encoding="utf-8") as f:
        return data_lib.build_small_bpe_tokenizer(f.read().splitlines()[:200], vocab_size=400)


def test_title_questions_answer_the_first_name_after_each_title():
    rows = qa.title_questions(["Then Mr. Henry Dashwood met Mrs. Jennings, and Mr. Palmer. Sir John laughed."])
    assert [r["question"] for r in rows] == ["Which name follows the first Mr.?", "Which name follows the first Mrs.?",
                                             "Which name follows the first Sir?"]
    assert [r["answers"]["text"] for r in rows] == [["Henry Dashwood"], ["Jennings"], ["John"]]
    for r in rows:  # rows pass the reader's own check: the answer is the context at answer_start
        assert sources_lib.qa_row(r, "test") == r


def test_qa_reader_rejects_an_answer_not_in_the_context(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q?", "context": "abc def", "answers": {"text": ["xyz"],
                                                                                    "answer_start": [4]}}) + "\n")
    with pytest.raises(ValueError, match="not the context's text at answer_start 4"):
        sources_lib.read_source(str(path), "text", qa=True)


def context_row(n_words: int, answer_word: int) -> dict:
    words = [f"w{i}" for i in range(n_words)]
    words[answer_word] = "Target Name"
    context = " ".join(words)
    return {"question": "Which name?", "context": context,
            "answers": {"text": ["Target Name"], "answer_start": [context.index("Target Name")]}}


@pytest.mark.parametrize("doc_stride", [10, 1000])
def test_windows_cover_the_context_and_label_the_answer(tokenizer, doc_stride):
    row = context_row(80, 55)
    ds = qa.QADataset([row], tokenizer, max_length=48, doc_stride=doc_stride)
    n_context = len(tokenizer(row["context"], add_special_tokens=False)["input_ids"])
    room = 48 - len(tokenizer(row["question"], add_special_tokens=False)["input_ids"]) - 4
    step = min(doc_stride, room)
    assert len(ds) == 1 + -(-(n_context - room) // step) > 1
    all_offsets = tokenizer(row["context"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    found = 0
    for w in range(len(ds)):
        assert ds.lengths[w] <= 48
        offsets = ds.offsets[w]
        np.testing.assert_array_equal(offsets, all_offsets[w * step:w * step + room])  # windows `step` apart
        start, end, window = ds.load(w)["labels"]
        assert window == w
        if start == 0:  # <s>: the answer is not (wholly) in this window
            assert end == 0
            continue
        c0 = ds.context_start[w]
        assert row["context"][offsets[start - c0][0]:offsets[end - c0][1]] == "Target Name"
        found += 1
    assert found >= 1


def test_best_span_respects_order_and_length():
    # the best pair overall, start 2 / end 0, ends before it starts
    assert qa.best_span(np.array([0.0, 0.0, 5.0, 0.0]), np.array([4.0, 0.0, 0.0, 1.0])) == (6.0, 2, 3)
    start, end = np.array([0.0, 5.0, 0.0, -9.0]), np.array([0.0, 0.0, 1.0, 3.0])
    assert qa.best_span(start, end) == (8.0, 1, 3)
    assert qa.best_span(start, end, max_tokens=2) == (6.0, 1, 2)  # end < start + 2


def test_squad_scores():
    assert qa.exact_and_f1("The  Dashwood!", ["dashwood"]) == (1.0, 1.0)
    exact, f1 = qa.exact_and_f1("Henry Dashwood of Norland", ["Mr. Henry Dashwood", "Norland"])
    assert exact == 0.0 and f1 == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))


def test_predictions_take_the_best_window(tokenizer):
    row = context_row(80, 55)
    ds = qa.QADataset([row], tokenizer, max_length=48, doc_stride=10)
    t = max(ds.lengths)
    starts, ends = np.zeros((len(ds), t)), np.zeros((len(ds), t))
    labels = np.array([ds.load(w)["labels"] for w in range(len(ds))])
    for w, (s, e, _) in enumerate(labels):
        if s:  # the gold span scores 10 in answer windows; window 0 has a weaker wrong span
            starts[w, s], ends[w, e] = 5.0, 5.0
    starts[0, ds.context_start[0]], ends[0, ds.context_start[0]] = 4.0, 4.0
    out = {"start_logits": starts, "end_logits": ends, "labels": labels, "example_mask": np.ones(len(ds))}
    assert qa.predictions(ds, [out]) == {0: "Target Name"}
