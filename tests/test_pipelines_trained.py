"""A model trained here by `train_tpu.py` (the default CTC job, 600 steps, shared with test_train): its exported
directory serves flax_data2vec's pipeline, its CLI and transformers' pipeline alike, with the trainer's own eval CER."""

import json
import os

import numpy as np
import pytest
import soundfile as sf
import transformers

import flax_data2vec as fd
from flax_data2vec import __main__ as cli
from flax_data2vec.pipelines.ngram import write_arpa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "speech_digits")
# The trained model is the suite's one default CTC run (conftest.default_ctc_run, 600 steps, off CTC's
# all-blank plateau), so the transcripts are real and the n-gram LM comparison runs.


def manifest(name):
    rows = [json.loads(line) for line in open(os.path.join(DATA, name))]
    return [os.path.join(DATA, r["path"]) for r in rows], [r["text"] for r in rows]


@pytest.fixture(scope="session")
def trained(default_ctc_run):
    out, rows = default_ctc_run  # conftest: the run test_train checks, trained once for both
    return out, [r for r in rows if "eval_cer" in r][-1]


def test_pipeline_cer_equals_the_trainers_final_eval_cer(trained, capsys):
    out, final = trained
    args = cli.parser().parse_args(["evaluate", "--model", out, "--data", os.path.join(DATA, "eval.jsonl"),
                                    "--progress", "false", "--batch-size", "16"])
    result = cli.evaluate(args)
    assert result["examples"] == 100
    assert result["cer"] == pytest.approx(final["eval_cer"], abs=1e-9)
    assert result["wer"] == pytest.approx(final["eval_wer"], abs=1e-9)
    assert f"CER {result['cer']:.4f}" in capsys.readouterr().out


def test_transformers_pipeline_reads_the_exported_directory(trained, tmp_path):
    out, _ = trained
    files, _ = manifest("eval.jsonl")
    files = files[:6]
    ours = [o["text"] for o in fd.pipeline("automatic-speech-recognition", out, batch_size=8)(files)]
    converted = fd.hub.convert_to_transformers(out, str(tmp_path / "hf"))  # processor files travel along
    for exported in (os.path.join(out, "model"), converted):
        theirs = transformers.pipeline("automatic-speech-recognition", model=exported)
        assert ours == [theirs(sf.read(f, dtype="float32")[0])["text"] for f in files]  # arrays: no ffmpeg here


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
    capsys.readouterr()
    assert cli.main(["transcribe", "nowhere.wav", "--model", out, "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: audio file not found: nowhere.wav"]
    assert cli.main(["embed", *files[:3], "--model", out, "--output", str(tmp_path / "e.npy"),
                     "--progress", "false"]) == 0
    assert np.load(tmp_path / "e.npy").shape == (3, fd.load(out)[0].config.hidden_size)


def test_ngram_lm_from_the_shipped_transcripts_lowers_the_wer(trained, tmp_path):
    """Beam search with a word bigram of data/speech_digits' training transcripts (kenlm through pyctcdecode)
    against greedy decoding, both through our pipeline, on the eval set."""
    import jiwer
    out, final = trained
    assert final["eval_cer"] < 1.0, "the trained model emits only blanks: no transcript for an LM to rescore"
    files, refs = manifest("eval.jsonl")
    lm = write_arpa(str(tmp_path / "digits.arpa"), manifest("train.jsonl")[1])
    greedy = [r["text"] for r in fd.pipeline("automatic-speech-recognition", out, batch_size=16)(files)]
    beam = fd.pipeline("automatic-speech-recognition", out, batch_size=16, lm=lm,
                       decoder_options=dict(alpha=0.5, beta=1.0))
    with_lm = [r["text"] for r in beam(files)]
    wer_greedy, wer_lm = jiwer.wer(refs, greedy), jiwer.wer(refs, with_lm)
    print(f"eval WER greedy {wer_greedy:.3f}, beam + bigram LM {wer_lm:.3f}")
    assert wer_lm < wer_greedy - 0.1
