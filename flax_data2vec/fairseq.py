"""fairseq data2vec checkpoints (v1 and 2.0; pre-trained, CTC and classification fine-tunes) -> our models.

`load("model.pt")` (also `flax_data2vec.load`) reads the file safely (`fairseq_pickle`), finds which model it
holds from its cfg, builds our config, renames the keys (v1: to transformers' names, so v1 files load into the
`Data2VecAudio*` / `Data2VecText*` classes and export with `convert/orbax_to_pytorch.py`; 2.0: the fairseq names
are our 2.0 classes' own), and converts through the conversion cache like a transformers checkpoint.
`weights="teacher"` takes the EMA teacher that pre-training files carry instead of the student. Facts:
REFERENCE.md §5.5.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Any, Mapping

import numpy as np

from . import checkpoint, hub, registry
from .fairseq_configs import SENTENCE_ENCODER as _SE
from .fairseq_configs import VOCABULARY_KEY, build_config
from .fairseq_pickle import read_checkpoint
from .hub import CheckpointError

WEIGHTS = ("student", "teacher")

# v1 names, fairseq -> transformers (REFERENCE.md §5.5.2). `{x}` stands for one dot-free name segment.
V1_AUDIO = (
    ("feature_extractor.conv_layers.{i}.0.{p}", "feature_extractor.conv_layers.{i}.conv.{p}"),
    ("feature_extractor.conv_layers.{i}.2.1.{p}", "feature_extractor.conv_layers.{i}.layer_norm.{p}"),
    ("layer_norm.{p}", "feature_projection.layer_norm.{p}"),
    ("post_extract_proj.{p}", "feature_projection.projection.{p}"),
    ("mask_emb", "masked_spec_embed"),
    ("encoder.pos_conv.{j}.0.{p}", "encoder.pos_conv_embed.layers.{j}.conv.{p}"),
    ("encoder.layer_norm.{p}", "encoder.layer_norm.{p}"),
    ("encoder.layers.{l}.self_attn.{q}_proj.{p}", "encoder.layers.{l}.attention.{q}_proj.{p}"),
    ("encoder.layers.{l}.self_attn_layer_norm.{p}", "encoder.layers.{l}.layer_norm.{p}"),
    ("encoder.layers.{l}.fc1.{p}", "encoder.layers.{l}.feed_forward.intermediate_dense.{p}"),
    ("encoder.layers.{l}.fc2.{p}", "encoder.layers.{l}.feed_forward.output_dense.{p}"),
    ("encoder.layers.{l}.final_layer_norm.{p}", "encoder.layers.{l}.final_layer_norm.{p}"),
)
_L = _SE + "layers.{l}."
V1_TEXT = (
    (_SE + "embed_tokens.weight", "embeddings.word_embeddings.weight"),
    (_SE + "embed_positions.weight", "embeddings.position_embeddings.weight"),
    (_SE + "layernorm_embedding.{p}", "embeddings.LayerNorm.{p}"),
    (_L + "self_attn.q_proj.{p}", "encoder.layer.{l}.attention.self.query.{p}"),
    (_L + "self_attn.k_proj.{p}", "encoder.layer.{l}.attention.self.key.{p}"),
    (_L + "self_attn.v_proj.{p}", "encoder.layer.{l}.attention.self.value.{p}"),
    (_L + "self_attn.out_proj.{p}", "encoder.layer.{l}.attention.output.dense.{p}"),
    (_L + "self_attn_layer_norm.{p}", "encoder.layer.{l}.attention.output.LayerNorm.{p}"),
    (_L + "fc1.{p}", "encoder.layer.{l}.intermediate.dense.{p}"),
    (_L + "fc2.{p}", "encoder.layer.{l}.output.dense.{p}"),
    (_L + "final_layer_norm.{p}", "encoder.layer.{l}.output.LayerNorm.{p}"),
)
V1_TEXT_HEADS = (
    ("encoder.lm_head.dense.{p}", "lm_head.dense.{p}"), ("encoder.lm_head.layer_norm.{p}", "lm_head.layer_norm.{p}"),
    ("encoder.lm_head.bias", "lm_head.bias"),
    ("classification_heads.{head}.dense.{p}", "classifier.dense.{p}"),
    ("classification_heads.{head}.out_proj.{p}", "classifier.out_proj.{p}"),
)
# pre-training-only entries (regression heads, decoders, EMA copies, buffers), dropped and logged
PRETRAINING_ONLY = re.compile(
    r"(final_proj(\..*)?|_ema|encoder\._ema|encoder\.regression_head\..*|encoder\.sentence_encoder\.version"
    r"|encoder\.lm_head\.weight|.*decoder.*|target_proj(\..*)?|recon_proj(\..*)?"
    r"|modality_encoders\.\w+\.encoder_mask|modality_encoders\.\w+\.extra_tokens)")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^.]+)", re.escape(template)))


def rename(key: str, table, reverse: bool = False, fill: Mapping[str, str] = {"head": "sentence_classification_head"}):
    """`key` renamed by the first matching (fairseq, transformers) pair of `table`; None if none matches."""
    for fairseq_name, hf_name in table:
        source, target = (hf_name, fairseq_name) if reverse else (fairseq_name, hf_name)
        m = _pattern(source).fullmatch(key)
        if m:
            return target.format(**{**fill, **m.groupdict()})
    return None


# ---------------------------------------------------------------------------------------------------------------
# what a file holds
@dataclasses.dataclass
class FairseqCheckpoint:
    """A fairseq file, understood: which family, its model cfg, its tensors and (if any) the EMA teacher."""

    family: str  # "v1-audio", "v1-text", "v2-audio", "v2-text"
    model_cfg: dict  # the pre-training model cfg (for fine-tunes: w2v_args.model)
    finetune_cfg: dict | None  # the fine-tuning model cfg (wav2vec_ctc, ...), else None
    tensors: dict  # name -> torch tensor (EMA dicts removed)
    ema: dict  # fairseq name -> tensor of the teacher (empty if none)
    vocabulary: list[str] | None  # CTC target dictionary symbols, blank first


def _model_cfg(state: dict, path: str) -> tuple[dict, dict | None]:
    cfg = state.get("cfg") or {}
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not model and isinstance(state.get("args"), dict):  # pre-hydra files: argparse args
        model = {**state["args"], "_name": state["args"].get("arch") or state["args"].get("_name")}
    if not isinstance(model, dict) or "_name" not in model:
        raise CheckpointError(f"{path} has no fairseq model cfg (cfg['model']['_name']): is it a fairseq checkpoint?")
    inner = (model.get("w2v_args") or {}).get("model") or model.get("model")
    if isinstance(inner, dict) and "_name" in inner:
        return inner, model
    return model, None


def _family(model_cfg: dict, path: str) -> str:
    name = str(model_cfg["_name"])
    if name == "data2vec_audio":
        return "v1-audio"
    if name == "data2vec_text":
        return "v1-text"
    if "data2vec_multi" in name:
        modality = str(model_cfg.get("supported_modality", "")).rsplit(".", 1)[-1].upper()
        if modality not in ("AUDIO", "TEXT"):
            raise CheckpointError(f"{path} is a data2vec 2.0 {modality or 'unknown-modality'} model; only speech "
                                  "(AUDIO) and text (TEXT) are supported")
        return f"v2-{modality.lower()}"
    kind = "a plain wav2vec 2.0 model" if name.startswith("wav2vec") else f"model {name!r}"
    raise CheckpointError(f"{path} is not a data2vec checkpoint: its cfg describes {kind} (model._name {name!r}); "
                          "expected data2vec_audio, data2vec_text or data2vec_multi")


def _split_ema(model: dict, family: str) -> tuple[dict, dict]:
    """(student tensors, teacher tensors under their fairseq student names)."""
    tensors = {k: v for k, v in model.items() if not isinstance(v, dict)}
    ema = {}
    for key, where in (("_ema", "" if family.startswith("v2") else "encoder."), ("encoder._ema", _SE)):
        for k, v in (model.get(key) or {}).items():
            if family == "v2-text" and k[:1].isdigit():  # text teacher = EMA of `blocks` (ModuleList keys)
                k = "blocks." + k
            if not k.endswith("version"):
                ema[where + k] = v
    return tensors, ema


def _upgrade_v1_text(key: str) -> str:
    if key.startswith("decoder."):
        key = "encoder." + key[len("decoder."):]
    return key.replace(".emb_layer_norm.", ".layernorm_embedding.")


def inspect_checkpoint(path: str | os.PathLike) -> FairseqCheckpoint:
    """Read `path` and say what it holds; one clear error for anything that is not a data2vec checkpoint."""
    path = os.fspath(path)
    state = read_checkpoint(path)
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' state dict: is it a fairseq checkpoint?")
    model_cfg, finetune_cfg = _model_cfg(state, path)
    family = _family(model_cfg, path)
    model = state["model"]
    if family == "v1-text":  # data2vec_text's own upgrade of older names (upgrade_state_dict_named)
        model = {_upgrade_v1_text(k): v for k, v in model.items()}
    tensors, ema = _split_ema(model, family)
    dictionary = (state.get("task_state") or {}).get("target_dictionary")
    vocabulary = None
    if isinstance(dictionary, dict) and dictionary.get("symbols"):
        vocabulary = list(dictionary["symbols"])
        vocabulary[:2] = vocabulary[:2][::-1]  # fairseq's <s> (index 0) is the blank: named <pad> as transformers
    return FairseqCheckpoint(family, model_cfg, finetune_cfg, tensors, ema, vocabulary)


# ---------------------------------------------------------------------------------------------------------------
# tensors in the naming of our classes
NATURAL_CLASS = {  # (family, head found) -> class
    ("v1-audio", "ctc"): "Data2VecAudioForCTC", ("v1-audio", None): "Data2VecAudioModel",
    ("v1-text", "cls"): "Data2VecTextForSequenceClassification", ("v1-text", "lm"): "Data2VecTextForMaskedLM",
    ("v1-text", None): "Data2VecTextModel", ("v2-audio", "ctc"): "Data2Vec2AudioForCTC",
    ("v2-audio", None): "Data2Vec2AudioModel", ("v2-text", "cls"): "Data2Vec2TextForSequenceClassification",
    ("v2-text", None): "Data2Vec2TextModel",
}
FAMILY_PREFIX = {"v1-audio": "Data2VecAudio", "v1-text": "Data2VecText", "v2-audio": "Data2Vec2Audio",
                 "v2-text": "Data2Vec2Text"}


def _head(tensors: dict) -> str | None:
    if "w2v_encoder.proj.weight" in tensors:
        return "ctc"
    if any(k.startswith("classification_heads.") for k in tensors):
        return "cls"
    return "lm" if "encoder.lm_head.dense.weight" in tensors else None


def choose_class(ck: FairseqCheckpoint, requested: str | None, path: str) -> str:
    natural = NATURAL_CLASS.get((ck.family, _head(ck.tensors))) or NATURAL_CLASS[(ck.family, None)]
    if requested is None:
        return natural
    family = [n for n in {**registry.model_classes(), **registry.data2vec2_classes()}
              if n.startswith(FAMILY_PREFIX[ck.family])]
    if requested not in family:
        raise ValueError(f"architecture {requested!r} does not suit {path} ({ck.family} checkpoint); "
                         f"choose one of {', '.join(family)}")
    return requested


def _to_numpy(tensors: dict, path: str) -> dict[str, np.ndarray]:
    """Tensors -> float32 numpy (released weights are float16: said once)."""
    halves = [k for k, v in tensors.items() if str(v.dtype) in ("torch.float16", "torch.bfloat16")]
    if halves:
        warnings.warn(f"{path}: {len(halves)} float16 weights were converted to float32 (pass param_dtype= to "
                      "load them in another dtype)", stacklevel=4)
    return {k: (v.float() if k in halves else v).numpy() for k, v in tensors.items()}


def state_dict_for(ck: FairseqCheckpoint, weights: str, path: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """({name in our class's naming: array}, dropped pre-training-only names)."""
    tensors = dict(ck.tensors)
    if weights == "teacher":
        if not ck.ema:
            raise CheckpointError(f"{path} carries no EMA teacher (only pre-training checkpoints do); "
                                  "load it with weights='student'")
        unknown = sorted(k for k in ck.ema if k not in tensors)
        if unknown:
            warnings.warn(f"{path}: {len(unknown)} teacher entries have no student counterpart and are ignored: "
                          f"{', '.join(unknown[:5])}", stacklevel=3)
        # parts the teacher shares with the student (CNN, embeddings) stay the student's
        tensors.update({k: v for k, v in ck.ema.items() if k in tensors})
    dropped = sorted(k for k in tensors if PRETRAINING_ONLY.fullmatch(k) or k.startswith("modality_encoders.")
                     and not k.startswith(f"modality_encoders.{ck.family[3:].upper()}."))
    tensors = {k: v for k, v in tensors.items() if k not in dropped}
    arrays = _to_numpy(tensors, path)
    if ck.family.startswith("v2"):
        return _v2_names(arrays), dropped
    return _v1_names(arrays, ck.family), dropped


def _v2_names(arrays: dict) -> dict:
    out = {}
    for k, v in arrays.items():
        m = re.fullmatch(r"classification_heads\.[^.]+\.(dense|out_proj)\.(weight|bias)", k)
        out[f"classification_heads.sentence_classification_head.{m[1]}.{m[2]}" if m else k] = v
    return out


def _v1_names(arrays: dict, family: str) -> dict:
    """fairseq v1 names -> transformers names (encoder under `data2vec_audio.` / `data2vec_text.`); unknown kept."""
    audio = family == "v1-audio"
    base = "data2vec_audio." if audio else "data2vec_text."
    out = {}
    for k, v in arrays.items():
        if audio and k.startswith("w2v_encoder."):
            k = "lm_head." + k[len("w2v_encoder.proj."):] if k.startswith("w2v_encoder.proj.") else \
                k[len("w2v_encoder.w2v_model."):]
        name = rename(k, V1_AUDIO if audio else V1_TEXT)
        if name is not None:
            out[base + name] = v
        else:
            out[(rename(k, V1_TEXT_HEADS) if not audio else None) or k] = v
    if not audio:  # transformers has token types; the fairseq model has none (zeros, as transformers' converter)
        width = out[base + "embeddings.word_embeddings.weight"].shape[1]
        out[base + "embeddings.token_type_embeddings.weight"] = np.zeros((1, width), np.float32)
    return out


# ---------------------------------------------------------------------------------------------------------------
# entry points
def convert(path: str, architecture: str | None = None, weights: str = "student") -> tuple[Any, dict, dict]:
    """(float32 module, host params with new ones zero, info) from a fairseq file; info as `hub.params_for`."""
    ck = inspect_checkpoint(path)
    name = choose_class(ck, architecture, path)
    config = build_config(ck, path)
    module = registry.model_class(name)(config=config.replace(architectures=(name,)))
    state_dict, dropped = state_dict_for(ck, weights, path)
    params, info = hub.params_for(module, state_dict, path)
    info["pretraining_only"] = dropped
    return module, params, info


def _source(path: str, weights: str) -> hub.Source:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fairseq checkpoint at {path}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    from .integrity import content_digest  # the cache key follows the file's content, as for transformers files
    return hub.Source(path, "fairseq", os.path.dirname(path), fetch=lambda: [path],
                      identify=lambda: json.dumps(["fairseq", weights, content_digest(
                          path, os.path.join(hub.cache_dir(), ".digests"))]))


def load(path: str | os.PathLike, architecture: str | None = None, dtype=None, param_dtype=None, sharding=None, *,
         rng: int = 0, weights: str = "student", **module_options) -> tuple[Any, dict]:
    """(module, params) of a fairseq data2vec `.pt` file; arguments as `hub.load`, plus `weights` ('student' or
    'teacher'). Converted once into the conversion cache; float16 weights become float32 unless `param_dtype`."""
    path = os.path.abspath(os.fspath(path))
    source = _source(path, weights)
    options = {k: v for k, v in module_options.items() if k not in checkpoint.SPEED_OPTIONS}
    def entry():
        return hub.cache_entry(source, architecture or "natural", options,
                               convert=lambda *_: convert(path, architecture, weights))
    return hub.load_entry(entry, path, dtype, param_dtype, sharding, rng, module_options)


def convert_to_orbax(src: str, dst: str, architecture: str | None = None, weights: str = "student",
                     overwrite: bool = False, rng: int = 0) -> str:
    """A fairseq `.pt` file -> an Orbax checkpoint at `dst` (the `convert/fairseq_to_orbax.py` script)."""
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(dst)} already exists; pass --overwrite to replace it")
    path = os.path.abspath(src)
    source = _source(path, weights)
    module, params, info = convert(path, architecture, weights)
    hub.warn_changes(type(module).__name__, path, info)
    params = checkpoint.init_new(module, params, info["new_paths"], rng, checkpoint.host_sharding())
    return checkpoint.save(dst, module, params, overwrite, metadata={"source": source.key})


def vocabulary(config) -> list[str] | None:
    """The CTC symbols a fine-tuned fairseq file carried (index = logit row; `<pad>` = blank), if any."""
    extra = dict(config.extra)
    return json.loads(extra[VOCABULARY_KEY]) if VOCABULARY_KEY in extra else None
