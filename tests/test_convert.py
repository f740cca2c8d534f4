"""convert/ scripts: transformers -> Orbax -> transformers is bit-exact for all twelve classes; CLI contract."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from test_hub import (
    ROOT,
    inputs_for,
    main_output,
    save_torch,
    tiny_torch_model,
    truncate,
)

import flax_data2vec as fd
from flax_data2vec import checkpoint, publish, registry

AUTO = {
    "Data2VecAudioModel": "AutoModel", "Data2VecAudioForCTC": "AutoModelForCTC",
    "Data2VecAudioForSequenceClassification": "AutoModelForAudioClassification",
    "Data2VecAudioForAudioFrameClassification": "AutoModelForAudioFrameClassification",
    "Data2VecAudioForXVector": "AutoModelForAudioXVector", "Data2VecTextModel": "AutoModel",
    "Data2VecTextForCausalLM": "AutoModelForCausalLM", "Data2VecTextForMaskedLM": "AutoModelForMaskedLM",
    "Data2VecTextForSequenceClassification": "AutoModelForSequenceClassification",
    "Data2VecTextForMultipleChoice": "AutoModelForMultipleChoice",
    "Data2VecTextForTokenClassification": "AutoModelForTokenClassification",
    "Data2VecTextForQuestionAnswering": "AutoModelForQuestionAnswering",
}


def script(name: str):
    """A convert/ script imported as a module, so its `main(argv)` runs in this process."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "convert", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TO_ORBAX, TO_TORCH = script("pytorch_to_orbax"), script("orbax_to_pytorch")


pytestmark = pytest.mark.usefixtures("private_cache")


def cli(name: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, os.path.join(ROOT, "convert", f"{name}.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": ""})  # the script finds the package itself


