"""Training data from Hugging Face `datasets` (hf:NAME[:CONFIG][@SPLIT]): folders of data files,
save_to_disk folders, hub names (offline error), columns, splits, audio decoding and sentence pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import soundfile as sf
from datasets import Audio, ClassLabel, Dataset, DatasetDict, Features, Value

from flax_data2vec.train import data as D
from flax_data2vec.train import sources as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECH = os.path.join(ROOT, "data", "speech_digits")
TEXT = os.path.join(ROOT, "data", "text")


def _manifest(split, n):
    return D.read_manifest(os.path.join(SPEECH, f"{split}.jsonl"))[:n]


def _audio_dataset(rows, names):
    """A dataset laid out like the hub's audio sets: Audio bytes embedded, a ClassLabel, a transcript."""
    plain = Features({"audio": {"bytes": Value("binary"), "path": Value("string")}, "sentence": Value("string"),
                      "intent": ClassLabel(names=names)})
    data = {"audio": [{"bytes": open(r["path"], "rb").read(), "path": os.path.basename(r["path"])} for r in rows],
            "sentence": [r["text"] for r in rows], "intent": [names.index(r["label"]) for r in rows]}
    # cast, not encode: encoding Audio values would need torchcodec
    return Dataset.from_dict(data, features=plain).cast_column("audio", Audio())


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def audio_sets(tmp_path_factory):
    """(parquet folder with train/validation files, save_to_disk folder, the manifest rows, class names)."""
    root = tmp_path_factory.mktemp("hf")
    train, evaluation = _manifest("train", 24), _manifest("eval", 8)
    names = sorted({r["label"] for r in train + evaluation}, reverse=True)  # not sorted order: kept as declared
    folder = root / "digits"
    (folder / "data").mkdir(parents=True)
    _audio_dataset(train, names).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    _audio_dataset(evaluation, names).to_parquet(str(folder / "data" / "validation-00000-of-00001.parquet"))
    DatasetDict({"train": _audio_dataset(train, names),
                 "validation": _audio_dataset(evaluation, names)}).save_to_disk(str(root / "on_disk"))
    return str(folder), str(root / "on_disk"), train, evaluation, names


def test_spec_parsing():
    spec = S.HFSpec.parse("hf:openslr/librispeech_asr:clean@train.100[:10%]")
    assert (spec.name, spec.config, spec.split) == ("openslr/librispeech_asr", "clean", "train.100[:10%]")
    assert str(spec) == "hf:openslr/librispeech_asr:clean@train.100[:10%]"
    assert S.HFSpec.parse("hf:imdb") == S.HFSpec("imdb")
    assert not S.is_hf("data/train.jsonl")
    with pytest.raises(ValueError, match="expected hf:NAME"):
        S.HFSpec.parse("hf:@train")


@pytest.mark.parametrize("which", [0, 1], ids=["data-files", "save_to_disk"])
def test_audio_rows_match_the_manifest(audio_sets, which):
    """Same examples, labels (in the dataset's class order), lengths and bitwise-equal decoded audio."""
    spec, train_rows, eval_rows, names = audio_sets[which], audio_sets[2], audio_sets[3], audio_sets[4]
    train, evaluation = S.train_eval_sources("hf:" + spec, "", "audio", need_text=True, need_label=True)
    assert train.name.endswith("@train") and evaluation.name.endswith("@validation")  # eval split found
    assert [r["text"] for r in train.rows] == [r["text"] for r in train_rows]
    assert [r["label"] for r in evaluation.rows] == [r["label"] for r in eval_rows]
    labels = S.label_map(train)
    assert labels.names == names  # ids follow the ClassLabel, so id2label matches the dataset's ids
    ours = D.AudioDataset(train.rows, label_map=labels)
    ref = D.AudioDataset(train_rows, label_map=labels)
    np.testing.assert_array_equal(ours.lengths, ref.lengths)
    for i in (0, 5, 23):
        a, b = ours.load(i), ref.load(i)
        np.testing.assert_array_equal(a["input_values"], b["input_values"])
        assert a["labels"] == b["labels"]


