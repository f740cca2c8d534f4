"""Fine-tuning tasks: each says which head, which data, which loss and which eval metric.

A task gives the loop four things: the module and params, batch iterators, a loss that returns
(sum, count, stats) so that devices and micro-batches add up exactly, and host-side eval metrics.
New heads (token classification, QA, frame classification, x-vectors) plug in by subclassing
`Task`; the loop does not change.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
import optax

from .. import registry
from ..audio import conv_output_lengths
from ..audio_heads import is_feature_encoder_param
from ..ctc import ctc_loss
from . import data as data_lib
from . import sources as sources_lib
from .config import REPO_DATA, TrainConfig
from .optim import make_schedule

AUDIO_PRESETS = {
    # small enough to leave CTC's all-blank plateau within ~150 steps from scratch on CPU (4 layers or a
    # 128-wide CNN stay on it for hundreds of steps, in transformers' PyTorch model too)
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 conv_dim=(64,) * 7, num_conv_pos_embedding_groups=16, layerdrop=0.0, hidden_dropout=0.0,
                 activation_dropout=0.0, attention_dropout=0.0, final_dropout=0.0, mask_time_min_masks=0),
    "base": {},
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
TEXT_PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                 max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
    "base": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
    "large": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                  hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
PRESETS = ("tiny", "base", "large")


def build_module(cfg: TrainConfig, architecture: str, config_changes: dict, extra_options: dict | None = None):
    """(module, params, source) for `cfg.model`: a preset initialised from `cfg.seed`, or a checkpoint
    whose encoder is kept and whose head is re-initialised when the task needs another shape."""
    options = dict(dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32, scan_layers=cfg.scan_layers,
                   remat=cfg.remat, attention_implementation=cfg.attention_implementation or None,
                   **(extra_options or {}))
    audio = registry.is_audio(architecture)
    if audio and cfg.attention_implementation == "cudnn":
        options["frame_multiple"] = 128  # cuDNN flash attention needs the frame axis in multiples of 128
    overrides = {**config_changes, **cfg.model_overrides}
    if audio and cfg.mask_time_prob >= 0:
        overrides["mask_time_prob"] = cfg.mask_time_prob
    cls = registry.model_class(architecture)
    if cfg.model in PRESETS:
        base = (AUDIO_PRESETS if audio else TEXT_PRESETS)[cfg.model]
        config = registry.config_class(architecture)(**{**base, **overrides})
        module = cls(config=config, **options)
        return module, registry.init_params(module, cfg.seed), f"preset {cfg.model!r} (random init)"
    from ..hub import load
    loaded, loaded_params = load(cfg.model, architecture=architecture)
    config = loaded.config.replace(**overrides) if overrides else loaded.config
    module = cls(config=config, **options)
    params = registry.init_params(module.clone(scan_layers=False), cfg.seed)
    prefix = registry.base_prefix(architecture)
    loaded_params = _unscanned(loaded_params)
    encoder = loaded_params.get(prefix, loaded_params)
    if prefix in params:
        params = {**params, prefix: encoder}
    else:
        params = encoder
    if cfg.scan_layers:
        from ..weights import scan_params
        params = scan_params(params)
    return module, params, f"{cfg.model} (encoder loaded, head for this task initialised)"


def _unscanned(params):
    from ..weights import unscan_params
    return unscan_params(params)


class Task:
    """Base class. Subclasses set `architecture`, build data, and define `loss` and the eval pair."""

    architecture: str = ""
    best_metric: str = "eval_loss"
    best_mode: str = "min"
    default_lr: float = 1e-4
    default_schedule: str = "linear"
    data_note: str = ""  # which data the run reads, for the log

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def setup(self, shard_index: int = 0, num_shards: int = 1) -> None:
        """Read and check the data (before any compile), then build the model."""
        raise NotImplementedError

    # -- the model -----------------------------------------------------------------------------
    def frozen(self, path: tuple[str, ...]) -> bool:
        return False

    def delayed(self, path: tuple[str, ...]) -> bool:
        """Params that wait `freeze_encoder_steps` (the encoder): everything but the head."""
        return path[0] == registry.base_prefix(self.architecture)

    def identity(self) -> dict:
        """What must match for a checkpoint in the output directory to be resumable."""
        return {"task": self.cfg.task, "architecture": self.architecture, "config": self.module.config.to_dict()}

    def init_extra(self, params) -> Any:
        return None

    def after_update(self, extra, params, step):
        return extra

    def make_schedule(self):
        return make_schedule(self.cfg, self.default_lr, self.default_schedule)

    def step_metrics(self, step) -> dict:
        """Extra per-step metrics computed on device from the step number."""
        return {}

    def check_health(self, metrics: dict, step: int) -> None:
        """Host-side check on logged metrics; raise to stop the run (pre-training's collapse guard)."""

    # -- data ----------------------------------------------------------------------------------
    def sources(self, default_train: str, default_eval: str = "", *, need_text: bool = True,
                need_label: bool = False, tagged: bool = False) -> tuple[sources_lib.Source, sources_lib.Source]:
        """(train, eval) rows from --train-data/--eval-data or the shipped files (paths under data/)."""
        cfg = self.cfg
        shipped = not cfg.train_data
        train_spec = cfg.train_data or os.path.join(REPO_DATA, default_train)
        default_eval = os.path.join(REPO_DATA, default_eval) if shipped and default_eval else ""
        columns = sources_lib.Columns(cfg.audio_column, cfg.text_column, cfg.label_column)
        train, evaluation = sources_lib.train_eval_sources(
            train_spec, cfg.eval_data, cfg.modality, default_eval=default_eval, columns=columns,
            need_text=need_text, need_label=need_label, tagged=tagged)
        self.note_data(train, evaluation)
        return train, evaluation

    def note_data(self, train: sources_lib.Source, evaluation: sources_lib.Source) -> None:
        """The log line naming the data the run reads."""
        self.data_note = (f"data: train {_short(train.name)} ({len(train.rows)} examples), "
                          f"eval {_short(evaluation.name)} ({len(evaluation.rows)})")

    def train_batches(self) -> data_lib.BatchIterator:
        return self.train_iter

    def eval_batches(self) -> Iterator[dict]:
        return iter(self.eval_iter_factory())

    def prepare(self, batch: dict, rng: np.random.Generator) -> dict:
        """Host-side per-batch work in the loader thread (masks for MLM / pre-training)."""
        return batch

    def throughput_unit(self, batch: dict) -> tuple[str, float]:
        if "input_values" in batch:
            return "audio-s", float(batch["attention_mask"].sum()) / 16000.0
        return "tokens", float(batch["attention_mask"].sum())

    # -- steps ---------------------------------------------------------------------------------
    def loss(self, params, extra, batch, rng, train: bool):
        """(loss sum, count, stats): the step's loss is sum / count over the global batch."""
        raise NotImplementedError

    def eval_outputs(self, params, extra, batch) -> dict:
        num, den, _ = self.loss(params, extra, batch, None, False)
        return {"loss_sum": num, "count": den}

    def eval_metrics(self, outputs: list[dict]) -> dict:
        num = sum(float(o["loss_sum"]) for o in outputs)
        den = sum(float(o["count"]) for o in outputs)
        return {"eval_loss": num / max(den, 1.0), "eval_count": den}

    # -- export --------------------------------------------------------------------------------
    def export(self, params):
        """(module, params) of the model a user loads afterwards."""
        return self.module, params

    def save_assets(self, directory: str) -> None:
        """Tokenizer / vocabulary files that belong beside the exported model."""


def _short(name: str) -> str:
    """Shipped data paths shown relative to the repository's data/ folder."""
    return name.replace(REPO_DATA + os.sep, "data/")


class _AudioTask(Task):
    def _read(self, need_text: bool = True, need_label: bool = False):
        """(train, eval) sources; the shipped default is data/speech_digits."""
        return self.sources("speech_digits/train.jsonl", "speech_digits/eval.jsonl", need_text=need_text,
                            need_label=need_label)

    def _iterators(self, train_ds, eval_ds, shard_index, num_shards):
        cfg = self.cfg
        self.train_iter = data_lib.BatchIterator(train_ds, cfg.batch_size, n_buckets=cfg.n_buckets, multiple=320,
                                                 seed=cfg.seed, shard_index=shard_index, num_shards=num_shards,
                                                 num_workers=cfg.num_workers)
        self.eval_iter_factory = lambda: data_lib.BatchIterator(
            eval_ds, cfg.eval_batch_size, n_buckets=cfg.n_buckets, multiple=320, shuffle=False, num_epochs=1,
            drop_remainder=False, shard_index=shard_index, num_shards=num_shards, num_workers=cfg.num_workers)

    def frozen(self, path):
        return self._freeze_cnn and is_feature_encoder_param(path)

    @property
    def _freeze_cnn(self) -> bool:
        return self.cfg.freeze_feature_encoder and self.cfg.model not in PRESETS


class CTCTask(_AudioTask):
    """Speech recognition: Data2VecAudioForCTC on characters; eval CER and WER (jiwer)."""

    architecture: str = "Data2VecAudioForCTC"
    best_metric: str = "eval_cer"
    default_schedule: str = "tri_stage"

    @property
    def default_lr(self) -> float:
        """1e-3 from scratch; 1e-4 when fine-tuning a checkpoint (fairseq base_960h)."""
        return 1e-3 if self.cfg.model in PRESETS else 1e-4

    def make_schedule(self):
        """Tri-stage; from scratch the peak is held longer (CTC leaves its blank plateau late)."""
        ratios = (0.1, 0.7, 0.2) if self.cfg.model in PRESETS else (0.1, 0.4, 0.5)  # fairseq base_960h
        return make_schedule(self.cfg, self.default_lr, self.default_schedule, ratios)

    def setup(self, shard_index=0, num_shards=1):
        cfg = self.cfg
        train, evaluation = self._read()
        train_rows, eval_rows = train.rows, evaluation.rows
        self.vocab = self._vocab([r.get("text", "") for r in train_rows])
        max_samples = int(cfg.max_audio_seconds * 16000)
        train_ds = data_lib.AudioDataset(train_rows, vocab=self.vocab, max_samples=max_samples)
        eval_ds = data_lib.AudioDataset(eval_rows, vocab=self.vocab, max_samples=max_samples)
        self._iterators(train_ds, eval_ds, shard_index, num_shards)
        self.module, self.params, self.source = build_module(
            cfg, self.architecture, dict(vocab_size=len(self.vocab), pad_token_id=0, ctc_zero_infinity=True),
            dict(freeze_feature_encoder=self._freeze_cnn))

    def _vocab(self, texts):
        path = os.path.join(self.cfg.model, "vocab.json")
        if self.cfg.model not in PRESETS and os.path.isfile(path):
            return data_lib.CharVocab.load(path)
        return data_lib.CharVocab.from_texts(texts)

    def loss(self, params, extra, batch, rng, train):
        out = self.module.apply({"params": params}, batch["input_values"], batch["attention_mask"],
                                deterministic=not train, rngs={"dropout": rng} if train else None)
        c = self.module.config
        lengths = conv_output_lengths(c, batch["attention_mask"].sum(-1))
        per_seq = ctc_loss(out.logits, lengths, batch["labels"], c.pad_token_id, "none", zero_infinity=True,
                           implementation=self.cfg.ctc_implementation)
        w = batch["example_mask"]
        return (per_seq * w).sum(), w.sum(), {}

    def eval_outputs(self, params, extra, batch):
        # pipelines: eval as flax_data2vec.pipeline transcribes, padding-invariant, so eval CER = pipeline CER
        from ..pipelines.inputs import padding_invariant
        with padding_invariant(self.module.config, batch["attention_mask"]):
            out = self.module.apply({"params": params}, batch["input_values"], batch["attention_mask"])
        c = self.module.config
        lengths = conv_output_lengths(c, batch["attention_mask"].sum(-1))
        per_seq = ctc_loss(out.logits, lengths, batch["labels"], c.pad_token_id, "none", zero_infinity=True,
                           implementation=self.cfg.ctc_implementation)
        w = batch["example_mask"]
        return {"loss_sum": (per_seq * w).sum(), "count": w.sum(), "pred": jnp.argmax(out.logits, -1),
                "lengths": lengths, "labels": batch["labels"], "example_mask": w}

    def eval_metrics(self, outputs):
        import jiwer
        refs, hyps = [], []
        for o in outputs:
            pred, lengths, labels, w = (np.asarray(o[k]) for k in ("pred", "lengths", "labels", "example_mask"))
            for i in np.nonzero(w)[0]:
                hyps.append(self.vocab.decode(pred[i, :lengths[i]]))
                refs.append(self.vocab.decode([t for t in labels[i] if t >= 0], collapse=False))
        metrics = super().eval_metrics(outputs)
        metrics["eval_cer"] = float(jiwer.cer(refs, hyps)) if refs else float("nan")
        metrics["eval_wer"] = float(jiwer.wer(refs, hyps)) if refs else float("nan")
        metrics["eval_example"] = f"{refs[0]!r} -> {hyps[0]!r}" if refs else ""
        return metrics

    def save_assets(self, directory):
        self.vocab.save(directory)


class ClassificationMixin:
    """Loss (cross-entropy over real examples) and accuracy for heads with (batch, num_labels) logits."""

    input_key = "input_values"

    def _logits_loss(self, params, batch, rng, train):
        out = self.module.apply({"params": params}, batch[self.input_key], batch["attention_mask"],
                                deterministic=not train, rngs={"dropout": rng} if train else None)
        w, labels = batch["example_mask"], batch["labels"]
        losses = optax.softmax_cross_entropy_with_integer_labels(out.logits.astype(jnp.float32), labels)
        return (losses * w).sum(), w.sum(), ((jnp.argmax(out.logits, -1) == labels) * w).sum()

    def loss(self, params, extra, batch, rng, train):
        num, den, _ = self._logits_loss(params, batch, rng, train)
        return num, den, {}

    def eval_outputs(self, params, extra, batch):
        num, den, correct = self._logits_loss(params, batch, None, False)
        return {"loss_sum": num, "count": den, "correct": correct}

    def eval_metrics(self, outputs):
        metrics = super().eval_metrics(outputs)
        correct = sum(float(o["correct"]) for o in outputs)
        return {**metrics, "eval_accuracy": correct / max(metrics["eval_count"], 1.0)}


class AudioClassificationTask(ClassificationMixin, _AudioTask):
    """Utterance classification: Data2VecAudioForSequenceClassification; eval accuracy."""

    architecture: str = "Data2VecAudioForSequenceClassification"
    best_metric: str = "eval_accuracy"
    best_mode: str = "max"
    default_lr: float = 3e-4

    def setup(self, shard_index=0, num_shards=1):
        cfg = self.cfg
        train, evaluation = self._read(need_text=False, need_label=True)
        train_rows, eval_rows = train.rows, evaluation.rows
        self.label_map = sources_lib.label_map(train)
        max_samples = int(cfg.max_audio_seconds * 16000)
        train_ds = data_lib.AudioDataset(train_rows, label_map=self.label_map, max_samples=max_samples)
        eval_ds = data_lib.AudioDataset(eval_rows, label_map=self.label_map, max_samples=max_samples)
        self._iterators(train_ds, eval_ds, shard_index, num_shards)
        self.module, self.params, self.source = build_module(
            cfg, self.architecture, dict(id2label=self.label_map.id2label),
            dict(freeze_feature_encoder=self._freeze_cnn))



def get_task(cfg: TrainConfig) -> Task:
    """The Task object for `cfg.task`."""
    from .pretrain_tasks import AudioPretrainTask, TextPretrainTask
    from .text_tasks import MLMTask, TextClassificationTask, TokenClassificationTask
    tasks = {"ctc": CTCTask, "audio-classification": AudioClassificationTask,
             "text-classification": TextClassificationTask, "token-classification": TokenClassificationTask,
             "mlm": MLMTask,
             "pretrain-audio": AudioPretrainTask, "pretrain-text": TextPretrainTask}
    return tasks[cfg.task](cfg)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
