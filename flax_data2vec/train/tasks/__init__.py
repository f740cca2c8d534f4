"""The training tasks, by `--task` name. Each entry makes a `Task` (train/task.py) from the config."""

from __future__ import annotations

from collections.abc import Callable

from ..config import TrainConfig
from ..task import Task
from .audio import make_audio_classification, make_ctc
from .frame_classification import make_audio_frame_classification
from .pretrain import make_pretrain_audio, make_pretrain_text
from .pretrain2 import make_pretrain2_audio, make_pretrain2_text
from .question_answering import make_question_answering
from .speaker_verification import make_speaker_verification
from .text import make_mlm, make_text_classification
from .token_classification import make_token_classification

TASKS: dict[str, Callable[..., Task]] = {
    "ctc": make_ctc,
    "audio-classification": make_audio_classification,
    "audio-frame-classification": make_audio_frame_classification,
    "speaker-verification": make_speaker_verification,
    "text-classification": make_text_classification,
    "token-classification": make_token_classification,
    "question-answering": make_question_answering,
    "mlm": make_mlm,
    "pretrain-audio": make_pretrain_audio,
    "pretrain-text": make_pretrain_text,
    "pretrain2-audio": make_pretrain2_audio,
    "pretrain2-text": make_pretrain2_text,
}


def make_task(cfg: TrainConfig, shard_index: int = 0, num_shards: int = 1) -> Task:
    """The task `cfg.task` names, its data read and checked and its model built (before anything compiles)."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[cfg.task](cfg, shard_index, num_shards)
