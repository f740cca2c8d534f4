"""Per-frame labels (voice activity, diarisation-style tags): Data2VecAudioForAudioFrameClassification; eval frame
accuracy and per-class F1.

Labels come from a manifest whose rows carry `segments`: [{"start": s, "end": s, "label": name}] in seconds.
Frame i of the model (inputs_to_logits_ratio samples, 20 ms) takes the label of the segment holding its
midpoint; frames no segment covers are -100 (not scored).

The shipped default is speech vs. silence on data/speech_digits: a 20-ms frame is "speech" when its RMS is within
40 dB of the utterance's loudest frame, else "silence". The clips are clean synthetic speech whose pauses are
digital zeros (9-bit quantisation), so the rule is unambiguous there (see the README for the class balance).
"""

from __future__ import annotations

import numpy as np

from ...audio import conv_output_lengths
from .. import data as data_lib
from ..config import TrainConfig
from ..task import Task
from . import common

SPEECH_DB = -40.0  # shipped labels: a frame within 40 dB of the utterance's loudest frame is speech


def energy_segments(audio: np.ndarray, frame: int = 320, sample_rate: int = 16000,
                    threshold_db: float = SPEECH_DB) -> list[dict]:
    """Speech / silence segments of a clean clip: runs of `frame`-sample frames whose RMS is within
    `threshold_db` of the loudest frame (a partial last frame is left unlabelled)."""
    n = len(audio) // frame
    rms = np.sqrt(np.mean(np.square(audio[:n * frame].reshape(n, frame), dtype=np.float64), axis=1))
    speech = 20 * np.log10(np.maximum(rms, 1e-10) / max(rms.max(), 1e-10)) >= threshold_db
    edges = np.flatnonzero(np.diff(speech.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [n]])
    return [{"start": a * frame / sample_rate, "end": b * frame / sample_rate,
             "label": "speech" if speech[a] else "silence"} for a, b in zip(bounds[:-1], bounds[1:])]


def frame_labels(segments: list[dict], num_frames: int, frame_seconds: float, label_map: data_lib.LabelMap):
    """One class id per frame: the segment holding the frame's midpoint, -100 where none does."""
    labels = np.full(num_frames, data_lib.IGNORE_INDEX, np.int32)
    mid = (np.arange(num_frames) + 0.5) * frame_seconds
    for seg, label in zip(segments, label_map.encode(s["label"] for s in segments)):
        labels[(mid >= float(seg["start"])) & (mid < float(seg["end"]))] = label
    return labels


def segment_sources(cfg: TrainConfig):
    """(train, eval) rows with `segments`: from --train-data manifests, or energy labels of the shipped clips."""
    train, evaluation = common.shipped_speech(cfg, need_text=False)
    for split in (train, evaluation):
        if not cfg.train_data:
            split.rows = [{**r, "segments": energy_segments(data_lib.load_row_audio(r))} for r in split.rows]
            split.name += " (speech/silence by frame energy)"
        bad = [i for i, r in enumerate(split.rows)
               if not isinstance(r.get("segments"), list)
               or not all(isinstance(s, dict) and {"start", "end", "label"} <= set(s) for s in r["segments"])]
        if bad:
            raise ValueError(f"{split.name}: {len(bad)} rows lack 'segments' [{{start, end, label}}, ...] "
                             f"(first: row {bad[0]})")
    return train, evaluation


def frame_dataset(rows: list[dict], config, label_map: data_lib.LabelMap, max_samples: int) -> common.LabelledAudio:
    """Audio examples with per-frame class ids (one per model frame of each utterance)."""
    audio = data_lib.AudioDataset(rows, max_samples=max_samples)
    seconds = config.inputs_to_logits_ratio / audio.target_sr
    return common.LabelledAudio(audio, [frame_labels(r["segments"], int(n), seconds, label_map)
                                        for r, n in zip(audio.rows, conv_output_lengths(config, audio.lengths))])


def frame_scores(outputs: list[dict], num_labels: int) -> np.ndarray:
    """(num_labels, num_labels) confusion counts [gold, predicted] over the scored frames."""
    confusion = np.zeros((num_labels, num_labels), np.int64)
    for o in outputs:
        pred, labels = np.asarray(o["pred"]).ravel(), np.asarray(o["labels"]).ravel()
        keep = labels >= 0
        np.add.at(confusion, (labels[keep], pred[keep]), 1)
    return confusion


def confusion_metrics(confusion: np.ndarray, names: list[str]) -> dict:
    """Accuracy, macro F1 and each class's F1 from confusion counts [gold, predicted]."""
    hits = np.diag(confusion).astype(np.float64)
    f1 = 2 * hits / np.maximum(confusion.sum(0) + confusion.sum(1), 1)
    metrics = {"eval_accuracy": float(hits.sum() / max(confusion.sum(), 1)), "eval_macro_f1": float(f1.mean())}
    metrics.update({f"eval_f1_{name}": float(v) for name, v in zip(names, f1)})
    return metrics


def make_audio_frame_classification(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    arch = "Data2VecAudioForAudioFrameClassification"
    train, evaluation = segment_sources(cfg)
    label_map = data_lib.LabelMap.from_labels(s["label"] for r in train.rows for s in r["segments"])
    model = common.audio_model(cfg, arch, dict(id2label=label_map.id2label))
    max_samples = int(cfg.max_audio_seconds * 16000)
    train_ds, eval_ds = (frame_dataset(s.rows, model.module.config, label_map, max_samples)
                         for s in (train, evaluation))
    train_data, eval_data = common.audio_iterators(cfg, train_ds, eval_ds, shard_index, num_shards)
    loss, eval_step = common.labelling_steps(common.forward(model.module))

    def eval_metrics(outputs):
        return {**common.mean_eval_loss(outputs),
                **confusion_metrics(frame_scores(outputs, len(label_map)), label_map.names)}

    return common.fine_tuning_task(cfg, arch, model, (train, evaluation), (train_data, eval_data), (loss, eval_step),
                                   eval_metrics, lr=3e-4, best=("eval_macro_f1", "max"))
