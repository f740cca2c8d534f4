"""Pipelines on 8 simulated CPU devices (a fresh interpreter with XLA_FLAGS): `parallel="pmap"` and the jit
mesh give one device's outputs (ASR; text classification for pmap), with batches that 8 does not divide
(filler rows padded, then dropped)."""

import json
import os
import subprocess
import sys
import textwrap

from pipeline_models import audio_checkpoint, text_checkpoint

import flax_data2vec as fd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import json, sys
import jax
sys.path.insert(0, {tests!r})
from pipeline_models import speech
import flax_data2vec as fd

assert jax.local_device_count() == 8
ways = {{"one": dict(devices=jax.local_devices()[:1]), "pmap": dict(parallel="pmap"), "mesh": {{}}}}
waves = [speech(0.52 + 0.01 * i, i) for i in range(11)]  # one length bucket (0.64 s); batches of 8 + 3 (padded to 8)
sentences = ["paris is the capital of france", "emma", "the quick brown fox jumps over the lazy dog"]
out = {{}}
for name, kw in ways.items():
    asr = fd.pipeline("automatic-speech-recognition", {ctc!r}, batch_size=5, **kw)  # 5 -> 8 rows on 8 devices
    out[name] = {{"asr": asr(waves, return_timestamps="word"), "batch_size": asr.batch_size,
                 "compiles": asr.stats.compiles, "batches": asr.stats.batches}}
    if name != "mesh":  # the jit mesh is the default everywhere else; pmap is the new path
        out[name]["cls"] = fd.pipeline("text-classification", {cls!r}, batch_size=2, **kw)(sentences, top_k=None)
print(json.dumps(out))
"""


def test_pmap_and_mesh_equal_one_device(tmp_path):
    ctc = audio_checkpoint(str(tmp_path / "ctc"), head_scale=3.0)
    cls = text_checkpoint(str(tmp_path / "cls"), "Data2VecTextForSequenceClassification", num_labels=3)
    code = CODE.format(tests=os.path.join(ROOT, "tests"), ctc=ctc, cls=cls)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one = out["one"]
    assert one["batch_size"] == 5 and out["pmap"]["batch_size"] == out["mesh"]["batch_size"] == 8
    assert (one["batches"], out["pmap"]["batches"]) == (3, 2)  # 11 = 5 + 5 + 1 rows; 8 + 3 rows
    assert out["pmap"]["compiles"] == out["mesh"]["compiles"] == 1
    texts = [o["text"] for o in one["asr"]]
    assert len(texts) == 11 and len(set(texts)) > 5  # real, varied transcripts
    for name in ("pmap", "mesh"):
        assert [o["text"] for o in out[name]["asr"]] == texts, name
        assert [o["chunks"] for o in out[name]["asr"]] == [o["chunks"] for o in one["asr"]], name
    assert len(out["pmap"]["cls"]) == len(one["cls"]) == 3
    for ours, ref in zip(out["pmap"]["cls"], one["cls"]):
        assert [d["label"] for d in ours] == [d["label"] for d in ref]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(ours, ref)) < 1e-5


def test_parallel_is_checked_before_loading(tmp_path):
    import pytest
    with pytest.raises(ValueError, match="parallel must be 'jit' or 'pmap', got 'vmap'"):
        fd.pipeline("automatic-speech-recognition", str(tmp_path / "nowhere"), parallel="vmap")
