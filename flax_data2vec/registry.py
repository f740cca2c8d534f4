"""The twelve model classes by their transformers names, and conversion to and from PyTorch models.

The data2vec 2.0 classes (`data2vec2_heads.DATA2VEC2_CLASSES`) are registered too; their state-dict naming
(`weights.data2vec2_weight_table`) is fairseq's (transformers has no 2.0 classes).

`from_transformers(torch_model)` builds the matching flax module and params (config included);
`to_transformers_state_dict(module, params)` gives back a state dict that the torch model loads strictly.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import audio_heads
from .audio import Data2VecAudioModel
from .config import Data2VecAudioConfig, Data2VecTextConfig
from .weights import (
    AUDIO2_BASE,
    AUDIO2_PREFIX,
    TEXT2_BASE,
    TEXT2_PREFIX,
    ConversionReport,
    WeightTable,
    audio_weight_table,
    data2vec2_weight_table,
    from_state_dict,
    scan_params,
    text_weight_table,
    to_state_dict,
    unscan_params,
)

AUDIO_CLASSES = {
    "Data2VecAudioModel": Data2VecAudioModel,
    "Data2VecAudioForCTC": audio_heads.Data2VecAudioForCTC,
    "Data2VecAudioForSequenceClassification": audio_heads.Data2VecAudioForSequenceClassification,
    "Data2VecAudioForAudioFrameClassification": audio_heads.Data2VecAudioForAudioFrameClassification,
    "Data2VecAudioForXVector": audio_heads.Data2VecAudioForXVector,
}


def _text_classes() -> dict:
    from . import text, text_heads
    return {"Data2VecTextModel": text.Data2VecTextModel,
            **{n: getattr(text_heads, n) for n in (
                "Data2VecTextForCausalLM", "Data2VecTextForMaskedLM", "Data2VecTextForSequenceClassification",
                "Data2VecTextForMultipleChoice", "Data2VecTextForTokenClassification",
                "Data2VecTextForQuestionAnswering")}}


def data2vec2_classes() -> dict[str, type]:
    """The data2vec 2.0 classes (fairseq-named state dicts; no transformers counterpart)."""
    from .data2vec2_heads import DATA2VEC2_CLASSES
    return DATA2VEC2_CLASSES


def model_classes() -> dict[str, type]:
    """All twelve classes, keyed by their transformers name."""
    return {**AUDIO_CLASSES, **_text_classes()}


def model_class(name: str) -> type:
    classes = data2vec2_classes() if is_data2vec2(name) else AUDIO_CLASSES if is_audio(name) else _text_classes()
    if name not in classes:
        known = sorted({**model_classes(), **data2vec2_classes()})
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(known)}")
    return classes[name]


def is_audio(name: str) -> bool:
    return name.startswith(("Data2VecAudio", "Data2Vec2Audio"))


def is_data2vec2(name: str) -> bool:
    return name.startswith("Data2Vec2")


def config_class(name: str) -> type:
    if is_data2vec2(name):
        from .data2vec2_config import Data2Vec2AudioConfig, Data2Vec2TextConfig
        return Data2Vec2AudioConfig if is_audio(name) else Data2Vec2TextConfig
    return Data2VecAudioConfig if is_audio(name) else Data2VecTextConfig


def weight_table(name: str, config=None) -> WeightTable:
    """The state-dict naming of class `name`; `config` decides whether the text LM decoder is tied."""
    if is_data2vec2(name):
        return data2vec2_weight_table(name)
    if is_audio(name):
        return audio_weight_table(name)
    return text_weight_table(name, getattr(config, "tie_word_embeddings", True))


def base_prefix(name: str) -> str:
    """Submodule / state-dict prefix of the encoder inside a head class."""
    if is_data2vec2(name):
        return AUDIO2_PREFIX if is_audio(name) else TEXT2_PREFIX
    return "data2vec_audio" if is_audio(name) else "data2vec_text"


def encoder_prefix(name: str) -> str | None:
    """Where class `name` keeps its encoder params: under `base_prefix` in a head, at the top in a base model."""
    if name.endswith("Model"):
        return None
    if is_data2vec2(name):  # flax submodule names; base_prefix gives fairseq's state-dict prefixes
        return AUDIO2_BASE if is_audio(name) else TEXT2_BASE
    return base_prefix(name)


def dummy_inputs(module) -> tuple:
    """Smallest inputs that initialise every parameter of `module` (host arrays: the modules' eager checks read
    them, also inside a jitted or abstract init)."""
    c = module.config
    if hasattr(c, "front_end"):  # data2vec 2.0 audio: the v1 CNN's geometry
        c = c.front_end()
    if isinstance(c, Data2VecAudioConfig):
        return (np.zeros((1, c.receptive_field + 2 * c.inputs_to_logits_ratio), np.float32),)
    ids = np.full((1, 4), c.bos_token_id or 0, np.int32)
    if type(module).__name__ == "Data2VecTextForMultipleChoice":
        ids = ids[:, None, :].repeat(2, axis=1)
    return (ids,)


def init_params(module, rng: jax.Array | int = 0, inputs: tuple | None = None) -> dict:
    """Freshly initialised params of `module` (unrolled or scanned layout, as the module is); `inputs`: what to
    initialise on, if not `dummy_inputs` (e.g. a pre-training student's batch)."""
    rng = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    extra = {}
    if getattr(module.config, "add_cross_attention", False):
        extra["encoder_hidden_states"] = jnp.zeros((1, 4, module.config.hidden_size), module.dtype)
    inputs = dummy_inputs(module) if inputs is None else inputs
    # One compiled init instead of one tiny compile per op (eager init of a tiny model is ~200 compiles).
    return jax.jit(lambda key: module.init(key, *inputs, **extra)["params"])(rng)


def abstract_params(module) -> dict:
    """Shapes and dtypes of `module`'s params, without computing them."""
    return jax.eval_shape(lambda: init_params(module.clone(scan_layers=False)))


def params_from_state_dict(module, state_dict: Mapping[str, Any], rng: int = 0,
                           allow_missing: bool = False) -> tuple[dict, ConversionReport]:
    """Torch-named arrays -> params for `module`. Missing params are initialised from `rng` and reported."""
    name = type(module).__name__
    shapes = abstract_params(module)
    state_dict = {k: _to_numpy(v) for k, v in state_dict.items()}
    params, report = from_state_dict(state_dict, shapes, weight_table(name, module.config))
    if report.missing:
        if not allow_missing:
            raise KeyError(f"{name}: parameters missing from the state dict: {', '.join(report.missing)}")
        fresh = traverse_util.flatten_dict(init_params(module.clone(scan_layers=False), rng))
        flat = traverse_util.flatten_dict(params)
        flat = {k: (fresh[k] if isinstance(v, jax.ShapeDtypeStruct) else v) for k, v in flat.items()}
        params = traverse_util.unflatten_dict(flat)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if module.scan_layers:
        params = scan_params(params)
    return params, report


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bf16 has no numpy dtype, go through float32
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def from_transformers(torch_model, **module_options) -> tuple[Any, dict]:
    """(module, params) equal in function to a transformers Data2Vec model (any of the twelve classes).

    `module_options` are passed to the flax class (dtype, param_dtype, scan_layers, remat, ...).
    """
    name = type(torch_model).__name__
    cls = model_class(name)
    config = config_class(name).from_dict(torch_model.config.to_dict())
    module = cls(config=config, **module_options)
    if name == "Data2VecTextModel" and getattr(torch_model, "pooler", None) is None:
        module = module.clone(add_pooling_layer=False)
    params, report = params_from_state_dict(module, torch_model.state_dict())
    if report.unexpected:
        warnings.warn(f"{name}: state-dict entries not used: {', '.join(report.unexpected)}", stacklevel=2)
    return module, params


def to_transformers_state_dict(module, params: Mapping) -> dict[str, np.ndarray]:
    """Params -> {name: numpy array} that `torch_model.load_state_dict(..., strict=True)` accepts."""
    return to_state_dict(unscan_params(params), weight_table(type(module).__name__, module.config))
