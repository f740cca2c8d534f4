"""data2vec 2.0 students (encoder on the kept tokens + `Decoder1d`), their EMA teachers and targets.

A student's params are those of `Data2Vec2AudioModel` / `Data2Vec2TextModel` (the same stage helpers build
them) plus `decoder`, so dropping `decoder` gives a checkpoint of the encoder class. Called with `masks`, a
student encodes the M clones' kept tokens and decodes every position; called without, it is the teacher:
audio (`ema_encoder_only: false`) runs its own positional conv, ALiBi scale, context norm and blocks on the
student's local features; text (`ema_encoder_only: true`) runs the EMA blocks on the student's embeddings.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .audio import feature_attention_mask
from .data2vec2 import (
    Data2Vec2Encoder,
    alibi_bias,
    alibi_scale,
    alibi_slopes,
    local_features,
    positional_conv,
    text_embeddings,
)
from .pretrain import gather_positions, make_targets
from .pretrain2 import (
    Data2Vec2PretrainConfig,
    MaskIds,
    keep_tokens,
    repeat_clones,
    restore_tokens,
    row_dropout,
    row_keys,
)

Array = jax.Array
AUDIO_TEACHER = ("relative_positional_encoder", "alibi_scale", "context_norm", "prenet", "blocks", "norm")
TEXT_TEACHER = ("blocks", "norm")


def torch_default_init(fan_in: int):
    """(kernel_init, bias_init) of torch's Conv1d / Linear `reset_parameters`: U(+-1/sqrt(fan_in)) for both."""
    bound = 1.0 / math.sqrt(fan_in)
    return (nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
            lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound))


