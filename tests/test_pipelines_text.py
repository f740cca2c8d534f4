"""Text pipelines against transformers' own pipelines (and, for question answering, removed from transformers 5,
against the 4.x rule written here from the PyTorch model's logits), on tiny random checkpoints."""

import json
import warnings

import numpy as np
import pytest
import torch
import transformers
from pipeline_models import text_checkpoint

import flax_data2vec as fd

TEXTS = ["paris is the <mask> of france", "the quick <mask> fox jumps over the lazy dog",
         "john <mask> works at <mask> in new york"]
TAGS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
SENTENCES = ["emma woodhouse lives in paris, france", "john smith works at acme in new york",
             "it is a truth universally acknowledged"]


def rounded(x, digits=4):
    """Nested outputs with floats rounded, so that 1e-4 differences compare equal."""
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, digits) for v in x]
    if isinstance(x, (float, np.floating)):
        return round(float(x), digits)
    return x


def assert_same(ours, theirs, score_key="score"):
    """Equal outputs apart from scores, which must agree within 1e-4."""
    def split(x):
        if isinstance(x, dict):
            return {k: v for k, v in x.items() if k != score_key}, [x[score_key]] if score_key in x else []
        if isinstance(x, list):
            parts = [split(v) for v in x]
            return [p[0] for p in parts], [s for p in parts for s in p[1]]
        return x, []
    (a, sa), (b, sb) = split(ours), split(theirs)
    assert a == b
    np.testing.assert_allclose(np.array(sa, float), np.array(sb, float), atol=1e-4)


@pytest.fixture(scope="session")
def mlm_dir(tmp_path_factory):
    return text_checkpoint(str(tmp_path_factory.mktemp("mlm")), "Data2VecTextForMaskedLM")


def test_fill_mask_equals_transformers(mlm_dir):
    ours = fd.pipeline("fill-mask", mlm_dir, batch_size=4)
    ref = transformers.pipeline("fill-mask", model=mlm_dir)
    assert_same(ours(TEXTS, top_k=3), ref(TEXTS, top_k=3))
    assert_same(ours(TEXTS), ref(TEXTS))  # the default top_k (5), as transformers 5
    assert len(ours(TEXTS[0])) == 5
    targets = [t for t in sorted(ref.tokenizer.get_vocab()) if t.startswith("Ġ")][:3]
    assert_same(ours(TEXTS[0], targets=targets), ref(TEXTS[0], targets=targets))
    assert ours.stats.compiles <= 2
    with pytest.raises(ValueError, match="no mask token"):
        ours("no mask here")


@pytest.fixture(scope="session")
def cls_dir(tmp_path_factory):
    return text_checkpoint(str(tmp_path_factory.mktemp("cls")), "Data2VecTextForSequenceClassification",
                           num_labels=3, id2label={0: "austen", 1: "bronte", 2: "eliot"})


@pytest.fixture(scope="session")
def classifiers(cls_dir):
    return (fd.pipeline("text-classification", cls_dir, batch_size=4),
            transformers.pipeline("text-classification", model=cls_dir))


@pytest.mark.parametrize("options", [{}, {"top_k": None}, {"top_k": 2, "function_to_apply": "sigmoid"},
                                     {"function_to_apply": "none"}])
def test_text_classification_equals_transformers(classifiers, options):
    ours, ref = classifiers
    assert_same(ours(SENTENCES[0], **options), ref(SENTENCES[0], **options))
    assert_same(ours(SENTENCES, **options), ref(SENTENCES, **options))
    pair = {"text": SENTENCES[0], "text_pair": SENTENCES[1]}
    assert_same(ours(pair, **options), ref(pair, **options))


