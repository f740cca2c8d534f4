"""Pieces every task file uses: where its data come from, its batch iterators, its tokenizer, its optimizer,
and the forward pass of a head. Pure helpers; each returns what a `Task` field holds."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import jax.numpy as jnp
import numpy as np

from ... import losses, registry
from ...audio_heads import is_feature_encoder_param
from .. import data as data_lib
from .. import sources as sources_lib
from ..config import REPO_DATA, TrainConfig
from ..input_pipeline import BatchIterator
from ..models import PRESETS, TaskModel, build
from ..optim import make_optimizer, make_schedule
from ..task import Task, no_assets

EVAL_MASK_SEED = 12345  # eval batches get the same host-side masks at every evaluation


# ----------------------------------------------------------------------------- data
def read_sources(cfg: TrainConfig, modality: str, default_train: str, default_eval: str = "", *,
                 need_text: bool = True, need_label: bool = False,
                 tagged: bool = False) -> tuple[sources_lib.Split, sources_lib.Split]:
    """(train, eval) rows from --train-data/--eval-data, or the shipped files (paths under data/)."""
    shipped = not cfg.train_data
    train_spec = cfg.train_data or os.path.join(REPO_DATA, default_train)
    default_eval = os.path.join(REPO_DATA, default_eval) if shipped and default_eval else ""
    columns = sources_lib.Columns(cfg.audio_column, cfg.text_column, cfg.label_column)
    return sources_lib.train_eval_sources(train_spec, cfg.eval_data, modality, default_eval=default_eval,
                                          columns=columns, need_text=need_text, need_label=need_label,
                                          tagged=tagged)


def data_note(train: sources_lib.Split, evaluation: sources_lib.Split) -> str:
    """The log line naming the data a run reads (shipped paths shown relative to the repository)."""
    def short(name: str) -> str:
        return name.replace(REPO_DATA + os.sep, "data/")
    return (f"data: train {short(train.name)} ({len(train.rows)} examples), "
            f"eval {short(evaluation.name)} ({len(evaluation.rows)})")


def shipped_speech(cfg: TrainConfig, **kw) -> tuple[sources_lib.Split, sources_lib.Split]:
    """Audio (train, eval) rows; the shipped default is data/speech_digits."""
    return read_sources(cfg, "audio", "speech_digits/train.jsonl", "speech_digits/eval.jsonl", **kw)


def iterators(cfg: TrainConfig, train_ds, eval_ds, *, multiple: int, shard_index: int, num_shards: int,
              prepare: Callable | None = None, crop_to_shortest: bool = False) -> tuple[Callable, Callable]:
    """(train_data, eval_data) factories of bucketed batches over this host's shard (Grain underneath).
    `prepare(batch, rng)` (host-side masks) runs in the loader, keyed by the data position for training;
    eval batches get the same masks at every evaluation and load in one background thread."""
    kw = dict(n_buckets=cfg.n_buckets, multiple=multiple, shard_index=shard_index, num_shards=num_shards,
              crop_to_shortest=crop_to_shortest)

    def train_data():
        return BatchIterator(train_ds, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers,
                             transform=prepare, **kw)

    def eval_data() -> Iterator[dict]:
        it = BatchIterator(eval_ds, cfg.eval_batch_size, shuffle=False, num_epochs=1, drop_remainder=False, **kw)
        if prepare is None:
            return iter(it)
        rng = np.random.default_rng([cfg.seed, EVAL_MASK_SEED])
        return (prepare(b, rng) for b in it)
    return train_data, eval_data


class LabelledAudio:
    """Audio examples (`data.AudioDataset`) with one label array per example, for the batch iterator."""

    pad_value = 0.0

    def __init__(self, audio: data_lib.AudioDataset, targets: list[np.ndarray]):
        self.audio, self.targets = audio, targets
        self.lengths = audio.lengths
        self.label_lengths = np.array([len(t) for t in targets])

    def __len__(self) -> int:
        return len(self.audio)

    def load(self, i: int, rng: np.random.Generator | None = None) -> dict:
        return {**self.audio.load(i, rng), "labels": self.targets[i]}


def audio_iterators(cfg: TrainConfig, train_ds, eval_ds, shard_index: int, num_shards: int,
                    prepare: Callable | None = None, crop_to_shortest: bool = False) -> tuple[Callable, Callable]:
    """Audio batches in multiples of 320 samples (one frame): padded, or cropped to the shortest row."""
    return iterators(cfg, train_ds, eval_ds, multiple=320, shard_index=shard_index, num_shards=num_shards,
                     prepare=prepare, crop_to_shortest=crop_to_shortest)


def text_iterators(cfg: TrainConfig, train_ds, eval_ds, shard_index: int, num_shards: int,
                   prepare: Callable | None = None) -> tuple[Callable, Callable]:
    """Token batches, padded to multiples of 8 (128 for cuDNN attention, which needs T % 128 == 0)."""
    multiple = 128 if cfg.attention_implementation == "cudnn" else 8
    return iterators(cfg, train_ds, eval_ds, multiple=multiple, shard_index=shard_index, num_shards=num_shards,
                     prepare=prepare)


def tokenizer_for(cfg: TrainConfig, texts: list[str]):
    """--tokenizer, else the checkpoint's tokenizer, else (presets) a small BPE trained on `texts`
    (for the shipped data: on the whole shipped corpus)."""
    from transformers import AutoTokenizer
    if cfg.tokenizer:
        return AutoTokenizer.from_pretrained(cfg.tokenizer)
    if cfg.model not in PRESETS:
        from ...hub import training_output_model
        source = training_output_model(cfg.model) if os.path.isdir(cfg.model) else cfg.model
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ValueError(f"no tokenizer found with model {cfg.model!r}; pass --tokenizer") from e
    if not cfg.train_data:
        texts = [r["text"] for r in data_lib.load_text_lines(os.path.join(REPO_DATA, "text/corpus.txt"))]
    return data_lib.build_small_bpe_tokenizer((t for t in texts if t), vocab_size=2000)


def tokenizer_changes(cfg: TrainConfig, tokenizer) -> dict:
    """Model-config fields a tokenizer decides (special ids; the vocabulary size of a preset)."""
    changes = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    if cfg.model in PRESETS:
        changes["vocab_size"] = len(tokenizer)
    return changes


# ----------------------------------------------------------------------------- optimisation
def freeze_cnn(cfg: TrainConfig) -> bool:
    """Audio: the CNN is frozen when fine-tuning a checkpoint (wav2vec 2.0 practice), trained from scratch."""
    return cfg.freeze_feature_encoder and cfg.model not in PRESETS


def audio_model(cfg: TrainConfig, architecture: str, changes: dict) -> TaskModel:
    """An audio task's model (`models.build`), its CNN's backward pass skipped when the CNN is frozen."""
    return build(cfg, architecture, changes, freeze_feature_encoder=freeze_cnn(cfg))


def fine_tuning_labels(cfg: TrainConfig, architecture: str, freeze_cnn: bool) -> Callable[[tuple], str]:
    """Optimizer label of each param: the CNN frozen (audio, when asked), the encoder (v1 or 2.0, at
    `registry.encoder_prefix`) delayed for --freeze-encoder-steps, the head trained from the start."""
    prefix = registry.encoder_prefix(architecture)

    def label(path: tuple[str, ...]) -> str:
        if freeze_cnn and is_feature_encoder_param(path):
            return "frozen"
        return "delayed" if cfg.freeze_encoder_steps and path[0] == prefix else "train"
    return label


def adamw(cfg: TrainConfig, default_lr: float, default_schedule: str, label: Callable[[tuple], str],
          ratios: tuple[float, float, float] = (0.1, 0.4, 0.5)) -> Callable:
    """The `optimizer` field of a fine-tuning task: AdamW over the task's schedule, by param label."""
    def optimizer(params):
        schedule = make_schedule(cfg, default_lr, default_schedule, ratios)
        return make_optimizer(cfg, schedule, params, label), schedule
    return optimizer


