"""Our configs from a fairseq checkpoint's cfg: data2vec v1 (transformers' configs) and 2.0 (Data2Vec2*Config).

Field names and their meaning are REFERENCE.md §5.5.2 (v1) and §5.5.3 (2.0); sizes that the cfg may not hold
(vocabulary, positions, labels) are read from the tensors' shapes.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from .config import Data2VecAudioConfig, Data2VecTextConfig
from .data2vec2_config import Data2Vec2AudioConfig, Data2Vec2TextConfig
from .integrity import CheckpointError

VOCABULARY_KEY = "fairseq_target_dictionary"  # config `extra` entry: the CTC symbols, index = output row
SENTENCE_ENCODER = "encoder.sentence_encoder."  # v1 text encoder prefix
_SE = SENTENCE_ENCODER


def parse_conv_spec(spec: Any) -> tuple[tuple[int, int, int], ...]:
    """fairseq's `conv_feature_layers` / `feature_encoder_spec` (a Python expression string such as
    "[(512, 10, 5)] + [(512, 3, 2)] * 4") -> tuple of (dim, kernel, stride), without eval."""
    def value(node):
        if isinstance(node, (ast.List, ast.Tuple)):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element {ast.dump(node)}")
    try:
        layers = value(ast.parse(spec, mode="eval").body) if isinstance(spec, str) else spec
        return tuple((int(d), int(k), int(s)) for d, k, s in layers)
    except (SyntaxError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read the conv feature spec {spec!r}: {e}") from None


def _rows(tensors: dict, key: str, path: str) -> int:
    if key not in tensors:
        raise CheckpointError(f"{path} has no {key}")
    return int(tensors[key].shape[0])


def _v1_audio_config(ck, path: str) -> Data2VecAudioConfig:
    m = ck.model_cfg
    if m.get("extractor_mode", "layer_norm") != "layer_norm" or m.get("layer_norm_first", False):
        raise CheckpointError(f"{path}: extractor_mode {m.get('extractor_mode')!r} / layer_norm_first "
                              f"{m.get('layer_norm_first')!r}: data2vec audio is layer_norm / post-LN")
    depth = int(m.get("pos_conv_depth", 1))
    if depth <= 1:
        raise CheckpointError(f"{path}: pos_conv_depth {depth} (one weight-normed positional conv) is wav2vec 2.0's "
                              "layout, not data2vec's")
    spec = parse_conv_spec(m.get("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"))
    dims, kernels, strides = zip(*spec)
    ft = ck.finetune_cfg or {}
    extra = {}
    kw: dict[str, Any] = {}
    if "w2v_encoder.proj.weight" in ck.tensors:
        kw = dict(vocab_size=_rows(ck.tensors, "w2v_encoder.proj.weight", path), pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, final_dropout=float(ft.get("final_dropout", 0.0)),
                  mask_time_prob=float(ft.get("mask_prob", 0.05)) or 0.05,
                  mask_time_length=int(ft.get("mask_length", 10)), ctc_zero_infinity=True)
        if ck.vocabulary:
            extra[VOCABULARY_KEY] = ck.vocabulary
    return Data2VecAudioConfig(
        hidden_size=int(m.get("encoder_embed_dim", 768)),
        intermediate_size=int(m.get("encoder_ffn_embed_dim", 3072)), num_hidden_layers=int(m.get("encoder_layers", 12)),
        num_attention_heads=int(m.get("encoder_attention_heads", 12)),
        hidden_act=m.get("activation_fn", "gelu"), conv_dim=dims, conv_kernel=kernels, conv_stride=strides,
        conv_bias=bool(m.get("conv_bias", False)), num_conv_pos_embeddings=depth,
        conv_pos_kernel_size=max(3, int(m.get("conv_pos", 95)) // depth),
        num_conv_pos_embedding_groups=int(m.get("conv_pos_groups", 16)), hidden_dropout=float(m.get("dropout", 0.1)),
        attention_dropout=float(m.get("attention_dropout", 0.1)),
        activation_dropout=float(m.get("activation_dropout", 0.0)), layerdrop=float(m.get("encoder_layerdrop", 0.05)),
        layer_norm_eps=1e-5, extra=extra, **kw)


def _v1_text_config(ck, path: str) -> Data2VecTextConfig:
    t = ck.model_cfg.get("transformer") or {}
    e = t.get("encoder") or {}
    if e.get("normalize_before", False):
        raise CheckpointError(f"{path}: normalize_before=True (pre-LN) is not data2vec v1 text's post-LN layout")
    heads = sorted({k.split(".")[1] for k in ck.tensors if k.startswith("classification_heads.")})
    if len(heads) > 1:
        raise CheckpointError(f"{path} has {len(heads)} classification heads ({', '.join(heads)}); "
                              "only one is supported")
    kw = {}
    if heads:
        kw["num_labels"] = _rows(ck.tensors, f"classification_heads.{heads[0]}.out_proj.weight", path)
    config = Data2VecTextConfig(
        vocab_size=_rows(ck.tensors, _SE + "embed_tokens.weight", path), hidden_size=int(e.get("embed_dim", 768)),
        intermediate_size=int(e.get("ffn_embed_dim", 3072)), num_hidden_layers=int(e.get("layers", 12)),
        num_attention_heads=int(e.get("attention_heads", 12)), hidden_act=t.get("activation_fn", "gelu"),
        max_position_embeddings=_rows(ck.tensors, _SE + "embed_positions.weight", path), type_vocab_size=1,
        hidden_dropout_prob=float(t.get("dropout", 0.1)),
        attention_probs_dropout_prob=float(t.get("attention_dropout", 0.1)),
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return config.replace(**kw) if kw else config


# Data2VecMultiConfig fields that live in the modality sub-config (`modalities.audio` / `modalities.text`)
_MODALITY_FIELDS = frozenset({
    "prenet_depth", "prenet_layerdrop", "prenet_dropout", "num_extra_tokens", "feature_encoder_spec",
    "extractor_mode", "conv_pos_width", "conv_pos_groups", "conv_pos_depth", "conv_pos_pre_ln", "use_alibi_encoder",
    "learned_alibi_scale", "learned_alibi_scale_per_head", "learned_alibi_scale_per_layer", "alibi_scale",
    "max_source_positions", "learned_pos", "dropout", "no_scale_embedding", "layernorm_embedding"})


def _v2_config(ck, path: str):
    m = ck.model_cfg
    audio = ck.family == "v2-audio"
    cls = Data2Vec2AudioConfig if audio else Data2Vec2TextConfig
    modality = (m.get("modalities") or {}).get("audio" if audio else "text") or {}
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        source = modality if f.name in _MODALITY_FIELDS else m
        if f.name in source and source[f.name] is not None:
            kw[f.name] = source[f.name]
    if "feature_encoder_spec" in kw:
        kw["feature_encoder_spec"] = parse_conv_spec(kw["feature_encoder_spec"])
    if audio and "w2v_encoder.proj.weight" in ck.tensors:
        kw.update(vocab_size=_rows(ck.tensors, "w2v_encoder.proj.weight", path),
                  final_dropout=float((ck.finetune_cfg or {}).get("final_dropout", 0.0)))
        if ck.vocabulary:
            kw["extra"] = {VOCABULARY_KEY: ck.vocabulary}
    if not audio:
        kw["vocab_size"] = _rows(ck.tensors, _text2_key(ck.tensors, "local_encoder.embed_tokens.weight"), path)
        heads = sorted({k.split(".")[1] for k in ck.tensors if k.startswith("classification_heads.")})
        if heads:
            kw["id2label"] = {i: f"LABEL_{i}" for i in range(
                _rows(ck.tensors, f"classification_heads.{heads[0]}.out_proj.weight", path))}
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its cfg does not describe a supported data2vec 2.0 model: {e}") from None


def _text2_key(tensors: dict, suffix: str) -> str:
    name = "modality_encoders.TEXT." + suffix
    return next((k for k in tensors if k.endswith(name)), name)


def build_config(ck, path: str):
    """The config of the model a `fairseq.FairseqCheckpoint` holds."""
    builders = {"v1-audio": _v1_audio_config, "v1-text": _v1_text_config}
    return builders.get(ck.family, _v2_config)(ck, path)
