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
                        unfold_pos_conv: bool = False) -> Array:
    """Data2VecAudioModel's last_hidden_state (unpadded audio, no attention mask) with the Transformer run
    on frames zero-padded to a multiple of `multiple` (1: no padding). `params` are the base model's params.
    `unfold_pos_conv` computes the grouped positional convs as unfold + einsum (`positional_convs_unfold`)."""
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
    if unfold_pos_conv:
        x = hidden + positional_convs_unfold(c, enc["pos_conv_embed"], hidden)
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
                    unfold_pos_conv: bool = False) -> Array:
    """Data2VecAudioForCTC's loss (unpadded audio, no attention mask) with the padded-frame encoder."""
    c = module.config
    hidden = audio_hidden_padded(module, params["data2vec_audio"], input_values, multiple, mask_time_indices,
                                 deterministic, rng, module.freeze_feature_encoder, unfold_pos_conv)
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


def positional_convs_unfold(config, params: dict, x: Array) -> Array:
    """PositionalConvEmbedding(config) with `grouped_conv_unfold`; params = encoder/pos_conv_embed."""
    from flax_data2vec.layers import gelu
    k = config.conv_pos_kernel_size
    for j in range(config.num_conv_pos_embeddings):
        p = params[f"layers_{j}"]
        x = grouped_conv_unfold(x, p["kernel"], p["bias"], config.num_conv_pos_embedding_groups)
        if k % 2 == 0:
            x = x[:, :-1]
        x = gelu(layer_norm(config.layer_norm_eps, None, x.dtype, jnp.float32, affine=False).apply({}, x))
    return x
