"""Audio pipelines against transformers' own pipelines and models, on tiny random checkpoints saved with their
processors; bucketed compiles; errors before anything runs."""

import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
from pipeline_models import TOKENS, audio_checkpoint, speech

import flax_data2vec as fd
from flax_data2vec.pipelines import asr as asr_lib

SR = 16000
FRAME_S = 80 / SR  # the tiny config's inputs_to_logits_ratio (5 * 4 * 4) in seconds
LENGTHS_S = [0.7, 1.3, 2.1, 0.9, 1.6]


def _words_model(model):
    """Make the random CTC model emit word delimiters and no <s>, </s>, <unk>."""
    with torch.no_grad():
        model.lm_head.bias[TOKENS.index("|")] += 1.5
        model.lm_head.bias[1:4] -= 20.0


@pytest.fixture(scope="session")
def ctc_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ctc"))
    audio_checkpoint(d)
    model = transformers.Data2VecAudioForCTC.from_pretrained(d)
    _words_model(model)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def waves():
    return [speech(s, i) for i, s in enumerate(LENGTHS_S)]


@pytest.fixture(scope="session")
def asr(ctc_dir):
    return fd.pipeline("automatic-speech-recognition", ctc_dir, batch_size=8)


@pytest.fixture(scope="session")
def reference(ctc_dir):
    return transformers.pipeline("automatic-speech-recognition", model=ctc_dir)


def test_asr_greedy_transcripts_equal_transformers(asr, reference, waves):
    ours = asr(waves)
    theirs = [reference(w.copy()) for w in waves]
    assert [o["text"] for o in ours] == [t["text"] for t in theirs]
    assert any(" " in o["text"] for o in ours)  # words, not one long run
    assert asr(waves[1])["text"] == ours[1]["text"]  # alone or in a batch: the same


def test_asr_chunked_equals_transformers_chunked(asr, reference, waves):
    kw = dict(chunk_length_s=0.6, stride_length_s=0.1)
    ours = asr(waves, **kw)
    theirs = [reference(w.copy(), **kw) for w in waves]
    assert [o["text"] for o in ours] == [t["text"] for t in theirs]


@pytest.mark.parametrize("kind", ["char", "word"])
def test_asr_timestamps_within_one_frame(asr, reference, waves, kind):
    for kw in ({}, dict(chunk_length_s=0.6, stride_length_s=0.1)):
        ours = asr(waves[2], return_timestamps=kind, **kw)["chunks"]
        theirs = reference(waves[2].copy(), return_timestamps=kind, **kw)["chunks"]
        assert [c["text"] for c in ours] == [c["text"] for c in theirs] and len(ours) > 3
        spans = np.array([c["timestamp"] for c in ours]) - np.array([c["timestamp"] for c in theirs])
        assert np.abs(spans).max() <= FRAME_S + 1e-9


def test_new_lengths_inside_the_buckets_compile_nothing(ctc_dir):
    asr = fd.pipeline("automatic-speech-recognition", ctc_dir, batch_size=8)
    asr([speech(1.02), speech(1.1, 1)])
    compiles = asr.stats.compiles
    asr([speech(1.05, 2), speech(1.15, 3), speech(1.12, 4)])
    assert asr.stats.compiles == compiles == 1
    assert asr.stats.compile_s > 0 and asr.stats.run_s > 0


def test_asr_reads_files_and_dicts_and_resamples(asr, waves, tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, waves[0], SR)
    from scipy.signal import resample_poly
    at_8k = resample_poly(waves[1], 1, 2).astype(np.float32)
    out = asr([str(path), {"raw": waves[1], "sampling_rate": SR}, {"array": at_8k, "sampling_rate": 8000}])
    assert out[0]["text"] == asr(waves[0])["text"] and out[1]["text"] == asr(waves[1])["text"]
    assert isinstance(out[2]["text"], str)


