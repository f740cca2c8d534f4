"""A model trained here by `train_tpu.py` (a short run of the default CTC job): its exported directory serves
flax_data2vec's pipeline, CLI and transformers' pipeline alike; an n-gram LM from the shipped transcripts helps."""

import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import transformers

import flax_data2vec as fd
from flax_data2vec import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "speech_digits")
STEPS = 400  # past CTC's all-blank plateau (eval CER ~0.8 here), so transcripts have content to compare


def manifest(name):
    rows = [json.loads(line) for line in open(os.path.join(DATA, name))]
    return [os.path.join(DATA, r["path"]) for r in rows], [r["text"] for r in rows]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    args = ["--max-steps", str(STEPS), "--eval-every", str(STEPS), "--save-every", str(STEPS), "--log-every", "100",
            "--n-buckets", "2", "--progress", "false", "--output-dir", str(out)]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_tpu.py"), *args], capture_output=True,
                          text=True, timeout=1500, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return str(out), [r for r in rows if "eval_cer" in r][-1]


def test_pipeline_cer_equals_the_trainers_final_eval_cer(trained, capsys):
    out, final = trained
    assert cli.main(["evaluate", "--model", out, "--data", os.path.join(DATA, "eval.jsonl"), "--progress", "false",
                     "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    cer = float(printed.split("CER ")[1].split()[0])
    wer = float(printed.split("WER ")[1].split(",")[0])
    assert cer == pytest.approx(final["eval_cer"], abs=5e-5) and wer == pytest.approx(final["eval_wer"], abs=5e-5)
    assert cer < 0.99  # not the all-blank plateau: the comparison has text in it


def test_transformers_pipeline_reads_the_exported_directory(trained):
    out, _ = trained
    exported = os.path.join(out, "model")
    files, _ = manifest("eval.jsonl")
    files = files[:6]
    theirs = transformers.pipeline("automatic-speech-recognition", model=exported)
    ours = fd.pipeline("automatic-speech-recognition", out, batch_size=8)
    assert [o["text"] for o in ours(files)] == [theirs(f)["text"] for f in files]


def write_arpa(path, sentences, discount=0.5):
    """A word bigram LM in ARPA format: absolute discounting, backing off to add-one unigrams."""
    unigrams, bigrams = Counter(), Counter()
    for s in sentences:
        words = ["<s>", *s.split(), "</s>"]
        unigrams.update(words[1:])
        bigrams.update(zip(words, words[1:]))
    vocab = sorted(unigrams) + ["<unk>"]
    total = sum(unigrams.values()) + len(vocab)
    p_uni = {w: (unigrams[w] + 1) / total for w in vocab}
    history = Counter()
    for (a, _), c in bigrams.items():
        history[a] += c
    followers = {a: [b for (x, b) in bigrams if x == a] for a in history}
    backoff = {}
    for a, seen in followers.items():
        left = 1 - sum((bigrams[a, b] - discount) / history[a] for b in seen)
        backoff[a] = left / (1 - sum(p_uni[b] for b in seen))
    lines = ["\\data\\", f"ngram 1={len(vocab) + 1}", f"ngram 2={len(bigrams)}", "", "\\1-grams:",
             f"-99\t<s>\t{math.log10(backoff['<s>']):.6f}"]
    for w in vocab:
        lines.append(f"{math.log10(p_uni[w]):.6f}\t{w}" + (f"\t{math.log10(backoff[w]):.6f}" if w in backoff else ""))
    lines += ["", "\\2-grams:"]
    for (a, b), c in sorted(bigrams.items()):
        lines.append(f"{math.log10((c - discount) / history[a]):.6f}\t{a} {b}")
    lines += ["", "\\end\\", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def test_ngram_lm_lowers_wer(trained, tmp_path):
    pytest.importorskip("kenlm", reason="kenlm (the [lm] extra) builds from source; not installed here")
    out, final = trained
    _, train_texts = manifest("train.jsonl")
    files, refs = manifest("eval.jsonl")
    lm = write_arpa(tmp_path / "digits.arpa", train_texts)
    import jiwer
    greedy = fd.pipeline("automatic-speech-recognition", out, batch_size=16)
    with_lm = fd.pipeline("automatic-speech-recognition", out, batch_size=16, lm=str(lm),
                          decoder_options=dict(alpha=0.5, beta=1.0))
    wer_greedy = jiwer.wer(refs, [r["text"] for r in greedy(files)])
    wer_lm = jiwer.wer(refs, [r["text"] for r in with_lm(files)])
    print(f"eval WER greedy {wer_greedy:.3f} -> with the bigram LM {wer_lm:.3f}")
    assert wer_greedy == pytest.approx(final["eval_wer"], abs=5e-5)
    assert wer_lm < wer_greedy - 0.05


def test_cli_transcribe_formats_and_errors(trained, capsys, tmp_path):
    out, _ = trained
    files, _ = manifest("eval.jsonl")
    assert cli.main(["transcribe", *files[:2], "--model", out, "--format", "jsonl", "--timestamps", "word",
                     "--progress", "false"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == files[:2] and all("chunks" in r for r in rows)
    assert cli.main(["transcribe", files[0], "--model", out, "--format", "srt", "--progress", "false",
                     "--output-dir", str(tmp_path)]) == 0
    srt = (tmp_path / "eval-0000.srt").read_text()
    assert srt == "" or srt.startswith("1\n00:00:0")
    assert cli.main(["transcribe", "nowhere.wav", "--model", out, "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: audio file not found: nowhere.wav"]
    assert cli.main(["embed", *files[:3], "--model", out, "--output", str(tmp_path / "e.npy"),
                     "--progress", "false"]) == 0
    assert np.load(tmp_path / "e.npy").shape == (3, fd.load(out)[0].config.hidden_size)
