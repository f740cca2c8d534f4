"""PyTorch state dict <-> Flax params, driven by per-modality name tables.

A table is a list of `(flax_regex, torch_template)` pairs over module paths (leaf name excluded),
tried in order; the leaf is renamed and reshaped by its kind (Linear/Conv kernel, LayerNorm scale,
embedding) unless a *special* rule names the full flax path. Both directions use the same table,
so a name is written once. The tables of both modalities (data2vec 2.0's fairseq names too) are here, as is
the base <-> head merge in Flax space.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from flax import traverse_util

from .layers import stack_layer_params, unstack_layer_params


class Special(NamedTuple):
    """A leaf with its own transform: `to_torch(flax_array) -> torch array`, `from_torch` the inverse."""

    torch_name: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray, tuple], np.ndarray]


class WeightTable(NamedTuple):
    """How one model class's flax params are named in transformers' state dict."""

    rules: Sequence[tuple[str, str]]
    specials: Mapping[str, Special] = {}  # full flax path regex -> Special
    # torch keys that are copies of other parameters (tied weights): torch name -> flax path of the source
    tied: Mapping[str, str] = {}
    # torch keys that exist only as buffers/ignored tensors in the reference (e.g. position_ids)
    ignored_torch: Sequence[str] = ()


def prefixed(rules: Sequence[tuple[str, str]], flax_prefix: str, torch_prefix: str) -> tuple:
    """The rules of a base model nested under `flax_prefix` (flax) / `torch_prefix.` (torch)."""
    out = []
    for pattern, template in rules:
        flax_pat = f"{flax_prefix}/{pattern}" if pattern else flax_prefix
        torch_tmpl = f"{torch_prefix}.{template}" if template else torch_prefix
        out.append((flax_pat, torch_tmpl))
    return tuple(out)


def _leaf_to_torch(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if leaf == "kernel":
        if value.ndim == 2:  # Dense (in, out) -> Linear (out, in)
            return "weight", value.T
        return "weight", np.transpose(value, (2, 1, 0))  # Conv (k, in/g, out) -> Conv1d (out, in/g, k)
    if leaf in ("scale", "embedding"):
        return "weight", value
    return leaf, value


def _leaf_from_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return value.T if value.ndim == 2 else np.transpose(value, (2, 1, 0))
    return value


def torch_name(path: str, table: WeightTable) -> str | None:
    """The state-dict key of the flax leaf at `path` ('a/b/kernel'), or None if the table has no rule."""
    for pattern, special in table.specials.items():
        m = re.fullmatch(pattern, path)
        if m:
            return m.expand(special.torch_name)
    module, _, leaf = path.rpartition("/")
    for pattern, template in table.rules:
        m = re.fullmatch(pattern, module)
        if m:
            name = m.expand(template)
            torch_leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
            return f"{name}.{torch_leaf}" if name else torch_leaf
    return None


def _special(path: str, table: WeightTable) -> Special | None:
    for pattern, special in table.specials.items():
        if re.fullmatch(pattern, path):
            return special
    return None


def to_state_dict(params: Mapping, table: WeightTable) -> dict[str, np.ndarray]:
    """Flax params (unrolled layers) -> {torch name: numpy array}, tied copies included."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        value = np.asarray(jax.device_get(value))
        name = torch_name(path, table)
        if name is None:
            raise KeyError(f"no PyTorch name for flax parameter {path!r}")
        special = _special(path, table)
        if special is not None:
            out[name] = np.array(special.to_torch(value), copy=True, order="C")
        else:
            _, converted = _leaf_to_torch(path.rpartition("/")[2], value)
            out[name] = np.array(converted, copy=True, order="C")
    for torch_key, source in table.tied.items():
        if source in flat:
            out[torch_key] = out[torch_name(source, table)]
    return out


class ConversionReport(NamedTuple):
    missing: list[str]  # flax params with no tensor in the state dict (left at their init)
    unexpected: list[str]  # state-dict keys nothing consumed


