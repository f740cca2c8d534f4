"""Data2Vec text encoder: RoBERTa embeddings -> post-LN Transformer [-> pooler].

Numerically the function of transformers' `Data2VecTextModel` (REFERENCE.md §2). Inputs are token ids
`(batch, seq)`; with `config.is_decoder` the self-attention is causal and `decode=True` runs one step of
incremental decoding against the flax `cache` collection (see `init_cache`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .base import ConfigModule, ModelOptions
from .checks import check_ids
from .config import Data2VecTextConfig
from .layers import TransformerStack, dense, layer_norm, mask_to_bias_mask
from .outputs import BaseModelOutput

Array = jax.Array


def pad_id(config: Data2VecTextConfig) -> int:
    return config.pad_token_id if config.pad_token_id is not None else 0


def position_ids_from_input_ids(input_ids: Array, pad_token_id: int, offset: Array | int = 0) -> Array:
    """RoBERTa positions: real tokens count up from `pad + 1 (+ offset)`, pad tokens sit at `pad`."""
    real = (input_ids != pad_token_id).astype(jnp.int32)
    return (jnp.cumsum(real, axis=-1) + offset) * real + pad_token_id


def embedding_init(std: float, padding_idx: int | None):
    """normal(0, std) with the padding row zeroed, as torch's `nn.Embedding(padding_idx=...)`."""
    def init(key, shape, dtype=jnp.float32):
        table = jax.random.normal(key, shape, dtype) * std
        return table if padding_idx is None else table.at[padding_idx].set(0)
    return init


def _lookup(embed: nn.Embed, ids: Array, padding_idx: int | None) -> Array:
    """Embedding lookup whose `padding_idx` row gets no gradient from here (torch's padding_idx rule)."""
    out = embed(ids)
    if padding_idx is None:
        return out
    return jnp.where((ids == padding_idx)[..., None], jax.lax.stop_gradient(out), out)


class TextEmbeddings(ConfigModule):
    """word + learned position + token type embeddings -> LayerNorm -> dropout."""

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array | None, position_ids: Array | None,
                 position_offset: Array | int = 0, deterministic: bool = True) -> Array:
        c = self.config
        pad = pad_id(c)
        if position_ids is None:
            position_ids = position_ids_from_input_ids(input_ids, pad, position_offset)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embed = lambda n, name, padding_idx=None: nn.Embed(  # noqa: E731
            n, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=embedding_init(c.initializer_range, padding_idx), name=name)
        x = _lookup(embed(c.vocab_size, "word_embeddings", pad), input_ids, pad)
        x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = x + _lookup(embed(c.max_position_embeddings, "position_embeddings", pad), position_ids, pad)
        x = layer_norm(c.layer_norm_eps, "layer_norm", self.dtype, self.param_dtype)(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class TextEncoder(ModelOptions):
    """The Transformer stack (torch `encoder.layer.{i}`); causal if `config.is_decoder`, with
    cross-attention to `encoder_hidden_states` when `config.add_cross_attention` and they are given."""

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, encoder_hidden_states: Array | None = None,
                 encoder_mask: Array | None = None, deterministic: bool = True, output_attentions: bool = False,
                 decode: bool = False, last_positions: Array | None = None):
        c = self.config
        if c.add_cross_attention and encoder_hidden_states is None and self.is_initializing():
            # init without an encoder output must still create the cross-attention weights
            encoder_hidden_states = jnp.zeros((x.shape[0], 1, c.hidden_size), self.dtype)
        stack = TransformerStack(
            c.num_hidden_layers,
            dict(hidden_size=c.hidden_size, num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                 hidden_dropout=c.hidden_dropout_prob, attention_dropout=c.attention_probs_dropout_prob,
                 activation_dropout=0.0, layer_norm_eps=c.layer_norm_eps, init_std=c.initializer_range,
                 cross_attention=encoder_hidden_states is not None, causal=c.is_decoder,
                 attention_implementation=self.attention_implementation,
                 dtype=self.dtype, param_dtype=self.param_dtype),
            scan_layers=self.scan_layers, remat=self.remat, name="layer")
        return stack(x, mask, encoder_hidden_states, encoder_mask, deterministic, output_attentions, decode,
                     last_positions=last_positions)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_positions(positions, input_ids, pooled: bool) -> None:
    """`output_positions` must be (batch, k) integer positions inside the sequence."""
    if pooled:
        raise ValueError("output_positions with add_pooling_layer=True: the pooler reads the first token of the "
                         "whole sequence; build the model with add_pooling_layer=False")
    shape, batch, seq = tuple(np.shape(positions)), np.shape(input_ids)[0], np.shape(input_ids)[1]
    if len(shape) != 2 or shape[0] != batch:
        raise ValueError(f"output_positions must have shape (batch, k) = ({batch}, k), got {shape}")
    if not jnp.issubdtype(positions.dtype if hasattr(positions, "dtype") else np.asarray(positions).dtype,
                          jnp.integer):
        raise TypeError("output_positions must be integer token positions")
    if _is_concrete(positions) and np.size(positions):
        lo, hi = int(np.min(positions)), int(np.max(positions))
        if lo < 0 or hi >= seq:
            raise ValueError(f"output_positions must lie in [0, {seq}), got values in [{lo}, {hi}]")


