"""Task heads on the data2vec 2.0 encoders, and the fairseq 2.0 state-dict names of every class.

The heads reuse the v1 head modules where the math is the same (text LM head and classification head,
CTC loss, cross-entropy). The state-dict naming of the 2.0 classes is fairseq's: a base model's keys are
those of a pre-training file (`modality_encoders.AUDIO.*`, `blocks.*`); inside a head class the encoder sits
under fairseq's fine-tuning prefixes (`w2v_encoder.w2v_model.` for CTC, `model.` for text classification).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import losses
from .audio import conv_output_lengths, feature_attention_mask
from .base import ModelOptions
from .ctc import ctc_loss
from .data2vec2 import Data2Vec2AudioModel, Data2Vec2TextModel
from .layers import dense
from .outputs import HeadOutput, QuestionAnsweringOutput
from .text_heads import ClassificationHead, LMHead
from .weights import Special, WeightTable, prefixed

Array = jax.Array
AUDIO_BASE, TEXT_BASE = "data2vec2_audio", "data2vec2_text"  # flax submodule names of the encoders
# fairseq prefixes of the encoder inside fine-tuned checkpoints (REFERENCE.md §5.5.4)
AUDIO_PREFIX, TEXT_PREFIX = "w2v_encoder.w2v_model", "model"


def _check_shape(name: str, value, shape: tuple) -> None:
    if value is not None and tuple(np.shape(value)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(np.shape(value))}")


def _outputs(out) -> dict:
    return dict(hidden_states=out.hidden_states, attentions=out.attentions)


class _Audio2Head(ModelOptions):
    freeze_feature_encoder: bool = False

    def encode(self, input_values, attention_mask, deterministic, output_attentions, output_hidden_states):
        return Data2Vec2AudioModel(self.config, **self.options, freeze_feature_encoder=self.freeze_feature_encoder,
                                   name=AUDIO_BASE)(input_values, attention_mask, deterministic=deterministic,
                                                    output_attentions=output_attentions,
                                                    output_hidden_states=output_hidden_states)

    def dense(self, features: int, name: str) -> nn.Dense:
        return dense(features, self.config.initializer_range, name, self.dtype, self.param_dtype)


class Data2Vec2AudioForCTC(_Audio2Head):
    """Encoder -> dropout -> Linear to the letter vocabulary (fairseq's `w2v_encoder.proj`); CTC loss with `labels`
    (batch, L) padded with -100 or the blank `pad_token_id` (fairseq's index 0)."""

    @nn.compact
    def __call__(self, input_values, attention_mask=None, labels=None, *, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False) -> HeadOutput:
        c = self.config
        if labels is not None:
            if np.ndim(labels) != 2 or np.shape(labels)[0] != np.shape(input_values)[0]:
                raise ValueError(f"labels must have shape (batch, target_length), got {tuple(np.shape(labels))}")
            if not isinstance(labels, jax.core.Tracer) and np.size(labels) and int(np.max(labels)) >= c.vocab_size:
                raise ValueError(f"labels values must be < vocab_size ({c.vocab_size}), got max {int(np.max(labels))}")
        out = self.encode(input_values, attention_mask, deterministic, output_attentions, output_hidden_states)
        hidden = nn.Dropout(c.final_dropout)(out.last_hidden_state, deterministic=deterministic)
        logits = self.dense(c.vocab_size, "lm_head")(hidden)
        loss = None
        if labels is not None:
            samples = (jnp.full((input_values.shape[0],), input_values.shape[1]) if attention_mask is None
                       else attention_mask.astype(jnp.int32).sum(-1))
            loss = ctc_loss(logits, conv_output_lengths(c.front_end(), samples), labels, c.pad_token_id,
                            c.ctc_loss_reduction, c.ctc_zero_infinity)
        return HeadOutput(logits=logits, loss=loss, **_outputs(out))


class Data2Vec2AudioForSequenceClassification(_Audio2Head):
    """Linear(classifier_proj_size) -> mean over real frames -> Linear(num_labels), as the v1 head."""

    @nn.compact
    def __call__(self, input_values, attention_mask=None, labels=None, *, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False) -> HeadOutput:
        c = self.config
        _check_shape("labels", labels, (np.shape(input_values)[0],))
        out = self.encode(input_values, attention_mask, deterministic, output_attentions, output_hidden_states)
        hidden = self.dense(c.classifier_proj_size, "projector")(out.last_hidden_state)
        if attention_mask is None:
            pooled = hidden.mean(axis=1)
        else:
            frames = feature_attention_mask(c.front_end(), attention_mask, hidden.shape[1])[:, :, None]
            pooled = jnp.where(frames, hidden, 0).sum(axis=1) / frames.sum(axis=1)
        logits = self.dense(c.num_labels, "classifier")(pooled)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return HeadOutput(logits=logits, loss=loss, **_outputs(out))


class _Text2Head(ModelOptions):
    def encode(self, input_ids, attention_mask, deterministic, output_attentions, output_hidden_states):
        encoder = Data2Vec2TextModel(self.config, **self.options, name=TEXT_BASE)
        out = encoder(input_ids, attention_mask, deterministic=deterministic, output_attentions=output_attentions,
                      output_hidden_states=output_hidden_states)
        return encoder, out

    def classifier(self, features: int, x: Array, deterministic: bool) -> Array:
        c = self.config
        rate = c.classifier_dropout if c.classifier_dropout is not None else c.dropout
        x = nn.Dropout(rate)(x, deterministic=deterministic)
        return dense(features, c.initializer_range, "classifier", self.dtype, self.param_dtype)(x).astype(jnp.float32)


class Data2Vec2TextForMaskedLM(_Text2Head):
    """RoBERTa LM head (dense -> GELU -> LayerNorm -> tied vocabulary projection); `labels` -100 = not scored.
    The released 2.0 text model has no LM head (it pre-trains with a regression decoder): it starts new."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, labels=None, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False) -> HeadOutput:
        _check_shape("labels", labels, np.shape(input_ids))
        encoder, out = self.encode(input_ids, attention_mask, deterministic, output_attentions, output_hidden_states)
        embedding = encoder.variables["params"]["embed_tokens"]["embedding"]
        logits = LMHead(self.config.heads_config(), self.dtype, self.param_dtype, name="lm_head")(
            out.last_hidden_state, embedding)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return HeadOutput(logits=logits, loss=loss, **_outputs(out))


class Data2Vec2TextForSequenceClassification(_Text2Head):
    """fairseq's RobertaClassificationHead on the first token (dropout, dense, tanh, dropout, out_proj)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, labels=None, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False) -> HeadOutput:
        c = self.config
        if labels is not None and np.shape(labels)[:1] != np.shape(input_ids)[:1]:
            raise ValueError(f"labels must have batch size {np.shape(input_ids)[0]}, got shape {np.shape(labels)}")
        _, out = self.encode(input_ids, attention_mask, deterministic, output_attentions, output_hidden_states)
        logits = ClassificationHead(c.heads_config(), self.dtype, self.param_dtype, name="classifier")(
            out.last_hidden_state, deterministic).astype(jnp.float32)
        loss = None if labels is None else losses.sequence_classification_loss(logits, labels, c.problem_type)
        return HeadOutput(logits=logits, loss=loss, **_outputs(out))


class Data2Vec2TextForTokenClassification(_Text2Head):
    """Per-token dropout -> Linear(num_labels); `labels` (batch, seq) with -100 ignored."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, labels=None, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False) -> HeadOutput:
        _check_shape("labels", labels, np.shape(input_ids))
        _, out = self.encode(input_ids, attention_mask, deterministic, output_attentions, output_hidden_states)
        logits = self.classifier(self.config.num_labels, out.last_hidden_state, deterministic)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return HeadOutput(logits=logits, loss=loss, **_outputs(out))


class Data2Vec2TextForQuestionAnswering(_Text2Head):
    """Per-token start/end logits; the span loss needs both `start_positions` and `end_positions` (batch,)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, start_positions=None, end_positions=None,
                 deterministic: bool = True, output_attentions: bool = False,
                 output_hidden_states: bool = False) -> QuestionAnsweringOutput:
        c = self.config
        for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
            _check_shape(name, positions, (np.shape(input_ids)[0],))
        _, out = self.encode(input_ids, attention_mask, deterministic, output_attentions, output_hidden_states)
        logits = dense(2, c.initializer_range, "qa_outputs", self.dtype, self.param_dtype)(
            out.last_hidden_state).astype(jnp.float32)
        start, end = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = losses.span_loss(start, end, start_positions, end_positions)
        return QuestionAnsweringOutput(start_logits=start, end_logits=end, loss=loss, **_outputs(out))


# ---------------------------------------------------------------------------------------------------------------
# fairseq 2.0 state-dict names (REFERENCE.md §5.5.3): flax module path -> fairseq module name
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
    base, prefix = (AUDIO_BASE, AUDIO_PREFIX) if audio else (TEXT_BASE, TEXT_PREFIX)
    rules = prefixed(base_rules, base, prefix) + tuple(heads[class_name])
    return WeightTable(rules, _alibi_scale(base + "/", prefix + ".") if audio else {})


DATA2VEC2_CLASSES = {cls.__name__: cls for cls in (
    Data2Vec2AudioModel, Data2Vec2AudioForCTC, Data2Vec2AudioForSequenceClassification, Data2Vec2TextModel,
    Data2Vec2TextForMaskedLM, Data2Vec2TextForSequenceClassification, Data2Vec2TextForTokenClassification,
    Data2Vec2TextForQuestionAnswering)}
