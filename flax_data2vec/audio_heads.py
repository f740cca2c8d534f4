"""Task heads on the Data2Vec audio encoder: CTC, sequence and frame classification, x-vectors.

Each class matches the transformers class of the same name, output fields and loss included; the
encoder is the submodule `data2vec_audio`, as in the reference's state dict.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from .audio import Data2VecAudioModel, conv_output_lengths, feature_attention_mask
from .base import ModelOptions
from .checks import check_ids
from .ctc import ctc_loss
from .layers import weighted_layer_sum
from .losses import IGNORE_INDEX, am_softmax_sum, cross_entropy
from .outputs import HeadOutput, XVectorOutput

Array = jax.Array


def _check_labels(labels, shape: tuple, name: str, upper: int | None = None) -> None:
    """Shape always; values in [0, upper) or -100 (padding / ignored) eagerly, and under `checks.checked`."""
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    if upper is not None:
        check_ids(name, labels, upper, ignore=IGNORE_INDEX)


class _AudioHead(ModelOptions):
    """Shared plumbing: run the encoder (named `data2vec_audio`) and pick the hidden states to pool."""

    freeze_feature_encoder: bool = False
    frame_multiple: int = 1  # see Data2VecAudioModel
    padding_invariant: bool = False  # see Data2VecAudioModel

    def encode(self, input_values, attention_mask, mask_time_indices, deterministic, output_attentions,
               output_hidden_states, weighted: bool):
        base = Data2VecAudioModel(**self.options, config=self.config, frame_multiple=self.frame_multiple,
                                  padding_invariant=self.padding_invariant,
                                  freeze_feature_encoder=self.freeze_feature_encoder, name="data2vec_audio")
        out = base(input_values, attention_mask, mask_time_indices, deterministic=deterministic,
                   output_attentions=output_attentions,
                   output_hidden_states=output_hidden_states or (weighted and self.config.use_weighted_layer_sum))
        hidden = out.last_hidden_state
        if weighted and self.config.use_weighted_layer_sum:
            n = self.config.num_hidden_layers + 1
            weights = self.param("layer_weights", lambda _, s: jnp.ones(s, self.param_dtype) / n, (n,))
            hidden = weighted_layer_sum(out.hidden_states, weights)
        return out, hidden

    def dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(self.config.initializer_range), name=name)

    def _no_adapter(self) -> None:
        if self.config.add_adapter:
            raise ValueError(f"{type(self).__name__} does not support adapters (config.add_adapter=True)")


def _outputs(out, output_hidden_states: bool, output_attentions: bool) -> dict:
    return dict(hidden_states=out.hidden_states if output_hidden_states else None,
                attentions=out.attentions if output_attentions else None)


class Data2VecAudioForCTC(_AudioHead):
    """Encoder -> dropout -> Linear to the character vocabulary; CTC loss when `labels` are given.

    labels: (batch, L) int, padded with -100 (or the blank id, `pad_token_id`).
    """

    @nn.compact
    def __call__(self, input_values, attention_mask=None, labels=None, mask_time_indices=None, *,
                 deterministic: bool = True, output_attentions: bool = False,
                 output_hidden_states: bool = False) -> HeadOutput:
        c = self.config
        if labels is not None:
            if labels.ndim != 2:
                raise ValueError(f"labels must have shape (batch, target_length), got {tuple(labels.shape)}")
            _check_labels(labels, (input_values.shape[0], labels.shape[1]), "labels", c.vocab_size)
        out, hidden = self.encode(input_values, attention_mask, mask_time_indices, deterministic,
                                  output_attentions, output_hidden_states, weighted=False)
        hidden = nn.Dropout(c.final_dropout)(hidden, deterministic=deterministic)
        logits = self.dense(c.vocab_size, "lm_head")(hidden)
        loss = None
        if labels is not None:
            samples = (jnp.full((input_values.shape[0],), input_values.shape[1]) if attention_mask is None
                       else attention_mask.astype(jnp.int32).sum(-1))
            loss = ctc_loss(logits, conv_output_lengths(c, samples), labels, c.pad_token_id, c.ctc_loss_reduction,
                            c.ctc_zero_infinity)
        return HeadOutput(logits=logits, loss=loss, **_outputs(out, output_hidden_states, output_attentions))


class Data2VecAudioForSequenceClassification(_AudioHead):
    """[Weighted layer sum] -> Linear(classifier_proj_size) -> mean over real frames -> Linear(num_labels)."""

    @nn.compact
    def __call__(self, input_values, attention_mask=None, labels=None, *, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False) -> HeadOutput:
        self._no_adapter()
        c = self.config
        if labels is not None:
            _check_labels(labels, (input_values.shape[0],), "labels", c.num_labels)
        out, hidden = self.encode(input_values, attention_mask, None, deterministic, output_attentions,
                                  output_hidden_states, weighted=True)
        hidden = self.dense(c.classifier_proj_size, "projector")(hidden)
        if attention_mask is None:
            pooled = hidden.mean(axis=1)
        else:
            frames = feature_attention_mask(c, attention_mask, hidden.shape[1])[:, :, None]
            pooled = jnp.where(frames, hidden, 0).sum(axis=1) / frames.sum(axis=1)
        logits = self.dense(c.num_labels, "classifier")(pooled)
        loss = None if labels is None else cross_entropy(logits, labels)
        return HeadOutput(logits=logits, loss=loss, **_outputs(out, output_hidden_states, output_attentions))


class Data2VecAudioForAudioFrameClassification(_AudioHead):
    """Per-frame Linear(num_labels); labels (batch, frames, num_labels) are one-/multi-hot, argmax'd as torch."""

    @nn.compact
    def __call__(self, input_values, attention_mask=None, labels=None, *, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False) -> HeadOutput:
        self._no_adapter()
        c = self.config
        out, hidden = self.encode(input_values, attention_mask, None, deterministic, output_attentions,
                                  output_hidden_states, weighted=True)
        logits = self.dense(c.num_labels, "classifier")(hidden)
        loss = None
        if labels is not None:
            _check_labels(labels, logits.shape, "labels")
            targets = jnp.argmax(labels.reshape(-1, c.num_labels), axis=1)
            loss = cross_entropy(logits.reshape(-1, c.num_labels), targets)
        return HeadOutput(logits=logits, loss=loss, **_outputs(out, output_hidden_states, output_attentions))