# ----------------------------------------------------------------------------- the model
def forward(module, inputs_key: str = "input_values") -> Callable:
    """(params, batch, rng, train) -> the head's outputs; dropout only when training."""
    def apply(params, batch, rng, train: bool, **kwargs):
        return module.apply({"params": params}, batch[inputs_key], batch["attention_mask"], deterministic=not train,
                            rngs={"dropout": rng} if train else None, **kwargs)
    return apply


def loss_eval_step(loss: Callable) -> Callable:
    """The eval_step of a task scored by its loss alone: (sum, count) without dropout."""
    def eval_step(params, extra, batch):
        total, count, _ = loss(params, extra, batch, None, False)
        return {"loss_sum": total, "count": count}
    return eval_step


def real_rows(labels, example_mask):
    """Labels with padding rows (example_mask 0) set to the ignored id, so a loss skips them."""
    keep = example_mask.reshape(example_mask.shape + (1,) * (labels.ndim - 1)) > 0
    return jnp.where(keep, labels, data_lib.IGNORE_INDEX)


def mean_eval_loss(outputs: list[dict]) -> dict:
    """eval_loss (global sum / count) and eval_count from eval outputs with loss_sum and count."""
    total = sum(float(o["loss_sum"]) for o in outputs)
    count = sum(float(o["count"]) for o in outputs)
    return {"eval_loss": total / max(count, 1.0), "eval_count": int(count)}