class Decoder1d(nn.Module):
    """fairseq `Decoder1d`: per layer Conv1d(kernel, padding k // 2, groups) -> SamePad -> LayerNorm (no affine)
    -> GELU, plus the input when channel counts match and `residual`; then the projection, applied only at
    `positions` (the masked ones, where a loss is taken)."""

    p: Data2Vec2PretrainConfig
    output_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, positions: Array) -> Array:
        p, kw = self.p, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        k = p.decoder_kernel
        for i in range(p.decoder_layers):
            kernel_init, bias_init = torch_default_init(x.shape[-1] // p.decoder_groups * k)
            y = nn.Conv(p.decoder_dim, (k,), padding=[(k // 2, k // 2)], feature_group_count=p.decoder_groups,
                        kernel_init=kernel_init, bias_init=bias_init, name=f"blocks_{i}", **kw)(x)
            if k % 2 == 0:  # SamePad drops the extra frame of an even kernel
                y = y[:, :-1]
            y = nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False, **kw)(y)
            y = nn.gelu(y, approximate=False)
            x = y + x if p.decoder_residual and y.shape[-1] == x.shape[-1] else y
        x = gather_positions(x, positions)
        dims = [x.shape[-1]]
        for i in range(p.projection_layers - 1):
            dims.append(int(dims[-1] * p.projection_ratio) if i == 0 else dims[-1])
        dims.append(self.output_dim)
        for i, (fan_in, width) in enumerate(zip(dims[:-1], dims[1:])):
            kernel_init, bias_init = torch_default_init(fan_in)
            x = nn.Dense(width, kernel_init=kernel_init, bias_init=bias_init, name=f"proj_{i}", **kw)(x)
            if i < len(dims) - 2:
                x = nn.gelu(x, approximate=False)
        return x


def alibi_bias_at(num_heads: int, positions: Array, scale: Array) -> Array:
    """(R, heads, K, K) ALiBi bias between the kept `positions` (R, K): fairseq's `masked_alibi`, computed."""
    distance = jnp.abs(positions[:, :, None] - positions[:, None, :]).astype(jnp.float32)
    slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32) * jnp.maximum(scale.astype(jnp.float32), 0.0)
    return -slopes[None, :, None, None] * distance[:, None]


class _Student(Data2Vec2Encoder):
    """What both students share: the decoder over kept tokens, and the teacher's layer results."""

    pretrain: Data2Vec2PretrainConfig = None

    def decode(self, kept: Array, masks: MaskIds, deterministic: bool) -> Array:
        """Input dropout (training) and N(0, std) masked slots, drawn per row from the host's `masks.seeds`."""
        p = self.pretrain
        if not deterministic:
            kept = row_dropout(kept, p.decoder_input_dropout, row_keys(masks.seeds, 0))
        full = restore_tokens(kept, masks.ids_restore, p.mask_noise_std, row_keys(masks.seeds, 1))
        return Decoder1d(p, self.config.embed_dim, self.dtype, self.param_dtype, name="decoder")(
            full, masks.ids_masked)

    def layer_results(self, x: Array, key_mask: Array | None, bias: Array | None, context_norm: bool) -> list:
        _, _, extras = self.encode(x, key_mask, bias, context_norm, True, False)
        return [jax.lax.stop_gradient(e[2]) for e in extras]


class Data2Vec2AudioStudent(_Student):
    """Student: waveform -> local features -> M clones, masked frames zeroed for the positional conv -> kept
    frames (features + their positional output) -> blocks with the kept rows/columns of ALiBi -> decoder.
    Returns (predictions at masked frames (B M, T - K, D), local features (B, T, D), frame mask or None).
    Teacher (`masks` None): `inputs` are local features -> x + pos(x) -> full ALiBi -> blocks' FFN outputs."""

    @nn.compact
    def __call__(self, inputs: Array, attention_mask: Array | None = None, masks: MaskIds | None = None, *,
                 deterministic: bool = True):
        c = self.config
        if masks is None:
            x = jax.lax.stop_gradient(inputs)
            scale = alibi_scale(self)
            bias = None if scale is None else alibi_bias(c.num_heads, x.shape[1], scale)
            return self.layer_results(x + positional_conv(self, x), attention_mask, bias, True)
        _, local = local_features(self, inputs)
        frame_mask = None if attention_mask is None else feature_attention_mask(
            c.front_end(), attention_mask, local.shape[1])
        clones = masks.ids_keep.shape[0] // local.shape[0]
        x = repeat_clones(local, clones)
        pos = positional_conv(self, x * (1 - masks.mask[..., None].astype(x.dtype)))  # encoder_zero_mask
        kept = keep_tokens(x, masks.ids_keep) + keep_tokens(pos, masks.ids_keep)
        scale = alibi_scale(self)
        bias = None if scale is None else alibi_bias_at(c.num_heads, masks.ids_keep, scale)
        key_mask = None if frame_mask is None else gather_positions(
            repeat_clones(frame_mask, clones)[..., None], masks.ids_keep)[..., 0]
        last, _, _ = self.encode(kept, key_mask, bias, True, deterministic, False)
        return self.decode(last, masks, deterministic), local, frame_mask


class Data2Vec2TextStudent(_Student):
    """Student: token ids -> embeddings (once per sample) -> M clones' kept tokens -> blocks -> decoder.
    Returns (predictions at masked tokens (B M, L - K, D), embeddings (B, L, D), key mask).
    Teacher (`masks` None): `inputs` are the student's embeddings -> blocks' FFN outputs."""

    @nn.compact
    def __call__(self, inputs: Array, attention_mask: Array, masks: MaskIds | None = None, *,
                 deterministic: bool = True):
        if masks is None:
            return self.layer_results(jax.lax.stop_gradient(inputs), attention_mask, None, False)
        local = text_embeddings(self, inputs, deterministic)
        clones = masks.ids_keep.shape[0] // local.shape[0]
        kept = keep_tokens(repeat_clones(local, clones), masks.ids_keep)
        key_mask = gather_positions(repeat_clones(attention_mask, clones)[..., None], masks.ids_keep)[..., 0]
        last, _, _ = self.encode(kept, key_mask, None, False, deterministic, False)
        return self.decode(last, masks, deterministic), local, attention_mask


def teacher_params(student_params: dict, audio: bool) -> dict:
    """The subtree the EMA teacher averages: audio's encoder minus CNN and projection, or text's blocks."""
    keys = AUDIO_TEACHER if audio else TEXT_TEACHER
    return {k: v for k, v in student_params.items() if k in keys}


def encoder_params(student_params: dict) -> dict:
    """The student's params without the decoder: a `Data2Vec2AudioModel` / `Data2Vec2TextModel` checkpoint."""
    return {k: v for k, v in student_params.items() if k != "decoder"}


def targets(student, teacher: dict, local: Array, key_mask: Array | None, p: Data2Vec2PretrainConfig) -> Array:
    """(B, T, D) targets: the teacher's top-K FFN outputs on each sample (once), instance-normed, averaged."""
    layers = student.apply({"params": teacher}, local, key_mask, None)
    return make_targets(layers, p.top_k, p.target_norm)


def masked_targets(y: Array, masks: MaskIds) -> Array:
    """(B, T, D) targets -> (B M, T - K, D): repeated for the M clones, taken at each clone's masked positions."""
    return gather_positions(repeat_clones(y, masks.ids_keep.shape[0] // y.shape[0]), masks.ids_masked)


def device_masks(batch: dict) -> MaskIds:
    """The batch's host-made masks as `MaskIds` (the arrays `pretrain2.mask_ids` returned)."""
    return MaskIds(*(batch[k] for k in MaskIds._fields))


def masked_weights(masks: MaskIds, example_mask: Array, key_mask: Array | None) -> Array:
    """(B M, T - K) loss weights: 1 at masked positions of real rows and real frames / tokens, else 0."""
    clones = masks.ids_keep.shape[0] // example_mask.shape[0]
    w = repeat_clones(example_mask.astype(jnp.float32), clones)[:, None] * np.ones((1, masks.ids_masked.shape[1]))
    if key_mask is None:
        return w
    return w * gather_positions(repeat_clones(key_mask, clones).astype(jnp.float32)[..., None],
                                masks.ids_masked)[..., 0]