def tdnn_output_lengths(config, lengths, with_dilation: bool = False):
    """Frames left after the TDNN stack. The reference ignores dilation (`with_dilation=False`)."""
    for k, d in zip(config.tdnn_kernel, config.tdnn_dilation):
        lengths = lengths - (d if with_dilation else 1) * (k - 1)
    return lengths


class Data2VecAudioForXVector(_AudioHead):
    """Projector -> TDNN (dilated convs + ReLU) -> mean/std statistics pooling -> embeddings -> AM-softmax.

    `tdnn_lengths_with_dilation=True` pools over the frames the TDNN really produces; the default
    reproduces the reference, whose lengths ignore dilation (transformers#25476).
    """

    tdnn_lengths_with_dilation: bool = False

    @nn.compact
    def __call__(self, input_values, attention_mask=None, labels=None, *, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False) -> XVectorOutput:
        c = self.config
        if labels is not None:
            _check_labels(labels, (input_values.shape[0],), "labels", c.num_labels)
        out, hidden = self.encode(input_values, attention_mask, None, deterministic, output_attentions,
                                  output_hidden_states, weighted=True)
        hidden = self.dense(c.tdnn_dim[0], "projector")(hidden)
        for i, (dim, k, d) in enumerate(zip(c.tdnn_dim, c.tdnn_kernel, c.tdnn_dilation)):
            hidden = nn.relu(nn.Conv(dim, (k,), kernel_dilation=(d,), padding="VALID", dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=f"tdnn_{i}")(hidden))
        frames = hidden.shape[1]
        if attention_mask is None:
            counts = jnp.full((hidden.shape[0],), frames)
        else:
            counts = tdnn_output_lengths(c, conv_output_lengths(c, attention_mask.astype(jnp.int32).sum(1)),
                                         self.tdnn_lengths_with_dilation)
            counts = jnp.minimum(counts, frames)  # slicing past the end stops at the end, as in torch
        keep = (jnp.arange(frames)[None, :] < counts[:, None])[:, :, None]
        n = counts[:, None].astype(jnp.float32)
        h32 = hidden.astype(jnp.float32)
        mean = jnp.where(keep, h32, 0).sum(1) / n
        std = jnp.sqrt(jnp.where(keep, (h32 - mean[:, None]) ** 2, 0).sum(1) / (n - 1))  # unbiased, as torch.std
        embeddings = self.dense(c.xvector_output_dim, "feature_extractor")(
            jnp.concatenate([mean, std], -1).astype(self.dtype))
        logits = self.dense(c.xvector_output_dim, "classifier")(embeddings)
        weight = self.param("objective", nn.initializers.normal(1.0), (c.xvector_output_dim, c.num_labels),
                            self.param_dtype)
        loss = None
        if labels is not None:
            total, count = am_softmax_sum(logits, weight, labels)
            loss = total / count
        return XVectorOutput(logits=logits, embeddings=embeddings, loss=loss,
                             **_outputs(out, output_hidden_states, output_attentions))


def is_feature_encoder_param(path: tuple[str, ...]) -> bool:
    """True for the CNN feature encoder's params (v1 `feature_extractor`, 2.0 `local_encoder`; not the x-vector
    head's `feature_extractor` Linear)."""
    return ("feature_extractor" in path or "local_encoder" in path) and any(p.startswith("conv_layers_") for p in path)


def feature_encoder_labels(params) -> dict:
    """'frozen' for the CNN feature encoder's params, 'train' elsewhere: labels for `optax.multi_transform`.

    Pair with `freeze_feature_encoder=True` on the module, which also skips the CNN's backward pass.
    """
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: "frozen" if is_feature_encoder_param(k) else "train" for k in flat})