@pytest.fixture(scope="session")
def taggers(tmp_path_factory):
    d = text_checkpoint(str(tmp_path_factory.mktemp("tag")), "Data2VecTextForTokenClassification", id2label=TAGS)
    return fd.pipeline("token-classification", d, batch_size=4), transformers.pipeline("token-classification", model=d)


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_every_aggregation_strategy(taggers, strategy):
    ours, ref = taggers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = ours(SENTENCES, aggregation_strategy=strategy), ref(SENTENCES, aggregation_strategy=strategy)
    assert sum(map(len, a)) > 3
    assert_same(a, b)
    for text, entities in zip(SENTENCES, a):  # character offsets inside the text, in order
        spans = [(e["start"], e["end"]) for e in entities]
        assert all(0 <= s <= e <= len(text) for s, e in spans) and spans == sorted(spans)


def qa_reference(model, tokenizer, question, context, max_seq_len, doc_stride, max_answer_len=15,
                 handle_impossible_answer=False):
    """transformers 4.x QuestionAnsweringPipeline's rule, from the PyTorch model's logits."""
    enc = tokenizer(question, context, truncation="only_second", max_length=max_seq_len, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    best, null = None, 1.0
    for w in range(len(enc["input_ids"])):
        ids = torch.tensor([enc["input_ids"][w]])
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        in_context = np.array([s == 1 for s in enc.sequence_ids(w)])
        keep = in_context | (ids[0].numpy() == tokenizer.cls_token_id)

        def probs(logits, keep=keep):
            x = np.where(keep, logits[0].numpy(), -10000.0)
            e = np.exp(x - x.max())
            return e / e.sum()
        p_start, p_end = probs(out.start_logits), probs(out.end_logits)
        if handle_impossible_answer:
            null = min(null, p_start[0] * p_end[0])
            p_start[0] = p_end[0] = 0.0
        for s in np.flatnonzero(in_context):
            for e in np.flatnonzero(in_context):
                if s <= e < s + max_answer_len and (best is None or p_start[s] * p_end[e] > best[0]):
                    encoding = enc[w]
                    start = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=1)[0]
                    end = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=1)[1]
                    best = (p_start[s] * p_end[e], start, end)
    if handle_impossible_answer and null > best[0]:
        return {"score": null, "start": 0, "end": 0, "answer": ""}
    return {"score": best[0], "start": best[1], "end": best[2], "answer": context[best[1]:best[2]]}


@pytest.mark.parametrize("context_words", [12, 150])  # one window; many doc_stride windows
def test_question_answering_follows_the_4x_rule(tmp_path, context_words):
    d = text_checkpoint(str(tmp_path / "qa"), "Data2VecTextForQuestionAnswering", num_labels=2)
    model = transformers.Data2VecTextForQuestionAnswering.from_pretrained(d).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(d)
    words = " ".join(SENTENCES).split()
    context = " ".join((words * 20)[:context_words])
    qa = fd.pipeline("question-answering", d, batch_size=4)
    for question, impossible in (("where does emma live?", False), ("who works at acme?", True)):
        ours = qa(question=question, context=context, max_seq_len=48, doc_stride=16,
                  handle_impossible_answer=impossible)
        ref = qa_reference(model, tokenizer, question, context, 48, 16, handle_impossible_answer=impossible)
        assert (ours["start"], ours["end"], ours["answer"]) == (ref["start"], ref["end"], ref["answer"])
        assert abs(ours["score"] - ref["score"]) < 1e-4
    top = qa({"question": "where?", "context": context}, top_k=3, max_seq_len=48, doc_stride=16)
    assert len(top) == 3 and top[0]["score"] >= top[1]["score"] >= top[2]["score"]


def test_text_feature_extraction_and_embed(tmp_path):
    d = text_checkpoint(str(tmp_path / "base"), "Data2VecTextModel")
    ours = fd.pipeline("feature-extraction", d, batch_size=4)
    ref = transformers.pipeline("feature-extraction", model=d)
    for text in SENTENCES:
        np.testing.assert_allclose(np.array(ours(text)), np.array(ref(text)), atol=1e-4)
    pooled = fd.embed(SENTENCES, ours)
    means = [np.array(ref(t))[0].mean(0) for t in SENTENCES]
    np.testing.assert_allclose(pooled, np.stack(means), atol=1e-4)