def from_state_dict(state_dict: Mapping[str, np.ndarray], init_params: Mapping, table: WeightTable,
                    allow_missing: Iterable[str] = ()) -> tuple[dict, ConversionReport]:
    """{torch name: array} -> flax params shaped like `init_params` (unrolled layers).

    Parameters whose key is absent keep their value from `init_params` and are listed as missing;
    a shape mismatch raises ValueError naming the parameter and both shapes.
    """
    flat = traverse_util.flatten_dict(init_params, sep="/")
    consumed, missing, out = set(), [], {}
    for path, init in flat.items():
        name = torch_name(path, table)
        if name is None or name not in state_dict:
            missing.append(name or path)
            out[path] = init
            continue
        value = np.asarray(state_dict[name])
        expected = tuple(_expected_torch_shape(path, init, table))
        if value.shape != expected:
            raise ValueError(f"shape mismatch for {name}: checkpoint has {tuple(value.shape)}, "
                             f"the config expects {expected} (flax {path} {tuple(init.shape)})")
        special = _special(path, table)
        if special is not None:
            value = special.from_torch(value, tuple(init.shape))
        else:
            value = _leaf_from_torch(path.rpartition("/")[2], value)
        out[path] = value.astype(init.dtype)
        consumed.add(name)
    ignored = set(table.tied) | set(table.ignored_torch)
    unexpected = sorted(k for k in state_dict if k not in consumed and k not in ignored)
    allowed = set(allow_missing)
    missing = [m for m in missing if m not in allowed]
    return traverse_util.unflatten_dict(out, sep="/"), ConversionReport(missing, unexpected)


def _expected_torch_shape(path: str, init, table: WeightTable) -> tuple:
    """The state-dict shape of a flax leaf, from a zero-stride view: nothing of the param's size is allocated."""
    view = np.broadcast_to(np.zeros((), np.float32), tuple(init.shape))
    special = _special(path, table)
    if special is not None:
        return special.to_torch(view).shape
    return _leaf_to_torch(path.rpartition("/")[2], view)[1].shape


# ---------------------------------------------------------------------------------------------------------------
# scanned <-> unrolled layer trees
def _map_layer_containers(params: Mapping, fn: Callable[[dict], dict], is_container: Callable[[dict], bool]) -> dict:
    """Apply `fn` to every subtree holding a layer stack (found by `is_container`)."""
    if not isinstance(params, Mapping):
        return params
    if is_container(params):
        params = fn(dict(params))
    return {k: _map_layer_containers(v, fn, is_container) for k, v in params.items()}


def unscan_params(params: Mapping) -> dict:
    """Params of a `scan_layers=True` model -> the unrolled `layers_{i}` layout the tables use."""
    def is_scanned(d):
        return "layers" in d and isinstance(d["layers"], Mapping) and set(d["layers"]) == {"layer"}

    def fn(d):
        n = jax.tree_util.tree_leaves(d["layers"]["layer"])[0].shape[0]
        return unstack_layer_params(d, n)
    return _map_layer_containers(params, fn, is_scanned)


def scan_params(params: Mapping) -> dict:
    """Unrolled `layers_{i}` Transformer layers -> the stacked layout of `scan_layers=True`."""
    def is_stack(d):
        # Transformer stacks are the subtrees whose layers have an `attention` block
        return "layers_0" in d and isinstance(d["layers_0"], Mapping) and "attention" in d["layers_0"]

    def fn(d):
        n = sum(1 for k in d if re.fullmatch(r"layers_\d+", k))
        return stack_layer_params(d, n)
    return _map_layer_containers(params, fn, is_stack)


