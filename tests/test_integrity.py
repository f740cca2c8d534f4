"""Nothing served wrong, nothing poisoned: publishing under races, checksums, refused inputs, one-line messages."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from test_hub import ROOT, assert_same_outputs, cache_entries, edit_config, save_torch, tiny_torch_model

import flax_data2vec as fd
from flax_data2vec import checkpoint, hub, integrity
from flax_data2vec.config import Data2VecAudioConfig, Data2VecTextConfig

pytestmark = pytest.mark.usefixtures("private_cache")




def assert_nothing_published():
    """No cache entry that reads as a checkpoint, and no temp dir left."""
    for name in cache_entries():
        path = os.path.join(hub.cache_dir(), name)
        assert ".tmp-" not in name and not checkpoint.is_checkpoint(path), name


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message.strip(), message
    return message


def flip_byte(path, offset: int | None = None) -> None:
    data = bytearray(Path(path).read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x10
    Path(path).write_bytes(bytes(data))


def biggest_file(directory) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


# ---------------------------------------------------------------------------------------------------------------
# checksums, cache key
@pytest.fixture()
def orbax_ckpt(tmp_path, audio_model):
    module, params = fd.from_transformers(audio_model)
    return fd.save(tmp_path / "orbax", module, params), module, params


def test_marker_lists_every_file_with_its_checksum(orbax_ckpt):
    path, _, _ = orbax_ckpt
    info = checkpoint.read_metadata(path)
    on_disk = {os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs}
    assert set(info["files"]) == on_disk - {checkpoint.MARKER} and "config.json" in info["files"]


def test_bit_flip_in_orbax_array_file_is_refused(orbax_ckpt):
    path, _, _ = orbax_ckpt
    victim = biggest_file(os.path.join(path, "params"))
    flip_byte(victim)
    with pytest.raises(hub.CheckpointError) as e:
        fd.load(path)
    assert f"{victim} fails its checksum" in one_line(e)
    with pytest.raises(hub.CheckpointError, match="fails its checksum"):
        hub.convert_to_transformers(path, os.path.join(os.path.dirname(path), "hf"))
    assert not os.path.exists(os.path.join(os.path.dirname(path), "hf"))


def test_bit_flip_in_a_cache_entry_is_converted_again(tmp_path, audio_model):
    src = save_torch(audio_model, tmp_path / "ckpt")
    fd.load(src)
    (entry,) = cache_entries()
    flip_byte(biggest_file(os.path.join(hub.cache_dir(), entry, "params")))
    with pytest.warns(UserWarning, match="failed its check and is converted again"):
        module, params = fd.load(src)
    assert_same_outputs(audio_model, module, params)
    checkpoint.check_files(os.path.join(hub.cache_dir(), entry))


def test_bit_flip_in_written_safetensors_is_refused(orbax_ckpt, tmp_path):
    path, _, _ = orbax_ckpt
    hf = hub.convert_to_transformers(path, tmp_path / "hf")
    weights = os.path.join(hf, "model.safetensors")
    flip_byte(weights, os.path.getsize(weights) - 100)  # inside the last tensor's data
    with pytest.raises(hub.CheckpointError) as e:
        fd.load(hf)
    assert f"{weights} fails its checksum" in one_line(e)
    assert_nothing_published()


def test_bit_flip_in_a_hub_cache_blob_is_refused(tmp_path):
    """huggingface_hub stores LFS weights as blobs/<sha256>, the snapshot file a symlink to it."""
    data = os.urandom(4096)
    blob = tmp_path / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(data)
    (tmp_path / "snapshot").mkdir()
    link = tmp_path / "snapshot" / "model.safetensors"
    link.symlink_to(blob)
    integrity.check_hub_blob(str(link))
    flip_byte(blob)
    with pytest.raises(hub.CheckpointError, match=f"{link} fails its checksum .*delete it and fetch it again"):
        integrity.check_hub_blob(str(link))


def test_same_size_same_mtime_replacement_is_not_served_stale(tmp_path, audio_model):
    src = save_torch(audio_model, tmp_path / "ckpt")
    other_model = tiny_torch_model("Data2VecAudioModel", seed=1)
    other = save_torch(other_model, tmp_path / "other")
    fd.load(src)
    weights = os.path.join(src, "model.safetensors")
    before = os.stat(weights)
    assert os.path.getsize(os.path.join(other, "model.safetensors")) == before.st_size
    shutil.copy2(os.path.join(other, "model.safetensors"), weights)  # cp -p: content new, size and mtime as before
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(weights).st_mtime_ns == before.st_mtime_ns and os.stat(weights).st_size == before.st_size
    module, params = fd.load(src)
    assert_same_outputs(other_model, module, params)


def test_non_finite_weights_refused_at_conversion_and_load(tmp_path, audio_model, monkeypatch):
    src = save_torch(audio_model, tmp_path / "ckpt")
    weights = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
    weights["encoder.layers.0.attention.q_proj.weight"][0, :16] = np.nan
    safetensors.numpy.save_file(weights, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hub.CheckpointError) as e:
        fd.load(src)
    assert "parameter encoder.layers.0.attention.q_proj.weight holds 16 non-finite values" in one_line(e)
    assert_nothing_published()
    module, params = fd.from_transformers(audio_model)
    params["encoder"]["layer_norm"]["scale"] = params["encoder"]["layer_norm"]["scale"].at[3].set(jnp.inf)
    with pytest.raises(hub.CheckpointError, match="parameter encoder/layer_norm/scale holds 1 non-finite"):
        fd.save(tmp_path / "nan", module, params)
    assert not (tmp_path / "nan").exists()
    monkeypatch.setattr(checkpoint, "check_finite_params", lambda *a: None)  # written by a version without the check
    fd.save(tmp_path / "nan", module, params)
    monkeypatch.undo()
    with pytest.raises(hub.CheckpointError, match="parameter encoder/layer_norm/scale holds 1 non-finite"):
        fd.load(tmp_path / "nan")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "orbax_to_pytorch.py"), tmp_path / "nan",
                           tmp_path / "nan-hf"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "non-finite" in proc.stderr and not (tmp_path / "nan-hf").exists()


# ---------------------------------------------------------------------------------------------------------------
# refused inputs
@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd"])
def test_shard_paths_are_confined_to_the_checkpoint(tmp_path, audio_model, name):
    src = save_torch(audio_model, tmp_path / "ckpt", "sharded")
    index = os.path.join(src, "model.safetensors.index.json")
    data = json.loads(Path(index).read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = name
    Path(index).write_text(json.dumps(data))
    with pytest.raises(hub.CheckpointError) as e:
        fd.load(src)
    assert f"shard name {name!r}" in one_line(e) and index in str(e.value)
    assert_nothing_published()


def test_small_bin_that_expands_hugely_is_refused_before_reading(tmp_path, audio_model):
    src = save_torch(audio_model, tmp_path / "ckpt", "bin")
    path = os.path.join(src, "pytorch_model.bin")
    with zipfile.ZipFile(path) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for info, data in members:
            z.writestr(info.filename, data)
        with z.open("pytorch_model/data/huge", "w") as f:  # 96 MiB of zeros deflate to about 100 kB
            for _ in range(96):
                f.write(bytes(2**20))
    assert os.path.getsize(path) < 2**20
    with pytest.raises(hub.CheckpointError) as e:
        fd.load(src)
    assert f"cannot read {path}: it holds 9" in one_line(e) and "MiB the config's parameters can need" in str(e.value)
    assert_nothing_published()


def test_refused_pickle_names_the_call_and_runs_nothing(tmp_path, audio_model):
    src = save_torch(audio_model, tmp_path / "ckpt", "bin")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"x": Evil()}, os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(hub.CheckpointError) as e:
        fd.load(src)
    message = one_line(e)
    assert "refused: this file's pickle calls `posix.system`, which is not allowed" in message, message
    assert "weights_only" not in message and "corrupted" not in message
    assert not marker.exists()
    assert_nothing_published()


@pytest.mark.parametrize("content,want", [
    (3, "it holds an int, expected a state dict"), ([torch.zeros(2)], "it holds a list, expected a state dict"),
    ({"a": {"b": torch.zeros(2)}}, "entry 'a' is a dict, expected a tensor")])
def test_bin_holding_no_state_dict(tmp_path, audio_model, content, want):
    src = save_torch(audio_model, tmp_path / "ckpt", "bin")
    torch.save(content, os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(hub.CheckpointError) as e:
        fd.load(src)
    assert f"cannot read {os.path.join(src, 'pytorch_model.bin')}: {want}" in one_line(e)
    assert_nothing_published()


def test_two_d_tensor_where_one_d_is_declared(tmp_path, audio_model):
    src = save_torch(audio_model, tmp_path / "ckpt")
    weights = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
    weights["encoder.layer_norm.bias"] = weights["encoder.layer_norm.bias"][None]
    weights["feature_extractor.conv_layers.1.conv.weight"] = weights["feature_extractor.conv_layers.1.conv.weight"][0]
    safetensors.numpy.save_file(weights, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hub.CheckpointError) as e:
        fd.load(src)
    assert "shape mismatch for" in one_line(e) and "the config expects" in str(e.value)
    assert_nothing_published()


# ---------------------------------------------------------------------------------------------------------------
# damaged Orbax checkpoints
@pytest.mark.parametrize("damage,want", [
    ("array file", "is missing: flax_data2vec.json lists it"), ("manifest", "manifest.ocdbt is missing"),
    ("config", "config.json is missing: flax_data2vec.json lists it"),
    ("marker json", "flax_data2vec.json: not valid JSON"), ("architecture", "architecture 'Data2VecFoo' is not one"),
    ("marker list", "holds a JSON list, expected an object")])
def test_damaged_orbax_checkpoint_is_named(orbax_ckpt, damage, want):
    path, _, _ = orbax_ckpt
    marker = os.path.join(path, checkpoint.MARKER)
    info = json.loads(Path(marker).read_text())
    if damage == "array file":
        os.remove(biggest_file(os.path.join(path, "params")))
    elif damage == "manifest":
        os.remove(os.path.join(path, "params", "manifest.ocdbt"))
    elif damage == "config":
        os.remove(os.path.join(path, "config.json"))
    elif damage == "marker json":
        Path(marker).write_text("{not json")
    elif damage == "architecture":
        Path(marker).write_text(json.dumps({**info, "architecture": "Data2VecFoo"}))
    else:
        Path(marker).write_text("[1, 2]")
    with pytest.raises((hub.CheckpointError, FileNotFoundError)) as e:
        fd.load(path)
    assert want in one_line(e) and path in str(e.value)


def test_version_1_checkpoint_loads_with_a_warning(orbax_ckpt):
    path, module, params = orbax_ckpt
    marker = os.path.join(path, checkpoint.MARKER)
    info = json.loads(Path(marker).read_text())
    Path(marker).write_text(json.dumps({**{k: v for k, v in info.items() if k != "files"}, "format_version": 1}))
    with pytest.warns(UserWarning, match="format_version 1.*no checksums"):
        _, loaded = fd.load(path)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), loaded, params))


# ---------------------------------------------------------------------------------------------------------------
# configs
@pytest.mark.parametrize("change,want", [
    ({"num_hidden_layers": "2"}, "num_hidden_layers must be an integer, got '2' (str)"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer, got 2.5 (float)"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer <= 1048576, got 0"),
    ({"num_attention_heads": 5}, "hidden_size (32) must be divisible by num_attention_heads (5)"),
    ({"conv_stride": [5, 0, 2]}, "conv_stride[1] must be a positive integer <= 1048576, got 0"),
    ({"conv_kernel": [10, -3, 3]}, "conv_kernel[1] must be a positive integer <= 1048576, got -3"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps must be a finite number, got nan (float)"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps must be a finite positive number, got 0.0"),
    ({"vocab_size": 10**12}, "vocab_size must be a positive integer <= 16777216, got 1000000000000"),
    ({"hidden_dropout": 1.5}, "hidden_dropout must lie in [0, 1], got 1.5"),
    ({"conv_bias": "no"}, "conv_bias must be true or false, got 'no' (str)"),
])
def test_bad_config_field_is_named_with_the_file(tmp_path, audio_model, change, want):
    src = save_torch(audio_model, tmp_path / "ckpt")
    edit_config(src, **change)
    with pytest.raises(hub.CheckpointError) as e:
        fd.load(src)
    assert one_line(e) == f"{os.path.join(src, 'config.json')}: {want}"
    assert_nothing_published()


def test_config_json_that_is_a_list(tmp_path, audio_model):
    src = save_torch(audio_model, tmp_path / "ckpt")
    Path(src, "config.json").write_text("[1, 2]")
    with pytest.raises(hub.CheckpointError, match=r"config.json holds a JSON list, expected an object"):
        fd.load(src)
    with pytest.raises(TypeError, match="config.json: a config must be a JSON object"):
        Data2VecTextConfig.from_pretrained(src)
    with pytest.raises(ValueError, match="id2label keys must be integer class ids, got 'x'"):
        Data2VecAudioConfig.from_dict({"id2label": {"x": "a"}})


# ---------------------------------------------------------------------------------------------------------------
# labels: eager, and under jit with fd.checked
def test_ctc_labels_padded_with_minus_one_are_an_error_eager_and_jitted():
    module, params = fd.from_transformers(tiny_torch_model("Data2VecAudioForCTC", num_hidden_layers=1))
    x = np.random.default_rng(0).standard_normal((2, 800)).astype(np.float32)
    good = np.array([[1, 2, 3, -100], [4, 5, -100, -100]])
    bad = np.where(good == -100, -1, good)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 12\) or be -100, got -1"):
        module.apply({"params": params}, x, labels=bad)
    loss = fd.checked(lambda p, x, y: module.apply({"params": p}, x, labels=y).loss)
    assert np.isfinite(loss(params, x, good))
    with pytest.raises(Exception, match=r"labels must lie in \[0, 12\) or be -100, got -1"):
        loss(params, x, bad)  # same shapes: the compiled check runs, no second compile


def test_token_ids_and_class_labels_checked_under_jit():
    module, params = fd.from_transformers(tiny_torch_model("Data2VecTextForSequenceClassification",
                                                           num_hidden_layers=1))  # no eager init: it is slow
    ids = np.full((2, 5), 7, np.int32)
    logits = fd.checked(lambda p, i, y: module.apply({"params": p}, i, labels=y).loss)
    logits(params, ids, np.array([0, 2]))
    bad_ids = ids.copy()
    bad_ids[1, 2] = 120
    with pytest.raises(Exception, match=r"input_ids must lie in \[0, 99\), got 120"):
        logits(params, bad_ids, np.array([0, 2]))
    with pytest.raises(Exception, match=r"labels must lie in \[0, 3\) or be -100, got 3"):
        logits(params, ids, np.array([0, 3]))


# ---------------------------------------------------------------------------------------------------------------
# interrupted training runs
def test_load_of_an_interrupted_training_run_reads_its_latest_checkpoint(tmp_path, audio_model):
    from flax_data2vec.train.checkpointing import TrainCheckpointer
    from flax_data2vec.train.optim import TrainState
    module, params = fd.from_transformers(audio_model, scan_layers=True)
    identity = {"task": "pretrain-audio", "config": module.config.to_dict()}  # no architecture: the base class
    checkpointer = TrainCheckpointer(str(tmp_path / "run"), async_save=False)
    for step, saved in ((10, jax.tree_util.tree_map(jnp.zeros_like, params)), (20, params)):
        state = TrainState(step=jnp.int32(step), params={**saved, "regression_head": {"kernel": jnp.ones((2, 2))}},
                           opt_state=(), rng=jax.random.PRNGKey(0))
        checkpointer.save(step, state, {"identity": identity, "step": step})
    checkpointer.close()
    with pytest.warns(UserWarning, match=r"has no final model yet .* latest training checkpoint, .*checkpoints/20"):
        loaded, loaded_params = fd.load(tmp_path / "run")
    assert type(loaded).__name__ == "Data2VecAudioModel"
    assert_same_outputs(audio_model, loaded, loaded_params)
