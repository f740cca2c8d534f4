"""The training tasks, by `--task` name. Each entry says where its `make_<task>` lives (imported on first use, so
the command line checks `--task` and `--model-config` without loading JAX), which model config it trains, and
the command that uses the exported model."""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..task import Task


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    module: str  # in this package
    maker: str  # make_<task>(cfg, shard_index, num_shards) -> Task
    modality: str  # "audio", "text" (v1) or "audio2", "text2" (data2vec 2.0): whose config --model-config edits
    usage: str  # the next command after training; {model} is OUTPUT_DIR/model


def _pipeline(task: str) -> str:
    return f'flax_data2vec.pipeline("{task}", "{{model}}")'


TASKS: dict[str, TaskEntry] = {
    "ctc": TaskEntry("audio", "make_ctc", "audio", "python -m flax_data2vec transcribe AUDIO.wav --model {model}"),
    "audio-classification": TaskEntry("audio", "make_audio_classification", "audio",
                                      "python -m flax_data2vec classify AUDIO.wav --model {model}"),
    "audio-frame-classification": TaskEntry("frame_classification", "make_audio_frame_classification", "audio",
                                            _pipeline("audio-frame-classification")),
    "speaker-verification": TaskEntry("speaker_verification", "make_speaker_verification", "audio",
                                      _pipeline("speaker-embedding")),
    "text-classification": TaskEntry("text", "make_text_classification", "text",
                                     "python -m flax_data2vec classify 'some text' --model {model}"),
    "token-classification": TaskEntry("token_classification", "make_token_classification", "text",
                                      _pipeline("token-classification")),
    "question-answering": TaskEntry("question_answering", "make_question_answering", "text",
                                    _pipeline("question-answering")),
    "mlm": TaskEntry("text", "make_mlm", "text", "python -m flax_data2vec fill-mask 'a <mask> text' --model {model}"),
    "pretrain-audio": TaskEntry("pretrain", "make_pretrain_audio", "audio",
                                "python -m flax_data2vec embed AUDIO.wav --model {model} --output emb.npy"),
    "pretrain-text": TaskEntry("pretrain", "make_pretrain_text", "text",
                               "python -m flax_data2vec embed 'some text' --model {model} --output emb.npy"),
    "pretrain2-audio": TaskEntry("pretrain2", "make_pretrain2_audio", "audio2",
                                 "python train_tpu.py --task ctc --model {model}"),
    "pretrain2-text": TaskEntry("pretrain2", "make_pretrain2_text", "text2",
                                "python train_tpu.py --task text-classification --model {model}"),
}


def make_task(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    """The task `cfg.task` names, its data read and checked and its model built (before anything compiles)."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    entry = TASKS[cfg.task]
    maker = getattr(importlib.import_module(f".{entry.module}", __name__), entry.maker)
    return maker(cfg, shard_index, num_shards)
