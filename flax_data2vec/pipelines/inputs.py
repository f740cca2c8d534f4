"""Audio inputs as transformers' pipelines take them (paths, arrays, `{"raw", "sampling_rate"}` dicts, datasets
rows), decoded and resampled on the host without torch, and checked before anything runs."""

from __future__ import annotations

import math
import os

import numpy as np


def resample(x: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """Mono float32 at `target_sr`: soxr when installed (fast, high quality), else scipy's polyphase filter."""
    if sr == target_sr:
        return x
    try:
        import soxr
        return soxr.resample(x, sr, target_sr).astype(np.float32)
    except ImportError:
        from scipy.signal import resample_poly
        g = math.gcd(int(sr), int(target_sr))
        return resample_poly(x, target_sr // g, sr // g).astype(np.float32)


def read_audio_file(path: str, target_sr: int) -> np.ndarray:
    """Decode a file with soundfile, channels averaged, resampled; one clear error if missing or unreadable."""
    import soundfile as sf
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise ValueError(f"cannot decode audio file {path}: {e}") from None
    return resample(x.mean(axis=1), sr, target_sr)


def to_waveform(item, target_sr: int, index: int = 0) -> np.ndarray:
    """One input -> mono float32 waveform at `target_sr`; empty or malformed input raises naming the item."""
    where = f"input {index}"
    if isinstance(item, (str, os.PathLike)):
        where, x = os.fspath(item), read_audio_file(os.fspath(item), target_sr)
    elif isinstance(item, dict):
        if "path" in item and item.get("array") is None and item.get("raw") is None:
            return to_waveform(item["path"], target_sr, index)
        raw = item.get("raw", item.get("array"))
        if raw is None or "sampling_rate" not in item:
            raise ValueError(f"{where}: an audio dict needs 'raw' (or 'array') and 'sampling_rate', got keys "
                             f"{sorted(item)}")
        x = _mono(np.asarray(raw, np.float32), where)
        x = resample(x, int(item["sampling_rate"]), target_sr)
    elif hasattr(item, "get_all_samples"):  # a datasets/torchcodec AudioDecoder
        samples = item.get_all_samples()
        x = resample(_mono(np.asarray(samples.data, np.float32), where), int(samples.sample_rate), target_sr)
    elif isinstance(item, np.ndarray) or hasattr(item, "__array__"):
        x = _mono(np.asarray(item, np.float32), where)  # arrays are taken to be at the model's rate
    else:
        raise TypeError(f"{where}: expected a file path, a numpy array or an audio dict, got {type(item).__name__}")
    if x.size == 0:
        raise ValueError(f"{where} is an empty clip (0 samples)")
    if not np.isfinite(x).all():
        raise ValueError(f"{where} holds NaN or infinite samples")
    return np.ascontiguousarray(x, np.float32)


def _mono(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 1:
        return x
    if x.ndim == 2 and min(x.shape) <= 2:  # (channels, samples) as transformers reads it, or channels-last
        return x.mean(axis=0 if x.shape[0] <= 2 else 1)
    raise ValueError(f"{where}: expected a 1-D waveform (or 2 channels), got shape {x.shape}")


def check_long_enough(x: np.ndarray, config, where: str) -> None:
    if len(x) < config.receptive_field:
        raise ValueError(f"{where} has {len(x)} samples, fewer than the model's receptive field "
                         f"({config.receptive_field} samples, {config.receptive_field / 16000:.3f} s at 16 kHz)")
