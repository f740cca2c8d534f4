"""Task heads on the Data2Vec text encoder, and their PyTorch state-dict name tables.

Each head holds the encoder as a submodule named `data2vec_text` (transformers' `base_model_prefix`), so
its parameters convert with the same table, prefixed. The LM heads reuse the word embeddings as the
output projection (tied, as the reference) unless `config.tie_word_embeddings` is False.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import losses
from .base import ModelOptions
from .checks import check_ids
from .config import Data2VecTextConfig
from .layers import dense, gelu, layer_norm
from .outputs import HeadOutput, QuestionAnsweringOutput
from .text import Data2VecTextModel, check_text_inputs

Array = jax.Array
BASE = "data2vec_text"


def _check_labels(name: str, labels, allowed: list[tuple[int, ...]]) -> None:
    """Labels must have one of the `allowed` shapes (checked at trace time, so it also works under jit)."""
    if labels is not None and tuple(np.shape(labels)) not in allowed:
        want = " or ".join(str(s) for s in allowed)
        raise ValueError(f"{name} must have shape {want}, got {tuple(np.shape(labels))}")


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _check_class_ids(name: str, labels, num_classes: int, ignore_index: int | None = losses.IGNORE_INDEX) -> None:
    """Labels must be integer class ids (or the ignore index); values are checked when concrete, as torch does."""
    if labels is None:
        return
    if not jnp.issubdtype(_dtype(labels), jnp.integer):
        raise TypeError(f"{name} must be integer class ids, got dtype {_dtype(labels)}")
    check_ids(name, labels, num_classes, ignore_index)


def _f32(x: Array) -> Array:
    return x.astype(jnp.float32)


class _TextHead(ModelOptions):
    """Shared plumbing: the `data2vec_text` encoder submodule and dropout rates."""

    def _encoder(self, add_pooling_layer: bool = False) -> Data2VecTextModel:
        return Data2VecTextModel(self.config, **self.options, add_pooling_layer=add_pooling_layer, name=BASE)

    def _classifier_dropout(self, x: Array, deterministic: bool) -> Array:
        c: Data2VecTextConfig = self.config
        rate = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        return nn.Dropout(rate)(x, deterministic=deterministic)


class LMHead(nn.Module):
    """dense -> exact GELU -> LayerNorm -> vocabulary logits (float32).

    Tied (the default): logits = h @ word_embeddings.T + bias, with no decoder kernel of its own. Untied:
    a `decoder` Dense; the reference then keeps `lm_head.bias` but never uses it, and so do we.
    """

    config: Data2VecTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, word_embeddings: Array | None) -> Array:
        c = self.config
        x = gelu(dense(c.hidden_size, c.initializer_range, "dense", self.dtype, self.param_dtype)(x))
        x = layer_norm(c.layer_norm_eps, "layer_norm", self.dtype, self.param_dtype)(x)
        bias = self.param("bias", nn.initializers.zeros, (c.vocab_size,), self.param_dtype)
        if word_embeddings is None:
            return _f32(dense(c.vocab_size, c.initializer_range, "decoder", self.dtype, self.param_dtype)(x))
        logits = jnp.dot(x, word_embeddings.astype(self.dtype).T, preferred_element_type=jnp.float32)
        return logits + _f32(bias)


class _LMModel(_TextHead):
    """Encoder + LM head; the masked and causal LMs differ only in the loss and the decoder switches."""

    def _lm_logits(self, input_ids, attention_mask, token_type_ids, position_ids, labels, encoder_kw: dict,
                   masked_positions=None):
        c: Data2VecTextConfig = self.config
        check_text_inputs(c, input_ids, attention_mask, token_type_ids, position_ids)
        if masked_positions is not None:
            if np.ndim(masked_positions) != 2 or np.shape(masked_positions)[0] != np.shape(input_ids)[0]:
                raise ValueError("masked_positions must have shape (batch, k), got "
                                 f"{tuple(np.shape(masked_positions))}")
        scored = tuple(np.shape(input_ids) if masked_positions is None else np.shape(masked_positions))
        _check_labels("labels", labels, [scored])
        _check_class_ids("labels", labels, c.vocab_size)
        base = self._encoder()
        # the head (and its vocabulary matmul) only where it is scored; in eval the last layer too
        out = base(input_ids, attention_mask, token_type_ids, position_ids, output_positions=masked_positions,
                   **encoder_kw)
        embedding = None
        if c.tie_word_embeddings:
            embedding = base.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
        logits = LMHead(c, self.dtype, self.param_dtype, name="lm_head")(out.last_hidden_state, embedding)
        return logits, out


class Data2VecTextForMaskedLM(_LMModel):
    """Token logits over the vocabulary; `labels` (batch, seq) with -100 = not scored.

    `masked_positions` (batch, k) runs the LM head only at those positions (logits (batch, k, vocab),
    labels (batch, k)): the same loss as the full head with -100 elsewhere, for a fraction of the work.
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, labels=None,
                 masked_positions=None, encoder_hidden_states=None, encoder_attention_mask=None,
                 deterministic: bool = True, output_attentions: bool = False,
                 output_hidden_states: bool = False) -> HeadOutput:
        logits, out = self._lm_logits(input_ids, attention_mask, token_type_ids, position_ids, labels, dict(
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
            deterministic=deterministic, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states), masked_positions)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return HeadOutput(logits=logits, loss=loss, hidden_states=out.hidden_states, attentions=out.attentions)