def test_greedy_generation_gives_the_tokens_of_transformers_generate(tmp_path):
    d = text_checkpoint(str(tmp_path / "clm"), "Data2VecTextForCausalLM", is_decoder=True)
    model = transformers.Data2VecTextForCausalLM.from_pretrained(d).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(d)
    gen = fd.pipeline("text-generation", d, batch_size=4)
    prompts = ["paris is the", "the quick brown fox jumps over", "emma"]  # one left-padded batch
    ours = gen(prompts, max_new_tokens=10, return_tensors=True)
    for prompt, out in zip(prompts, ours):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        # RoBERTa positions start after the pad id; transformers' generate would count them from 0 otherwise
        positions = torch.arange(ids.shape[1])[None] + model.config.pad_token_id + 1
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), position_ids=positions, max_new_tokens=10,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out[0]["generated_token_ids"] == ref[0].tolist()
    sampled = gen(prompts[0], max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, temperature=0.8, seed=3)
    again = gen(prompts[0], max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, temperature=0.8, seed=3)
    assert sampled == again and sampled[0]["generated_text"].startswith(prompts[0])
    assert gen.stats.compiles == 2  # greedy and sampling: one decode loop each


def test_feature_extraction_and_embed_from_a_head_checkpoint(cls_dir):
    """A head checkpoint serves feature-extraction with its encoder, as transformers' pipeline loads it (AutoModel)."""
    ours = fd.pipeline("feature-extraction", cls_dir, batch_size=4)
    assert ours.model.architecture == "Data2VecTextModel"
    ref = transformers.pipeline("feature-extraction", model=cls_dir)
    hidden = [np.array(ref(t))[0] for t in SENTENCES]
    for text, h in zip(SENTENCES, hidden):
        np.testing.assert_allclose(np.array(ours(text))[0], h, atol=1e-4)
    np.testing.assert_allclose(fd.embed(SENTENCES, cls_dir), np.stack([h.mean(0) for h in hidden]), atol=1e-4)


def test_cli_parallel_flag(cls_dir, mlm_dir, capsys, monkeypatch, tmp_path):
    """`--parallel jit|pmap` on every pipeline command (documented in --help) reaches the pipeline; pmap gives
    jit's outputs."""
    from flax_data2vec import __main__ as cli
    from flax_data2vec.pipelines import base
    for command in ("transcribe", "classify", "embed", "fill-mask", "evaluate"):
        with pytest.raises(SystemExit):
            cli.parser().parse_args([command, "--help"])
        assert "--parallel {jit,pmap}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["classify", "x", "--model", cls_dir, "--parallel", "vmap"])
    assert "invalid choice: 'vmap'" in capsys.readouterr().err
    used, init = [], base.Forward.__init__

    def spy(self, fn, params, mesh, parallel="jit"):
        used.append(parallel)
        init(self, fn, params, mesh, parallel)
    monkeypatch.setattr(base.Forward, "__init__", spy)
    runs = {}
    for parallel in ("jit", "pmap"):
        assert cli.main(["classify", *SENTENCES, "--model", cls_dir, "--parallel", parallel, "--progress",
                         "false", "--top-k", "3"]) == 0
        runs[parallel] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert used == ["jit", "pmap"]
    assert_same(runs["pmap"], runs["jit"])
    assert cli.main(["fill-mask", TEXTS[0], "--model", mlm_dir, "--parallel", "pmap", "--progress", "false"]) == 0
    assert cli.main(["embed", *SENTENCES, "--model", cls_dir, "--parallel", "pmap", "--progress", "false",
                     "--output", str(tmp_path / "e.npy")]) == 0
    assert used[2:] == ["pmap", "pmap"] and np.load(tmp_path / "e.npy").shape == (3, 32)
