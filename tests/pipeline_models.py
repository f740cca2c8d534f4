"""Tiny random-init transformers Data2Vec checkpoints saved with their processors, for the pipeline tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from flax_data2vec import processors

AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embedding_groups=4,
             conv_pos_kernel_size=5, num_conv_pos_embeddings=3, classifier_proj_size=10,
             tdnn_dim=(8, 8, 12), tdnn_kernel=(3, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=6)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=66, type_vocab_size=1, layer_norm_eps=1e-5)
CHARS = list("abcdefghijklmnopqrstuvwxyz'")
TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "|", *CHARS]
CORPUS = ["the quick brown fox jumps over the lazy dog", "paris is the capital of france",
          "john smith works at acme in new york", "data to vector learns from masked views",
          "emma woodhouse handsome clever and rich", "it is a truth universally acknowledged"] * 4


def _perturb(model, scale: float = 0.1, seed: int = 0):
    """Random values for params that init to constants, so that every path of the model matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def audio_checkpoint(directory: str, class_name: str = "Data2VecAudioForCTC", seed: int = 0, head_scale=None,
                     **overrides) -> str:
    """A transformers audio checkpoint dir with its feature extractor (and the CTC tokenizer for CTC)."""
    torch.manual_seed(seed)
    extra = dict(vocab_size=len(TOKENS), pad_token_id=0) if class_name == "Data2VecAudioForCTC" else {}
    config = transformers.Data2VecAudioConfig(**{**AUDIO, **extra, **overrides})
    model = _perturb(getattr(transformers, class_name)(config), seed=seed)
    if head_scale is not None:  # peaked CTC outputs
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(directory)
    if class_name == "Data2VecAudioForCTC":
        processors.save_ctc_processor(directory, TOKENS)
    else:
        processors.save_feature_extractor(directory)
    return directory


def text_tokenizer(directory: str):
    """A small byte-level BPE (RoBERTa special tokens) trained on CORPUS, saved in `directory`."""
    import json

    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = transformers.RobertaTokenizer(vocab=model["vocab"], merges=merges, model_max_length=64)
    tok.save_pretrained(directory)
    return tok


def text_checkpoint(directory: str, class_name: str, seed: int = 0, **overrides) -> str:
    """A transformers text checkpoint dir with its tokenizer."""
    tok = text_tokenizer(directory)
    torch.manual_seed(seed)
    config = transformers.Data2VecTextConfig(**{**TEXT, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                                **overrides})
    model = _perturb(getattr(transformers, class_name)(config), seed=seed)
    model.save_pretrained(directory)
    return directory


def speech(seconds: float, seed: int = 0, sr: int = 16000) -> np.ndarray:
    """A deterministic speech-like signal: a few harmonics with a wandering pitch, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * x + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
