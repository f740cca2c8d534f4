"""data2vec 2.0 encoders: each piece against its equations, jit / scan / bf16, and fairseq 2.0 files."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fairseq_files import half, save_fairseq
from flax import traverse_util
from test_hub import cache_entries

import flax_data2vec as fd
from flax_data2vec import data2vec2_heads as heads
from flax_data2vec import fairseq, registry
from flax_data2vec.audio import PositionalConvEmbedding
from flax_data2vec.data2vec2 import alibi_bias, alibi_slopes
from flax_data2vec.data2vec2_config import Data2Vec2AudioConfig, Data2Vec2TextConfig
from flax_data2vec.layers import TransformerLayer
from flax_data2vec.weights import from_state_dict, scan_params, to_state_dict

AUDIO = dict(depth=2, embed_dim=32, num_heads=4, conv_pos_width=6, conv_pos_depth=2, conv_pos_groups=4,
             feature_encoder_spec=((16, 10, 5), (16, 3, 2)), vocab_size=12, classifier_proj_size=8)
TEXT = dict(depth=2, embed_dim=32, num_heads=4, vocab_size=60, max_source_positions=30)


pytestmark = pytest.mark.usefixtures("private_cache")


@jax.jit
def _perturbed(params, key):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def perturbed(params, seed=0):
    """Params with every leaf moved off its init (LayerNorm scales, biases and the ALiBi scale included)."""
    return _perturbed(params, jax.random.PRNGKey(seed))


def audio_batch():
    x = np.random.default_rng(0).standard_normal((2, 800)).astype(np.float32)
    mask = np.ones((2, 800), np.int32)
    mask[1, 500:] = 0
    return x, mask


def text_batch():
    ids = np.random.default_rng(0).integers(3, TEXT["vocab_size"], (2, 9)).astype(np.int32)
    ids[1, 6:] = 1
    return ids, (ids != 1).astype(np.int32)


@functools.cache
def _jitted(module, kwargs: tuple):
    return jax.jit(lambda p, *a: module.apply({"params": p}, *a, **dict(kwargs)))


def run(module, params, *args, **kwargs):
    """`module.apply` under jit, compiled once per (module, options): eager dispatch is slower on CPU."""
    return _jitted(module, tuple(sorted(kwargs.items())))(params, *args)


def model_and_params(name, seed=0, **config):
    cfg_cls = Data2Vec2AudioConfig if registry.is_audio(name) else Data2Vec2TextConfig
    base = AUDIO if registry.is_audio(name) else TEXT
    extra = {"id2label": {0: "a", 1: "b"}} if name.endswith("QuestionAnswering") else {}
    module = registry.model_class(name)(cfg_cls(**{**base, **extra, **config}))
    params = jax.jit(lambda key: registry.init_params(module, key))(jax.random.PRNGKey(seed))
    return module, perturbed(params, seed)


# ---------------------------------------------------------------------------------------------------------------
# pieces against their equations
def test_alibi_slopes_and_bias_values():
    np.testing.assert_allclose(alibi_slopes(12), [2.0 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5,
                                                                                      2 ** -2.5, 2 ** -3.5])
    np.testing.assert_allclose(alibi_slopes(16), [2.0 ** (-0.5 * k) for k in range(1, 17)])
    scale = jnp.array([1.0, 0.5, -2.0, 3.0])  # a negative learned scale is clamped to 0
    bias = np.asarray(alibi_bias(4, 5, scale))
    slopes = alibi_slopes(4) * np.array([1.0, 0.5, 0.0, 3.0])
    i, j = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    np.testing.assert_allclose(bias, -(slopes[:, None, None] * np.abs(i - j))[None], rtol=1e-6)


def test_attention_is_softmax_of_scaled_logits_plus_alibi_with_padding_masked():
    module, params = model_and_params("Data2Vec2AudioModel", depth=1)
    params["alibi_scale"] = jnp.array([1.5, 0.0, -1.0, 4.0])
    x, mask = audio_batch()
    out = run(module, params, x, mask, output_attentions=True, output_hidden_states=True)
    h = np.asarray(out.hidden_states[0], np.float64)  # the blocks' input
    qkv = params["blocks"]["layers_0"]["attention"]["qkv"]
    q, k, _ = np.split(h @ np.asarray(qkv["kernel"]) + np.asarray(qkv["bias"]), 3, axis=-1)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], 4, 8).transpose(0, 2, 1, 3)  # noqa: E731
    logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(8)
    t = h.shape[1]
    dist = np.abs(np.arange(t)[:, None] - np.arange(t)[None])
    logits = logits - (alibi_slopes(4) * np.array([1.5, 0.0, 0.0, 4.0]))[None, :, None, None] * dist
    logits = np.where(np.asarray(out.feature_mask)[:, None, None, :], logits, -np.inf)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out.attentions[0]), want, atol=2e-6)
    assert np.asarray(out.feature_mask).sum(1).tolist() == [79, 49]
    fast = run(module, params, x, mask).last_hidden_state  # jax.nn.dot_product_attention with a bias
    np.testing.assert_allclose(np.asarray(fast), np.asarray(out.last_hidden_state), atol=1e-5)


@pytest.mark.parametrize("width,depth", [(12, 3), (95, 5)])
def test_conv_positional_encoder_matches_its_definition(width, depth):
    cfg = Data2Vec2AudioConfig(**{**AUDIO, "conv_pos_width": width, "conv_pos_depth": depth})
    k = max(3, width // depth)
    assert cfg.conv_pos_kernel == k  # 4 (even: one frame trimmed) and 19 (base)
    encoder = PositionalConvEmbedding(cfg.front_end())
    x = np.random.default_rng(1).standard_normal((2, 23, 32)).astype(np.float32)
    params = perturbed(jax.jit(encoder.init)(jax.random.PRNGKey(0), x)["params"])
    got = np.asarray(encoder.apply({"params": params}, x))
    y = torch.tensor(x).transpose(1, 2)
    for j in range(depth):
        conv = torch.nn.Conv1d(32, 32, k, padding=k // 2, groups=4)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor(np.asarray(params[f"layers_{j}"]["kernel"]).transpose(2, 1, 0)))
            conv.bias.copy_(torch.tensor(np.asarray(params[f"layers_{j}"]["bias"])))
            y = conv(y)[:, :, :-1] if k % 2 == 0 else conv(y)
            y = torch.nn.functional.gelu(torch.nn.functional.layer_norm(y.transpose(1, 2), (32,)).transpose(1, 2))
    np.testing.assert_allclose(got, y.transpose(1, 2).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_block_order(layer_norm_first):
    cfg = Data2Vec2TextConfig(**TEXT, layer_norm_first=layer_norm_first)
    layer = TransformerLayer(**cfg.block_kwargs())
    x = np.random.default_rng(2).standard_normal((2, 5, 32)).astype(np.float32)
    p = perturbed(jax.jit(lambda key: layer.init(key, x, None))(jax.random.PRNGKey(0))["params"])
    got, (_, _, ffn) = layer.apply({"params": p}, x, None)

    def ln(t, name):
        mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-5) * np.asarray(p[name]["scale"]) + np.asarray(p[name]["bias"])

    def lin(t, name, sub=None):
        w = p[name][sub] if sub else p[name]
        return t @ np.asarray(w["kernel"]) + np.asarray(w["bias"])

    def attn(t):
        q, k, v = (s.reshape(2, 5, 4, 8).transpose(0, 2, 1, 3) for s in np.split(lin(t, "attention", "qkv"), 3, -1))
        a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
        a = np.exp(a - a.max(-1, keepdims=True))
        o = (a / a.sum(-1, keepdims=True)) @ v
        return lin(o.transpose(0, 2, 1, 3).reshape(2, 5, 32), "attention", "out")

    def mlp(t):
        return lin(np.asarray(jax.nn.gelu(lin(t, "intermediate"), approximate=False)), "output")
    if layer_norm_first:  # x + attn(norm1(x)); x + mlp(norm2(x))
        x1 = x + attn(ln(x, "attention_norm"))
        m = mlp(ln(x1, "output_norm"))
        want = x1 + m
    else:  # r = norm1(x + attn(x)); norm2(r + mlp(r))
        r = ln(x + attn(x), "attention_norm")
        m = mlp(r)
        want = ln(r + m, "output_norm")
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ffn), m, atol=2e-5)  # the data2vec target: the MLP output


# ---------------------------------------------------------------------------------------------------------------
# every class: jit, scan = unrolled, bf16
def inputs(name):
    return audio_batch() if registry.is_audio(name) else text_batch()


def main(out):
    return np.asarray(next(getattr(out, f) for f in ("logits", "start_logits", "last_hidden_state")
                           if getattr(out, f, None) is not None), np.float32)


BASES = ("Data2Vec2AudioModel", "Data2Vec2TextModel")


@functools.cache
def base_model(name):
    """A base model with a prenet block, its params and its float32 output (shared by the tests below)."""
    module, params = model_and_params(name, prenet_depth=1, layer_norm_first=name.startswith("Data2Vec2Text"))
    return module, params, main(run(module, params, *inputs(name)))


@pytest.mark.parametrize("name", BASES)
def test_scan_equals_unrolled(name):
    module, params, unrolled = base_model(name)
    scanned = main(run(module.clone(scan_layers=True), scan_params(params), *inputs(name)))
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5)


@pytest.mark.parametrize("name", sorted(set(heads.DATA2VEC2_CLASSES) - set(BASES)))
def test_every_head_jits(name):
    module, params = model_and_params(name, depth=1)
    out = main(run(module, params, *inputs(name)))
    assert np.isfinite(out).all() and out.shape[0] == 2


BF16_TOLERANCE = 0.05  # max |bf16 - fp32| / max |fp32| of the last hidden state (bf16 has 8 mantissa bits)


@pytest.mark.parametrize("name", BASES)
def test_bf16_within_tolerance(name):
    module, params, want = base_model(name)
    got = main(run(module.clone(dtype=jnp.bfloat16), params, *inputs(name)))
    assert np.abs(got - want).max() / np.abs(want).max() < BF16_TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# fairseq 2.0 files
def v2_cfg(modality: str, config) -> dict:
    """Data2VecMultiConfig as fairseq saves it: top-level fields plus all three modality sub-configs."""
    fields = config.to_dict()
    modality_cfg = {k: fields.pop(k) for k in list(fields) if k in fairseq_configs_fields()}
    if "feature_encoder_spec" in modality_cfg:
        modality_cfg["feature_encoder_spec"] = " + ".join(f"[{tuple(layer)}]" for layer in
                                                          modality_cfg["feature_encoder_spec"])
    modalities = {"audio": {"prenet_depth": 0}, "image": {"prenet_depth": 2}, "text": {"prenet_depth": 0}}
    modalities[modality.lower()] = {**modality_cfg, "prenet_depth": config.prenet_depth}
    return {"_name": "data2vec_multi", "supported_modality": modality, "clone_batch": 8, "modalities": modalities,
            **{k: v for k, v in fields.items() if k in ("depth", "embed_dim", "num_heads", "mlp_ratio", "norm_eps",
                                                        "layer_norm_first", "encoder_dropout", "layerdrop")}}


def fairseq_configs_fields():
    from flax_data2vec.fairseq_configs import _MODALITY_FIELDS
    return _MODALITY_FIELDS


def torch_state(module, params) -> dict:
    return {k: torch.tensor(np.asarray(v)) for k, v in to_state_dict(params, registry.weight_table(
        type(module).__name__)).items()}


def assert_same_params(got, want):
    got, want = traverse_util.flatten_dict(got, sep="/"), traverse_util.flatten_dict(want, sep="/")
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=1e-6, err_msg=k)


def test_fairseq_2_audio_pretrained_student_teacher_and_ctc(tmp_path):
    module, params = model_and_params("Data2Vec2AudioModel")
    params = jax.tree_util.tree_map(lambda t: t.astype(jnp.float16).astype(jnp.float32), params)
    state = torch_state(module, params)
    assert state["modality_encoders.AUDIO.alibi_scale"].shape == (1, 1, 4, 1, 1)
    ema = {k: v + 0.05 for k, v in state.items() if k.startswith(("blocks.1.", "modality_encoders.AUDIO.alibi"))}
    state = {**half(state), "_ema": ema, "modality_encoders.AUDIO.decoder.proj.weight": torch.zeros(32, 16).half()}
    cfg = {"model": v2_cfg("AUDIO", module.config), "task": {"_name": "audio_pretraining"}}
    path = save_fairseq(tmp_path / "base_libri.pt", state, cfg)
    x, mask = audio_batch()
    with pytest.warns(UserWarning, match="float16"):
        loaded, loaded_params = fd.load(path)
    heads_only = ("vocab_size", "classifier_proj_size", "architectures")  # not in a pre-training cfg
    encoder_fields = lambda c: {k: v for k, v in c.to_dict().items() if k not in heads_only}  # noqa: E731
    assert type(loaded).__name__ == "Data2Vec2AudioModel"
    assert encoder_fields(loaded.config) == encoder_fields(module.config)
    assert_same_params(loaded_params, params)  # same config and params: the same function
    teacher, teacher_params = fd.load(path, weights="teacher")
    assert_same_params(teacher_params, {**params, "alibi_scale": params["alibi_scale"] + 0.05, "blocks": {
        **params["blocks"], "layers_1": jax.tree_util.tree_map(lambda t: t + 0.05, params["blocks"]["layers_1"])}})

    ctc, ctc_params = model_and_params("Data2Vec2AudioForCTC")
    ctc_cfg = {"_name": "wav2vec_ctc", "final_dropout": 0.0, "w2v_args": {"model": v2_cfg("AUDIO", ctc.config)}}
    path = save_fairseq(tmp_path / "base_libri_960h.pt", torch_state(ctc, ctc_params), {"model": ctc_cfg},
                        resaved=True, symbols=list("|ETAOINS"))
    assert any(k.startswith("w2v_encoder.w2v_model.modality_encoders.AUDIO.") for k in torch_state(ctc, ctc_params))
    loaded, loaded_params = fd.load(path)
    assert type(loaded).__name__ == "Data2Vec2AudioForCTC" and fairseq.vocabulary(loaded.config)[:5] == [
        "<pad>", "<s>", "</s>", "<unk>", "|"]
    assert_same_params(loaded_params, ctc_params)  # same params and config: the same function; and it runs
    logits = main(run(loaded, loaded_params, x, mask))
    assert logits.shape == (2, 79, 12) and np.isfinite(logits).all()


def test_fairseq_2_text_pretrained_and_classifier(tmp_path):
    ids, mask = text_batch()
    for name in ("Data2Vec2TextModel", "Data2Vec2TextForSequenceClassification"):
        module, params = model_and_params(name)
        state = torch_state(module, params)
        if name.endswith("Classification"):
            state = {k.replace("sentence_classification_head", "mnli"): v for k, v in state.items()}
            cfg = {"_name": "data2vec_text_classification", "model": v2_cfg("TEXT", module.config)}
        else:
            state["_ema"] = {k.removeprefix("blocks."): v for k, v in state.items() if k.startswith("blocks.")}
            cfg = v2_cfg("TEXT", module.config)
        path = save_fairseq(tmp_path / f"{name}.pt", state, {"model": cfg, "task": {"_name": "masked_lm"}})
        loaded, loaded_params = fd.load(path)
        assert type(loaded).__name__ == name
        assert_same_params(loaded_params, params)
    assert len(cache_entries()) == 2


def test_base_shapes_have_fairseq_names_and_forward_shapes():
    """The base configs give fairseq's base state dict (REFERENCE.md §5.5.3); forward shapes, abstractly."""
    for config, frames, inputs_ in ((Data2Vec2AudioConfig(), 49, jnp.zeros((1, 16000))),
                                    (Data2Vec2TextConfig(), 16, jnp.ones((1, 16), jnp.int32))):
        name = "Data2Vec2AudioModel" if isinstance(config, Data2Vec2AudioConfig) else "Data2Vec2TextModel"
        module = registry.model_class(name)(config)
        shapes = registry.abstract_params(module)
        flat = traverse_util.flatten_dict(shapes, sep="/")
        fake = to_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float16), shapes),
                             registry.weight_table(name))
        if name == "Data2Vec2AudioModel":
            assert sum(int(np.prod(v.shape)) for v in flat.values()) == 93_163_532
            expected = {"modality_encoders.AUDIO.alibi_scale": (1, 1, 12, 1, 1),
                        "modality_encoders.AUDIO.local_encoder.conv_layers.0.0.weight": (512, 1, 10),
                        "modality_encoders.AUDIO.local_encoder.conv_layers.4.0.weight": (512, 512, 3),
                        "modality_encoders.AUDIO.local_encoder.conv_layers.6.2.1.bias": (512,),
                        "modality_encoders.AUDIO.project_features.2.weight": (768, 512),
                        "modality_encoders.AUDIO.relative_positional_encoder.5.0.weight": (768, 48, 19),
                        "modality_encoders.AUDIO.context_encoder.norm.weight": (768,)}
        else:
            expected = {"modality_encoders.TEXT.local_encoder.embed_tokens.weight": (50265, 768),
                        "modality_encoders.TEXT.local_encoder.embed_positions.weight": (514, 768)}
        expected |= {"blocks.11.attn.qkv.weight": (2304, 768), "blocks.0.mlp.fc1.weight": (3072, 768),
                     "blocks.3.mlp.fc2.weight": (768, 3072), "blocks.7.norm2.bias": (768,)}
        assert {k: fake[k].shape for k in expected} == expected
        _, report = from_state_dict(fake, shapes, registry.weight_table(name))
        assert report.missing == [] and report.unexpected == []
        out = jax.eval_shape(module.apply, {"params": shapes}, inputs_)
        assert out.last_hidden_state.shape == (1, frames, 768)