def test_split_slices_and_errors(audio_sets):
    folder, on_disk = audio_sets[0], audio_sets[1]
    sliced = S.read_source(f"hf:{on_disk}@train[:25%]+validation[-2:]", "audio", need_text=False)
    assert len(sliced.rows) == 6 + 2
    assert len(S.read_source(f"hf:{folder}@train[:5]", "audio").rows) == 5
    with pytest.raises(ValueError, match=r"Unknown split \"test\".*train.*validation"):
        S.read_source(f"hf:{folder}@test", "audio")
    with pytest.raises(ValueError, match=r"bad split .test. \(Unknown split \"test\".*\); splits: train, validation"):
        S.read_source(f"hf:{on_disk}@test", "audio")
    with pytest.raises(ValueError, match="text column transcript not in the dataset; columns: audio, sentence, intent"):
        S.read_source(f"hf:{folder}", "audio", columns=S.Columns(text="transcript"))
    with pytest.raises(ValueError, match="cannot load hf:/nowhere/at/all@train"):
        S.read_source("hf:/nowhere/at/all", "audio")
    only_train = os.path.join(os.path.dirname(on_disk), "only_train")
    datasets.load_from_disk(on_disk)["train"].save_to_disk(only_train)
    with pytest.raises(ValueError, match="no split among validation, valid, dev, test \\(has train\\)"):
        S.train_eval_sources(f"hf:{folder}", f"hf:{only_train}", "audio")


def test_path_column_resampling_and_missing_files(tmp_path):
    """A string column of file paths; an 8 kHz file is resampled like load_audio; missing files all named."""
    rows = _manifest("train", 3)
    x, sr = sf.read(rows[0]["path"], dtype="float32")
    slow = str(tmp_path / "slow.wav")
    sf.write(slow, x[::2], 8000)
    paths = [slow, rows[1]["path"], rows[2]["path"]]
    ds = Dataset.from_dict({"file": paths, "text": ["a", "b", "c"]})
    ds.save_to_disk(str(tmp_path / "paths"))
    src = S.read_source(f"hf:{tmp_path / 'paths'}", "audio")
    audio = D.AudioDataset(src.rows, normalize=False)
    assert audio.lengths[0] == D.audio_length(slow)
    np.testing.assert_array_equal(audio.load(0)["input_values"], D.load_audio(slow))
    Dataset.from_dict({"file": paths + ["/gone/one.wav", "/gone/two.flac"], "text": list("abcde")}).save_to_disk(
        str(tmp_path / "broken"))
    with pytest.raises(ValueError, match=r"2 of 5 audio rows cannot be read: /gone/one.wav .*/gone/two.flac"):
        S.read_source(f"hf:{tmp_path / 'broken'}", "audio")
    Dataset.from_dict({"file": [1.0, 2.0], "text": ["a", "b"]}).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(ValueError, match="audio column 'file' has type"):
        S.read_source(f"hf:{tmp_path / 'numbers'}", "audio", columns=S.Columns(audio="file"))


def test_unlabelled_split_is_refused(tmp_path):
    feats = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    Dataset.from_dict({"text": ["x", "y"], "label": [-1, -1]}, features=feats).save_to_disk(str(tmp_path / "t"))
    with pytest.raises(ValueError, match="no label in column 'label'"):
        S.read_source(f"hf:{tmp_path / 't'}", "text", need_label=True)


