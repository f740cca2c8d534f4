"""Exports round-trip through transformers: a trainer's final model, converted by convert/orbax_to_pytorch.py,
runs in `transformers.pipeline(task, model=DIR)` with flax_data2vec's predictions, for five task types; an export
whose tokenizer is missing fails with one line instead of loading an empty tokenizer."""

import importlib.util
import json
import os
import stat

import numpy as np
import pytest
import soundfile as sf
import transformers

import flax_data2vec as fd
from flax_data2vec import processors
from flax_data2vec.train.config import TrainConfig
from flax_data2vec.train.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECH = os.path.join(ROOT, "data", "speech_digits")
spec = importlib.util.spec_from_file_location("orbax_to_pytorch", os.path.join(ROOT, "convert", "orbax_to_pytorch.py"))
TO_TORCH = importlib.util.module_from_spec(spec)
spec.loader.exec_module(TO_TORCH)

# a two-layer CNN: fewer distinct eager ops to compile while the trainer initialises the tiny audio preset
SMALL_CNN = json.dumps({"conv_dim": [128, 128], "conv_stride": [5, 4], "conv_kernel": [10, 4]})
PIPELINE_TASK = {"ctc": "automatic-speech-recognition", "audio-classification": "audio-classification",
                 "text-classification": "text-classification", "token-classification": "token-classification",
                 "mlm": "fill-mask"}
TEXTS = ["It is a truth universally acknowledged.", "She was not handsome enough to tempt him.",
         "The rain fell on the garden all afternoon."]


def speech(n=3):
    rows = [json.loads(line) for line in open(os.path.join(SPEECH, "eval.jsonl"))][:n]
    return [sf.read(os.path.join(SPEECH, r["path"]), dtype="float32")[0] for r in rows]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """task -> (training output dir, its orbax_to_pytorch conversion); each trainer built as a user would and
    exported by its own export() (no steps: the export path is what is tested, not learning)."""
    made = {}

    def make(task):
        if task not in made:
            out = tmp_path_factory.mktemp(task) / "run"
            audio = task in ("ctc", "audio-classification")
            cfg = TrainConfig(task=task, batch_size=2, n_buckets=1, max_text_tokens=32, num_workers=0,
                              max_steps=1, progress=False, output_dir=str(out),
                              model_config=SMALL_CNN if audio else "")
            Trainer(cfg).export()
            hf = str(out.parent / "hf")
            assert TO_TORCH.main([str(out), hf]) == 0
            made[task] = str(out), hf
        return made[task]
    return make


def ordinary_modes(directory):
    """Every file 0644 and directory 0755 (umask 022 here), not tempfile's or safetensors' 0600 / 0700."""
    for root, _, files in os.walk(directory):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o755, root
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o644, os.path.join(root, f)


def close_scores(ours, theirs, keys):
    assert [[o[k] for k in keys] for o in ours] == [[t[k] for k in keys] for t in theirs]
    np.testing.assert_allclose([o["score"] for o in ours], [t["score"] for t in theirs], atol=1e-4)


@pytest.mark.parametrize("task", ["ctc", "audio-classification"])
def test_audio_export_runs_in_transformers_pipeline(exported, task):
    run, hf = exported(task)
    want = {"config.json", "model.safetensors", "preprocessor_config.json"}
    want |= {"vocab.json", "tokenizer_config.json"} if task == "ctc" else set()
    assert want <= set(os.listdir(hf)) and want <= set(os.listdir(os.path.join(run, "model")))
    ordinary_modes(hf), ordinary_modes(os.path.join(run, "model"))
    config = json.load(open(os.path.join(hf, "config.json")))
    if task == "audio-classification":
        assert len(config["id2label"]) > 2 and config["label2id"] == {v: int(k) for k, v in config["id2label"].items()}
    name = PIPELINE_TASK[task]
    clips = speech()
    options = {} if task == "ctc" else {"top_k": 5}  # transformers 5 returns every label when a call omits top_k
    ours = fd.pipeline(name, run, batch_size=4)(clips, **options)
    for directory in (hf, os.path.join(run, "model")):  # the converted copy and the trainer's own export
        theirs = transformers.pipeline(name, model=directory)
        for clip, mine in zip(clips, ours):
            got = theirs(clip, **options)
            if task == "ctc":
                assert mine["text"] == got["text"]
            else:
                close_scores(mine, got, ["label"])


@pytest.mark.parametrize("task", ["text-classification", "token-classification", "mlm"])
def test_text_export_runs_in_transformers_pipeline(exported, task):
    run, hf = exported(task)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(hf))
    ordinary_modes(hf)
    name = PIPELINE_TASK[task]
    theirs = transformers.pipeline(name, model=hf)
    ids = [theirs.tokenizer(t)["input_ids"] for t in TEXTS]
    assert len(theirs.tokenizer) > 100 and len({tuple(i) for i in ids}) == len(TEXTS)  # a real vocabulary
    ours = fd.pipeline(name, run, batch_size=4)
    if task == "mlm":
        texts = [t.replace("truth", theirs.tokenizer.mask_token) for t in TEXTS[:1]]
        close_scores(ours(texts[0]), theirs(texts[0]), ["token", "token_str"])
        return
    for text in TEXTS:
        if task == "text-classification":
            close_scores(ours(text, top_k=None), theirs(text, top_k=None), ["label"])
        else:
            close_scores(ours(text), theirs(text), ["entity", "word", "start", "end", "index"])


def without_tokenizer(tmp_path, task_run):
    """The exported model saved again with fd.save alone: a checkpoint that lost its tokenizer."""
    module, params = fd.load(task_run)
    return fd.save(tmp_path / "bare", module, params)


def test_export_without_tokenizer_fails_in_one_line(exported, tmp_path, capfd):
    bare = without_tokenizer(tmp_path, exported("text-classification")[0])
    dst = tmp_path / "hf"
    assert TO_TORCH.main([bare, str(dst)]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bare} has no tokenizer files"), err
    assert "has no tokenizer files" in err[0] and "tokenizer.save_pretrained" in err[0], err
    assert not dst.exists()
    with pytest.raises(FileNotFoundError, match="holds only its 5 special tokens"):
        processors.text_tokenizer(bare)  # what transformers would have built silently
    assert TO_TORCH.main([bare, str(dst), "--weights-only"]) == 0  # asked for explicitly
    assert "tokenizer.json" not in os.listdir(dst)


def test_ctc_export_without_vocabulary_fails(exported, tmp_path, capfd):
    bare = without_tokenizer(tmp_path, exported("ctc")[0])
    assert TO_TORCH.main([bare, str(tmp_path / "hf")]) == 1
    (line,) = capfd.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "has no vocab.json" in line, line
