"""Model configs and inputs shared by the benchmarks: the published base shapes, and tiny ones for --quick."""

from __future__ import annotations

import numpy as np

# Published base shapes (REFERENCE.md §7): audio = transformers' default Data2VecAudioConfig();
# text = RoBERTa/data2vec-text-base.
TEXT_BASE = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
TINY_TEXT = dict(TEXT_BASE, vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128)
TINY_AUDIO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  conv_dim=(32,) * 7)

SAMPLE_RATE = 16_000
CUDNN_BLOCK = 128  # cuDNN flash attention wants the sequence length a multiple of this


def text_config(quick: bool, **overrides):
    from transformers import Data2VecTextConfig
    return Data2VecTextConfig(**{**(TINY_TEXT if quick else TEXT_BASE), **overrides})


def audio_config(quick: bool, **overrides):
    from transformers import Data2VecAudioConfig
    return Data2VecAudioConfig(**{**(TINY_AUDIO if quick else {}), **overrides})


def torch_model(cls_name: str, config, device: str):
    """A randomly initialised transformers model using SDPA attention, in eval mode."""
    import torch
    import transformers
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)._from_config(config, attn_implementation="sdpa")
    return model.to(device).eval()


def token_ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Random ids avoiding the special tokens 0-3 (<s>, <pad>, </s>, <unk>)."""
    return np.random.default_rng(seed).integers(4, vocab, (batch, length)).astype(np.int64)


def waveform(batch: int, seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, int(seconds * SAMPLE_RATE))).astype(np.float32)


def frames_for(config, samples: int) -> int:
    """Frames the feature encoder makes from `samples` samples (transformers' formula)."""
    for k, s in zip(config.conv_kernel, config.conv_stride):
        samples = (samples - k) // s + 1
    return samples


def samples_for_frames(config, frames: int) -> int:
    """Fewest samples that give exactly `frames` frames: the receptive field plus one hop per extra frame."""
    rf, hop = 1, 1
    for k, s in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        rf = (rf - 1) * s + k
    for s in config.conv_stride:
        hop *= s
    return rf + (frames - 1) * hop


def pad_audio_to_frame_multiple(wave: np.ndarray, config, multiple: int = CUDNN_BLOCK):
    """Zero-pad raw audio so the frame count is a multiple of `multiple`.

    Returns (padded waveform, sample-level attention mask, real frame count). With the mask the flax model
    zeroes the padded frames before the positional convs and masks them as attention keys, so its outputs on
    the first `real frame count` frames equal the unpadded run (frames only read samples of their own window).
    """
    batch, samples = wave.shape
    frames = frames_for(config, samples)
    target = -(-frames // multiple) * multiple
    padded_samples = samples_for_frames(config, target)
    out = np.zeros((batch, padded_samples), wave.dtype)
    out[:, :samples] = wave
    mask = np.zeros((batch, padded_samples), np.int32)
    mask[:, :samples] = 1
    return out, mask, frames


def masked_mlm_loss(module, params: dict, input_ids, positions, targets, rng, deterministic: bool = False):
    """Data2VecTextForMaskedLM's loss with the LM head run only at `positions` (batch, k) against `targets`
    (batch, k), through the package's `masked_positions`; equals the full head's loss with labels = targets
    there and -100 elsewhere."""
    from flax_data2vec import losses
    logits = module.apply({"params": params}, input_ids, masked_positions=positions, deterministic=deterministic,
                          rngs=None if deterministic else {"dropout": rng}).logits
    return losses.cross_entropy(logits, targets)