def test_every_class_round_trips_bit_exact(tmp_path):
    names = list(registry.model_classes())
    assert len(names) == 12, names
    for name in names:
        tmodel = tiny_torch_model(name)
        src, orbax, back = tmp_path / name / "hf", tmp_path / name / "orbax", tmp_path / name / "back"
        assert TO_ORBAX.main([save_torch(tmodel, src), str(orbax)]) == 0
        assert TO_TORCH.main([str(orbax), str(back), "--weights-only"]) == 0  # tiny models have no tokenizer
        assert sorted(os.listdir(tmp_path / name)) == ["back", "hf", "orbax"]  # no temp dirs left
        config = json.loads((back / "config.json").read_text())
        assert config["architectures"] == [name] and config["model_type"] == tmodel.config.model_type
        loaded, info = getattr(transformers, name).from_pretrained(back, output_loading_info=True)
        assert not any(info.values()), f"{name}: {info}"  # no missing / unexpected / mismatched keys
        want, got = tmodel.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
        auto = getattr(transformers, AUTO[name]).from_pretrained(back).eval()
        assert type(auto).__name__ == name
        x = torch.tensor(inputs_for(name))
        with torch.no_grad():
            assert np.array_equal(main_output(auto(x)), main_output(tmodel(x))), name


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_of_bin_checkpoint_lm_decoder(tmp_path, tied):
    """Old .bin files store the tied decoder weight; the written safetensors leaves it out, as transformers does."""
    import safetensors.numpy
    tmodel = tiny_torch_model("Data2VecTextForMaskedLM", tie_word_embeddings=tied)
    assert TO_ORBAX.main([save_torch(tmodel, tmp_path / "hf", "bin"), str(tmp_path / "orbax")]) == 0
    assert TO_TORCH.main([str(tmp_path / "orbax"), str(tmp_path / "back"), "--weights-only"]) == 0
    stored = safetensors.numpy.load_file(tmp_path / "back" / "model.safetensors")
    assert ("lm_head.decoder.weight" in stored) == (not tied) and "lm_head.bias" in stored
    loaded, info = transformers.Data2VecTextForMaskedLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info
    embeddings = loaded.data2vec_text.embeddings.word_embeddings.weight
    assert (loaded.lm_head.decoder.weight.data_ptr() == embeddings.data_ptr()) == tied
    want, got = tmodel.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_base_checkpoint_converted_to_head_class(tmp_path, capsys):
    src = save_torch(tiny_torch_model("Data2VecAudioModel"), tmp_path / "hf")
    assert TO_ORBAX.main([src, str(tmp_path / "orbax"), "--architecture", "Data2VecAudioForCTC"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "orbax")
    assert "warning: Data2VecAudioForCTC: 2 parameters are not in" in err and "lm_head.bias, lm_head.weight" in err
    module, params = fd.load(tmp_path / "orbax")  # a complete checkpoint: no warning, the head is stored
    assert type(module).__name__ == "Data2VecAudioForCTC" and np.abs(params["lm_head"]["kernel"]).sum() > 0


def test_overwrite_replaces_destination(tmp_path):
    src = save_torch(tiny_torch_model("Data2VecAudioModel"), tmp_path / "hf")
    other = save_torch(tiny_torch_model("Data2VecAudioModel", seed=1), tmp_path / "hf1")
    dst = tmp_path / "orbax"
    assert TO_ORBAX.main([src, str(dst)]) == 0
    assert TO_ORBAX.main([other, str(dst)]) == 1  # refused without --overwrite
    _, before = fd.load(dst)
    assert TO_ORBAX.main([other, str(dst), "--overwrite"]) == 0
    _, after = fd.load(dst)
    assert not np.array_equal(before["masked_spec_embed"], after["masked_spec_embed"])
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf1", "orbax"]  # no temp or old dirs left
    assert TO_TORCH.main([str(dst), str(tmp_path / "back")]) == 0
    assert TO_TORCH.main([str(dst), str(tmp_path / "back"), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path / "back")) == ["config.json", "model.safetensors", "preprocessor_config.json"]


def test_help():
    for name in ("pytorch_to_orbax", "orbax_to_pytorch"):
        proc = cli(name, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout and "--overwrite" in proc.stdout


def _truncated(tmp_path):
    path = save_torch(tiny_torch_model("Data2VecAudioModel"), tmp_path / "hf")
    truncate(os.path.join(path, "model.safetensors"), keep=100)
    return path


@pytest.mark.parametrize("case", ["unknown name", "dst exists", "truncated", "not orbax", "missing src"])
def test_cli_failures_print_one_line(tmp_path, case):
    dst = tmp_path / "dst"
    if case == "unknown name":
        proc = cli("pytorch_to_orbax", "data2vec-audio-bse", dst)
        want = "error: unknown model name 'data2vec-audio-bse'; did you mean data2vec-audio-base"
    elif case == "dst exists":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
        proc = cli("pytorch_to_orbax", tmp_path / "nowhere", dst)
        want = f"error: {dst} already exists; pass --overwrite"
    elif case == "truncated":
        src = _truncated(tmp_path)
        proc, want = cli("pytorch_to_orbax", src, dst), f"error: cannot read {src}/model.safetensors: it is corrupted"
    elif case == "not orbax":
        src = save_torch(tiny_torch_model("Data2VecAudioModel"), tmp_path / "hf")
        proc, want = cli("orbax_to_pytorch", src, dst), f"error: {src} is not a flax_data2vec Orbax checkpoint"
    else:
        proc, want = cli("orbax_to_pytorch", tmp_path / "nowhere", dst), f"error: {tmp_path / 'nowhere'} does not exist"
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert want in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    if case == "dst exists":
        assert os.listdir(dst) == ["keep.txt"]
    else:
        assert not dst.exists()
    assert sorted(os.listdir(tmp_path)) in (["dst"], [], ["hf"])  # no temp dirs, no cache entries


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("pytorch_to_orbax", _truncated(tmp_path), tmp_path / "dst", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
    assert not (tmp_path / "dst").exists()


def test_checkpoint_directory_writes_are_atomic(tmp_path):
    """A failing write leaves neither the destination nor its temp dir; a dead writer's temp dir is cleaned."""
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError), checkpoint.atomic_directory(dst) as tmp:
        Path(tmp, "half").write_text("x")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    os.makedirs(tmp_path / "out.tmp-999999999")  # a dead writer's (old-style name), dead long enough
    long_ago = time.time() - 2 * publish.STALE_AFTER_S
    os.utime(tmp_path / "out.tmp-999999999", (long_ago, long_ago))
    with checkpoint.atomic_directory(dst) as tmp:
        Path(tmp, "whole").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(dst) == ["whole"]
    # killed between moving the old `out` aside and moving the new one in: the old one comes back
    os.replace(dst, tmp_path / "out.old-999999999")
    os.utime(tmp_path / "out.old-999999999", (long_ago, long_ago))
    os.utime(tmp_path / "out.old-999999999" / "whole", (long_ago, long_ago))
    checkpoint.remove_stale_writes(dst)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(dst) == ["whole"]
