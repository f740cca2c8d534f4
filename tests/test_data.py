"""Tests for the shipped datasets and the host-side data pipeline (flax_data2vec.train.data)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from flax_data2vec.train import data as D
from flax_data2vec.train.input_pipeline import BatchIterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECH = os.path.join(ROOT, "data", "speech_digits")
TEXT = os.path.join(ROOT, "data", "text")


@pytest.fixture(scope="module")
def train_rows():
    return D.read_manifest(os.path.join(SPEECH, "train.jsonl"))


@pytest.fixture(scope="module")
def vocab(train_rows):
    return D.CharVocab.from_texts(r["text"] for r in train_rows)


@pytest.fixture(scope="module")
def ctc_data(train_rows, vocab):
    return D.AudioDataset(train_rows[:96], vocab=vocab)


@pytest.fixture(scope="module")
def tokenizer():
    return D.build_small_bpe_tokenizer(os.path.join(TEXT, "corpus.txt"), vocab_size=400)


@pytest.fixture(scope="module")
def text_data(tokenizer):
    rows = D.load_text_lines(os.path.join(TEXT, "classify_eval.jsonl"))
    labels = D.LabelMap.from_labels(r["label"] for r in rows)
    return D.TextDataset(rows, tokenizer, max_length=64, label_map=labels)


def _write_wav(path, x, sr=16000):
    sf.write(path, x, sr)
    return path


# ----------------------------------------------------------------------------- shipped datasets

def test_shipped_speech_dataset(train_rows):
    ev = D.read_manifest(os.path.join(SPEECH, "eval.jsonl"))
    assert (len(train_rows), len(ev)) == (600, 100)
    size = sum(os.path.getsize(r["path"]) for r in train_rows + ev)
    assert size <= 6 * 2**20
    for r in train_rows[::50] + ev[::25]:
        info = sf.info(r["path"])
        assert info.samplerate == 16000 and info.channels == 1 and 0.5 <= info.duration <= 3.0
    for r in train_rows + ev:
        assert set(r["text"]) <= set("abcdefghijklmnopqrstuvwxyz '") and r["label"] == r["text"].split()[0]
    assert len({r["label"] for r in train_rows}) == 30


def test_shipped_text_corpus():
    lines = D.load_text_lines(os.path.join(TEXT, "corpus.txt"))
    assert len(lines) > 100 and os.path.getsize(os.path.join(TEXT, "corpus.txt")) < 400_000
    train = D.load_text_lines(os.path.join(TEXT, "classify_train.jsonl"))
    assert len({r["label"] for r in train}) == 6 and all(r["text"] for r in train)


# ----------------------------------------------------------------------------- manifests

def test_read_manifest_tsv_and_fairseq(tmp_path):
    _write_wav(tmp_path / "a.wav", np.zeros(800, np.float32))
    (tmp_path / "m.tsv").write_text("path\ttext\na.wav\thi there\n")
    rows = D.read_manifest(str(tmp_path / "m.tsv"))
    assert rows == [{"path": str(tmp_path / "a.wav"), "text": "hi there"}]
    (tmp_path / "m.json").write_text('[{"path": "a.wav", "label": "x"}]')
    assert D.read_manifest(str(tmp_path / "m.json"))[0]["label"] == "x"
    sub = tmp_path / "fs"
    sub.mkdir()
    (sub / "train.tsv").write_text(f"{tmp_path}\na.wav\t800\n")
    (sub / "train.wrd").write_text("hello world\n")
    rows = D.read_manifest(str(sub / "train.tsv"))
    assert rows == [{"path": str(tmp_path / "a.wav"), "frames": 800, "text": "hello world"}]


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        D.read_manifest(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no entries"):
        D.read_manifest(str(tmp_path / "empty.jsonl"))
    (tmp_path / "nopath.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="entry 1 has no 'path' field"):
        D.read_manifest(str(tmp_path / "nopath.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"path": "a.wav"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        D.read_manifest(str(tmp_path / "bad.jsonl"))
    (tmp_path / "m.csv").write_text("path\n")
    with pytest.raises(ValueError, match="unknown format"):
        D.read_manifest(str(tmp_path / "m.csv"))
    _write_wav(tmp_path / "ok.wav", np.zeros(10, np.float32))
    rows = [{"path": "ok.wav"}] + [{"path": f"gone{i}.wav"} for i in range(7)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FileNotFoundError, match=r"7 of 8 audio files are missing: .*gone0.wav.*\(7 in all\)"):
        D.read_manifest(str(tmp_path / "m.jsonl"))
    assert len(D.read_manifest(str(tmp_path / "m.jsonl"), check_files=False)) == 8


# ----------------------------------------------------------------------------- audio

def test_load_audio_mixdown_resample_and_errors(tmp_path):
    t = np.arange(8000) / 8000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = _write_wav(str(tmp_path / "s.wav"), np.stack([tone, 0 * tone], 1), sr=8000)
    x = D.load_audio(path, 16000)
    assert x.dtype == np.float32 and len(x) == 16000 == D.audio_length(path, 16000)
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 s at 16 kHz: bin = Hz
    assert np.abs(x[2000:-2000]).max() == pytest.approx(0.25, abs=0.01)  # mono = mean of channels
    (tmp_path / "junk.flac").write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="cannot read audio file .*junk.flac"):
        D.load_audio(str(tmp_path / "junk.flac"))
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        D.load_audio(str(tmp_path / "missing.wav"))


def test_normalize_matches_transformers(train_rows):
    from transformers import Wav2Vec2FeatureExtractor
    fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    waves = [D.load_audio(r["path"]) for r in train_rows[:3]]
    ref = fe(waves, sampling_rate=16000, padding=True, return_tensors="np")
    for k, w in enumerate(waves):
        np.testing.assert_allclose(D.normalize_audio(w), ref["input_values"][k, :len(w)], atol=1e-6)
    longest = max(len(w) for w in waves)
    assert len({len(w) for w in waves}) == 3  # the padded comparison below really pads
    for k, w in enumerate(waves):  # normalising a zero-padded row over its valid length: same result
        padded = D.normalize_audio(np.pad(w, (0, longest - len(w))), len(w))
        np.testing.assert_allclose(padded, ref["input_values"][k], atol=1e-6)


# ----------------------------------------------------------------------------- vocabularies and labels

def test_char_vocab(tmp_path, train_rows, vocab):
    from transformers import Wav2Vec2CTCTokenizer
    assert vocab.tokens[:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"] and "'" in vocab.tokens
    text = "don't stop three"
    ids = vocab.encode(text)
    assert vocab.decode(ids, collapse=False) == text
    assert vocab.decode([ids[0], ids[0], 0, ids[0], vocab.delimiter_id, vocab.delimiter_id, ids[1]]) == "dd o"
    tok = Wav2Vec2CTCTokenizer(vocab.save(str(tmp_path)))
    for r in train_rows[:20]:
        assert tok(r["text"]).input_ids == vocab.encode(r["text"])
    assert D.CharVocab.load(str(tmp_path)).tokens == vocab.tokens
    with pytest.raises(ValueError, match=r"2 characters are not in the vocabulary: 'QZ'; e.g. in 'a Q'"):
        vocab.check_texts(["ok", "a Q", "Z"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vocab.json").write_text('{"a": 0, "b": 1}')
    with pytest.raises(ValueError, match="not a CharVocab vocabulary"):
        D.CharVocab.load(str(tmp_path / "bad"))


def test_label_map():
    lm = D.LabelMap.from_labels(["b", "a", "c", "a"])
    assert lm.names == ["a", "b", "c"] and lm.encode(["c", "a"]) == [2, 0] and lm.id2label[1] == "b"
    with pytest.raises(ValueError, match="2 unknown labels: x, y"):
        lm.encode(["a", "x", "y"])
    with pytest.raises(ValueError, match="3 labels but the model has num_labels=2; labels past it: c"):
        lm.check(2)
    lm.check(3)
    assert D.LabelMap.from_labels([10, 2, 1, 2]).names == ["1", "2", "10"]


# ----------------------------------------------------------------------------- text

def test_load_text_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one line\n\n two \n")
    assert D.load_text_lines(str(tmp_path / "a.txt")) == [{"text": "one line"}, {"text": "two"}]
    (tmp_path / "a.csv").write_text('text,label,extra\n"hi, there",pos,1\n')
    assert D.load_text_lines(str(tmp_path / "a.csv")) == [{"text": "hi, there", "label": "pos"}]
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 1, "id": 5}\n')
    assert D.load_text_lines(str(tmp_path / "a.jsonl")) == [{"text": "x", "label": 1}]
    (tmp_path / "b.csv").write_text("sentence,label\nx,y\n")
    with pytest.raises(ValueError, match="needs a 'text' column"):
        D.load_text_lines(str(tmp_path / "b.csv"))
    (tmp_path / "b.jsonl").write_text('{"label": 1}\n')
    with pytest.raises(ValueError, match=r"line 1 has no 'text' \(or 'tokens'\) key"):
        D.load_text_lines(str(tmp_path / "b.jsonl"))
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(ValueError, match="has no examples"):
        D.load_text_lines(str(tmp_path / "e.txt"))


def test_small_bpe_tokenizer(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id, tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
    enc = tokenizer(["Mr. Darcy smiled.", "Emma"], padding=True)
    assert enc["input_ids"][0][0] == 0 and enc["input_ids"][0][-1] == 2 and enc["input_ids"][1][-1] == 1
    assert tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True) == "Mr. Darcy smiled."
    assert len(tokenizer) == 400
    rows = [{"text": "It is a truth universally acknowledged, that a single man in possession of a good "
                     "fortune, must be in want of a wife."}]
    pieces = D.TextDataset(rows, tokenizer, max_length=8, split_long=True)
    whole = tokenizer(rows[0]["text"])["input_ids"]
    assert len(pieces) > 1 and max(pieces.lengths) == 8 and all(p[0] == 0 and p[-1] == 2 for p in pieces.ids)
    assert [i for p in pieces.ids for i in p[1:-1]] == whole[1:-1]
    assert D.TextDataset(rows, tokenizer, max_length=8).lengths.tolist() == [8]
    with pytest.raises(ValueError, match="split_long is for unlabelled text"):
        D.TextDataset(rows, tokenizer, split_long=True, label_map=D.LabelMap(["a"]))


# ----------------------------------------------------------------------------- datasets

def test_audio_classification_and_crop(train_rows):
    lm = D.LabelMap.from_labels(r["label"] for r in train_rows)
    ds = D.AudioDataset(train_rows[:20], label_map=lm, max_samples=8000, crop=True)
    batch = next(BatchIterator(ds, 4, buckets=[8000]))
    assert batch["input_values"].shape == (4, 8000) and batch["labels"].shape == (4,)
    dropped = D.AudioDataset(train_rows[:20], max_samples=12000)
    assert len(dropped) + dropped.dropped == 20 and "labels" not in dropped.load(0)
    with pytest.raises(ValueError, match=r"all 5 utterances dropped: 0 shorter .* 5 longer than max_samples=10"):
        D.AudioDataset(train_rows[:5], max_samples=10)
    with pytest.raises(ValueError, match="1 unknown labels: yes"):
        D.AudioDataset([r for r in train_rows if r["label"] == "yes"][:2], label_map=D.LabelMap(["no"]))


def test_min_samples_drops_and_reports(train_rows):
    rows = train_rows[:40]
    full = D.AudioDataset(rows)
    ds = D.AudioDataset(rows, min_samples=14000, max_samples=20000, crop=True)
    short = int((full.lengths < 14000).sum())
    assert 0 < short < 40 and ds.dropped == ds.dropped_short == short and len(ds) == 40 - short
    assert ds.lengths.min() >= 14000 and ds.lengths.max() == 20000 and len(ds.load(0)["input_values"]) <= 20000
    both = D.AudioDataset(rows, min_samples=14000, max_samples=20000)  # without crop, long ones go too
    assert both.dropped_short == short and both.dropped == short + int((full.lengths > 20000).sum())
    with pytest.raises(ValueError, match="all 40 utterances dropped: 40 shorter than min_samples=10000000"):
        D.AudioDataset(rows, min_samples=10_000_000)


def test_packed_text_blocks(tokenizer):
    """fairseq complete_doc blocks: <s> + whole lines of one document (each ending </s>), <= tokens_per_sample."""
    paragraphs = [r["text"] for r in D.load_text_lines(os.path.join(TEXT, "corpus.txt"))[:12]]
    sentences = [s.strip() + "." for p in paragraphs for s in p.split(". ") if s.strip()]
    docs = [sentences[:40], sentences[40:41], sentences[41:]]
    ds = D.PackedTextDataset([ln for d in docs for ln in d + [""]], tokenizer, tokens_per_sample=512)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in sentences]
    assert max(len(x) for x in ids) < 511  # so every block holds whole lines
    assert max(ds.lengths) <= 512 and all(b[0] == bos and b[-1] == eos for b in ds.ids)
    blocks, k = [], 0  # each block as the range of sentence numbers it holds
    for b in ds.ids:
        body, first = list(b[1:]), k
        while body:
            assert body[:len(ids[k])] == ids[k]  # whole lines, in order
            body, k = body[len(ids[k]):], k + 1
        blocks.append((first, k))
    assert k == len(sentences) and len(ds) < len(sentences) / 3  # every line, packed several to a block
    for (a, end), (nxt, _), length in zip(blocks, blocks[1:], ds.lengths):
        assert not a < 40 < end and not a < 41 < end  # no block crosses a document boundary
        assert nxt in (40, 41) or length + len(ids[nxt]) > 512  # a block ends early only at a document's end
    long_line = " ".join(paragraphs)  # one line longer than a block: cut into pieces that end in </s>
    cut = D.PackedTextDataset([long_line], tokenizer, tokens_per_sample=64)
    assert len(cut) > 2 and max(cut.lengths) <= 64 and all(b[-1] == eos for b in cut.ids)
    whole = tokenizer(long_line, add_special_tokens=False)["input_ids"]
    assert [t for b in cut.ids for t in b[1:-1]] == whole
    with pytest.raises(ValueError, match="no text to pack"):
        D.PackedTextDataset(["", "  "], tokenizer)


def test_truecasing_examples():
    """The shipped token-classification default: lower-cased words tagged by their original case."""
    rows = D.truecasing_rows(["Mr. DARCY said no to Elizabeth", "", "a 1811 I"])
    assert rows[0] == {"tokens": ["mr.", "darcy", "said", "no", "to", "elizabeth"],
                       "tags": ["Cap", "UPPER", "O", "O", "O", "Cap"]}
    assert rows[1] == {"tokens": ["a", "1811", "i"], "tags": ["O", "O", "Cap"]}


# ----------------------------------------------------------------------------- per-example checks (issue 15)

def test_wav_holding_nan_is_named_at_its_first_batch(tmp_path, vocab):
    """A NaN sample would make the step's loss NaN (skipped steps, nan eval_loss); the batch that holds it
    fails instead, naming the file and where in it, through the background loader as through a plain load."""
    good, bad = np.sin(np.arange(16000) / 9.0).astype(np.float32), np.zeros(16000, np.float32)
    bad[8000] = np.nan
    for name, x in (("good", good), ("bad", bad)):
        sf.write(tmp_path / f"{name}.wav", x, 16000, subtype="FLOAT")  # 32-bit float WAV: NaN survives
    rows = [{"path": str(tmp_path / f"{n}.wav"), "text": "on"} for n in ("good", "bad")]
    dataset = D.AudioDataset(rows, vocab=vocab)  # lengths come from headers: planning reads no samples
    it = BatchIterator(dataset, 2, n_buckets=1, shuffle=False)
    with pytest.raises(ValueError) as e:
        next(it)
    it.close()
    assert str(e.value) == (f"audio file {tmp_path / 'bad.wav'} holds 1 non-finite samples (NaN or inf), the first "
                            "at 0.500 s; repair the file or remove it from the data")


def test_empty_audio_file_is_named(tmp_path):
    _write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    with pytest.raises(ValueError, match=f"audio file {tmp_path / 'empty.wav'} is empty"):
        D.load_audio(str(tmp_path / "empty.wav"))


def test_unlabelled_rows_are_refused_not_made_a_class():
    with pytest.raises(ValueError, match=r"example 1 has no label \(and 1 more\)"):
        D.LabelMap.from_labels(["yes", None, "no", ""])


def test_hf_tag_ids_outside_the_classes_are_refused():
    """ClassLabel stores -1 for "no label"; names[-1] would silently train it as the last class."""
    datasets = pytest.importorskip("datasets")
    from flax_data2vec.train import sources
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER"]))})
    ds = datasets.Dataset.from_dict({"tokens": [["Anne", "Elliot"], ["x"]], "ner_tags": [[1, 0], [-1]]}, features)
    with pytest.raises(ValueError, match=r"hf:tiny row 1: tag id -1 in column 'ner_tags' is outside its 2 classes"):
        sources._hf_tagged_rows(ds, "hf:tiny", sources.Columns())
    split = sources._hf_tagged_rows(ds.select([0]), "hf:tiny", sources.Columns())
    assert split.rows[0]["tags"] == ["B-PER", "O"]