# ---------------------------------------------------------------------------------------------------------------
# the audio classes' names in transformers' state dict
_LAYER = r"encoder/transformer/layers_(\d+)"
AUDIO_BASE_RULES = (
    (r"feature_extractor/conv_layers_(\d+)/(conv|layer_norm)", r"feature_extractor.conv_layers.\1.\2"),
    (r"feature_projection/(layer_norm|projection)", r"feature_projection.\1"),
    (r"encoder/pos_conv_embed/layers_(\d+)", r"encoder.pos_conv_embed.layers.\1.conv"),
    (r"encoder/layer_norm", r"encoder.layer_norm"),
    (_LAYER + r"/attention/query", r"encoder.layers.\1.attention.q_proj"),
    (_LAYER + r"/attention/key", r"encoder.layers.\1.attention.k_proj"),
    (_LAYER + r"/attention/value", r"encoder.layers.\1.attention.v_proj"),
    (_LAYER + r"/attention/out", r"encoder.layers.\1.attention.out_proj"),
    (_LAYER + r"/attention_norm", r"encoder.layers.\1.layer_norm"),
    (_LAYER + r"/intermediate", r"encoder.layers.\1.feed_forward.intermediate_dense"),
    (_LAYER + r"/output", r"encoder.layers.\1.feed_forward.output_dense"),
    (_LAYER + r"/output_norm", r"encoder.layers.\1.final_layer_norm"),
    (r"adapter/(proj|proj_layer_norm)", r"adapter.\1"),
    (r"adapter/layers_(\d+)", r"adapter.layers.\1.conv"),
    (r"", r""),  # masked_spec_embed
)


def _tdnn_to_torch(kernel):
    k, d_in, d_out = kernel.shape  # flax (k, in, out) -> torch Linear (out, k*in)
    return kernel.transpose(2, 0, 1).reshape(d_out, k * d_in)


def _tdnn_from_torch(weight, shape):
    k, d_in, d_out = shape
    return weight.reshape(d_out, k, d_in).transpose(1, 2, 0)


def audio_weight_table(class_name: str) -> WeightTable:
    """The state-dict naming of one audio class (base model unprefixed, heads under `data2vec_audio.`)."""
    if class_name == "Data2VecAudioModel":
        return WeightTable(AUDIO_BASE_RULES)
    rules = prefixed(AUDIO_BASE_RULES, "data2vec_audio", "data2vec_audio") + (
        (r"(lm_head|projector|classifier|feature_extractor)", r"\1"),
        (r"tdnn_(\d+)", r"tdnn.\1.kernel"),
        (r"", r""),  # layer_weights
    )
    specials = {
        r"tdnn_(\d+)/kernel": Special(r"tdnn.\1.kernel.weight", _tdnn_to_torch, _tdnn_from_torch),
        r"objective": Special("objective.weight", lambda w: w, lambda w, shape: w),
    }
    return WeightTable(rules, specials)


# ---------------------------------------------------------------------------------------------------------------
# the text classes' names in transformers' state dict
def _encoder_rules(p: str, t: str) -> list[tuple[str, str]]:
    """Rules for the encoder at flax prefix `p` ('' or 'data2vec_text/') / torch prefix `t`."""
    layer, tl = p + r"encoder/layer/layers_(\d+)", t + r"encoder.layer.\1"
    return [
        (p + r"embeddings/(word_embeddings|position_embeddings|token_type_embeddings)", t + r"embeddings.\1"),
        (p + r"embeddings/layer_norm", t + "embeddings.LayerNorm"),
        (layer + r"/(attention|crossattention)/(query|key|value)", tl + r".\2.self.\3"),
        (layer + r"/(attention|crossattention)/out", tl + r".\2.output.dense"),
        (layer + r"/(attention|crossattention)_norm", tl + r".\2.output.LayerNorm"),
        (layer + r"/intermediate", tl + ".intermediate.dense"),
        (layer + r"/output", tl + ".output.dense"),
        (layer + r"/output_norm", tl + ".output.LayerNorm"),
        (p + "pooler", t + "pooler.dense"),
    ]


_TEXT_HEAD_RULES = {
    "Data2VecTextModel": [],
    "Data2VecTextForMaskedLM": [("lm_head", "lm_head"), (r"lm_head/(dense|layer_norm|decoder)", r"lm_head.\1")],
    "Data2VecTextForSequenceClassification": [(r"classifier/(dense|out_proj)", r"classifier.\1")],
    "Data2VecTextForMultipleChoice": [("classifier", "classifier")],
    "Data2VecTextForTokenClassification": [("classifier", "classifier")],
    "Data2VecTextForQuestionAnswering": [("qa_outputs", "qa_outputs")],
}
_TEXT_HEAD_RULES["Data2VecTextForCausalLM"] = _TEXT_HEAD_RULES["Data2VecTextForMaskedLM"]