def test_text_pairs_and_unlabelled_text(tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(TEXT, "classify_eval.jsonl"))][:6]
    feats = Features({"premise": Value("string"), "hypothesis": Value("string"),
                      "label": ClassLabel(names=["entailment", "neutral", "contradiction"])})
    pairs = Dataset.from_dict({"premise": [r["text"] for r in rows], "hypothesis": [r["text"][::-1] for r in rows],
                               "label": [i % 3 for i in range(6)]}, features=feats)
    pairs.save_to_disk(str(tmp_path / "nli"))
    src = S.read_source(f"hf:{tmp_path / 'nli'}", "text", columns=S.Columns(text="premise,hypothesis"),
                        need_label=True)
    assert src.rows[1] == {"label": "neutral", "text": rows[1]["text"], "text_pair": rows[1]["text"][::-1]}
    tok = D.build_small_bpe_tokenizer(os.path.join(TEXT, "corpus.txt"), vocab_size=400)
    ds = D.TextDataset(src.rows, tok, max_length=24, label_map=S.label_map(src))
    expected = tok(rows[1]["text"], rows[1]["text"][::-1], truncation="longest_first", max_length=24)["input_ids"]
    np.testing.assert_array_equal(ds.load(1)["input_ids"], expected)
    ids = list(ds.load(1)["input_ids"])
    assert len(ids) == 24 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert [ids[i:i + 2] for i in range(len(ids) - 1)].count([tok.sep_token_id, tok.sep_token_id]) == 1
    assert ds.load(1)["labels"] == 1
    with pytest.raises(ValueError, match="one column or a pair a,b"):
        S.read_source(f"hf:{tmp_path / 'nli'}", "text", columns=S.Columns(text="premise,hypothesis,label"))
    # unlabelled text (MLM, pre-training): blank lines dropped; with no eval split, every 20th row held out
    lines = [f"line {i}" if i % 4 else "" for i in range(100)]
    (tmp_path / "wiki").mkdir()
    Dataset.from_dict({"text": lines}).to_parquet(str(tmp_path / "wiki" / "train.parquet"))
    train, held = S.train_eval_sources(f"hf:{tmp_path / 'wiki'}", "", "text")
    assert len(train.rows) + len(held.rows) == 75 and len(held.rows) == 4 and "held out" in held.name


