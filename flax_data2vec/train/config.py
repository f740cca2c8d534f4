"""The training configuration: one typed, frozen dataclass with command-line overrides and a file form.

Every field is a `--flag` of `train_tpu.py` (underscores become dashes); `--config FILE` reads a
JSON file of fields first, so `flag > file > default`. The resolved config is saved in the output
directory as `train_config.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any, Sequence

REPO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train, on what, how, and where to write it."""

    # what
    task: str = "ctc"  # a name in flax_data2vec.train.tasks.TASKS
    model: str = "tiny"  # a preset (tiny, base, large) or anything flax_data2vec.load() takes
    model_config: str = ""  # JSON object of model-config overrides, e.g. '{"hidden_dropout": 0.0}'
    # data (empty: the data the repository ships for the task). A manifest (.jsonl/.json/.tsv) for audio, a
    # text file (.txt/.jsonl/.csv) for text, or hf:NAME[:CONFIG][@SPLIT] for a Hugging Face dataset
    train_data: str = ""
    eval_data: str = ""  # empty: the hf: train set's validation/test split, the shipped eval set, or a holdout
    audio_column: str = ""  # hf: columns; empty: guessed (an Audio feature; text/sentence/...; a ClassLabel)
    text_column: str = ""  # text tasks may name a pair "premise,hypothesis"
    label_column: str = ""
    tokenizer: str = ""  # text tasks: a transformers tokenizer dir/name; empty: a BPE built on the train text
    max_audio_seconds: float = 15.0
    max_text_tokens: int = 128
    # question-answering: tokens between the starts of successive context windows of a long context (BERT's
    # run_squad doc_stride; capped at a window's context length, so no token is skipped)
    doc_stride: int = 128
    n_buckets: int = 3  # distinct padded lengths, so XLA compiles at most this many step shapes
    num_workers: int = 0  # Grain worker processes that load batches (0: one background thread; TPU hosts: several)
    # optimisation
    max_steps: int = 1000
    batch_size: int = 8  # global batch (all devices, all hosts)
    eval_batch_size: int = 32
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    learning_rate: float = 0.0  # 0: the task's default
    schedule: str = "auto"  # auto (task default), tri_stage, linear, cosine, constant
    warmup_ratio: float = 0.1
    tri_stage_ratios: tuple[float, ...] = ()  # warm-up/hold/decay fractions; empty: the task's default
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # 0: no clipping
    freeze_feature_encoder: bool = True  # audio: no gradient through the CNN (as wav2vec 2.0 fine-tuning)
    freeze_encoder_steps: int = 0  # train only the head for this many steps
    # model switches
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
    scan_layers: bool = False
    remat: bool = False
    attention_implementation: str = ""  # '', 'xla' or 'cudnn'
    mask_time_prob: float = -1.0  # SpecAugment override for fine-tuning (-1: the model config's value)
    ctc_implementation: str = "optax"  # ctc task: optax or unrolled (flax_data2vec.ctc.ctc_nll_unrolled)
    # data2vec pre-training overrides (0/-1: the released default of the modality)
    top_k: int = 0
    ema_anneal_steps: int = 0
    mask_prob: float = -1.0
    tokens_per_sample: int = 0  # pretrain-text: packed block length (0: the recipe's 512)
    teacher_input: str = ""  # pretrain-text: unmasked (the paper) or masked (fairseq's released code); '': unmasked
    clone_batch: int = 0  # pretrain2-*: masked copies of each sample per teacher pass (0: the recipe's 8)
    # devices
    parallel: str = "jit"  # jit (Mesh + shardings) or pmap
    fsdp: int = 1  # size of the mesh's fsdp axis: params and optimizer state sharded over it
    # bookkeeping
    seed: int = 0
    output_dir: str = "outputs/run"
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the output directory's latest checkpoint if there is one
    async_checkpointing: bool = True
    progress: bool = True
    benchmark: bool = False  # time steady-state steps (and transformers' step) instead of training

    def __post_init__(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.ctc_implementation not in ("optax", "unrolled"):
            raise ValueError(f"ctc_implementation must be optax or unrolled, got {self.ctc_implementation!r}")
        if self.parallel not in ("jit", "pmap"):
            raise ValueError(f"parallel must be jit or pmap, got {self.parallel!r}")
        if self.schedule not in ("auto", "tri_stage", "linear", "cosine", "constant"):
            raise ValueError(f"schedule must be auto, tri_stage, linear, cosine or constant, got {self.schedule!r}")
        if self.model_config:
            try:
                overrides = json.loads(self.model_config)
            except json.JSONDecodeError as e:
                raise ValueError(f"model_config is not valid JSON: {e}") from None
            if not isinstance(overrides, dict):
                raise ValueError("model_config must be a JSON object of config fields")
        if self.tri_stage_ratios and (len(self.tri_stage_ratios) != 3 or abs(sum(self.tri_stage_ratios) - 1) > 1e-6):
            raise ValueError(f"tri_stage_ratios must be 3 fractions summing to 1, got {self.tri_stage_ratios}")
        if self.doc_stride <= 0:
            raise ValueError(f"doc_stride must be positive, got {self.doc_stride}")
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")

    @property
    def model_overrides(self) -> dict:
        return json.loads(self.model_config) if self.model_config else {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str, **overrides) -> "TrainConfig":
        with open(path) as f:
            d = json.load(f)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown training options {', '.join(sorted(unknown))}")
        d.update(overrides)
        if "tri_stage_ratios" in d:
            d["tri_stage_ratios"] = tuple(d["tri_stage_ratios"])
        return cls(**d)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per TrainConfig field (defaults shown in --help)."""
    parser = argparse.ArgumentParser(
        prog="train_tpu.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune or pre-train Data2Vec on one device, many devices or a TPU pod. With no "
                    "arguments: CTC fine-tuning of a tiny model on the speech data shipped in data/.")
    parser.add_argument("--config", default="", help="JSON file of options (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=None,
                                help=f"(default: {f.default})")
        elif f.name == "tri_stage_ratios":
            parser.add_argument(flag, type=float, nargs=3, default=None, help=f"(default: {f.default})")
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"(default: {f.default!r})")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig (file given by --config first, then flags)."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None}
    if path:
        return TrainConfig.load(path, **overrides)
    return TrainConfig(**overrides)