def text_weight_table(class_name: str, tie_word_embeddings: bool = True) -> WeightTable:
    """The flax <-> transformers name table of one text class (`class_name` as in transformers)."""
    if class_name not in _TEXT_HEAD_RULES:
        raise KeyError(f"unknown text class {class_name!r}; expected one of {sorted(_TEXT_HEAD_RULES)}")
    p, t = ("", "") if class_name == "Data2VecTextModel" else ("data2vec_text/", "data2vec_text.")
    rules = _encoder_rules(p, t) + _TEXT_HEAD_RULES[class_name]
    tied = {}
    if class_name in ("Data2VecTextForMaskedLM", "Data2VecTextForCausalLM") and tie_word_embeddings:
        tied = {"lm_head.decoder.weight": p + "embeddings/word_embeddings/embedding",
                "lm_head.decoder.bias": "lm_head/bias"}
    return WeightTable(rules, tied=tied, ignored_torch=(t + "embeddings.position_ids", t + "embeddings.token_type_ids"))


# ---------------------------------------------------------------------------------------------------------------
# the data2vec 2.0 classes' names in fairseq's state dicts (REFERENCE.md §5.5.3; transformers has no 2.0
# classes): a base model's keys are those of a pre-training file (`modality_encoders.AUDIO.*`, `blocks.*`);
# inside a head class the encoder sits under fairseq's fine-tuning prefixes
AUDIO2_BASE, TEXT2_BASE = "data2vec2_audio", "data2vec2_text"  # flax submodule names of the encoders
# fairseq prefixes of the encoder inside fine-tuned checkpoints (REFERENCE.md §5.5.4)
AUDIO2_PREFIX, TEXT2_PREFIX = "w2v_encoder.w2v_model", "model"
# fairseq's Sequential has TransposeLast at index 0, so conv j is `relative_positional_encoder.{j + 1}`
_MAX_POS_CONV = 32


def _block_rules(owner: dict[str, str]) -> list[tuple[str, str]]:
    """AltBlock names; `owner` maps the flax stack name to its fairseq prefix (main or context-encoder blocks)."""
    rules = []
    for stack, prefix in owner.items():
        layer, torch = rf"{stack}/layers_(\d+)", rf"{prefix}.\1"
        rules += [(layer + "/attention/qkv", torch + ".attn.qkv"), (layer + "/attention/out", torch + ".attn.proj"),
                  (layer + "/attention_norm", torch + ".norm1"), (layer + "/output_norm", torch + ".norm2"),
                  (layer + "/intermediate", torch + ".mlp.fc1"), (layer + "/output", torch + ".mlp.fc2")]
    return rules


_AUDIO = "modality_encoders.AUDIO"
_TEXT = "modality_encoders.TEXT"
AUDIO2_BASE_RULES = tuple(
    [(r"local_encoder/conv_layers_(\d+)/conv", _AUDIO + r".local_encoder.conv_layers.\1.0"),
     (r"local_encoder/conv_layers_(\d+)/layer_norm", _AUDIO + r".local_encoder.conv_layers.\1.2.1"),
     ("project_features_norm", _AUDIO + ".project_features.1"),
     ("project_features", _AUDIO + ".project_features.2"),
     ("context_norm", _AUDIO + ".context_encoder.norm"), ("norm", "norm")]
    + [(f"relative_positional_encoder/layers_{j}", f"{_AUDIO}.relative_positional_encoder.{j + 1}.0")
       for j in range(_MAX_POS_CONV)]
    + _block_rules({"blocks": "blocks", "prenet": _AUDIO + ".context_encoder.blocks"}))
TEXT2_BASE_RULES = tuple(
    [(r"(embed_tokens|embed_positions|layernorm_embedding)", _TEXT + r".local_encoder.\1"), ("norm", "norm")]
    + _block_rules({"blocks": "blocks", "prenet": _TEXT + ".context_encoder.blocks"}))


def _alibi_scale(flax_prefix: str, torch_prefix: str) -> dict:
    """alibi_scale is (1, 1, heads, 1, 1) in fairseq (4-d in old files) and (heads,) here."""
    return {flax_prefix + "alibi_scale": Special(
        torch_prefix + _AUDIO + ".alibi_scale", lambda w: w.reshape(1, 1, -1, 1, 1),
        lambda w, shape: np.asarray(w).reshape(shape) if np.size(w) == int(np.prod(shape)) else np.asarray(w))}


