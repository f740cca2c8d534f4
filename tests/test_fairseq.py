"""fairseq data2vec v1 files: fd.load matches the transformers model they were written from; safe unpickling."""

import copy

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from fairseq_files import WritesMarker, half, save_fairseq
from test_convert import script
from test_hub import TEXT, cache_entries, tiny_torch_model, truncate

import flax_data2vec as fd
from flax_data2vec import fairseq, hub

TO_TORCH, FAIRSEQ_TO_ORBAX = script("orbax_to_pytorch"), script("fairseq_to_orbax")
AUDIO_CFG = {"_name": "data2vec_audio", "extractor_mode": "layer_norm", "layer_norm_first": False,
             "conv_feature_layers": "[(16, 10, 5)] + [(16, 3, 2)] * 2", "conv_bias": False,
             "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 37, "encoder_layers": 2, "encoder_attention_heads": 4,
             "conv_pos": 15, "conv_pos_groups": 4, "pos_conv_depth": 3, "activation_fn": "gelu",
             "encoder_layerdrop": 0.05, "dropout": 0.1, "average_top_k_layers": 8}
TEXT_CFG = {"_name": "data2vec_text", "head_layers": 2, "transformer": {
    "encoder": {"embed_dim": 32, "ffn_embed_dim": 37, "layers": 2, "attention_heads": 4, "normalize_before": False,
                "learned_pos": True}, "layernorm_embedding": True, "no_scale_embedding": True,
    "max_source_positions": 38, "activation_fn": "gelu", "dropout": 0.1}}
LETTERS = list("|ETAOINS")  # after fairseq's 4 specials: the 12 rows of the tiny CTC model


pytestmark = pytest.mark.usefixtures("private_cache")


def fairseq_audio_dict(model, ctc: bool) -> dict:
    """transformers state dict -> fairseq v1 names (pre-training: no prefix; CTC: w2v_encoder.*)."""
    out = {}
    for key, value in model.state_dict().items():
        if ctc and key.startswith("lm_head."):
            out["w2v_encoder.proj." + key.split(".")[-1]] = value
            continue
        name = fairseq.rename(key.removeprefix("data2vec_audio."), fairseq.V1_AUDIO, reverse=True)
        out[("w2v_encoder.w2v_model." if ctc else "") + name] = value
    return out


def audio_inputs():
    x = np.random.default_rng(0).standard_normal((2, 800)).astype(np.float32)
    mask = np.ones((2, 800), np.int32)
    mask[1, 560:] = 0
    x[1, 560:] = 0
    return x, mask