def test_hub_name_offline_and_missing_package(tmp_path):
    """A hub name goes through datasets.load_dataset; unreachable offline, the error names the dataset."""
    code = ("from flax_data2vec.train import sources as S\n"
            "try:\n    S.read_source('hf:someone/not_cached:clean', 'audio')\n"
            "except ValueError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ERR cannot load hf:someone/not_cached:clean@train:"), out
    code = ("import sys; sys.modules['datasets'] = None\nfrom flax_data2vec.train import sources as S\n"
            "try:\n    S.read_source('hf:x', 'text')\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "pip install datasets" in out, out


def test_train_tpu_reads_hf_data(audio_sets, tmp_path, fast_compile):
    """train_tpu.py end to end on an hf: folder: the validation split is found, class names reach the model (2 steps:
    compile-bound)."""
    from flax_data2vec import load
    from flax_data2vec.train.config import parse_args
    from flax_data2vec.train.loop import train

    out = tmp_path / "run"
    cfg = parse_args(["--task", "audio-classification", "--train-data", "hf:" + audio_sets[0], "--max-steps", "2",
                      "--eval-every", "2", "--save-every", "2", "--batch-size", "4", "--n-buckets", "1",
                      "--progress", "false", "--async-checkpointing", "false", "--output-dir", str(out)])
    train(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["eval_count"] for r in rows if "eval_count" in r] == [8.0]
    module, _ = load(str(out))
    assert [name for _, name in module.config.id2label] == audio_sets[4]


def test_audio_lengths_are_cached_by_fingerprint(audio_sets, tmp_path, monkeypatch):
    """A second read of the same split takes the lengths from the cache (no header read); another split or
    slice has another fingerprint and is read afresh."""
    spec = "hf:" + audio_sets[1]
    first = S.read_source(spec, "audio")
    assert len(os.listdir(tmp_path / "cache" / "lengths")) == 1

    def no_reads(*a, **k):
        raise AssertionError("header read despite the cache")

    monkeypatch.setattr(S.sf, "info", no_reads)
    again = S.read_source(spec, "audio")
    assert [r["frames"] for r in again.rows] == [r["frames"] for r in first.rows]
    with pytest.raises(AssertionError, match="header read"):
        S.read_source(spec + "@train[:3]", "audio")


def _ner_dataset(path):
    """A small IOB-tagged set: capitalised words not starting a line are PER (B-/I- by run)."""
    lines = [ln.split() for ln in open(os.path.join(TEXT, "corpus.txt"), encoding="utf-8").read().splitlines()[:60]]
    names = ["O", "B-PER", "I-PER"]
    tokens, tags = [], []
    for words in lines:
        words = words[:20]
        t, prev = [], "O"
        for i, w in enumerate(words):
            cap = i > 0 and w[:1].isupper()
            t.append(0 if not cap else (2 if prev != "O" else 1))
            prev = "O" if not cap else "PER"
        tokens.append(words)
        tags.append(t)
    feats = Features({"tokens": datasets.List(Value("string")), "ner_tags": datasets.List(ClassLabel(names=names))})
    ds = Dataset.from_dict({"tokens": tokens, "ner_tags": tags}, features=feats)
    DatasetDict({"train": ds.select(range(48)), "validation": ds.select(range(48, 60))}).save_to_disk(str(path))
    return names


def test_token_tags_from_hf_and_subword_alignment(tmp_path):
    names = _ner_dataset(tmp_path / "ner")
    train, evaluation = S.train_eval_sources(f"hf:{tmp_path / 'ner'}", "", "text", tagged=True)
    assert train.label_names == names and len(evaluation.rows) == 12
    row = train.rows[0]
    assert len(row["tokens"]) == len(row["tags"]) and set(row["tags"]) <= set(names)
    tok = D.build_small_bpe_tokenizer(os.path.join(TEXT, "corpus.txt"), vocab_size=400)
    labels = S.label_map(train)
    ds = D.TaggedTextDataset(train.rows, tok, labels, max_length=512)
    ex = ds.load(0)
    ids, tags = list(ex["input_ids"]), list(ex["labels"])
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tags[0] == tags[-1] == -100
    # each word: its sub-tokens, the first carrying the word's tag
    pos = 1
    for word, tag in zip(row["tokens"], row["tags"]):
        pieces = tok(" " + word, add_special_tokens=False)["input_ids"]
        assert ids[pos:pos + len(pieces)] == pieces
        assert tags[pos:pos + len(pieces)] == [labels.index[tag]] + [-100] * (len(pieces) - 1)
        pos += len(pieces)
    assert pos == len(ids) - 1
    short = D.TaggedTextDataset(train.rows[:1], tok, labels, max_length=8).load(0)
    assert len(short["input_ids"]) == 8 and short["input_ids"][-1] == tok.sep_token_id
    with pytest.raises(ValueError, match="token classification needs JSONL rows with 'tokens' and 'tags'"):
        S.read_source(os.path.join(TEXT, "corpus.txt"), "text", tagged=True)


def test_train_tpu_token_classification_on_iob_tags(tmp_path, fast_compile):
    """--task token-classification on an hf: IOB set: entity F1 (seqeval) is the tracked metric (2 steps:
    compile-bound)."""
    from flax_data2vec import load
    from flax_data2vec.train.config import parse_args
    from flax_data2vec.train.loop import train

    names = _ner_dataset(tmp_path / "ner")
    out = tmp_path / "run"
    cfg = parse_args(["--task", "token-classification", "--train-data", f"hf:{tmp_path / 'ner'}", "--max-steps", "2",
                      "--eval-every", "2", "--save-every", "2", "--batch-size", "8", "--n-buckets", "1",
                      "--max-text-tokens", "48", "--progress", "false", "--async-checkpointing", "false",
                      "--output-dir", str(out)])
    summary = train(cfg)
    assert 0.0 <= summary["eval_f1"] <= 1.0 and 0.0 <= summary["eval_accuracy"] <= 1.0
    module, _ = load(str(out))
    assert [name for _, name in module.config.id2label] == names
