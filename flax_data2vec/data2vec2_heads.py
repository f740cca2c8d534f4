"""Task heads on the data2vec 2.0 encoders.

The heads reuse the v1 head modules where the math is the same (text LM head and classification head,
CTC loss, cross-entropy). Their fairseq state-dict names are `weights.data2vec2_weight_table`.
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
from .weights import AUDIO2_BASE, TEXT2_BASE

Array = jax.Array


def _check_shape(name: str, value, shape: tuple) -> None:
    if value is not None and tuple(np.shape(value)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(np.shape(value))}")


def _outputs(out) -> dict:
    return dict(hidden_states=out.hidden_states, attentions=out.attentions)


class _Audio2Head(ModelOptions):
    freeze_feature_encoder: bool = False

    def encode(self, input_values, attention_mask, deterministic, output_attentions, output_hidden_states):
        return Data2Vec2AudioModel(self.config, **self.options, freeze_feature_encoder=self.freeze_feature_encoder,
                                   name=AUDIO2_BASE)(input_values, attention_mask, deterministic=deterministic,
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
        encoder = Data2Vec2TextModel(self.config, **self.options, name=TEXT2_BASE)
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


DATA2VEC2_CLASSES = {cls.__name__: cls for cls in (
    Data2Vec2AudioModel, Data2Vec2AudioForCTC, Data2Vec2AudioForSequenceClassification, Data2Vec2TextModel,
    Data2Vec2TextForMaskedLM, Data2Vec2TextForSequenceClassification, Data2Vec2TextForTokenClassification,
    Data2Vec2TextForQuestionAnswering)}
