"""Faster variants built in the benchmark from the package's own modules and params (prototypes for the package).

* `masked_mlm_loss`: Data2VecTextForMaskedLM's loss with the LM head (dense + GELU + LN + 50k-vocab
  projection + cross-entropy) run only on a static number of masked positions per row instead of on every
  token. Same loss value as the full head when the labels are -100 everywhere else.
* `audio_hidden_padded` / `ctc_loss_padded`: the audio encoder with the frame axis
  zero-padded to a multiple of 128 *after* the positional convs, with padded frames masked as attention keys,
  and sliced back afterwards. cuDNN flash attention refuses T=499/749; feeding zero-padded *audio* instead
  changes the real frames, because the reference's positional convs carry padding into the last ~40 real
  frames (transformers#25621), so the padding has to happen inside the encoder.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_data2vec import losses
from flax_data2vec.audio import FeatureEncoder, FeatureProjection, PositionalConvEmbedding, spec_augment_mask
from flax_data2vec.ctc import ctc_loss
from flax_data2vec.layers import TransformerStack, layer_norm
from flax_data2vec.text import Data2VecTextModel
from flax_data2vec.text_heads import LMHead

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------------
# text: LM head on masked positions only
def masked_mlm_loss(module, params: dict, input_ids: Array, positions: Array, targets: Array, rng: Array,
                    deterministic: bool = False) -> Array:
    """MLM loss of `module` (a Data2VecTextForMaskedLM) scoring only `positions` (batch, k) against
    `targets` (batch, k). Equals the full head's loss with labels = targets at positions, -100 elsewhere."""
    c = module.config
    base = Data2VecTextModel(c, **module.options, add_pooling_layer=False)
    out = base.apply({"params": params["data2vec_text"]}, input_ids, deterministic=deterministic,
                     rngs=None if deterministic else {"dropout": rng})
    hidden = jnp.take_along_axis(out.last_hidden_state, positions[..., None], axis=1)  # (batch, k, hidden)
    embedding = params["data2vec_text"]["embeddings"]["word_embeddings"]["embedding"] if c.tie_word_embeddings \
        else None
    logits = LMHead(c, module.dtype, module.param_dtype).apply({"params": params["lm_head"]}, hidden, embedding)
    return losses.cross_entropy(logits, targets)


# ---------------------------------------------------------------------------------------------------------------
# audio: frame axis padded inside the encoder
def _stack(module, c) -> TransformerStack:
    """The audio encoder's TransformerStack, built as `AudioEncoder` builds it."""
    return TransformerStack(
        c.num_hidden_layers,
        dict(hidden_size=c.hidden_size, num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
             hidden_dropout=c.hidden_dropout, attention_dropout=c.attention_dropout,
             activation_dropout=c.activation_dropout, layer_norm_eps=c.layer_norm_eps,
             init_std=c.initializer_range, attention_implementation=module.attention_implementation,
             dtype=module.dtype, param_dtype=module.param_dtype),
        layerdrop=c.layerdrop, scan_layers=module.scan_layers, remat=module.remat)


