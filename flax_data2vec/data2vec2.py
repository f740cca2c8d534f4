"""data2vec 2.0 encoders for speech and text (Baevski et al. 2022, arXiv 2212.07525), inference path.

Audio: waveform -> the wav2vec 2.0 CNN (`local_encoder`) -> LayerNorm + Linear (`project_features`) ->
x + conv positional encoder(x) -> ALiBi bias with a learned per-head scale -> context encoder (LayerNorm,
optional prenet blocks) -> `depth` AltBlocks. Text: token + learned position embeddings -> LayerNorm ->
AltBlocks. The blocks are `layers.TransformerLayer` (post-LN, or pre-LN with `layer_norm_first`) with a
fused qkv projection; CNN and positional convs are the v1 modules (same math). Pre-training (masking,
decoder, EMA teacher) is pretrain2_models.py. REFERENCE.md §5.5.3 describes the reference path step by step.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .audio import FeatureEncoder, PositionalConvEmbedding, check_audio_inputs, feature_attention_mask
from .base import ModelOptions
from .data2vec2_config import Data2Vec2AudioConfig, Data2Vec2TextConfig
from .layers import TransformerStack, dense, layer_norm, mask_to_bias_mask
from .outputs import BaseModelOutput
from .text import embedding_init, position_ids_from_input_ids

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------------
# ALiBi (Press et al. 2022), as data2vec 2.0 uses it: symmetric distances, a learned scale per head
def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head slopes: 2^(-8i/n) for a power of two n; otherwise those of the nearest lower power of two,
    then every other slope of twice that many (12 heads: 2^-1 ... 2^-8, 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5)."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]
    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads), np.float64)
    low = 2 ** math.floor(math.log2(num_heads))
    return np.asarray(power_of_two(low) + power_of_two(2 * low)[0::2][:num_heads - low], np.float64)


def alibi_bias(num_heads: int, length: int, scale: Array) -> Array:
    """(1, heads, length, length) float32 bias -slope_h * |i - j| * max(scale_h, 0); `scale` is (heads,) or (1,)."""
    distance = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :]).astype(np.float32)
    slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
    scale = jnp.maximum(scale.astype(jnp.float32), 0.0)  # fairseq clamps the learned scale at 0
    return (-(slopes * scale)[:, None, None] * distance)[None]


# ---------------------------------------------------------------------------------------------------------------
# the stages before the blocks; called inside a module's compact method, so the params are that module's
# (the encoders below and the pre-training students of pretrain2_models.py share these names)
def local_features(module: ModelOptions, input_values: Array, freeze_cnn: bool = False) -> tuple[Array, Array]:
    """Waveform -> (LayerNormed CNN features, projected `local features` (batch, frames, embed_dim))."""
    c, kw = module.config, dict(dtype=module.dtype, param_dtype=module.param_dtype)
    features = FeatureEncoder(c.front_end(), **kw, name="local_encoder")(input_values)
    if freeze_cnn:
        features = jax.lax.stop_gradient(features)
    normed = layer_norm(1e-5, "project_features_norm", **kw)(features)
    return normed, dense(c.embed_dim, c.initializer_range, "project_features", **kw)(normed)


def positional_conv(module: ModelOptions, x: Array) -> Array:
    """The relative positional encoder's output (added to its input by the caller)."""
    return PositionalConvEmbedding(module.config.front_end(), dtype=module.dtype, param_dtype=module.param_dtype,
                                   name="relative_positional_encoder")(x)


def alibi_scale(module: ModelOptions) -> Array | None:
    """The learned (or fixed) per-head ALiBi scale, or None without ALiBi."""
    c = module.config
    if not c.use_alibi_encoder:
        return None
    scale = module.param("alibi_scale", nn.initializers.constant(c.alibi_scale), (c.alibi_scale_heads,),
                         module.param_dtype)
    return scale if c.learned_alibi_scale else jax.lax.stop_gradient(scale)


def text_embeddings(module: ModelOptions, input_ids: Array, deterministic: bool) -> Array:
    """Token + learned position embeddings -> LayerNorm -> dropout (fairseq's text `local_encoder`)."""
    c, kw = module.config, dict(dtype=module.dtype, param_dtype=module.param_dtype)
    embed = lambda n, name: nn.Embed(n, c.embed_dim, embedding_init=embedding_init(  # noqa: E731
        c.initializer_range, c.pad_token_id), name=name, **kw)
    positions = position_ids_from_input_ids(input_ids, c.pad_token_id)
    x = embed(c.vocab_size, "embed_tokens")(input_ids) + embed(c.max_position_embeddings, "embed_positions")(
        positions)
    x = layer_norm(1e-5, "layernorm_embedding", **kw)(x)
    return nn.Dropout(c.dropout)(x, deterministic=deterministic)


# ---------------------------------------------------------------------------------------------------------------
# shared blocks
def blocks(module: ModelOptions, num_blocks: int, layerdrop: float, name: str) -> TransformerStack:
    """`num_blocks` AltBlocks (TransformerLayer with fused qkv) as a submodule of `module` (call in compact)."""
    layer = dict(**module.config.block_kwargs(), attention_implementation=module.attention_implementation,
                 dtype=module.dtype, param_dtype=module.param_dtype)
    return TransformerStack(num_blocks, layer, layerdrop=layerdrop, scan_layers=module.scan_layers,
                            remat=module.remat, name=name)


