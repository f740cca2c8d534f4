"""`flax_data2vec.pipeline(task, model)`: transformers' pipeline tasks, batched and jitted on every local device.

    asr = fd.pipeline("automatic-speech-recognition", "data2vec-audio-base-960h", batch_size=16)
    asr(["a.flac", "b.wav"], chunk_length_s=30, return_timestamps="word")

`model` is anything `fd.load` takes, or a `(module, params)` pair with `tokenizer=` / `feature_extractor=`.
"""

from __future__ import annotations

import importlib

from .base import Model, Pipeline, Stats, check_parallel, resolve_model

# task -> (module, class, the architecture loaded for it; None: the checkpoint's own)
TASKS = {
    "automatic-speech-recognition": ("asr", "AutomaticSpeechRecognitionPipeline", "Data2VecAudioForCTC"),
    "audio-classification": ("audio", "AudioClassificationPipeline", "Data2VecAudioForSequenceClassification"),
    "audio-frame-classification": ("audio", "AudioFrameClassificationPipeline",
                                   "Data2VecAudioForAudioFrameClassification"),
    "speaker-embedding": ("audio", "SpeakerEmbeddingPipeline", "Data2VecAudioForXVector"),
    "fill-mask": ("text", "FillMaskPipeline", "Data2VecTextForMaskedLM"),
    "text-classification": ("text", "TextClassificationPipeline", "Data2VecTextForSequenceClassification"),
    "token-classification": ("text", "TokenClassificationPipeline", "Data2VecTextForTokenClassification"),
    "question-answering": ("qa", "QuestionAnsweringPipeline", "Data2VecTextForQuestionAnswering"),
    "feature-extraction": ("features", "FeatureExtractionPipeline", "base"),
    "text-generation": ("generation", "TextGenerationPipeline", "Data2VecTextForCausalLM"),
}
ALIASES = {"ner": "token-classification", "sentiment-analysis": "text-classification",
           "asr": "automatic-speech-recognition"}


def pipeline(task: str, model, *, batch_size: int = 8, dtype=None, devices=None, mesh=None, parallel: str = "jit",
             **task_options) -> Pipeline:
    """A pipeline for `task` on `model`, with transformers' task names, call arguments and outputs.

    batch_size: rows per compiled call (rounded up to a multiple of the device count); dtype: compute dtype
    (e.g. jnp.bfloat16); devices / mesh: where the batch is split (default all local devices, a 'data' axis);
    parallel: 'jit' (one program over the mesh) or 'pmap' (one replica per device).
    task_options: the task's own (tokenizer=, feature_extractor=, lm=, top_k=, aggregation_strategy=, ...).
    """
    task = ALIASES.get(task, task)
    if task not in TASKS:
        import difflib
        close = difflib.get_close_matches(task, list(TASKS), n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown task {task!r}{hint} Tasks: {', '.join(TASKS)}")
    module_name, class_name, architecture = TASKS[task]
    check_parallel(parallel)
    cls = getattr(importlib.import_module(f".{module_name}", __name__), class_name)
    resolved = resolve_model(model, architecture=architecture, dtype=dtype)
    return cls(resolved, batch_size=batch_size, devices=devices, mesh=mesh, parallel=parallel, **task_options)


def embed(inputs, model, **options):
    """Pooled utterance or sentence embeddings (see `features.embed`)."""
    from .features import embed as _embed
    return _embed(inputs, model, **options)


__all__ = ["pipeline", "embed", "Pipeline", "Model", "Stats", "TASKS", "resolve_model"]