class Data2VecTextForCausalLM(_LMModel):
    """Next-token logits; `labels` are the input ids themselves (shifted inside the loss).

    With `decode=True` (and `mutable=["cache"]`) it runs incremental decoding; see `text.init_cache`.
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, labels=None,
                 encoder_hidden_states=None, encoder_attention_mask=None, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False,
                 decode: bool = False) -> HeadOutput:
        logits, out = self._lm_logits(input_ids, attention_mask, token_type_ids, position_ids, labels, dict(
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
            deterministic=deterministic, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, decode=decode))
        loss = None if labels is None else losses.causal_lm_loss(logits, labels)
        return HeadOutput(logits=logits, loss=loss, hidden_states=out.hidden_states, attentions=out.attentions,
                          cross_attentions=out.cross_attentions)


class ClassificationHead(nn.Module):
    """On the `<s>` token: dropout -> dense -> tanh -> dropout -> out_proj."""

    config: Data2VecTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Array, deterministic: bool) -> Array:
        c = self.config
        rate = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        drop = lambda t: nn.Dropout(rate)(t, deterministic=deterministic)  # noqa: E731
        x = drop(features[:, 0])
        x = jnp.tanh(dense(c.hidden_size, c.initializer_range, "dense", self.dtype, self.param_dtype)(x))
        return dense(c.num_labels, c.initializer_range, "out_proj", self.dtype, self.param_dtype)(drop(x))


def _check_sequence_labels(config: Data2VecTextConfig, labels, batch: int) -> str | None:
    """Validate sequence-classification labels; return the problem type they will be scored as."""
    if labels is None:
        return None
    n = config.num_labels
    problem = config.problem_type or losses.infer_problem_type(n, _dtype(labels))
    if problem == "single_label_classification":
        _check_labels("labels", labels, [(batch,), (batch, 1)])
        _check_class_ids("labels", labels, n)
    elif problem == "regression" and n == 1:
        _check_labels("labels", labels, [(batch,), (batch, 1)])
    else:
        _check_labels("labels", labels, [(batch, n)])
    return problem


class Data2VecTextForSequenceClassification(_TextHead):
    """One prediction per sequence, from the `<s>` token. The loss follows `config.problem_type`,
    inferred (as the reference) from `num_labels` and the labels' dtype when it is None."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, labels=None,
                 deterministic: bool = True, output_attentions: bool = False,
                 output_hidden_states: bool = False) -> HeadOutput:
        c: Data2VecTextConfig = self.config
        check_text_inputs(c, input_ids, attention_mask, token_type_ids, position_ids)
        problem = _check_sequence_labels(c, labels, np.shape(input_ids)[0])
        first = np.zeros((np.shape(input_ids)[0], 1), np.int32)  # the head reads `<s>` alone
        out = self._encoder()(input_ids, attention_mask, token_type_ids, position_ids, deterministic=deterministic,
                              output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                              output_positions=first)
        logits = _f32(ClassificationHead(c, self.dtype, self.param_dtype, name="classifier")(
            out.last_hidden_state, deterministic))
        loss = None if labels is None else losses.sequence_classification_loss(logits, labels, problem)
        return HeadOutput(logits=logits, loss=loss, hidden_states=out.hidden_states, attentions=out.attentions)