class Data2Vec2Encoder(ModelOptions):
    """Context encoder (norm, dropout, prenet blocks) -> dropout_input -> main blocks [-> final norm].

    Public so the 2.0 pre-training students (pretrain2_models.py) build the same parameter tree."""

    def encode(self, x: Array, key_mask: Array | None, bias: Array | None, context_norm: bool, deterministic: bool,
               output_attentions: bool):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mask = mask_to_bias_mask(key_mask)
        if context_norm and not c.layer_norm_first:
            x = layer_norm(c.norm_eps, "context_norm", **kw)(x)
        x = nn.Dropout(c.prenet_dropout)(x, deterministic=deterministic)
        prenet_extras = []
        if c.prenet_depth:
            x, _, prenet_extras = blocks(self, c.prenet_depth, c.prenet_layerdrop, "prenet")(
                x, mask, deterministic=deterministic, output_attentions=output_attentions, bias=bias)
        if context_norm and c.layer_norm_first:
            x = layer_norm(c.norm_eps, "context_norm", **kw)(x)
        x = nn.Dropout(c.dropout_input)(x, deterministic=deterministic)
        last, hidden, extras = blocks(self, c.depth, c.layerdrop, "blocks")(
            x, mask, deterministic=deterministic, output_attentions=output_attentions, bias=bias)
        if c.layer_norm_first:
            last = layer_norm(c.norm_eps, "norm", **kw)(last)
        return last, hidden, list(prenet_extras) + list(extras)


def _output(last, hidden, extras, output_hidden_states, output_attentions, output_layer_results, **kw):
    return BaseModelOutput(
        last_hidden_state=last,
        hidden_states=hidden if output_hidden_states else None,
        attentions=tuple(e[0] for e in extras) if output_attentions else None,
        layer_results=tuple(e[2] for e in extras) if output_layer_results else None, **kw)


# ---------------------------------------------------------------------------------------------------------------
# speech
class Data2Vec2AudioModel(Data2Vec2Encoder):
    """The data2vec 2.0 speech encoder: raw 16 kHz audio (batch, samples) -> (batch, frames, embed_dim).

    Unlike v1, padded frames are not zeroed before the positional convs (as in the reference). `hidden_states`
    and `layer_results` cover the main blocks (prenet blocks add to `layer_results` first).
    """

    freeze_feature_encoder: bool = False

    @nn.compact
    def __call__(self, input_values: Array, attention_mask: Array | None = None, *, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False,
                 output_layer_results: bool = False) -> BaseModelOutput:
        c: Data2Vec2AudioConfig = self.config
        front = c.front_end()
        check_audio_inputs(front, input_values, attention_mask)
        normed, x = local_features(self, input_values, self.freeze_feature_encoder)
        frame_mask = None
        if attention_mask is not None:
            frame_mask = feature_attention_mask(front, attention_mask, x.shape[1])
        x = x + positional_conv(self, x)
        scale = alibi_scale(self)
        bias = None if scale is None else alibi_bias(c.num_heads, x.shape[1], scale)
        last, hidden, extras = self.encode(x, frame_mask, bias, True, deterministic, output_attentions)
        return _output(last, hidden, extras, output_hidden_states, output_attentions, output_layer_results,
                       extract_features=normed, feature_mask=frame_mask)


# ---------------------------------------------------------------------------------------------------------------
# text
def check_text2_inputs(config: Data2Vec2TextConfig, input_ids, attention_mask=None) -> None:
    """Reject bad token input with a clear message before anything is traced."""
    shape, dtype = getattr(input_ids, "shape", None), getattr(input_ids, "dtype", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"input_ids must have shape (batch, seq), got {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"input_ids must be an integer array of token ids, got dtype {dtype}")
    if shape[1] > config.max_source_positions:
        raise ValueError(f"input_ids has {shape[1]} tokens, more than max_source_positions "
                         f"({config.max_source_positions})")
    if attention_mask is not None and tuple(np.shape(attention_mask)) != tuple(shape):
        raise ValueError(f"attention_mask shape {tuple(np.shape(attention_mask))} must equal input_ids shape "
                         f"{tuple(shape)}")
    if not isinstance(input_ids, jax.core.Tracer) and np.size(input_ids):
        lo, hi = int(np.min(input_ids)), int(np.max(input_ids))
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {config.vocab_size}), got values in [{lo}, {hi}]")


class Data2Vec2TextModel(Data2Vec2Encoder):
    """The data2vec 2.0 text encoder: token ids (batch, seq) -> (batch, seq, embed_dim).

    Padding: keys are masked where `attention_mask` is 0, else where the id is the pad id (as fairseq).
    """

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False,
                 output_layer_results: bool = False) -> BaseModelOutput:
        c: Data2Vec2TextConfig = self.config
        check_text2_inputs(c, input_ids, attention_mask)
        x = text_embeddings(self, input_ids, deterministic)
        key_mask = (input_ids != c.pad_token_id) if attention_mask is None else attention_mask.astype(bool)
        last, hidden, extras = self.encode(x, key_mask, None, False, deterministic, output_attentions)
        return _output(last, hidden, extras, output_hidden_states, output_attentions, output_layer_results)