def check_text_inputs(config: Data2VecTextConfig, input_ids, attention_mask=None, token_type_ids=None,
                      position_ids=None, rank: int = 2, name: str = "(batch, seq)") -> None:
    """Reject bad token input with a clear message before anything is traced."""
    shape = getattr(input_ids, "shape", None)
    dtype = getattr(input_ids, "dtype", None)
    if shape is None or len(shape) != rank:
        raise ValueError(f"input_ids must have shape {name}, got {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"input_ids must be an integer array of token ids, got dtype {dtype}")
    if shape[-1] > config.max_sequence_length:
        raise ValueError(f"input_ids has {shape[-1]} tokens, more than the {config.max_sequence_length} the "
                         f"position embeddings cover (max_position_embeddings - pad_token_id - 1)")
    for arg, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                       ("position_ids", position_ids)):
        if value is not None and tuple(np.shape(value)) != tuple(shape):
            raise ValueError(f"{arg} shape {tuple(np.shape(value))} must equal input_ids shape {tuple(shape)}")
    for arg, value, limit in (("input_ids", input_ids, config.vocab_size),
                              ("token_type_ids", token_type_ids, config.type_vocab_size),
                              ("position_ids", position_ids, config.max_position_embeddings)):
        if value is not None and _is_concrete(value) and np.size(value):
            value = np.asarray(value)
            lo, hi = int(value.min()), int(value.max())
            if lo < 0 or hi >= limit:
                raise ValueError(f"{arg} must lie in [0, {limit}), got values in [{lo}, {hi}]")
        elif value is not None:
            check_ids(arg, value, limit)  # traced: a checkify check under `checks.checked`, else nothing


class Data2VecTextModel(ModelOptions):
    """The bare Data2Vec text encoder: `last_hidden_state` (batch, seq, hidden) and, with
    `add_pooling_layer`, `pooler_output` = tanh(dense(first token)).

    `output_positions` (batch, k): `last_hidden_state` is (batch, k, hidden), the rows at those positions; in
    eval the last layer then computes only those rows (the heads that read a few positions use this).
    """

    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None, token_type_ids: Array | None = None,
                 position_ids: Array | None = None, *, encoder_hidden_states: Array | None = None,
                 encoder_attention_mask: Array | None = None, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False,
                 output_layer_results: bool = False, decode: bool = False,
                 output_positions: Array | None = None) -> BaseModelOutput:
        c: Data2VecTextConfig = self.config
        check_text_inputs(c, input_ids, attention_mask, token_type_ids, position_ids)
        if output_positions is not None:
            _check_positions(output_positions, input_ids, self.add_pooling_layer)
        if encoder_hidden_states is not None and not c.add_cross_attention:
            raise ValueError("encoder_hidden_states given, but the model has no cross-attention layers "
                             "(config.add_cross_attention=False)")
        if decode and not c.is_decoder:
            raise ValueError("decode=True needs a causal model: set config.is_decoder=True")
        if encoder_attention_mask is not None:
            if encoder_hidden_states is None:
                raise ValueError("encoder_attention_mask given without encoder_hidden_states")
            if tuple(encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
                raise ValueError(f"encoder_attention_mask shape {tuple(encoder_attention_mask.shape)} must be "
                                 f"(batch, encoder_seq) = {tuple(encoder_hidden_states.shape[:2])}")

        offset, self_mask = 0, attention_mask
        if decode:
            offset, self_mask = self._decode_step(input_ids, attention_mask)
        x = TextEmbeddings(c, self.dtype, self.param_dtype, name="embeddings")(
            input_ids, token_type_ids, position_ids, offset, deterministic)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.astype(self.dtype)
        # the last layer can run on the wanted rows alone when nothing reads its other rows
        prune = (output_positions is not None and deterministic and not self.scan_layers and not c.is_decoder
                 and encoder_hidden_states is None
                 and not (output_attentions or output_hidden_states or output_layer_results or decode))
        last, hidden_states, extras = TextEncoder(c, **self.options, name="encoder")(
            x, mask_to_bias_mask(self_mask), encoder_hidden_states, mask_to_bias_mask(encoder_attention_mask),
            deterministic, output_attentions, decode, last_positions=output_positions if prune else None)
        if output_positions is not None and not prune:
            last = jnp.take_along_axis(last, jnp.asarray(output_positions, jnp.int32)[..., None], axis=1)
        pooled = None
        if self.add_pooling_layer:
            pooled = jnp.tanh(dense(c.hidden_size, c.initializer_range, "pooler", self.dtype,
                                    self.param_dtype)(last[:, 0]))
        cross = encoder_hidden_states is not None and output_attentions
        return BaseModelOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=tuple(e[0] for e in extras) if output_attentions else None,
            cross_attentions=tuple(e[1] for e in extras) if cross else None,
            layer_results=tuple(e[2] for e in extras) if output_layer_results else None,
        )

    def _decode_step(self, input_ids: Array, attention_mask: Array | None):
        """Advance the token counter; return (tokens already cached, padding mask over the whole cache).

        `attention_mask` covers only this step's tokens; earlier steps' masks are kept in the cache.
        """
        initialized = self.has_variable("cache", "cache_index")
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        cached = self.variable("cache", "attention_mask", jnp.zeros, input_ids.shape, jnp.bool_)
        step_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        if not initialized:  # init call: only sizes the cache (batch, max_length)
            return 0, step_mask
        start = index.value
        cached.value = jax.lax.dynamic_update_slice(cached.value, step_mask, (0, start))
        index.value = start + input_ids.shape[1]
        return start, cached.value


def init_cache(module: nn.Module, batch_size: int, max_length: int, encoder_hidden_states: Array | None = None):
    """An empty (all-zero) decoding cache for sequences of up to `max_length` tokens.

    Pass it as `{"params": params, "cache": cache}` with `decode=True, mutable=["cache"]`.
    """
    ids = jnp.ones((batch_size, max_length), jnp.int32)

    extra = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}

    def init():
        return module.init(jax.random.PRNGKey(0), ids, decode=True, **extra)

    shapes = jax.eval_shape(init)["cache"]
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
