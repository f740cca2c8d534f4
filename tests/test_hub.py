"""`flax_data2vec.load`: names, hub cache, local formats, conversion cache, sharding, base <-> head, errors."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import flax_data2vec as fd
from flax_data2vec import checkpoint, hub, publish

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from conftest import AUDIO, TEXT, tiny_torch_model  # noqa: E402,F401  (used by test_convert too)


def save_torch(model, directory, fmt: str = "safetensors") -> str:
    """Write `model` as transformers does: safetensors, sharded safetensors, or a legacy pytorch_model.bin."""
    if fmt == "bin":  # transformers 5 only writes safetensors; old hub checkpoints are pickles
        model.config.architectures = [type(model).__name__]  # as save_pretrained records it
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    else:
        model.save_pretrained(directory, **({"max_shard_size": "20KB"} if fmt == "sharded" else {}))
    return str(directory)


def edit_config(directory, **changes) -> None:
    path = Path(directory) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def truncate(path, keep: int | None = None) -> None:
    """Cut a file short, as an interrupted download does."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2 if keep is None else keep])


def inputs_for(name: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    if name.startswith("Data2VecAudio"):
        return rng.standard_normal((2, 800)).astype(np.float32)
    shape = (2, 2, 7) if name.endswith("MultipleChoice") else (2, 7)
    return rng.integers(3, TEXT["vocab_size"], shape).astype(np.int32)


def main_output(out):
    for field in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, field, None) is not None:
            return np.asarray(getattr(out, field))
    raise AssertionError(f"no output to compare in {type(out).__name__}")


def assert_same_outputs(tmodel, module, params, tol=1e-4):
    x = inputs_for(type(tmodel).__name__)
    with torch.no_grad():
        want = main_output(tmodel(torch.tensor(x)))
    got = main_output(module.apply({"params": params}, x))
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= tol


def cache_entries() -> list[str]:
    """The cache's entries (and temp dirs), not its `.locks` and `.digests` bookkeeping."""
    names = os.listdir(hub.cache_dir()) if os.path.isdir(hub.cache_dir()) else []
    return sorted(n for n in names if not n.startswith("."))


pytestmark = pytest.mark.usefixtures("private_cache")