class Data2VecTextForMultipleChoice(_TextHead):
    """Scores `choices` candidate sequences per example: inputs (batch, choices, seq) -> logits (batch, choices).

    Uses the encoder's pooler (the only head that does); hidden states are those of the flattened
    (batch * choices, seq) batch, as in the reference.
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, labels=None,
                 deterministic: bool = True, output_attentions: bool = False,
                 output_hidden_states: bool = False) -> HeadOutput:
        c: Data2VecTextConfig = self.config
        check_text_inputs(c, input_ids, attention_mask, token_type_ids, position_ids, rank=3,
                          name="(batch, choices, seq)")
        batch, choices, length = np.shape(input_ids)
        _check_labels("labels", labels, [(batch,)])
        _check_class_ids("labels", labels, choices)
        flat = lambda t: None if t is None else t.reshape(batch * choices, length)  # noqa: E731
        out = self._encoder(add_pooling_layer=True)(
            flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids),
            deterministic=deterministic, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states)
        pooled = nn.Dropout(c.hidden_dropout_prob)(out.pooler_output, deterministic=deterministic)
        scores = dense(1, c.initializer_range, "classifier", self.dtype, self.param_dtype)(pooled)
        logits = _f32(scores.reshape(batch, choices))
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return HeadOutput(logits=logits, loss=loss, hidden_states=out.hidden_states, attentions=out.attentions)


class Data2VecTextForTokenClassification(_TextHead):
    """One prediction per token (e.g. NER): dropout -> Linear(num_labels); `labels` (batch, seq), -100 ignored."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, labels=None,
                 deterministic: bool = True, output_attentions: bool = False,
                 output_hidden_states: bool = False) -> HeadOutput:
        c: Data2VecTextConfig = self.config
        check_text_inputs(c, input_ids, attention_mask, token_type_ids, position_ids)
        _check_labels("labels", labels, [tuple(np.shape(input_ids))])
        _check_class_ids("labels", labels, c.num_labels)
        out = self._encoder()(input_ids, attention_mask, token_type_ids, position_ids, deterministic=deterministic,
                              output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        x = self._classifier_dropout(out.last_hidden_state, deterministic)
        logits = _f32(dense(c.num_labels, c.initializer_range, "classifier", self.dtype, self.param_dtype)(x))
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return HeadOutput(logits=logits, loss=loss, hidden_states=out.hidden_states, attentions=out.attentions)


class Data2VecTextForQuestionAnswering(_TextHead):
    """Extractive QA: per-token start/end logits. The loss needs both `start_positions` and `end_positions`
    (batch,); positions outside the sequence are ignored (clamped to seq, the ignore index)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 start_positions=None, end_positions=None, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False) -> QuestionAnsweringOutput:
        c: Data2VecTextConfig = self.config
        if c.num_labels != 2:
            raise ValueError(f"question answering needs num_labels == 2 (start, end), got {c.num_labels}")
        check_text_inputs(c, input_ids, attention_mask, token_type_ids, position_ids)
        batch = np.shape(input_ids)[0]
        for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
            _check_labels(name, positions, [(batch,), (batch, 1)])
            if positions is not None and not jnp.issubdtype(_dtype(positions), jnp.integer):
                raise TypeError(f"{name} must be integer token indices, got dtype {_dtype(positions)}")
        out = self._encoder()(input_ids, attention_mask, token_type_ids, position_ids, deterministic=deterministic,
                              output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        logits = _f32(dense(2, c.initializer_range, "qa_outputs", self.dtype, self.param_dtype)(out.last_hidden_state))
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = losses.span_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringOutput(start_logits=start_logits, end_logits=end_logits, loss=loss,
                                       hidden_states=out.hidden_states, attentions=out.attentions)