AUDIO2_HEAD_RULES = {
    "Data2Vec2AudioModel": None,
    "Data2Vec2AudioForCTC": [("lm_head", "w2v_encoder.proj")],
    "Data2Vec2AudioForSequenceClassification": [(r"(projector|classifier)", r"\1")],
}
TEXT2_HEAD_RULES = {
    "Data2Vec2TextModel": None,
    "Data2Vec2TextForMaskedLM": [("lm_head", "lm_head"), (r"lm_head/(dense|layer_norm)", r"lm_head.\1")],
    "Data2Vec2TextForSequenceClassification": [
        (r"classifier/(dense|out_proj)", r"classification_heads.sentence_classification_head.\1")],
    "Data2Vec2TextForTokenClassification": [("classifier", "classifier")],
    "Data2Vec2TextForQuestionAnswering": [("qa_outputs", "qa_outputs")],
}


def data2vec2_weight_table(class_name: str) -> WeightTable:
    """The flax <-> fairseq 2.0 name table of one class."""
    audio = class_name in AUDIO2_HEAD_RULES
    heads = AUDIO2_HEAD_RULES if audio else TEXT2_HEAD_RULES
    if class_name not in heads:
        raise KeyError(f"unknown data2vec 2.0 class {class_name!r}")
    base_rules = AUDIO2_BASE_RULES if audio else TEXT2_BASE_RULES
    if heads[class_name] is None:
        return WeightTable(base_rules, _alibi_scale("", "") if audio else {})
    base, prefix = (AUDIO2_BASE, AUDIO2_PREFIX) if audio else (TEXT2_BASE, TEXT2_PREFIX)
    rules = prefixed(base_rules, base, prefix) + tuple(heads[class_name])
    return WeightTable(rules, _alibi_scale(base + "/", prefix + ".") if audio else {})


class MergeReport(NamedTuple):
    """What `merge_encoder` did: target leaves kept at their init (new) and loaded leaves left out (dropped)."""

    new: list[str]
    dropped: list[str]


def _split_encoder(params: Mapping, prefix: str | None) -> tuple[dict, dict]:
    """({encoder path: leaf}, {other full path: leaf}) of unrolled params whose encoder sits at `prefix`."""
    flat = traverse_util.flatten_dict(params, sep="/")
    if not prefix:
        return flat, {}
    head = prefix + "/"
    return ({p[len(head):]: v for p, v in flat.items() if p.startswith(head)},
            {p: v for p, v in flat.items() if not p.startswith(head)})


def merge_encoder(target: Mapping, loaded: Mapping, target_prefix: str | None,
                  loaded_prefix: str | None) -> tuple[dict, MergeReport]:
    """Unrolled `target` params with the encoder of `loaded` put in place: base <-> head in Flax space.

    The encoder is `loaded[loaded_prefix]` (the whole tree when None) and goes to `target[target_prefix]`
    (the whole tree when None). Target leaves the encoder does not supply keep their value (a new head);
    loaded leaves with no place are dropped (an old head). A shape mismatch raises ValueError naming the
    parameter.
    """
    target_encoder, target_rest = _split_encoder(target, target_prefix)
    loaded_encoder, loaded_rest = _split_encoder(loaded, loaded_prefix)
    full = (lambda p: f"{target_prefix}/{p}") if target_prefix else (lambda p: p)
    merged, new = dict(target_rest), list(target_rest)
    for path, value in target_encoder.items():
        got = loaded_encoder.get(path)
        if got is None:
            new.append(full(path))
            merged[full(path)] = value
        elif tuple(np.shape(got)) != tuple(np.shape(value)):
            raise ValueError(f"shape mismatch for {path}: the checkpoint has {tuple(np.shape(got))}, "
                             f"the model expects {tuple(np.shape(value))}")
        else:
            merged[full(path)] = got
    dropped = list(loaded_rest) + [p for p in loaded_encoder if p not in target_encoder]
    return (traverse_util.unflatten_dict(merged, sep="/"),
            MergeReport(sorted(new), sorted(dropped)))