def identity(cfg: TrainConfig, architecture: str, module) -> dict:
    """What a checkpoint in the output directory must match to be resumed by this run."""
    return {"task": cfg.task, "architecture": architecture, "config": module.config.to_dict()}


def classification_loss(logits, labels, example_mask):
    """(sum, count, correct) of the cross-entropy over real rows of (batch, num_labels) logits."""
    labels = real_rows(labels, example_mask)
    total, count = losses.cross_entropy_sum(logits, labels)
    correct = ((jnp.argmax(logits, -1) == labels) & (labels >= 0)).sum()
    return total, count, correct


def classification_eval(outputs: list[dict]) -> dict:
    """eval_loss and eval_accuracy from eval outputs with loss_sum, count and correct."""
    metrics = mean_eval_loss(outputs)
    correct = sum(float(o["correct"]) for o in outputs)
    return {**metrics, "eval_accuracy": correct / max(metrics["eval_count"], 1)}


def classification_steps(apply) -> tuple:
    """(loss, eval_step) of a head with (batch, num_labels) logits."""
    def loss(params, extra, batch, rng, train):
        total, count, _ = classification_loss(apply(params, batch, rng, train).logits, batch["labels"],
                                              batch["example_mask"])
        return total, count, {}

    def eval_step(params, extra, batch):
        total, count, correct = classification_loss(apply(params, batch, None, False).logits, batch["labels"],
                                                    batch["example_mask"])
        return {"loss_sum": total, "count": count, "correct": correct}
    return loss, eval_step


def labelling_steps(apply) -> tuple:
    """(loss, eval_step) of a head with per-position (batch, T, num_labels) logits (tokens, frames); labels are
    cut or padded with -100 to T, padding rows ignored; eval returns pred and labels for host-side metrics."""
    def scored(params, batch, rng, train):
        logits = apply(params, batch, rng, train).logits
        labels = batch["labels"][:, :logits.shape[1]]
        labels = jnp.pad(labels, ((0, 0), (0, logits.shape[1] - labels.shape[1])),
                         constant_values=data_lib.IGNORE_INDEX)
        return logits, real_rows(labels, batch["example_mask"])

    def loss(params, extra, batch, rng, train):
        return (*losses.cross_entropy_sum(*scored(params, batch, rng, train)), {})

    def eval_step(params, extra, batch):
        logits, labels = scored(params, batch, None, False)
        total, count = losses.cross_entropy_sum(logits, labels)
        return {"loss_sum": total, "count": count, "pred": jnp.argmax(logits, -1), "labels": labels}
    return loss, eval_step


def export_as(module) -> Callable:
    """The export of a task whose trained module is the one users load."""
    def export(params):
        return module, params
    return export


# ----------------------------------------------------------------------------- the task
def fine_tuning_task(cfg: TrainConfig, architecture: str, model: TaskModel,
                     sources: tuple[sources_lib.Split, sources_lib.Split], data: tuple[Callable, Callable],
                     steps: tuple[Callable, Callable], eval_metrics: Callable, *, lr: float,
                     schedule: str = "linear", ratios: tuple[float, float, float] = (0.1, 0.4, 0.5),
                     best: tuple[str, str] = ("eval_loss", "min"), save_assets: Callable[[str], None] = no_assets,
                     data_detail: str = "", export: Callable | None = None) -> Task:
    """The `Task` of fine-tuning `model` (a head on the shared encoder): AdamW by param label (the CNN frozen for
    audio checkpoints), the trained module exported as it is, the log naming model and data. A task file states
    only its data (`sources`, the (train, eval) iterators `data`), its (loss, eval_step) `steps`, its metrics,
    learning rate and schedule, the metric that picks the best checkpoint, the assets saved beside it, and its
    `export` when training params hold more than the module's (default: the module and params as they are)."""
    train, evaluation = sources
    frozen_cnn = registry.is_audio(architecture) and freeze_cnn(cfg)
    loss, eval_step = steps
    return Task(
        name=cfg.task, architecture=architecture, module=model.module, init=lambda: model.params,
        optimizer=adamw(cfg, lr, schedule, fine_tuning_labels(cfg, type(model.module).__name__, frozen_cnn), ratios),
        loss=loss, eval_step=eval_step, eval_metrics=eval_metrics, train_data=data[0], eval_data=data[1],
        export=export or export_as(model.module), identity=identity(cfg, architecture, model.module),
        best_metric=best[0], best_mode=best[1], save_assets=save_assets,
        notes=(model.note, data_note(train, evaluation) + data_detail))
