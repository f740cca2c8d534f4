"""The README's python snippets run as written: each is executed in a fresh interpreter, against tiny models laid
out as the Hugging Face hub cache (HF_HUB_OFFLINE=1), so short names go through the real download and loading
code. A snippet's placeholders (`torch_model`, `module`, ...) are the only things defined for it beforehand."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE_ENV, tiny_torch_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# the placeholders a snippet's prose implies, defined before it runs; `None`: not run, with the reason
SETUP = {
    "models": "",
    "from and to pytorch": (
        "import transformers\n"
        "torch_model = transformers.Data2VecAudioForCTC(transformers.Data2VecAudioConfig(hidden_size=32,\n"
        "    num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, conv_dim=(16, 16),\n"
        "    conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, vocab_size=12))\n"),
    "loading checkpoints": "",
    "sharded loading": "",
    "checks under jit": (  # a classifier: its loss compiles faster than CTC's, and checks labels the same way
        "import jax.numpy as jnp\n"
        "module = fd.Data2VecAudioForSequenceClassification(fd.Data2VecAudioConfig(hidden_size=32,\n"
        "    num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, conv_dim=(16, 16),\n"
        "    conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, classifier_proj_size=8,\n"
        "    id2label={i: str(i) for i in range(32)}))\n"
        "params = fd.init_params(module)\n"
        "x, labels = jnp.zeros((2, 4000)), jnp.ones((2,), jnp.int32)\n"),
}
NOT_RUN = {
    "use a model": "placeholder inputs (`m`, `clips`, `a.flac`) and fourteen pipelines; each call is tested against "
                   "transformers' pipelines in tests/test_pipelines_*.py",
    "fairseq checkpoints and data2vec 2.0": "needs fairseq's released .pt files; their readers are tested on files "
                                            "written the fairseq way in tests/test_fairseq.py and test_data2vec2.py",
}
# after a snippet: what its comments promise
AFTER = {
    "checks under jit": (
        "bad = labels.at[0].set(-1)\n"
        "try:\n    loss(params, x, bad)\nexcept Exception as e:\n"
        "    assert 'labels must lie in [0, 32) or be -100, got -1' in str(e), e\n"
        "else:\n    raise AssertionError('bad labels were accepted')\n"),
    "sharded loading": "assert type(module).__name__ == 'Data2VecAudioModel'\n",
    "loading checkpoints": "assert module.dtype == jnp.bfloat16 and module.scan_layers\n",
}
# hub repos the snippets name -> the class of the tiny model stored for them
HUB = {"facebook/data2vec-audio-base-960h": "Data2VecAudioForCTC", "facebook/data2vec-audio-base": "Data2VecAudioModel",
       "facebook/data2vec-audio-large": "Data2VecAudioModel", "someone/my-data2vec-finetune": "Data2VecTextModel"}


def snippets() -> dict[str, str]:
    """Python blocks by name: the '## ' heading for a section's first block, else its paragraph's lead-in
    (a bold '**Name.**', a short 'Name:' line, or its first two words)."""
    out, heading, paragraph, previous = {}, "", "", ""
    lines = open(README).read().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading, paragraph = line[3:].strip(), ""
        elif line.startswith("```python"):
            end = lines.index("```", i + 1)
            bold = re.match(r"\*\*(.+?)\.\*\*", paragraph)
            lead = (bold.group(1) if bold else paragraph[:-1] if paragraph.endswith(":") and len(paragraph) < 40
                    else " ".join(paragraph.split()[:2]))
            name = (heading if heading.lower() not in out else lead).lower()
            out[name] = "\n".join(lines[i + 1:end])
            i = end
        elif line.strip() and not previous.strip():
            paragraph = line.strip()
        previous = line
        i += 1
    return out


def test_every_snippet_is_run_or_says_why_not():
    assert set(snippets()) == set(SETUP) | set(NOT_RUN)


def hub_cache(root) -> None:
    """Tiny models in huggingface_hub's cache layout: blobs/<sha256>, snapshots/<rev>/ links, refs/main."""
    rev = "0" * 40
    for repo, cls in HUB.items():
        base = root / ("models--" + repo.replace("/", "--"))
        staging = root / "staging" / repo
        tiny_torch_model(cls).save_pretrained(staging)
        (base / "blobs").mkdir(parents=True)
        (base / "snapshots" / rev).mkdir(parents=True)
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(rev)
        for f in os.listdir(staging):
            data = (staging / f).read_bytes()
            blob = base / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            os.symlink(os.path.relpath(blob, base / "snapshots" / rev), base / "snapshots" / rev / f)


DRIVER = """
import json, sys, time, traceback
jobs, results = json.load(open(sys.argv[1])), {}
for name, code in jobs.items():
    start = time.perf_counter()
    try:
        exec(compile(code, f"README snippet {name!r}", "exec"), {"__name__": "__readme__"})
        results[name] = {"error": None}
    except BaseException:
        results[name] = {"error": traceback.format_exc(limit=6)}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every runnable snippet, each in its own namespace, in one fresh interpreter (the hub settings are read
    at import time) whose working directory holds `./my-model`."""
    tmp = tmp_path_factory.mktemp("readme")
    hub_cache(tmp / "hf" / "hub")
    tiny_torch_model("Data2VecAudioModel", seed=1).save_pretrained(tmp / "work" / "my-model")
    code = snippets()
    jobs = {name: "import flax_data2vec as fd\n" * bool(setup) + setup + code[name] + "\n" + AFTER.get(name, "")
            for name, setup in SETUP.items()}
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    (tmp / "driver.py").write_text(DRIVER)
    # tiny models, a few calls each: compile-bound, so compiled with most XLA optimisations off
    env = {**os.environ, **FAST_COMPILE_ENV, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
           "HF_HUB_CACHE": str(tmp / "hf" / "hub"), "FLAX_DATA2VEC_CACHE": str(tmp / "cache")}
    proc = subprocess.run([sys.executable, str(tmp / "driver.py"), str(tmp / "jobs.json"), str(tmp / "out.json")],
                          cwd=tmp / "work", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("name", sorted(SETUP))
def test_snippet_runs_as_written(results, name):
    assert results[name]["error"] is None, results[name]["error"]
