"""`feature-extraction` (hidden states, as transformers' pipeline gives them) and `embed`: one pooled vector
per utterance or sentence, the mean over real frames/tokens of the last layer, or the data2vec way (the
average of the top-K layers, each instance-normed over the real positions, as data2vec builds its targets)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .audio import AudioPipeline
from .base import Model
from .text import TextPipeline

POOLINGS = ("mean", "data2vec")


def instance_norm(x, real, eps: float = 1e-5):
    """(batch, time, hidden) normalised per channel over the real time steps (`real`: (batch, time) bool)."""
    w = real[:, :, None].astype(jnp.float32)
    n = jnp.maximum(w.sum(1, keepdims=True), 1.0)
    mean = (x * w).sum(1, keepdims=True) / n
    var = (((x - mean) ** 2) * w).sum(1, keepdims=True) / n
    return (x - mean) / jnp.sqrt(var + eps)


class _Features:
    """Forward and pooling shared by the audio and text variants (mixed in before their batching base)."""

    def __init__(self, model: Model, *, pooling: str = "mean", top_k_layers: int = 8, **kw):
        super().__init__(model, **kw)
        top_k_layers = min(top_k_layers, self.config.num_hidden_layers)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        layers = self.config.num_hidden_layers
        if pooling == "data2vec" and not 1 <= top_k_layers <= layers:
            raise ValueError(f"top_k_layers must be in [1, {layers}], got {top_k_layers}")
        self.pooling, self.top_k_layers = pooling, top_k_layers

    def _outputs(self, out, real):
        """(last hidden state, pooled embedding) of a padded batch."""
        last = out.last_hidden_state.astype(jnp.float32)
        if self.pooling == "data2vec":
            layers = [instance_norm(h.astype(jnp.float32), real) for h in out.hidden_states[-self.top_k_layers:]]
            pooled_from = sum(layers) / len(layers)
        else:
            pooled_from = last
        w = real[:, :, None].astype(jnp.float32)
        return last, (pooled_from * w).sum(1) / jnp.maximum(w.sum(1), 1.0)

    def embed(self, inputs) -> np.ndarray:
        """(n, hidden) float32: one pooled vector per input."""
        single = not isinstance(inputs, (list, tuple))
        rows = self.rows([inputs] if single else list(inputs))
        pooled = np.stack([p for _, p in rows])
        return pooled[0] if single else pooled

    def run(self, items: list, options: dict) -> list:
        as_numpy = options.pop("return_tensors", False)
        if options:
            raise TypeError(f"unknown feature-extraction options: {sorted(options)}")
        return [last[None] if as_numpy else last[None].tolist() for last, _ in self.rows(items)]


class AudioFeatureExtractionPipeline(_Features, AudioPipeline):
    """Hidden states (frames, hidden) of each clip's real frames, or pooled embeddings."""

    task = "feature-extraction"

    def forward_fn(self, params, x, mask):
        out = self.apply(params, x, mask, output_hidden_states=self.pooling == "data2vec")
        return self._outputs(out, out.feature_mask)

    def rows(self, items):
        waves = self.waveforms(items)
        return [(last[:self.frames(w)], pooled) for w, (last, pooled) in zip(waves, self.batched(waves))]


class TextFeatureExtractionPipeline(_Features, TextPipeline):
    """Hidden states (tokens, hidden) of each text, special tokens included (as transformers), or pooled."""

    task = "feature-extraction"

    def forward_fn(self, params, ids, mask):
        out = self.module.apply({"params": params}, ids, mask, output_hidden_states=self.pooling == "data2vec")
        return self._outputs(out, mask.astype(bool))

    def rows(self, items):
        for x in items:
            if not isinstance(x, str):
                raise ValueError(f"text feature-extraction takes strings, got {type(x).__name__}")
        encodings = [self.encode(x) for x in items]
        return [(last[:len(e["input_ids"])], pooled) for e, (last, pooled) in zip(encodings, self.batched(encodings))]


def FeatureExtractionPipeline(model: Model, **kw):  # noqa: N802 - a factory standing in for the class
    """The audio or text variant, by the checkpoint's modality."""
    if model.architecture.startswith("Data2VecAudio"):
        return AudioFeatureExtractionPipeline(model, **kw)
    return TextFeatureExtractionPipeline(model, **kw)


def embed(inputs, model, *, pooling: str = "mean", top_k_layers: int = 8, batch_size: int = 8, dtype=None,
          **options) -> np.ndarray:
    """Pooled embeddings of audio clips or texts: (n, hidden), or (hidden,) for one input.

    model: a feature-extraction pipeline (reused, no new compile), or anything `fd.pipeline` takes.
    pooling: "mean" (last layer over real positions) or "data2vec" (mean of the top_k_layers, instance-normed).
    """
    if isinstance(model, _Features):
        return model.embed(inputs)
    from . import pipeline
    return pipeline("feature-extraction", model, batch_size=batch_size, dtype=dtype, pooling=pooling,
                    top_k_layers=top_k_layers, **options).embed(inputs)