def torch_out(model, x, mask):
    with torch.no_grad():
        out = model(torch.tensor(x), attention_mask=torch.tensor(mask))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def round_to_half(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def test_v1_audio_pretrained_student_teacher_and_export(tmp_path):
    model = round_to_half(tiny_torch_model("Data2VecAudioModel"))
    weights = fairseq_audio_dict(model, ctc=False)
    for name in ("feature_extractor.conv_layers.0.0.weight", "feature_extractor.conv_layers.1.2.1.bias",
                 "post_extract_proj.weight", "mask_emb", "encoder.pos_conv.2.0.weight",
                 "encoder.layers.1.self_attn.k_proj.bias", "encoder.layers.0.self_attn_layer_norm.weight",
                 "encoder.layers.0.fc2.weight", "encoder.layer_norm.bias", "layer_norm.weight"):
        assert name in weights  # fairseq's own names (REFERENCE.md §5.5.2)
    ema = {k.removeprefix("encoder."): v.float() + 0.05 for k, v in weights.items()
           if k.startswith("encoder.layers.1.") or k.startswith("encoder.pos_conv.")}
    state = {**half(weights), "final_proj.0.weight": torch.randn(32, 32).half(),
             "final_proj.0.bias": torch.zeros(32).half(), "_ema": ema}
    path = save_fairseq(tmp_path / "audio_base.pt", state, {"common": {"fp16": True}, "model": AUDIO_CFG,
                                                            "task": {"_name": "audio_pretraining"}})
    x, mask = audio_inputs()
    with pytest.warns(UserWarning, match="float16 weights were converted to float32"):
        module, params = fd.load(path)
    assert type(module).__name__ == "Data2VecAudioModel"
    assert params["encoder"]["layer_norm"]["scale"].dtype == np.float32
    got = np.asarray(module.apply({"params": params}, x, mask).last_hidden_state)
    np.testing.assert_allclose(got, torch_out(model, x, mask), atol=1e-4)

    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in ema.items():
            hf = fairseq.rename("encoder." + k, fairseq.V1_AUDIO)
            teacher.state_dict()[hf].copy_(v)
    t_module, t_params = fd.load(path, weights="teacher")
    t_got = np.asarray(t_module.apply({"params": t_params}, x, mask).last_hidden_state)
    np.testing.assert_allclose(t_got, torch_out(teacher, x, mask), atol=1e-4)
    assert np.abs(t_got - got).max() > 1e-3
    assert len(cache_entries()) == 2  # student and teacher are separate cache entries

    fd.save(tmp_path / "orbax", module, params)
    assert TO_TORCH.main([str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    exported = transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig.from_pretrained(tmp_path / "hf"))
    exported.load_state_dict(safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors"), strict=True)
    np.testing.assert_allclose(torch_out(exported.eval(), x, mask), torch_out(model, x, mask), atol=1e-5)


def test_v1_audio_ctc_resaved_cfg_dictionary_and_numpy_meters(tmp_path):
    model = tiny_torch_model("Data2VecAudioForCTC")
    assert model.config.vocab_size == 4 + len(LETTERS)
    ctc_cfg = {"_name": "wav2vec_ctc", "final_dropout": 0.0, "mask_prob": 0.5, "mask_length": 10,
               "w2v_args": {"model": AUDIO_CFG, "task": {"_name": "audio_pretraining"}}}
    path = save_fairseq(tmp_path / "ctc.pt", fairseq_audio_dict(model, ctc=True),
                        {"model": ctc_cfg, "task": {"_name": "audio_finetuning", "labels": "ltr"}},
                        resaved=True, symbols=LETTERS, metrics=np.float32(2.5))
    with pytest.raises(Exception, match="Unsupported global"):  # what a plain weights_only load says
        torch.load(path, weights_only=True)
    module, params = fd.load(path)
    assert type(module).__name__ == "Data2VecAudioForCTC"
    assert fairseq.vocabulary(module.config) == ["<pad>", "<s>", "</s>", "<unk>"] + LETTERS
    x, mask = audio_inputs()
    got = np.asarray(module.apply({"params": params}, x, mask).logits)
    np.testing.assert_allclose(got, torch_out(model, x, mask), atol=1e-4)
    base, _ = fd.load(path, architecture="Data2VecAudioModel")
    assert type(base).__name__ == "Data2VecAudioModel"


def fairseq_text_dict(model) -> dict:
    out = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("data2vec_text.")
        name = fairseq.rename(key, fairseq.V1_TEXT, reverse=True) or fairseq.rename(
            key, fairseq.V1_TEXT_HEADS, reverse=True)
        if name is not None:
            out[name] = value
    return out


@pytest.mark.parametrize("name", ["Data2VecTextModel", "Data2VecTextForSequenceClassification"])
def test_v1_text_matches_transformers(tmp_path, name):
    model = tiny_torch_model(name, type_vocab_size=1, layer_norm_eps=1e-5)
    with torch.no_grad():  # fairseq has no token types: the reader sets them to zero, as transformers' converter
        model.base_model.embeddings.token_type_embeddings.weight.zero_()
    weights = fairseq_text_dict(model)
    assert "encoder.sentence_encoder.layers.1.self_attn.out_proj.weight" in weights
    assert "encoder.sentence_encoder.layernorm_embedding.bias" in weights
    if name == "Data2VecTextModel":  # older files: `decoder.` and `emb_layer_norm` (upgraded by data2vec_text)
        weights = {k.replace("encoder.", "decoder.", 1).replace(".layernorm_embedding.", ".emb_layer_norm."): v
                   for k, v in weights.items()}
    weights.update({"encoder.sentence_encoder.version": torch.tensor([3.0]),
                    "encoder.regression_head.0.weight": torch.randn(64, 32),
                    "encoder._ema": {"layers.0.fc1.weight": torch.randn(37, 32)}})
    path = save_fairseq(tmp_path / "text.pt", weights, {"model": TEXT_CFG, "task": {"_name": "masked_lm"}})
    module, params = fd.load(path)
    assert type(module).__name__ == name
    ids = np.random.default_rng(1).integers(3, TEXT["vocab_size"], (2, 9)).astype(np.int32)
    ids[1, 6:] = 1
    mask = (ids != 1).astype(np.int32)
    got = module.apply({"params": params}, ids, mask)
    got = np.asarray(got.logits if hasattr(got, "logits") else got.last_hidden_state)
    np.testing.assert_allclose(got, torch_out(model, ids, mask), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# safety and errors
def audio_file(tmp_path, name="a.pt", cfg=None, **kwargs) -> str:
    weights = fairseq_audio_dict(tiny_torch_model("Data2VecAudioModel"), ctc=False)
    return save_fairseq(tmp_path / name, weights, {"model": cfg or AUDIO_CFG}, **kwargs)


def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = audio_file(tmp_path, extra={"hook": WritesMarker(str(marker))})
    with pytest.raises(hub.CheckpointError) as e:
        fd.load(path)
    assert "refused: this file's pickle calls `posix.system`, which is not allowed" in str(e.value)
    assert "weights_only=False" not in str(e.value)
    assert not marker.exists() and cache_entries() == []


@pytest.mark.parametrize("case", ["truncated", "wav2vec2", "shape"])
def test_bad_files_give_one_clear_error_and_cache_nothing(tmp_path, case):
    if case == "truncated":
        path = audio_file(tmp_path)
        truncate(path)
        message = "corrupted or truncated"
    elif case == "wav2vec2":
        path = audio_file(tmp_path, cfg={**AUDIO_CFG, "_name": "wav2vec2", "pos_conv_depth": 1})
        message = "not a data2vec checkpoint: its cfg describes a plain wav2vec 2.0 model"
    else:
        path = audio_file(tmp_path, cfg={**AUDIO_CFG, "encoder_ffn_embed_dim": 64})
        message = "does not fit its config: shape mismatch for encoder.layers.0.feed_forward.intermediate_dense"
    with pytest.raises(hub.CheckpointError, match=message):
        fd.load(path)
    assert cache_entries() == []


def test_fairseq_to_orbax_cli(tmp_path, capsys):
    path = audio_file(tmp_path)
    assert FAIRSEQ_TO_ORBAX.main([path, str(tmp_path / "out"), "--architecture", "Data2VecAudioForCTC"]) == 0
    module, _ = fd.load(tmp_path / "out")
    assert type(module).__name__ == "Data2VecAudioForCTC"
    assert "newly initialised" in capsys.readouterr().err
    assert FAIRSEQ_TO_ORBAX.main([path, str(tmp_path / "bad"), "--architecture", "Data2Vec2AudioModel"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: architecture 'Data2Vec2AudioModel' does not suit")
    assert FAIRSEQ_TO_ORBAX.main([path, str(tmp_path / "t"), "--weights", "teacher"]) == 1
    assert "carries no EMA teacher" in capsys.readouterr().err
