"""flax_data2vec: Data2Vec audio and text models in JAX/Flax, numerically matching transformers."""

from . import fairseq  # noqa: E402 - fd.fairseq.vocabulary / inspect; `fd.load("x.pt")` reads fairseq files
from .audio import Data2VecAudioModel
from .audio_heads import (
    Data2VecAudioForAudioFrameClassification,
    Data2VecAudioForCTC,
    Data2VecAudioForSequenceClassification,
    Data2VecAudioForXVector,
    feature_encoder_labels,
)
from .checks import checked, debug_checks
from .config import Data2VecAudioConfig, Data2VecTextConfig
from .data2vec2 import Data2Vec2AudioModel, Data2Vec2TextModel
from .data2vec2_config import Data2Vec2AudioConfig, Data2Vec2TextConfig
from .data2vec2_heads import (
    Data2Vec2AudioForCTC,
    Data2Vec2AudioForSequenceClassification,
    Data2Vec2TextForMaskedLM,
    Data2Vec2TextForQuestionAnswering,
    Data2Vec2TextForSequenceClassification,
    Data2Vec2TextForTokenClassification,
)
from .hub import load, save
from .pipelines import embed, pipeline
from .registry import from_transformers, init_params, model_class, to_transformers_state_dict
from .text import Data2VecTextModel
from .text_heads import (
    Data2VecTextForCausalLM,
    Data2VecTextForMaskedLM,
    Data2VecTextForMultipleChoice,
    Data2VecTextForQuestionAnswering,
    Data2VecTextForSequenceClassification,
    Data2VecTextForTokenClassification,
)

__version__ = "0.1.0"

__all__ = [
    "Data2VecAudioConfig", "Data2VecTextConfig",
    "Data2VecAudioModel", "Data2VecAudioForCTC", "Data2VecAudioForSequenceClassification",
    "Data2VecAudioForAudioFrameClassification", "Data2VecAudioForXVector",
    "Data2VecTextModel", "Data2VecTextForCausalLM", "Data2VecTextForMaskedLM", "Data2VecTextForSequenceClassification",
    "Data2VecTextForMultipleChoice", "Data2VecTextForTokenClassification", "Data2VecTextForQuestionAnswering",
    "from_transformers", "to_transformers_state_dict", "init_params", "model_class", "feature_encoder_labels",
    "load", "save", "pipeline", "embed", "checked", "debug_checks",
    "Data2Vec2AudioConfig", "Data2Vec2TextConfig", "Data2Vec2AudioModel", "Data2Vec2AudioForCTC",
    "Data2Vec2AudioForSequenceClassification", "Data2Vec2TextModel", "Data2Vec2TextForMaskedLM",
    "Data2Vec2TextForSequenceClassification", "Data2Vec2TextForTokenClassification",
    "Data2Vec2TextForQuestionAnswering", "fairseq",
]