def run_python(code: str, **env) -> str:
    """Run `code` in a fresh interpreter (own env, own sys.modules); returns stdout, fails on error."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# formats and outputs
@pytest.mark.parametrize("name,fmt", [
    ("Data2VecAudioForCTC", "safetensors"), ("Data2VecAudioModel", "bin"), ("Data2VecAudioForXVector", "sharded"),
    ("Data2VecTextForMaskedLM", "safetensors"), ("Data2VecTextModel", "bin"),
    ("Data2VecTextForSequenceClassification", "sharded")])
def test_load_local_checkpoint_matches_torch(tmp_path, name, fmt):
    tmodel = tiny_torch_model(name)
    module, params = fd.load(save_torch(tmodel, tmp_path / "ckpt", fmt))
    assert type(module).__name__ == name
    assert_same_outputs(tmodel, module, params)
    assert len(cache_entries()) == 1 and checkpoint.is_checkpoint(os.path.join(hub.cache_dir(), cache_entries()[0]))
    _, params2 = fd.load(tmp_path / "ckpt")  # from the cache now
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), params, params2))


def test_dtype_param_dtype_and_scan(tmp_path):
    tmodel = tiny_torch_model("Data2VecAudioModel")
    path = save_torch(tmodel, tmp_path / "ckpt")
    module, params = fd.load(path, dtype=jax.numpy.bfloat16, param_dtype=jax.numpy.bfloat16)
    assert module.dtype == jax.numpy.bfloat16
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jax.numpy.dtype("bfloat16")}
    module, params = fd.load(path, scan_layers=True)
    assert module.scan_layers and "layers" in params["encoder"]["transformer"]
    assert_same_outputs(tmodel, module, params)
    tmodel.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # bfloat16 safetensors: numpy has no such dtype
    _, params = fd.load(tmp_path / "bf16")
    assert np.array_equal(params["masked_spec_embed"], tmodel.masked_spec_embed.detach().float().numpy())


def test_orbax_checkpoint_round_trip(tmp_path):
    tmodel = tiny_torch_model("Data2VecTextForTokenClassification")
    module, params = fd.from_transformers(tmodel)
    fd.save(tmp_path / "orbax", module, params)
    assert sorted(os.listdir(tmp_path)) == ["orbax"]  # no temp dir left
    module2, params2 = fd.load(tmp_path / "orbax")
    assert module2.config == module.config.replace(architectures=("Data2VecTextForTokenClassification",))
    assert_same_outputs(tmodel, module2, params2)
    with pytest.raises(FileExistsError, match="already exists"):
        fd.save(tmp_path / "orbax", module, params)


def test_short_name_from_offline_hub_cache_then_without_torch(tmp_path):
    """facebook/data2vec-audio-base laid out as huggingface_hub caches it; loaded by short name, offline."""
    tmodel = tiny_torch_model("Data2VecAudioModel")
    repo = tmp_path / "hf" / "hub" / "models--facebook--data2vec-audio-base"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    save_torch(tmodel, repo / "snapshots" / commit, "bin")  # the real repo has only pytorch_model.bin
    x = inputs_for("Data2VecAudioModel")
    np.save(tmp_path / "x.npy", x)
    code = f"""
        import sys, numpy as np, flax_data2vec as fd
        module, params = fd.load("data2vec-audio-base")
        out = module.apply({{"params": params}}, np.load({str(tmp_path / "x.npy")!r})).last_hidden_state
        np.save({str(tmp_path / "out.npy")!r}, np.asarray(out))
        try:
            fd.load("data2vec-audio-large")  # not in the offline cache
        except FileNotFoundError as e:
            assert "cannot get hub repo facebook/data2vec-audio-large: HF_HUB_OFFLINE is set" in str(e), e
        print(type(module).__name__, "torch" in sys.modules)
    """
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    assert run_python(code, **env).split() == ["Data2VecAudioModel", "True"]  # first load converts the .bin
    with torch.no_grad():
        want = tmodel(torch.tensor(x)).last_hidden_state.numpy()
    assert np.max(np.abs(np.load(tmp_path / "out.npy") - want)) <= 1e-4
    (entry,) = cache_entries()
    assert entry.startswith("data2vec-audio-base--Data2VecAudioModel-")
    assert commit in checkpoint.read_metadata(os.path.join(hub.cache_dir(), entry))["source"]
    assert run_python(code, **env).split() == ["Data2VecAudioModel", "False"]  # second load: cache, no torch
    assert np.max(np.abs(np.load(tmp_path / "out.npy") - want)) <= 1e-4


def test_sharded_load_on_four_cpu_devices(tmp_path):
    tmodel = tiny_torch_model("Data2VecAudioForCTC")
    path = save_torch(tmodel, tmp_path / "ckpt")
    x = inputs_for("Data2VecAudioForCTC")
    with torch.no_grad():
        np.save(tmp_path / "want.npy", tmodel(torch.tensor(x)).logits.numpy())
    np.save(tmp_path / "x.npy", x)
    code = f"""
        import sys, jax, numpy as np, flax_data2vec as fd
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        assert jax.device_count() == 4, jax.devices()
        mesh = Mesh(np.array(jax.devices()), ("model",))
        def by_shape(path, shape):  # split the output axis of Dense kernels where it divides, replicate the rest
            split = path[-1] == "kernel" and len(shape) == 2 and shape[1] % 4 == 0
            return NamedSharding(mesh, P(None, "model") if split else P())
        module, params = fd.load({path!r}, sharding=by_shape)
        q = params["data2vec_audio"]["encoder"]["transformer"]["layers_0"]["attention"]["query"]["kernel"]
        assert q.sharding == NamedSharding(mesh, P(None, "model")), q.sharding
        assert len(q.addressable_shards) == 4 and q.addressable_shards[0].data.shape == (32, 8)
        assert params["lm_head"]["bias"].sharding == NamedSharding(mesh, P())
        out = jax.jit(module.apply)({{"params": params}}, np.load({str(tmp_path / "x.npy")!r}))
        assert np.max(np.abs(np.asarray(out.logits) - np.load({str(tmp_path / "want.npy")!r}))) <= 1e-4
        replicated = NamedSharding(mesh, P())
        module, params = fd.load({path!r}, sharding=replicated, architecture="Data2VecAudioForSequenceClassification")
        assert all(x.sharding == replicated for x in jax.tree_util.tree_leaves(params))
        assert "torch" not in sys.modules  # safetensors need no torch, even on the first load
        print("ok")
    """
    assert run_python(code, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu") == "ok\n"


# ---------------------------------------------------------------------------------------------------------------
# base <-> head
def test_base_checkpoint_into_head_initialises_and_lists_the_head(tmp_path):
    tmodel = tiny_torch_model("Data2VecAudioModel")
    path = save_torch(tmodel, tmp_path / "ckpt")
    with pytest.warns(UserWarning, match=r"newly initialised: lm_head.bias, lm_head.weight") as record:
        module, params = fd.load(path, architecture="Data2VecAudioForCTC", rng=1)
    assert "Data2VecAudioForCTC: 2 parameters" in str(record[0].message)
    base = tmodel(torch.tensor(inputs_for("Data2VecAudioModel"))).last_hidden_state.detach().numpy()
    out = module.apply({"params": params}, inputs_for("Data2VecAudioModel"), output_hidden_states=True)
    assert np.max(np.abs(np.asarray(out.hidden_states[-1]) - base)) <= 1e-4
    with pytest.warns(UserWarning):  # the cache holds the conversion; the head is re-drawn from rng
        _, again = fd.load(path, architecture="Data2VecAudioForCTC", rng=1)
    with pytest.warns(UserWarning):
        _, other = fd.load(path, architecture="Data2VecAudioForCTC", rng=2)
    assert np.array_equal(again["lm_head"]["kernel"], params["lm_head"]["kernel"])
    assert not np.array_equal(other["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_head_checkpoint_into_base_drops_and_lists_the_head(tmp_path):
    tmodel = tiny_torch_model("Data2VecTextForMaskedLM")  # keys carry the data2vec_text. prefix
    path = save_torch(tmodel, tmp_path / "ckpt")
    with pytest.warns(UserWarning) as record:
        module, params = fd.load(path, architecture="Data2VecTextModel")
    messages = [str(r.message) for r in record]
    assert any("dropped 5 entries" in m and "lm_head.bias, lm_head.dense.bias" in m for m in messages), messages
    assert any("newly initialised: pooler.dense.bias, pooler.dense.weight" in m for m in messages), messages
    ids = inputs_for("Data2VecTextModel")
    want = tmodel.data2vec_text(torch.tensor(ids)).last_hidden_state.detach().numpy()
    got = np.asarray(module.apply({"params": params}, ids).last_hidden_state)
    assert np.max(np.abs(got - want)) <= 1e-4


def test_text_base_config_with_masked_lm_weights(tmp_path):
    """data2vec-text-base: config says Data2VecTextModel, weights are those of the masked LM (prefixed)."""
    path = save_torch(tiny_torch_model("Data2VecTextForMaskedLM"), tmp_path / "ckpt")
    edit_config(path, architectures=["Data2VecTextModel"])
    with pytest.warns(UserWarning, match="dropped"):
        module, _ = fd.load(path, add_pooling_layer=False)
    assert type(module).__name__ == "Data2VecTextModel" and not module.add_pooling_layer


def test_orbax_checkpoint_loaded_as_another_class(tmp_path):
    tmodel = tiny_torch_model("Data2VecAudioForCTC")
    module, params = fd.from_transformers(tmodel)
    fd.save(tmp_path / "orbax", module, params)
    with pytest.warns(UserWarning, match="dropped 2 entries .*lm_head/bias, lm_head/kernel"):
        _, base_params = fd.load(tmp_path / "orbax", architecture="Data2VecAudioModel")
    assert jax.tree_util.tree_structure(base_params) == jax.tree_util.tree_structure(params["data2vec_audio"])


# ---------------------------------------------------------------------------------------------------------------
# errors: clear message, nothing left behind
def assert_nothing_cached():
    assert not any(checkpoint.is_checkpoint(os.path.join(hub.cache_dir(), e)) or ".tmp-" in e for e in cache_entries())


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match="unknown model name 'data2vec-audio-bse'; did you mean data2vec-audio-base"):
        fd.load("data2vec-audio-bse")
    with pytest.raises(ValueError, match="did you mean Data2VecAudioForCTC"):
        hub.choose_architecture({"model_type": "data2vec-audio"}, "Data2VecAudioForCtc", "x")
    with pytest.raises(ValueError, match="model_type 'data2vec-audio', but Data2VecTextModel needs 'data2vec-text'"):
        hub.choose_architecture({"model_type": "data2vec-audio"}, "Data2VecTextModel", "x")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at"):
        fd.load("./does/not/exist")
    assert_nothing_cached()


def test_missing_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        fd.load(tmp_path / "empty")
    path = save_torch(tiny_torch_model("Data2VecAudioModel"), tmp_path / "ckpt", "sharded")
    shard = sorted(f for f in os.listdir(path) if f.startswith("model-"))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=f"names shards that are missing: {shard}"):
        fd.load(path)
    for f in os.listdir(path):
        if f != "config.json":
            os.remove(os.path.join(path, f))
    with pytest.raises(FileNotFoundError, match="no weights: looked for model.safetensors, "):
        fd.load(path)
    assert_nothing_cached()


@pytest.mark.parametrize("fmt,file", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_truncated_weight_file(tmp_path, fmt, file):
    path = save_torch(tiny_torch_model("Data2VecAudioModel"), tmp_path / "ckpt", fmt)
    truncate(os.path.join(path, file))
    want = f"cannot read {os.path.join(path, file)}: it is corrupted or truncated"
    with pytest.raises(hub.CheckpointError, match=want):
        fd.load(path)
    assert_nothing_cached()


@pytest.mark.parametrize("change,message", [
    ({"intermediate_size": 40}, (r"does not fit its config: shape mismatch for encoder.layers.0.feed_forward."
                                 r"intermediate_dense.bias: checkpoint has \(37,\), the config expects \(40,\)")),
    ({"num_hidden_layers": 1}, r"entries are unexpected: encoder.layers.1.attention.k_proj.bias"),
    ({"num_hidden_layers": 3}, r"parameters of Data2VecAudioModel are missing: encoder.layers.2.attention.k_proj.bias"),
])
def test_config_that_does_not_fit_the_weights(tmp_path, change, message):
    path = save_torch(tiny_torch_model("Data2VecAudioModel"), tmp_path / "ckpt")
    edit_config(path, **change)
    with pytest.raises(hub.CheckpointError, match=message):
        fd.load(path)
    assert_nothing_cached()


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    import safetensors.numpy
    path = save_torch(tiny_torch_model("Data2VecAudioForCTC"), tmp_path / "ckpt")
    weights = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    weights.pop("data2vec_audio.encoder.layer_norm.weight")
    weights["data2vec_audio.encoder.extra.weight"] = np.zeros(3, np.float32)
    safetensors.numpy.save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hub.CheckpointError, match=r"1 parameters of Data2VecAudioForCTC are missing: "
                       r"data2vec_audio.encoder.layer_norm.weight; 1 entries are unexpected: "
                       r"data2vec_audio.encoder.extra.weight"):
        fd.load(path)
    assert_nothing_cached()


def test_interrupted_conversion_leaves_nothing_usable(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    tmodel = tiny_torch_model("Data2VecAudioModel")
    path = save_torch(tmodel, tmp_path / "ckpt")

    def crash(self):
        raise RuntimeError("disk full")
    with monkeypatch.context() as m:
        m.setattr(ocp.StandardCheckpointer, "wait_until_finished", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            fd.load(path)
    assert cache_entries() == []  # the temp dir is gone, no entry
    fd.load(path)
    (entry,) = cache_entries()
    entry = os.path.join(hub.cache_dir(), entry)
    # a writer killed outright long ago leaves <entry>.tmp-<token>; an entry without its marker is not complete
    dead = entry + ".tmp-otherhost-4242-0badc0de"
    os.makedirs(dead + "/params")
    long_ago = time.time() - 2 * publish.STALE_AFTER_S
    for p in (dead + "/params", dead):
        os.utime(p, (long_ago, long_ago))
    os.remove(os.path.join(entry, checkpoint.MARKER))
    module, params = fd.load(path)
    assert_same_outputs(tmodel, module, params)
    assert cache_entries() == [os.path.basename(entry)] and checkpoint.is_checkpoint(entry)


def test_incomplete_orbax_checkpoint_is_refused(tmp_path):
    module, params = fd.from_transformers(tiny_torch_model("Data2VecAudioModel"))
    fd.save(tmp_path / "orbax", module, params)
    os.remove(tmp_path / "orbax" / checkpoint.MARKER)
    with pytest.raises(FileNotFoundError, match="incomplete flax_data2vec checkpoint"):
        fd.load(tmp_path / "orbax")
