"""flax_data2vec: Data2Vec audio and text models in JAX/Flax, numerically matching transformers.

The names below are imported on first use (PEP 562), so `import flax_data2vec.train.config` and the command
lines' argument checks run without loading JAX; `import flax_data2vec as fd; fd.load(...)` works as usual.
"""

from __future__ import annotations

import importlib

# public name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(("Data2VecAudioConfig", "Data2VecTextConfig"), "config"),
    "Data2VecAudioModel": "audio",
    **dict.fromkeys(("Data2VecAudioForAudioFrameClassification", "Data2VecAudioForCTC",
                     "Data2VecAudioForSequenceClassification", "Data2VecAudioForXVector",
                     "feature_encoder_labels"), "audio_heads"),
    **dict.fromkeys(("checked", "debug_checks"), "checks"),
    **dict.fromkeys(("Data2Vec2AudioModel", "Data2Vec2TextModel"), "data2vec2"),
    **dict.fromkeys(("Data2Vec2AudioConfig", "Data2Vec2TextConfig"), "data2vec2_config"),
    **dict.fromkeys(("Data2Vec2AudioForCTC", "Data2Vec2AudioForSequenceClassification", "Data2Vec2TextForMaskedLM",
                     "Data2Vec2TextForQuestionAnswering", "Data2Vec2TextForSequenceClassification",
                     "Data2Vec2TextForTokenClassification"), "data2vec2_heads"),
    **dict.fromkeys(("load", "save"), "hub"),
    **dict.fromkeys(("embed", "pipeline"), "pipelines"),
    **dict.fromkeys(("from_transformers", "init_params", "model_class", "to_transformers_state_dict"), "registry"),
    "Data2VecTextModel": "text",
    **dict.fromkeys(("Data2VecTextForCausalLM", "Data2VecTextForMaskedLM", "Data2VecTextForMultipleChoice",
                     "Data2VecTextForQuestionAnswering", "Data2VecTextForSequenceClassification",
                     "Data2VecTextForTokenClassification"), "text_heads"),
}

__version__ = "0.1.0"
__all__ = [*_EXPORTS, "fairseq"]


def __getattr__(name: str):
    if name not in _EXPORTS:  # a submodule, as `fd.fairseq.vocabulary` or `fd.weights`
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
