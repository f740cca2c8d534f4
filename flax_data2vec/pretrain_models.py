"""data2vec v1 students and teachers, built from the audio and text models (the objective is in pretrain.py).

A student is the bare encoder (`Data2VecAudioModel` / `Data2VecTextModel`, as the submodule `backbone`, so
`params["backbone"]` is a plain checkpoint of that class) on the masked input, plus the regression head.
The teacher is an EMA copy of `params["backbone"]["encoder"]` run in eval mode under `stop_gradient`:
audio on the student's unmasked projected features (the CNN and projection are shared, fairseq
`pre_encoder_features`), text on the embeddings of the target tokens (embeddings shared).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .audio import AudioEncoder, Data2VecAudioModel
from .layers import mask_to_bias_mask
from .pretrain import Data2VecPretrainConfig, RegressionHead, make_targets
from .text import Data2VecTextModel, TextEmbeddings, TextEncoder

TEACHER_INPUTS = ("unmasked", "masked")


class AudioStudent(nn.Module):
    """Span-masked frames -> encoder -> regression head; also the unmasked projected features and frame mask."""

    config: Any
    pretrain: Data2VecPretrainConfig
    options: dict  # dtype, param_dtype, scan_layers, remat, attention_implementation

    @nn.compact
    def __call__(self, input_values, attention_mask, mask, deterministic: bool = True):
        out = Data2VecAudioModel(self.config, **self.options, name="backbone")(
            input_values, attention_mask, mask_time_indices=mask, deterministic=deterministic,
            output_projected_features=True)
        pred = RegressionHead(self.config.hidden_size, self.pretrain.head_layers, self.pretrain.head_init_std,
                              dtype=self.options["dtype"], param_dtype=self.options["param_dtype"],
                              name="regression_head")(out.last_hidden_state)
        return pred, out.projected_features, out.feature_mask


class TextStudent(nn.Module):
    """Masked tokens -> encoder -> regression head."""

    config: Any
    pretrain: Data2VecPretrainConfig
    options: dict

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        out = Data2VecTextModel(self.config, **self.options, add_pooling_layer=False, name="backbone")(
            input_ids, attention_mask, deterministic=deterministic)
        return RegressionHead(self.config.hidden_size, self.pretrain.head_layers, self.pretrain.head_init_std,
                              dtype=self.options["dtype"], param_dtype=self.options["param_dtype"],
                              name="regression_head")(out.last_hidden_state)


def teacher_ffn_outputs(encoder, teacher_params, hidden, bias_or_mask, audio: bool) -> list[jax.Array]:
    """Every teacher layer's FFN output (before dropout, residual and final LayerNorm), eval mode, no gradient."""
    hidden = jax.lax.stop_gradient(hidden)
    if audio:
        _, _, extras = encoder.apply({"params": teacher_params}, hidden, bias_or_mask, True)
    else:
        _, _, extras = encoder.apply({"params": teacher_params}, hidden, mask_to_bias_mask(bias_or_mask), None, None,
                                     True)
    return [jax.lax.stop_gradient(e[2]) for e in extras]


def audio_targets(config, options: dict, pretrain: Data2VecPretrainConfig, teacher_params, projected, frame_mask):
    """Regression targets of the audio teacher: top-K instance-normed FFN outputs, averaged."""
    layers = teacher_ffn_outputs(AudioEncoder(config, **options), teacher_params, projected, frame_mask, True)
    return make_targets(layers, pretrain.top_k, pretrain.target_norm, final_norm=pretrain.final_target_norm)


def text_teacher_input(input_ids, attention_mask, mask, pad_token_id: int, teacher_input: str):
    """(teacher ids, teacher attention mask). "unmasked": the whole sentence (the paper). "masked": fairseq's
    released code, whose teacher sees the original tokens at the masked positions only, pad elsewhere
    (fairseq#4881); a row with nothing masked keeps its whole sentence, since it scores nothing anyway."""
    if teacher_input == "unmasked":
        return input_ids, attention_mask
    if teacher_input != "masked":
        raise ValueError(f"teacher_input must be one of {TEACHER_INPUTS}, got {teacher_input!r}")
    any_masked = mask.any(-1, keepdims=True)
    ids = jnp.where(mask | ~any_masked, input_ids, pad_token_id)
    return ids, jnp.where(any_masked, mask, attention_mask > 0).astype(attention_mask.dtype)


def text_targets(config, options: dict, pretrain: Data2VecPretrainConfig, embedding_params, teacher_params,
                 target_ids, attention_mask):
    """Regression targets of the text teacher on `target_ids` (its input, embedded with the student's
    embeddings): top-K layer-normed FFN outputs, averaged."""
    embed = TextEmbeddings(config, options["dtype"], options["param_dtype"])
    hidden = embed.apply({"params": jax.lax.stop_gradient(embedding_params)}, target_ids, None, None, 0, True)
    layers = teacher_ffn_outputs(TextEncoder(config, **options), teacher_params, hidden, attention_mask, False)
    return make_targets(layers, pretrain.top_k, pretrain.target_norm, final_norm=pretrain.final_target_norm)