def audio_hidden_padded(module, params: dict, input_values: Array, multiple: int = 128,
                        mask_time_indices: Array | None = None, deterministic: bool = True,
                        rng: Array | None = None, freeze_feature_encoder: bool = False,
                        pos_conv_impl: str | None = None) -> Array:
    """Data2VecAudioModel's last_hidden_state (unpadded audio, no attention mask) with the Transformer run
    on frames zero-padded to a multiple of `multiple` (1: no padding). `params` are the base model's params.
    `pos_conv_impl`: None = the package's PositionalConvEmbedding; "unfold" = `positional_convs_unfold`;
    "taps" = `positional_convs_taps` (lax conv forward, per-tap matmul kernel gradient)."""
    c = module.config
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
    rngs = [None] * 4 if deterministic else [{"dropout": k} for k in jax.random.split(rng, 4)]
    feats = FeatureEncoder(c, **kw).apply({"params": params["feature_extractor"]}, input_values)
    if freeze_feature_encoder:
        feats = jax.lax.stop_gradient(feats)
    hidden, _ = FeatureProjection(c, **kw).apply({"params": params["feature_projection"]}, feats, deterministic,
                                                 rngs=rngs[0])
    if c.mask_feature_prob > 0 and not deterministic:
        raise NotImplementedError("feature masking is not reproduced here (mask_feature_prob > 0)")
    if mask_time_indices is None and not deterministic and c.mask_time_prob > 0 and c.apply_spec_augment:
        mask_time_indices = spec_augment_mask(rngs[1]["dropout"], hidden.shape[:2], c.mask_time_prob,
                                              c.mask_time_length, c.mask_time_min_masks)
    if mask_time_indices is not None:
        embed = params["masked_spec_embed"].astype(hidden.dtype)
        hidden = jnp.where(mask_time_indices[:, :, None].astype(bool), embed, hidden)
    enc = params["encoder"]
    if pos_conv_impl is not None:
        conv = {"unfold": grouped_conv_unfold, "taps": grouped_conv_taps}[pos_conv_impl]
        x = hidden + positional_convs(c, enc["pos_conv_embed"], hidden, conv)
    else:
        x = hidden + PositionalConvEmbedding(c, **kw).apply({"params": enc["pos_conv_embed"]}, hidden)
    x = layer_norm(c.layer_norm_eps, None, **kw).apply({"params": enc["layer_norm"]}, x)
    x = nn.Dropout(c.hidden_dropout).apply({}, x, deterministic=deterministic, rngs=rngs[2])
    batch, frames = x.shape[:2]
    padded = -(-frames // multiple) * multiple
    key_mask = None
    if padded != frames:
        x = jnp.pad(x, ((0, 0), (0, padded - frames), (0, 0)))
        key_mask = jnp.broadcast_to((jnp.arange(padded) < frames)[None, None, None, :], (batch, 1, 1, padded))
    y, _, _ = _stack(module, c).apply({"params": enc["transformer"]}, x, key_mask, deterministic=deterministic,
                                      rngs=rngs[3])
    return y[:, :frames]


def ctc_loss_padded(module, params: dict, input_values: Array, labels: Array, rng: Array, multiple: int = 128,
                    deterministic: bool = False, mask_time_indices: Array | None = None,
                    pos_conv_impl: str | None = None) -> Array:
    """Data2VecAudioForCTC's loss (unpadded audio, no attention mask) with the padded-frame encoder."""
    c = module.config
    hidden = audio_hidden_padded(module, params["data2vec_audio"], input_values, multiple, mask_time_indices,
                                 deterministic, rng, module.freeze_feature_encoder, pos_conv_impl)
    k_drop = None if deterministic else {"dropout": jax.random.fold_in(rng, 7)}
    hidden = nn.Dropout(c.final_dropout).apply({}, hidden, deterministic=deterministic, rngs=k_drop)
    logits = nn.Dense(c.vocab_size, dtype=module.dtype, param_dtype=module.param_dtype).apply(
        {"params": params["lm_head"]}, hidden)
    lengths = jnp.full((input_values.shape[0],), hidden.shape[1])
    return ctc_loss(logits, lengths, labels, c.pad_token_id, c.ctc_loss_reduction, c.ctc_zero_infinity)


# ---------------------------------------------------------------------------------------------------------------
# audio: grouped positional convs without a grouped XLA convolution
def grouped_conv_unfold(x: Array, kernel: Array, bias: Array, groups: int) -> Array:
    """`nn.Conv(feature_group_count=groups, padding=k//2)` on (batch, time, channels) via unfold + einsum.

    kernel is flax's (k, channels // groups, out); output (batch, time + 1 - k % 2, out). XLA:CPU's grouped
    convolution (and its gradients) are far slower than this batched matmul of the k shifted windows.
    """
    k, cg, out = kernel.shape
    batch, frames, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)))
    t_out = frames + 2 * (k // 2) - k + 1
    windows = jnp.stack([xp[:, i:i + t_out] for i in range(k)], axis=2)  # (batch, t_out, k, channels)
    windows = windows.reshape(batch, t_out, k, groups, cg)
    w = kernel.reshape(k, cg, groups, out // groups)
    y = jnp.einsum("btkgc,kcgo->btgo", windows, w.astype(x.dtype)).reshape(batch, t_out, out)
    return y + bias.astype(y.dtype)


def _grouped_conv(x: Array, kernel: Array, groups: int) -> Array:
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1,), [(k // 2, k // 2)],
                                        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _grouped_conv_taps(x: Array, kernel: Array, groups: int) -> Array:
    return _grouped_conv(x, kernel, groups)


def _taps_fwd(x, kernel, groups):
    return _grouped_conv(x, kernel, groups), (x, kernel)


def _taps_bwd(groups, res, dy):
    """Input gradient as XLA makes it (fast); kernel gradient as k batched (per-group) matmuls, one per tap.
    XLA:CPU lowers the grouped conv's kernel gradient ~20x slower than this (265 ms vs 12 ms per layer)."""
    x, kernel = res
    dx, = jax.vjp(lambda x_: _grouped_conv(x_, kernel, groups), x)[1](dy)
    k, cg, out = kernel.shape
    batch, t_out = dy.shape[:2]
    xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0))).reshape(batch, -1, groups, cg)
    d = dy.reshape(batch * t_out, groups, out // groups)
    taps = [jnp.einsum("ngc,ngo->gco", xp[:, i:i + t_out].reshape(batch * t_out, groups, cg), d,
                       preferred_element_type=jnp.float32) for i in range(k)]
    dk = jnp.stack(taps).transpose(0, 2, 1, 3).reshape(k, cg, out)  # (k, g, c, o) -> (k, c, g*o)
    return dx, dk.astype(kernel.dtype)


_grouped_conv_taps.defvjp(_taps_fwd, _taps_bwd)


def grouped_conv_taps(x: Array, kernel: Array, bias: Array, groups: int) -> Array:
    """Same function as `grouped_conv_unfold` / nn.Conv(feature_group_count=groups, padding=k//2); lax conv
    forward and input gradient, per-tap matmul kernel gradient (custom VJP)."""
    return _grouped_conv_taps(x, kernel, groups) + bias.astype(x.dtype)


def positional_convs(config, params: dict, x: Array, conv=grouped_conv_taps) -> Array:
    """PositionalConvEmbedding(config) with `conv` for the grouped convs; params = encoder/pos_conv_embed."""
    from flax_data2vec.layers import gelu
    k = config.conv_pos_kernel_size
    for j in range(config.num_conv_pos_embeddings):
        p = params[f"layers_{j}"]
        x = conv(x, p["kernel"], p["bias"], config.num_conv_pos_embedding_groups)
        if k % 2 == 0:
            x = x[:, :-1]
        x = gelu(layer_norm(config.layer_norm_eps, None, x.dtype, jnp.float32, affine=False).apply({}, x))
    return x


def positional_convs_unfold(config, params: dict, x: Array) -> Array:
    """`positional_convs` with unfold + einsum convs (fast gradient, slow forward on CPU)."""
    return positional_convs(config, params, x, grouped_conv_unfold)
