"""Audio pipelines: `audio-classification`, frame classification with merged segments, and x-vector speaker
embeddings with cosine similarity and a verification threshold. `AudioPipeline` batches waveforms for all."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from .. import processors
from ..audio import conv_output_lengths
from .base import Model, Pipeline, apply_function, bucket, length_batches, pad_rows, run_overlapped
from .inputs import check_long_enough, to_waveform

# The smallest padded clip, in seconds: shorter clips (keywords, digits) are not padded up to a second (the shipped
# eval set: 97.6 s of audio computed instead of 118 s; transformers' per-batch padding computes 129 s)
SHORTEST_BUCKET_S = 0.25


class AudioPipeline(Pipeline):
    """Shared: the feature extractor, decoding inputs up front, bucketed padded batches (padding-invariant)."""

    def __init__(self, model: Model, *, feature_extractor=None, padding_invariant: bool = True, **kw):
        self.feature_extractor = processors.feature_extractor(model.directory, feature_extractor)
        # a clip gives the outputs it gives alone (what transformers' pipeline computes at batch size 1)
        if hasattr(model.module, "padding_invariant"):
            model = Model(model.module.clone(padding_invariant=padding_invariant), model.params, model.directory)
        super().__init__(model, **kw)
        self.sampling_rate = self.feature_extractor.sampling_rate

    def apply(self, params, x, mask, **kw):
        return self.module.apply({"params": params}, x, mask, **kw)

    def waveforms(self, items: list) -> list[np.ndarray]:
        """Every input decoded and resampled (in threads) before anything runs: bad input fails first."""
        with ThreadPoolExecutor(4) as pool:
            waves = list(pool.map(lambda a: to_waveform(a[1], self.sampling_rate, a[0]), enumerate(items)))
        for i, x in enumerate(waves):
            check_long_enough(x, self.config, f"input {i}")
        return waves

    def prepare(self, waves: list[np.ndarray], longest: int | None = None):
        """Normalised (by the feature extractor), padded to a bucket (or to `longest`, the most samples any input
        can have, e.g. a chunk's, where that is less), with the attention mask."""
        rows = [np.asarray(self.feature_extractor(w, sampling_rate=self.sampling_rate)["input_values"][0],
                           np.float32) for w in waves]
        width = bucket(max(len(r) for r in rows), round(self.sampling_rate * SHORTEST_BUCKET_S),
                       self.config.inputs_to_logits_ratio, maximum=longest)
        x = pad_rows(rows, width, self.batch_size, 0.0)
        mask = pad_rows([np.ones(len(r), np.int32) for r in rows], width, self.batch_size, 0)
        mask[len(rows):, :self.config.receptive_field] = 1  # filler rows: one real frame keeps them finite
        return x, mask

    def batched(self, waves: list[np.ndarray]) -> list:
        """Per waveform, the forward's numpy output row (a pytree of arrays)."""
        def prepare(idx):
            return idx, self.prepare([waves[i] for i in idx])

        def finish(prepared, out):
            out = self.forward.fetch(out)
            return [(i, jax.tree_util.tree_map(lambda a, k=k: a[k], out)) for k, i in enumerate(prepared[0])]
        done = run_overlapped(length_batches([len(w) for w in waves], self.batch_size), prepare,
                              lambda p: self.forward(*p[1]), finish, self.stats)
        rows = dict(r for batch in done for r in batch)
        return [rows[i] for i in range(len(waves))]

    def frames(self, wave: np.ndarray) -> int:
        return int(conv_output_lengths(self.config, len(wave)))


def _labels(config, scores: np.ndarray, top_k: int | None) -> list[dict]:
    id2label = dict(config.id2label)
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [{"score": float(scores[i]), "label": id2label[int(i)]} for i in order]


def _scores(config, logits: np.ndarray, function) -> np.ndarray:
    """transformers 5's audio-classification scores: softmax, unless `function_to_apply` or the config's
    problem type (regression: none, multi-label: sigmoid) says otherwise."""
    if function is None:
        function = {"regression": "none", "multi_label_classification": "sigmoid"}.get(config.problem_type,
                                                                                        "softmax")
    return apply_function(logits, function)


class AudioClassificationPipeline(AudioPipeline):
    """`audio-classification`: labels with scores, every label unless `top_k` is given (as transformers 5)."""

    task = "audio-classification"
    architectures = ("Data2VecAudioForSequenceClassification",)

    def forward_fn(self, params, x, mask):
        return self.apply(params, x, mask).logits.astype(jnp.float32)

    def run(self, items: list, options: dict) -> list:
        top_k, function = options.pop("top_k", None), options.pop("function_to_apply", None)
        if options:
            raise TypeError(f"unknown audio-classification options: {sorted(options)}")
        top_k = None if top_k is None else min(top_k, self.config.num_labels)
        return [_labels(self.config, _scores(self.config, row, function), top_k)
                for row in self.batched(self.waveforms(items))]


def merge_segments(labels: list[str], scores: np.ndarray, seconds_per_frame: float) -> list[dict]:
    """Runs of equal frame labels -> {"label", "start", "end" (seconds), "score" (mean over the run)}."""
    segments, start = [], 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[start]:
            segments.append({"label": labels[start], "start": start * seconds_per_frame,
                             "end": t * seconds_per_frame, "score": float(scores[start:t].mean())})
            start = t
    return segments


class AudioFrameClassificationPipeline(AudioPipeline):
    """Per-frame labels (softmax, or sigmoid with `multi_label`) and merged segments with start/end times."""

    task = "audio-frame-classification"
    architectures = ("Data2VecAudioForAudioFrameClassification",)

    def forward_fn(self, params, x, mask):
        return self.apply(params, x, mask).logits.astype(jnp.float32)

    def run(self, items: list, options: dict) -> list:
        multi = options.pop("multi_label", False)
        threshold = options.pop("threshold", 0.5)
        if options:
            raise TypeError(f"unknown audio-frame-classification options: {sorted(options)}")
        waves = self.waveforms(items)
        id2label = dict(self.config.id2label)
        step = self.config.inputs_to_logits_ratio / self.sampling_rate
        out = []
        for w, logits in zip(waves, self.batched(waves)):
            logits = logits[:self.frames(w)]
            if multi:
                probs = apply_function(logits, "sigmoid")
                out.append({"frames": [[id2label[j] for j in np.flatnonzero(p >= threshold)] for p in probs],
                            "scores": probs})
                continue
            probs = apply_function(logits, "softmax")
            best = probs.argmax(-1)
            labels = [id2label[int(j)] for j in best]
            out.append({"frames": labels, "scores": probs,
                        "segments": merge_segments(labels, probs[np.arange(len(best)), best], step)})
        return out


def cosine_similarity(a, b) -> np.ndarray:
    """Cosine similarity of embeddings (..., dim) with (..., dim), broadcast."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


class SpeakerEmbeddingPipeline(AudioPipeline):
    """x-vector `embeddings` per clip; `verify(a, b)` says whether two clips share a speaker."""

    task = "speaker-embedding"
    architectures = ("Data2VecAudioForXVector",)

    def __init__(self, model: Model, *, threshold: float = 0.7, **kw):
        super().__init__(model, **kw)
        self.threshold = threshold  # transformers' x-vector example uses 0.7 (cosine similarity)

    def forward_fn(self, params, x, mask):
        return self.apply(params, x, mask).embeddings.astype(jnp.float32)

    def run(self, items: list, options: dict) -> list:
        if options:
            raise TypeError(f"unknown speaker-embedding options: {sorted(options)}")
        return [{"embeddings": e} for e in self.batched(self.waveforms(items))]

    def verify(self, a, b, threshold: float | None = None) -> dict:
        """{"similarity", "same_speaker"} of two clips: cosine similarity of their embeddings vs the threshold."""
        ea, eb = (r["embeddings"] for r in self([a, b]))
        similarity = float(cosine_similarity(ea, eb))
        return {"similarity": similarity, "same_speaker": similarity >= (threshold or self.threshold)}
