"""Data2Vec audio encoder: CNN feature encoder -> projection -> positional convs -> post-LN Transformer.

Numerically the function of transformers' `Data2VecAudioModel` (see REFERENCE.md §1). Inputs are
raw 16 kHz waveforms `(batch, samples)`; the feature encoder turns them into 50 Hz frames.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .base import ConfigModule, ModelOptions
from .config import Data2VecAudioConfig
from .layers import TransformerStack, gelu, layer_norm, linear_dot_general, mask_to_bias_mask
from .outputs import BaseModelOutput

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------------
# lengths and masks
def conv_output_lengths(config: Data2VecAudioConfig, lengths, add_adapter: bool | None = None):
    """Frames the feature encoder (and the adapter, if any) makes from `lengths` samples; numpy or jnp."""
    add_adapter = config.add_adapter if add_adapter is None else add_adapter
    for k, s in zip(config.conv_kernel, config.conv_stride):
        lengths = (lengths - k) // s + 1
    if add_adapter:
        for _ in range(config.num_adapter_layers):
            lengths = (lengths - 1) // config.adapter_stride + 1
    return lengths


def feature_attention_mask(config: Data2VecAudioConfig, attention_mask: Array, num_frames: int,
                           add_adapter: bool = False) -> Array:
    """Sample-level padding mask (right padded) -> (batch, frames) bool mask of the real frames."""
    lengths = conv_output_lengths(config, attention_mask.astype(jnp.int32).sum(-1), add_adapter)
    return jnp.arange(num_frames)[None, :] < lengths[:, None]


def spec_augment_mask(rng: Array, shape: tuple[int, int], prob: float, span: int, min_masks: int,
                      lengths: Array | None = None) -> Array:
    """On-device SpecAugment span mask with the counting rule of transformers' `_compute_mask_indices`.

    Each row gets `max(min_masks, int(prob * len / span + u))` spans (u ~ U(0,1), one per batch) with
    distinct start frames in [0, len - span]; returns a (batch, T) bool mask. Static shapes, so it jits.
    """
    batch, length = shape
    lengths = jnp.full((batch,), length) if lengths is None else lengths
    k_eps, k_start = jax.random.split(rng)
    eps = jax.random.uniform(k_eps)
    num_spans = jnp.maximum(min_masks, jnp.floor(prob * lengths / span + eps)).astype(jnp.int32)
    num_spans = jnp.minimum(num_spans, lengths // span)  # spans must fit in the row
    starts_allowed = jnp.arange(length)[None, :] <= (lengths - span)[:, None]
    scores = jnp.where(starts_allowed, jax.random.uniform(k_start, (batch, length)), -1.0)
    ranks = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)
    starts = (ranks < num_spans[:, None]) & starts_allowed
    covered = jnp.cumsum(starts, axis=-1)
    covered = covered - jnp.pad(covered, ((0, 0), (span, 0)))[:, :length]
    return covered > 0


# ---------------------------------------------------------------------------------------------------------------
# front end
class ConvLayer(nn.Module):
    """Conv1d (VALID) -> LayerNorm over channels -> GELU: one feature-encoder layer."""

    features: int
    kernel: int
    stride: int
    use_bias: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Conv(self.features, (self.kernel,), (self.stride,), padding="VALID", use_bias=self.use_bias,
                    dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.he_normal(),
                    name="conv")(x)
        return gelu(layer_norm(1e-5, "layer_norm", self.dtype, self.param_dtype)(x))


# On CPU the feature encoder runs all its layers over one time chunk at a time (CPU_FEATURE_CHUNK_FRAMES output
# frames, up to CPU_FEATURE_CHUNK_ROWS chunks per step of a loop), so the 512-channel activations of the first layers
# stay in cache instead of going through fresh memory: 8 x 10 s, 4.4 -> 3.7 s (benchmarks/README.md). Clips
# shorter than two chunks run whole.
CPU_FEATURE_CHUNK_FRAMES = 50
CPU_FEATURE_CHUNK_ROWS = 8


def time_chunks(x: Array, frames: int, chunk: int, field: int, hop: int) -> Array:
    """(batch, samples) -> (batch * n, hop * (chunk - 1) + field) windows whose frames are frames [j*chunk, ...)."""
    batch = x.shape[0]
    n = -(-frames // chunk)
    span, size = hop * chunk, hop * (chunk - 1) + field
    x = jnp.pad(x, ((0, 0), (0, max(0, span * n + size - span - x.shape[1]))))
    starts = np.arange(n) * span
    windows = x[:, starts[:, None] + np.arange(size)[None, :]]  # static gather: (batch, n, size)
    return windows.reshape(batch * n, size)


class FeatureEncoder(ConfigModule):
    """Raw waveform (batch, samples) -> (batch, frames, conv_dim[-1]) features."""

    @nn.compact
    def __call__(self, input_values: Array) -> Array:
        c = self.config
        layers = [ConvLayer(dim, k, s, c.conv_bias, self.dtype, self.param_dtype, name=f"conv_layers_{i}")
                  for i, (dim, k, s) in enumerate(zip(c.conv_dim, c.conv_kernel, c.conv_stride))]
        frames = int(conv_output_lengths(c, input_values.shape[1], add_adapter=False))
        if self.is_initializing() or frames < 2 * CPU_FEATURE_CHUNK_FRAMES:
            x = input_values[:, :, None].astype(self.dtype)
            for layer in layers:
                x = layer(x)
            return x
        # the same layers as pure functions of their params, so that a loop (not a Flax transform) can run them
        params = self.variables["params"]
        convs = [functools.partial(layer.clone(parent=None, name=None).apply, {"params": params[layer.name]})
                 for layer in layers]

        def run(x):
            x = x[..., None].astype(self.dtype)
            for conv in convs:
                x = conv(x)
            return x

        def chunked():
            batch, chunk, rows = input_values.shape[0], CPU_FEATURE_CHUNK_FRAMES, CPU_FEATURE_CHUNK_ROWS
            windows = time_chunks(input_values, frames, chunk, c.receptive_field, c.inputs_to_logits_ratio)
            n_rows = windows.shape[0]
            groups = -(-n_rows // rows)
            rows = -(-n_rows // groups)  # the fewest padded rows for that many steps
            windows = jnp.pad(windows, ((0, groups * rows - n_rows), (0, 0))).reshape(groups, rows, -1)
            out = jax.lax.map(run, windows).reshape(groups * rows, chunk, -1)[:n_rows]
            return out.reshape(batch, -1, out.shape[-1])[:, :frames]

        return jax.lax.platform_dependent(input_values, cpu=lambda _: chunked(), default=run)


# ---------------------------------------------------------------------------------------------------------------
# grouped positional convolution
def _plain_conv(x: Array, kernel: Array, padding, groups: int, precision) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, (1,), padding, dimension_numbers=("NWC", "WIO", "NWC"),
                                        feature_group_count=groups, precision=precision)


def _kernel_grad_taps(x: Array, dy: Array, kernel_shape, padding, groups: int) -> Array:
    """d(loss)/d(kernel) of a stride-1 grouped 1-D conv as one batched matmul per tap (k of them)."""
    k, cg, out = kernel_shape
    batch, t_out = dy.shape[:2]
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), (0, 0))).reshape(batch, -1, groups, cg)
    d = dy.reshape(batch * t_out, groups, out // groups)
    taps = [jnp.einsum("ngc,ngo->gco", xp[:, i:i + t_out].reshape(batch * t_out, groups, cg), d,
                       preferred_element_type=jnp.float32) for i in range(k)]
    return jnp.stack(taps).transpose(0, 2, 1, 3).reshape(k, cg, out)  # (k, g, c, o) -> (k, c, g*o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _grouped_conv(x: Array, kernel: Array, padding, groups: int, precision) -> Array:
    return _plain_conv(x, kernel, padding, groups, precision)


def _grouped_conv_fwd(x, kernel, padding, groups, precision):
    return _plain_conv(x, kernel, padding, groups, precision), (x, kernel)


def _grouped_conv_bwd(padding, groups, precision, res, dy):
    x, kernel = res
    conv = lambda x_, k_: _plain_conv(x_, k_, padding, groups, precision)  # noqa: E731
    dx, = jax.vjp(lambda x_: conv(x_, kernel), x)[1](dy)
    # XLA:CPU lowers the grouped conv's kernel gradient ~20x slower than per-tap matmuls (265 vs 12 ms per
    # base-size layer, benchmarks/README.md); other platforms keep XLA's own.
    dk = jax.lax.platform_dependent(
        cpu=lambda: _kernel_grad_taps(x, dy, kernel.shape, padding, groups).astype(kernel.dtype),
        default=lambda: jax.vjp(lambda k_: conv(x, k_), kernel)[1](dy)[0])
    return dx, dk


_grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)


def grouped_conv1d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None):
    """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: the same function, with a faster
    kernel gradient on CPU for the stride-1 grouped 1-D convs of the positional embedding."""
    simple = (tuple(window_strides) == (1,) and all(d in (None, (1,)) for d in (lhs_dilation, rhs_dilation))
              and feature_group_count > 1 and lhs.ndim == 3)
    if not simple:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision)
    padding = tuple(tuple(p) for p in padding)
    return _grouped_conv(lhs, rhs, padding, feature_group_count, precision)


class PositionalConvEmbedding(ConfigModule):
    """`num_conv_pos_embeddings` grouped convs, each -> parameter-free LayerNorm -> GELU (no weight norm).

    With `frame_mask`, each conv's input is zeroed past the real frames, so that every conv sees the zeros it
    sees at the end of an unpadded clip (without it, padding leaks in from the second conv on, as in the reference).
    """

    @nn.compact
    def __call__(self, x: Array, frame_mask: Array | None = None) -> Array:
        c = self.config
        k = c.conv_pos_kernel_size
        for j in range(c.num_conv_pos_embeddings):
            if frame_mask is not None:
                x = jnp.where(frame_mask[:, :, None], x, 0).astype(x.dtype)
            x = nn.Conv(c.hidden_size, (k,), padding=[(k // 2, k // 2)],
                        feature_group_count=c.num_conv_pos_embedding_groups, dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=nn.initializers.he_normal(),
                        conv_general_dilated=grouped_conv1d, name=f"layers_{j}")(x)
            if k % 2 == 0:  # an even kernel with k//2 padding on both sides makes one frame too many
                x = x[:, :-1]
            x = gelu(layer_norm(c.layer_norm_eps, None, self.dtype, self.param_dtype, affine=False)(x))
        return x


class Adapter(ConfigModule):
    """Optional down-sampler after the encoder: [Linear + LN] then strided conv + GLU layers."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        out = c.adapter_hidden_size
        if out != c.hidden_size:
            x = nn.Dense(out, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
            x = layer_norm(1e-5, "proj_layer_norm", self.dtype, self.param_dtype)(x)
        for n in range(c.num_adapter_layers):
            y = nn.Conv(2 * out, (c.adapter_kernel_size,), (c.adapter_stride,), padding=[(1, 1)], dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"layers_{n}")(x)
            # The reference skips adapter layers at random in training (layerdrop), which changes the output
            # length that its own CTC lengths assume; we always run them (static shapes).
            x = nn.glu(y, axis=-1)
        return x


class AudioEncoder(ModelOptions):
    """Positional convs + LayerNorm + dropout, then the Transformer layers (padded frames zeroed first)."""

    frame_multiple: int = 1
    padding_invariant: bool = False

    @nn.compact
    def __call__(self, x: Array, frame_mask: Array | None, deterministic: bool = True,
                 output_attentions: bool = False):
        c = self.config
        if frame_mask is not None:
            x = jnp.where(frame_mask[:, :, None], x, 0)
        # The reference leaks the amount of padding into real frames through these convs
        # (transformers#25621, kept for fairseq parity); so do we, unless padding_invariant.
        pos_mask = frame_mask if self.padding_invariant else None
        x = x + PositionalConvEmbedding(c, self.dtype, self.param_dtype, name="pos_conv_embed")(x, pos_mask)
        x = layer_norm(c.layer_norm_eps, "layer_norm", self.dtype, self.param_dtype)(x)
        x = nn.Dropout(c.hidden_dropout)(x, deterministic=deterministic)
        stack = TransformerStack(
            c.num_hidden_layers,
            dict(hidden_size=c.hidden_size, num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                 hidden_dropout=c.hidden_dropout, attention_dropout=c.attention_dropout,
                 activation_dropout=c.activation_dropout, layer_norm_eps=c.layer_norm_eps,
                 init_std=c.initializer_range, attention_implementation=self.attention_implementation,
                 dtype=self.dtype, param_dtype=self.param_dtype),
            layerdrop=c.layerdrop, scan_layers=self.scan_layers, remat=self.remat, name="transformer")
        frames, multiple = x.shape[1], self.frame_multiple
        padded = -(-frames // multiple) * multiple if multiple > 1 else frames
        if padded == frames:
            return stack(x, mask_to_bias_mask(frame_mask), deterministic=deterministic,
                         output_attentions=output_attentions)
        # Pad the frame axis *here*, after the positional convs (padding the audio would change real frames),
        # with the extra frames masked as keys: cuDNN attention needs T % 128 == 0. Sliced back below.
        keys = jnp.arange(padded)[None, :] < frames
        keys = keys if frame_mask is None else keys & jnp.pad(frame_mask, ((0, 0), (0, padded - frames)))
        keys = jnp.broadcast_to(keys, (x.shape[0], padded))
        x = jnp.pad(x, ((0, 0), (0, padded - frames), (0, 0)))
        last, hidden, extras = stack(x, mask_to_bias_mask(keys), deterministic=deterministic,
                                     output_attentions=output_attentions)
        cut = lambda t: None if t is None else t[:, :frames]  # noqa: E731
        cut_weights = lambda w: None if w is None else w[:, :, :frames, :frames]  # noqa: E731
        extras = [(cut_weights(a), b, cut(f)) for a, b, f in extras]
        return last[:, :frames], tuple(cut(h) for h in hidden), extras


def check_audio_inputs(config: Data2VecAudioConfig, input_values, attention_mask=None) -> None:
    """Reject bad audio input with a clear message before anything is traced."""
    shape = getattr(input_values, "shape", None)
    dtype = getattr(input_values, "dtype", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"input_values must have shape (batch, samples), got {shape}")
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"input_values must be a float array of raw audio, got dtype {dtype}")
    if shape[1] < config.receptive_field:
        raise ValueError(f"input_values has {shape[1]} samples, fewer than the feature encoder's receptive field "
                         f"({config.receptive_field} samples): at least one frame is needed")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_values shape {shape}")


class Data2VecAudioModel(ModelOptions):
    """The bare Data2Vec audio encoder: `last_hidden_state` (batch, frames, hidden) and `extract_features`.

    `freeze_feature_encoder=True` stops gradients at the CNN output (no backward pass through it).
    `padding_invariant=True`: a padded clip's real frames get the outputs the clip gives alone (the reference's
    positional convs read padded frames, transformers#25621); False (default) matches the reference's batches.
    SpecAugment: pass `mask_time_indices`, or train (`deterministic=False`) with `mask_time_prob > 0`;
    the mask is then drawn from the `'mask'` PRNG stream (falling back to `'dropout'`).
    """

    freeze_feature_encoder: bool = False
    frame_multiple: int = 1  # run attention on frames padded to this multiple (128 for cuDNN); outputs unchanged
    padding_invariant: bool = False

    @nn.compact
    def __call__(self, input_values: Array, attention_mask: Array | None = None,
                 mask_time_indices: Array | None = None, *, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False,
                 output_layer_results: bool = False, output_projected_features: bool = False) -> BaseModelOutput:
        c: Data2VecAudioConfig = self.config
        check_audio_inputs(c, input_values, attention_mask)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        features = FeatureEncoder(c, **kw, name="feature_extractor")(input_values)
        if self.freeze_feature_encoder:
            features = jax.lax.stop_gradient(features)
        frame_mask = None
        if attention_mask is not None:
            frame_mask = feature_attention_mask(c, attention_mask, features.shape[1])

        projected, extract_features = FeatureProjection(c, **kw, name="feature_projection")(features, deterministic)
        hidden = self._mask(projected, frame_mask, mask_time_indices, deterministic)

        encoder = AudioEncoder(c, **self.options, frame_multiple=self.frame_multiple,
                               padding_invariant=self.padding_invariant, name="encoder")
        last, hidden_states, extras = encoder(hidden, frame_mask, deterministic, output_attentions)
        if c.add_adapter:
            last = Adapter(c, **kw, name="adapter")(last)
        return BaseModelOutput(
            last_hidden_state=last,
            extract_features=extract_features,
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=tuple(e[0] for e in extras) if output_attentions else None,
            layer_results=tuple(e[2] for e in extras) if output_layer_results else None,
            feature_mask=frame_mask,
            projected_features=projected if output_projected_features else None,
        )

    def _mask(self, hidden: Array, frame_mask: Array | None, mask_time_indices: Array | None,
              deterministic: bool) -> Array:
        """SpecAugment: masked frames become the learned `masked_spec_embed`, masked channels zero."""
        c = self.config
        if not (c.mask_time_prob > 0 or c.mask_feature_prob > 0):
            if mask_time_indices is not None:
                raise ValueError("mask_time_indices given, but this config has no masked_spec_embed "
                                 "(mask_time_prob and mask_feature_prob are both 0)")
            return hidden
        embed = self.param("masked_spec_embed", nn.initializers.uniform(1.0), (c.hidden_size,), self.param_dtype)
        if not c.apply_spec_augment:
            return hidden
        training = not deterministic
        lengths = None if frame_mask is None else frame_mask.sum(-1)
        if mask_time_indices is None and training and c.mask_time_prob > 0:
            mask_time_indices = spec_augment_mask(self._mask_rng(), hidden.shape[:2], c.mask_time_prob,
                                                  c.mask_time_length, c.mask_time_min_masks, lengths)
        if mask_time_indices is not None:
            if tuple(mask_time_indices.shape) != hidden.shape[:2]:
                raise ValueError(f"mask_time_indices must have shape (batch, frames) = {hidden.shape[:2]}, "
                                 f"got {tuple(mask_time_indices.shape)}")
            hidden = jnp.where(mask_time_indices[:, :, None].astype(bool), embed.astype(hidden.dtype), hidden)
        if training and c.mask_feature_prob > 0:
            feat = spec_augment_mask(self._mask_rng(), (hidden.shape[0], c.hidden_size), c.mask_feature_prob,
                                     c.mask_feature_length, c.mask_feature_min_masks)
            hidden = jnp.where(feat[:, None, :], 0, hidden)
        return hidden

    def _mask_rng(self) -> Array:
        return self.make_rng("mask") if self.has_rng("mask") else self.make_rng("dropout")


class FeatureProjection(ConfigModule):
    """LayerNorm(conv features) -> Linear to hidden size -> dropout; also returns the normed features."""

    @nn.compact
    def __call__(self, features: Array, deterministic: bool = True):
        c = self.config
        normed = layer_norm(c.layer_norm_eps, "layer_norm", self.dtype, self.param_dtype)(features)
        fan_in = features.shape[-1]
        bound = 1.0 / np.sqrt(fan_in)
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        hidden = nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init,
                          dot_general=linear_dot_general,
                          bias_init=init, name="projection")(normed)
        hidden = nn.Dropout(c.feat_proj_dropout)(hidden, deterministic=deterministic)
        return hidden, normed