def test_asr_bad_input_fails_first_with_one_clear_error(asr, ctc_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="audio file not found: .*missing.wav"):
        asr(["/nowhere/missing.wav"])
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="cannot decode audio file .*broken.wav"):
        asr([speech(1.0), str(broken)])
    with pytest.raises(ValueError, match="input 1 is an empty clip"):
        asr([speech(1.0), np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match="fewer than the model's receptive field"):
        asr(np.zeros(50, np.float32))
    with pytest.raises(ValueError, match="return_timestamps must be"):
        asr(speech(1.0), return_timestamps="sentence")


def test_ctc_checkpoint_without_tokenizer_says_which_file(tmp_path):
    d = audio_checkpoint(str(tmp_path / "ctc"))
    (tmp_path / "ctc" / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no vocab\.json.*save_ctc_processor"):
        fd.pipeline("automatic-speech-recognition", d)


def test_task_that_does_not_fit_the_head(ctc_dir):
    with pytest.raises(ValueError, match="Data2VecAudioForCTC checkpoint; this task needs "
                                         "Data2VecAudioForSequenceClassification"):
        fd.pipeline("audio-classification", ctc_dir)
    with pytest.raises(ValueError, match="unknown task 'speech-recognition'"):
        fd.pipeline("speech-recognition", ctc_dir)


def test_beam_search_without_lm_gives_greedy_on_peaked_outputs(tmp_path, waves):
    d = audio_checkpoint(str(tmp_path / "peaked"), seed=1)
    model = transformers.Data2VecAudioForCTC.from_pretrained(d)
    _words_model(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
        model.lm_head.bias.mul_(200.0)
    model.save_pretrained(d)
    greedy = fd.pipeline("automatic-speech-recognition", d, batch_size=8)
    beam = fd.pipeline("automatic-speech-recognition", d, batch_size=8, decoder_options={})
    short = [waves[0], waves[3]]
    g, b = greedy(short), beam(short, return_timestamps="word")
    assert [x["text"] for x in b] == [" ".join(x["text"].split()) for x in g]
    assert [w["text"] for w in b[1]["chunks"]] == b[1]["text"].split()


def test_missing_lm_extra_says_what_to_install(ctc_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyctcdecode", None)
    with pytest.raises(ImportError, match=r"needs pyctcdecode: pip install --no-deps pyctcdecode"):
        fd.pipeline("automatic-speech-recognition", ctc_dir, decoder_options={})
    monkeypatch.delitem(sys.modules, "pyctcdecode")
    monkeypatch.setitem(sys.modules, "kenlm", None)
    with pytest.raises(ImportError, match=r"LM lm.arpa needs kenlm"):
        asr_lib.build_decoder(transformers.AutoTokenizer.from_pretrained(ctc_dir), "lm.arpa")


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("aclass"))
    return audio_checkpoint(d, "Data2VecAudioForSequenceClassification", num_labels=4,
                            id2label={0: "yes", 1: "no", 2: "up", 3: "down"})


def test_audio_classification_equals_transformers(classifier_dir, waves):
    """The default call too: transformers 5 returns every label when `top_k` is not given."""
    ours = fd.pipeline("audio-classification", classifier_dir, batch_size=8)
    ref = transformers.pipeline("audio-classification", model=classifier_dir)
    for options in ({}, {"top_k": 3}, {"top_k": 2, "function_to_apply": "sigmoid"}):
        for o, w in zip(ours(waves[:3], **options), waves):
            t = ref(w.copy(), **options)
            assert len(o) == options.get("top_k", 4)
            assert [x["label"] for x in o] == [x["label"] for x in t]
            np.testing.assert_allclose([x["score"] for x in o], [x["score"] for x in t], atol=1e-4)


def _torch_outputs(directory, class_name, wave):
    model = getattr(transformers, class_name).from_pretrained(directory).eval()
    fe = transformers.AutoFeatureExtractor.from_pretrained(directory)
    x = fe(wave, sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        return model(**x)


def test_frame_classification_labels_and_segments(tmp_path, waves):
    d = audio_checkpoint(str(tmp_path / "frames"), "Data2VecAudioForAudioFrameClassification", num_labels=2,
                         id2label={0: "silence", 1: "speech"})
    out = fd.pipeline("audio-frame-classification", d, batch_size=8)(waves[:3])
    for o, w in zip(out, waves):
        logits = _torch_outputs(d, "Data2VecAudioForAudioFrameClassification", w).logits[0].numpy()
        assert o["frames"] == [("silence", "speech")[i] for i in logits.argmax(-1)]
        seg = o["segments"]
        assert seg[0]["start"] == 0 and np.isclose(seg[-1]["end"], len(logits) * FRAME_S)
        assert all(a["end"] == b["start"] and a["label"] != b["label"] for a, b in zip(seg, seg[1:]))


def test_speaker_embeddings_and_verification(tmp_path, waves):
    d = audio_checkpoint(str(tmp_path / "xvec"), "Data2VecAudioForXVector", num_labels=3)
    spk = fd.pipeline("speaker-embedding", d, batch_size=8)
    out = spk(waves[:3])
    for o, w in zip(out, waves):
        ref = _torch_outputs(d, "Data2VecAudioForXVector", w).embeddings[0].numpy()
        np.testing.assert_allclose(o["embeddings"], ref, atol=1e-4)
    same = spk.verify(waves[0], waves[0].copy())
    assert np.isclose(same["similarity"], 1.0, atol=1e-5) and same["same_speaker"]
    other = spk.verify(waves[0], waves[1], threshold=1.01)
    assert other["same_speaker"] is False


def test_audio_feature_extraction_and_embed(tmp_path, waves):
    d = audio_checkpoint(str(tmp_path / "base"), "Data2VecAudioModel")
    feats = fd.pipeline("feature-extraction", d, batch_size=8)
    out = feats(waves[:3], return_tensors=True)
    means = []
    for o, w in zip(out, waves):
        ref = _torch_outputs(d, "Data2VecAudioModel", w).last_hidden_state.numpy()
        np.testing.assert_allclose(o, ref, atol=1e-4)
        means.append(ref[0].mean(0))
    np.testing.assert_allclose(fd.embed(waves[:3], feats), np.stack(means), atol=1e-4)
    d2v = fd.embed(waves[:2], d, pooling="data2vec", top_k_layers=2)
    assert d2v.shape == (2, 32) and np.isfinite(d2v).all()
