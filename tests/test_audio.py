"""Audio models against transformers' PyTorch Data2VecAudio* classes (float32, max abs diff <= 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_close  # noqa: E402

import flax_data2vec as fd
from flax_data2vec.audio import conv_output_lengths
from flax_data2vec.weights import audio_weight_table, scan_params, to_state_dict

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embedding_groups=4,
             conv_pos_kernel_size=5, num_conv_pos_embeddings=3, vocab_size=12, classifier_proj_size=10,
             tdnn_dim=(8, 8, 12), tdnn_kernel=(3, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=6,
             num_labels=3)
CLASSES = ["Data2VecAudioModel", "Data2VecAudioForCTC", "Data2VecAudioForSequenceClassification",
           "Data2VecAudioForAudioFrameClassification", "Data2VecAudioForXVector"]


def build(name, seed=0, **overrides):
    """A random-init transformers model and the flax module + params converted from it."""
    kwargs = {**SMALL, **overrides}
    torch.manual_seed(seed)
    tcfg = transformers.Data2VecAudioConfig(**kwargs)
    tcfg._attn_implementation = "eager"
    tmodel = getattr(transformers, name)(tcfg).eval()
    # random non-trivial values for params that init to constants
    with torch.no_grad():
        for n, p in tmodel.named_parameters():
            if "layer_norm" in n or n.endswith("bias") or "layer_weights" in n:
                p.add_(torch.randn_like(p) * 0.1)
    module, params = fd.from_transformers(tmodel)
    return tmodel, module, params


def audio_batch(batch=3, samples=1203, seed=0, pad=(0, 150, 407)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, samples)).astype(np.float32)
    mask = np.ones((batch, samples), np.int64)
    for i, p in enumerate(pad[:batch]):
        if p:
            mask[i, -p:] = 0
            x[i, -p:] = 0.0
    return x, mask


def run_both(name, tmodel, module, params, x, mask, labels=None, **kw):
    targs = dict(attention_mask=None if mask is None else torch.tensor(mask), output_hidden_states=True,
                 output_attentions=True)
    if labels is not None:
        targs["labels"] = torch.tensor(labels)
    with torch.no_grad():
        tout = tmodel(torch.tensor(x), **targs)
    jout = module.apply({"params": params}, jnp.asarray(x), None if mask is None else jnp.asarray(mask),
                        **({} if labels is None else {"labels": jnp.asarray(labels)}),
                        output_hidden_states=True, output_attentions=True, **kw)
    return tout, jout


def compare(tout, jout, fields):
    for f in fields:
        t, j = getattr(tout, f), getattr(jout, f)
        if t is None:
            assert j is None, f
            continue
        if isinstance(t, tuple):
            assert len(t) == len(j), f
            for i, (a, b) in enumerate(zip(t, j)):
                assert_close(f"{f}[{i}]", a.numpy(), b)
        else:
            assert_close(f, t.numpy(), j)


def labels_for(name, tmodel, x, mask, rng):
    n = x.shape[0]
    if name == "Data2VecAudioForCTC":
        lab = rng.integers(1, SMALL["vocab_size"], (n, 5))
        lab[1, 3:] = -100
        return lab
    if name in ("Data2VecAudioForSequenceClassification", "Data2VecAudioForXVector"):
        return rng.integers(0, SMALL["num_labels"], (n,))
    if name == "Data2VecAudioForAudioFrameClassification":
        frames = int(tmodel._get_feat_extract_output_lengths(x.shape[1]))
        return np.eye(SMALL["num_labels"], dtype=np.int64)[rng.integers(0, SMALL["num_labels"], (n, frames))]
    return None


FIELDS = {"Data2VecAudioModel": ("last_hidden_state", "extract_features", "hidden_states", "attentions"),
          "Data2VecAudioForXVector": ("logits", "embeddings", "loss", "hidden_states", "attentions")}


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("variant", ["default", "conv_bias_weighted", "no_mask"])
def test_parity(name, variant):
    overrides = {}
    if variant == "conv_bias_weighted":
        overrides = dict(conv_bias=True, use_weighted_layer_sum=True, mask_time_prob=0.0)
    tmodel, module, params = build(name, **overrides)
    x, mask = audio_batch(samples=1203 if variant != "no_mask" else 999)
    if variant == "no_mask":
        mask = None
    labels = labels_for(name, tmodel, x, mask if mask is not None else np.ones_like(x), np.random.default_rng(1))
    tout, jout = run_both(name, tmodel, module, params, x, mask, labels)
    compare(tout, jout, FIELDS.get(name, ("logits", "loss", "hidden_states", "attentions")))


@pytest.mark.parametrize("reduction,zero_inf", [("sum", False), ("mean", True)])
def test_ctc_adapter_and_loss_options(reduction, zero_inf):
    tmodel, module, params = build("Data2VecAudioForCTC", add_adapter=True, output_hidden_size=24,
                                   num_adapter_layers=2, ctc_loss_reduction=reduction, ctc_zero_infinity=zero_inf)
    x, mask = audio_batch(samples=4001, pad=(0, 500, 1700))
    labels = np.random.default_rng(3).integers(1, SMALL["vocab_size"], (3, 4))
    tout, jout = run_both("ctc", tmodel, module, params, x, mask, labels)
    compare(tout, jout, ("logits", "loss"))


def test_ctc_impossible_alignment_is_infinite_or_zero():
    for zero_inf in (False, True):
        tmodel, module, params = build("Data2VecAudioForCTC", ctc_zero_infinity=zero_inf)
        x, mask = audio_batch(samples=1203)
        labels = np.random.default_rng(3).integers(1, SMALL["vocab_size"], (3, 45))
        labels[2, :] = np.arange(45) % 3 + 1  # row 2 has 38 frames: too few for 45 labels
        labels[:2, 10:] = -100
        tout, jout = run_both("ctc", tmodel, module, params, x, mask, labels)
        if zero_inf:
            assert np.isfinite(float(jout.loss))
            np.testing.assert_allclose(float(tout.loss), float(jout.loss), rtol=1e-6)
        else:
            assert np.isinf(float(tout.loss)) and np.isinf(float(jout.loss))


def test_ctc_gradient_parity():
    tmodel, module, params = build("Data2VecAudioForCTC", ctc_loss_reduction="mean")
    x, mask = audio_batch()
    labels = np.random.default_rng(5).integers(1, SMALL["vocab_size"], (3, 5))
    tout = tmodel(torch.tensor(x), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    tout.loss.backward()
    tgrads = {n: p.grad.numpy() for n, p in tmodel.named_parameters() if p.grad is not None}

    def loss_fn(p):
        return module.apply({"params": p}, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(labels)).loss

    grads = to_state_dict(jax.grad(loss_fn)(params), audio_weight_table("Data2VecAudioForCTC"))
    for n, g in tgrads.items():
        assert_close(f"grad {n}", g, grads[n])


def test_state_dict_round_trip_is_bit_exact_and_strict():
    for name in CLASSES:
        tmodel, module, params = build(name, use_weighted_layer_sum=True)
        sd = fd.to_transformers_state_dict(module, params)
        ref = {k: v.numpy() for k, v in tmodel.state_dict().items()}
        assert set(sd) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)
        tmodel.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)


def test_scan_and_remat_match_unrolled():
    tmodel, module, params = build("Data2VecAudioForCTC")
    x, mask = audio_batch()
    ref = module.apply({"params": params}, x, mask, output_hidden_states=True)
    scanned = module.clone(scan_layers=True, remat=True)
    out = scanned.apply({"params": scan_params(params)}, x, mask, output_hidden_states=True)
    assert_close("logits", ref.logits, out.logits)
    for a, b in zip(ref.hidden_states, out.hidden_states):
        assert_close("hidden", a, b)
    init = scanned.init(jax.random.PRNGKey(0), x, mask)["params"]
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(scan_params(params))


def test_mask_time_indices_given():
    tmodel, module, params = build("Data2VecAudioModel")
    x, mask = audio_batch()
    frames = int(tmodel._get_feat_extract_output_lengths(x.shape[1]))
    mti = np.random.default_rng(0).random((3, frames)) < 0.3
    with torch.no_grad():
        tout = tmodel(torch.tensor(x), attention_mask=torch.tensor(mask), mask_time_indices=torch.tensor(mti))
    jout = module.apply({"params": params}, x, mask, jnp.asarray(mti))
    assert_close("masked", tout.last_hidden_state.numpy(), jout.last_hidden_state)


def test_training_mode_is_stochastic_and_jits():
    _, module, params = build("Data2VecAudioForCTC", mask_time_prob=0.3, mask_feature_prob=0.2)
    x, mask = audio_batch()
    f = jax.jit(lambda p, r: module.apply({"params": p}, x, mask, deterministic=False, rngs={"dropout": r}).logits)
    a, b = f(params, jax.random.PRNGKey(0)), f(params, jax.random.PRNGKey(1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, f(params, jax.random.PRNGKey(0)))


def test_spec_augment_mask_counts():
    from flax_data2vec.audio import spec_augment_mask
    lengths = jnp.array([100, 60])
    m = spec_augment_mask(jax.random.PRNGKey(0), (2, 100), 0.2, 5, 2, lengths)
    assert m.shape == (2, 100)
    assert not bool(m[1, 60:].any())
    assert int(m[0].sum()) >= 10


def test_bf16_forward_close_to_float32():
    _, module, params = build("Data2VecAudioModel")
    x, mask = audio_batch()
    ref = module.apply({"params": params}, x, mask).last_hidden_state
    out = module.clone(dtype=jnp.bfloat16).apply({"params": params}, x, mask).last_hidden_state
    assert out.dtype == jnp.bfloat16
    # post-LN outputs are O(1); bf16 has an 8-bit mantissa
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1


@pytest.mark.parametrize("bad,err,msg", [
    (np.zeros((3, 1000), np.int32), TypeError, "float"),
    (np.zeros((1000,), np.float32), ValueError, "batch, samples"),
    (np.zeros((2, 30), np.float32), ValueError, "receptive field"),
])
def test_bad_audio_input(bad, err, msg):
    _, module, params = build("Data2VecAudioModel")
    with pytest.raises(err, match=msg):
        module.apply({"params": params}, bad)


def test_bad_labels():
    _, module, params = build("Data2VecAudioForCTC")
    x, mask = audio_batch()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 12\) or be -100, got 12"):
        module.apply({"params": params}, x, mask, np.full((3, 4), 12))
    with pytest.raises(ValueError, match="labels must have shape"):
        module.apply({"params": params}, x, mask, np.full((3,), 1))
    _, module, params = build("Data2VecAudioForSequenceClassification")
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        module.apply({"params": params}, x, mask, np.zeros((3, 2), np.int32))


@pytest.mark.parametrize("name", CLASSES)
def test_every_class_jits(name):
    _, module, params = build(name)
    x, mask = audio_batch()
    eager = module.apply({"params": params}, x, mask)
    jitted = jax.jit(lambda p, a, m: module.apply({"params": p}, a, m))(params, x, mask)
    field = "logits" if name != "Data2VecAudioModel" else "last_hidden_state"
    assert_close("jit", getattr(eager, field), getattr(jitted, field))


def test_feature_encoder_freezing():
    """The module switch stops gradients at the CNN; the optax mask keeps its params fixed."""
    import optax
    _, module, params = build("Data2VecAudioForCTC")
    x, mask = audio_batch()
    labels = np.random.default_rng(0).integers(1, SMALL["vocab_size"], (3, 4))
    frozen = module.clone(freeze_feature_encoder=True)
    grads = jax.grad(lambda p: frozen.apply({"params": p}, x, mask, labels).loss)(params)
    cnn = grads["data2vec_audio"]["feature_extractor"]
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(cnn))
    tx = optax.multi_transform({"train": optax.adamw(1e-3), "frozen": optax.set_to_zero()},
                               fd.feature_encoder_labels(params))
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0.0
               for u in jax.tree_util.tree_leaves(updates["data2vec_audio"]["feature_extractor"]))
    assert float(jnp.abs(updates["lm_head"]["kernel"]).max()) > 0


def test_frame_multiple_pads_attention_without_changing_outputs():
    """Attention on frames padded to a multiple (cuDNN needs T % 128 == 0) gives the same function."""
    _, module, params = build("Data2VecAudioForCTC")
    x, mask = audio_batch()
    labels = np.random.default_rng(2).integers(1, SMALL["vocab_size"], (3, 5))
    padded = module.clone(frame_multiple=128)
    kw = dict(output_hidden_states=True, output_attentions=True)
    ref = module.apply({"params": params}, x, mask, labels, **kw)
    out = padded.apply({"params": params}, x, mask, labels, **kw)
    assert_close("logits", ref.logits, out.logits)
    assert_close("loss", ref.loss, out.loss)
    for a, b in zip(ref.hidden_states + ref.attentions, out.hidden_states + out.attentions):
        assert_close("hidden/attention", a, b)
    g_ref = jax.grad(lambda p: module.apply({"params": p}, x, mask, labels).loss)(params)
    g_pad = jax.grad(lambda p: padded.apply({"params": p}, x, mask, labels).loss)(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_pad)):
        assert_close("grad", a, b)


def test_padding_invariant_gives_each_clip_its_unpadded_outputs():
    """The positional convs read padded frames (transformers#25621); with padding_invariant=True each conv's
    input is zeroed past the real frames, so a padded clip's real frames equal the clip's outputs alone."""
    _, module, params = build("Data2VecAudioModel")
    x, mask = audio_batch()
    frames = conv_output_lengths(module.config, mask.sum(-1))
    leaky = module.apply({"params": params}, x, mask).last_hidden_state
    batched = module.clone(padding_invariant=True).apply({"params": params}, x, mask).last_hidden_state
    for i in range(len(x)):
        alone = module.apply({"params": params}, x[i:i + 1, :int(mask[i].sum())]).last_hidden_state[0]
        assert_close(f"row {i}", batched[i, :frames[i]], alone)
        if i:  # padded rows: the reference's (default) batched outputs differ from the clip alone
            assert float(jnp.abs(leaky[i, :frames[i]] - alone).max()) > 1e-3


@pytest.mark.parametrize("samples", [1203, 1000])
def test_cpu_feature_encoder_time_chunks_equal_the_whole_clip(monkeypatch, samples):
    """On CPU the CNN runs over time chunks in a loop: the same frames as transformers' whole-clip CNN, and the
    same gradients as our unchunked program (chunk sizes that do not divide the frames, a padded last group)."""
    from flax_data2vec import audio

    tmodel, module, params = build("Data2VecAudioForCTC")
    x, mask = audio_batch(samples=samples)
    labels = np.random.default_rng(3).integers(1, SMALL["vocab_size"], (3, 5))

    def run():  # a fresh trace each time: the chunk sizes are read while tracing
        def f(p):
            out = module.apply({"params": p}, x, mask, labels, output_hidden_states=True)
            return out.loss, out.logits, out.hidden_states[0]
        out, vjp = jax.vjp(f, params)
        return out, vjp(tuple(jnp.ones_like(o) for o in out))[0]

    monkeypatch.setattr(audio, "CPU_FEATURE_CHUNK_FRAMES", 10 ** 6)
    whole = jax.jit(lambda: run())()
    loops = jax.jit(lambda: run()).lower().as_text().count("stablehlo.while")  # the CTC loss has its own
    monkeypatch.setattr(audio, "CPU_FEATURE_CHUNK_FRAMES", 7)
    monkeypatch.setattr(audio, "CPU_FEATURE_CHUNK_ROWS", 4)
    assert jax.jit(lambda: run()).lower().as_text().count("stablehlo.while") > loops  # the chunk loop ran
    chunked = jax.jit(lambda: run())()
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(chunked)):  # relative 1e-5
        assert_close("chunked vs whole", a, b, tol=1e-5 * max(1.0, float(jnp.abs(b).max())))
    tout, jout = run_both("Data2VecAudioForCTC", tmodel, module, params, x, mask, labels)
    compare(tout, jout, ("loss", "logits", "hidden_states"))
