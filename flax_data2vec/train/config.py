"""The training configuration: one typed, frozen dataclass with command-line overrides and a file form.

Every field is a `--flag` of `train_tpu.py` (underscores become dashes) whose `--help` line, choices and allowed
range are the field's own metadata (`option`); `--config FILE` reads a JSON file of fields first, so
`flag > file > default`. The resolved config is saved in the output directory as `train_config.json`.
Everything is checked here, before any data is read or anything compiles: values in `TrainConfig`, files and
names in `check_inputs`, devices in `check_devices`; each failure is one `ConfigError` naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import shlex
from typing import Any

from .presets import AUDIO2_PRESETS, AUDIO_PRESETS, PRESETS, TEXT2_PRESETS, TEXT_PRESETS
from .tasks import TASKS

REPO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")


class ConfigError(ValueError):
    """One bad option: `--flag VALUE: what is allowed`."""

    def __init__(self, name: str, value: Any, allowed: str):
        shown = shlex.quote(value) if isinstance(value, str) else value  # as it would be typed
        super().__init__(f"{flag(name)} {shown}: {allowed}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option(default: Any, doc: str, *, choices: tuple = (), low: float | None = None, high: float | None = None,
           above: float | None = None, below: float | None = None, also: tuple = (), resume_free: bool = False):
    """A field with its --help text, allowed values (choices; [low, high], (above, below) bounds; `also`: sentinel
    values outside them) and whether it may change when a run resumes."""
    return dataclasses.field(default=default, metadata=dict(
        doc=doc, choices=choices, low=low, high=high, above=above, below=below, also=also, resume_free=resume_free))


POSITIVE = dict(low=1)
FRACTION = dict(low=0, high=1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train, on what, how, and where to write it."""

    # what
    task: str = option("ctc", "what to train", choices=tuple(TASKS))
    model: str = option("tiny", f"a preset ({', '.join(PRESETS)}: random init), or anything flax_data2vec.load() "
                        "takes (short name, hub repo id, local directory, fairseq .pt) whose encoder is fine-tuned")
    model_config: str = option("", "JSON object of model-config changes, e.g. '{\"hidden_dropout\": 0.0}'")
    # data
    train_data: str = option("", "a manifest (.jsonl/.json/.tsv) for audio, a text file (.txt/.jsonl/.csv) for text, "
                             "or hf:NAME[:CONFIG][@SPLIT]; empty: the data the repository ships for the task")
    eval_data: str = option("", "as --train-data; empty: the hf: train set's validation/test split, the shipped eval "
                            "set, or a holdout")
    audio_column: str = option("", "hf: audio column; empty: guessed (an Audio feature)")
    text_column: str = option("", "hf: text column (a pair: 'premise,hypothesis'); empty: guessed (text, sentence)")
    label_column: str = option("", "hf: label column; empty: guessed (a ClassLabel)")
    tokenizer: str = option("", "text tasks: a transformers tokenizer directory or name; empty: a BPE built on the "
                            "train text")
    max_audio_seconds: float = option(15.0, "longer utterances are dropped", above=0)
    max_text_tokens: int = option(128, "longer texts are cut", low=4)
    doc_stride: int = option(128, "question-answering: tokens between the starts of successive windows of a long "
                             "context (capped at a window's context length)", **POSITIVE)
    n_buckets: int = option(3, "distinct padded lengths: XLA compiles at most this many step shapes", **POSITIVE)
    num_workers: int = option(0, "Grain worker processes that load batches (0: one background thread)", low=0)
    # optimisation
    max_steps: int = option(1000, "optimizer updates in the whole run", **POSITIVE)
    batch_size: int = option(8, "global batch (all devices, all hosts); a multiple of devices x --grad-accum",
                             **POSITIVE)
    eval_batch_size: int = option(32, "eval batch (all devices)", **POSITIVE, resume_free=True)
    grad_accum: int = option(1, "micro-batches per step (--batch-size must divide by it)", **POSITIVE)
    learning_rate: float = option(0.0, "peak learning rate; 0: the task's default", low=0)
    schedule: str = option("auto", "learning-rate schedule (auto: the task's default)",
                           choices=("auto", "tri_stage", "linear", "cosine", "constant"))
    warmup_ratio: float = option(0.1, "fraction of --max-steps spent warming up (linear, cosine)", **FRACTION)
    tri_stage_ratios: tuple[float, ...] = option((), "three fractions (warm-up hold decay) summing to 1; empty: the "
                                                 "task's default", **FRACTION)
    adam_b1: float = option(0.9, "Adam beta1", low=0, below=1)
    adam_b2: float = option(0.98, "Adam beta2", low=0, below=1)
    adam_eps: float = option(1e-8, "Adam epsilon", above=0)
    weight_decay: float = option(0.01, "decoupled weight decay (AdamW)", low=0)
    clip_norm: float = option(1.0, "global gradient-norm clip; 0: none", low=0)
    freeze_feature_encoder: bool = option(True, "audio: no gradient through the CNN (as wav2vec 2.0 fine-tuning)")
    freeze_encoder_steps: int = option(0, "train only the head for this many steps", low=0)
    speaker_probe_weight: float = option(3.0, "speaker-verification: weight of the auxiliary speaker cross-entropy "
                                         "of a linear probe on the mean-pooled projector output (teaches the "
                                         "encoder speakers; not exported); 0: AM-softmax alone", low=0)
    # model switches
    dtype: str = option("float32", "compute dtype (params stay float32)", choices=("float32", "bfloat16"))
    scan_layers: bool = option(False, "jax.lax.scan over the layers (faster compiles for deep models)")
    remat: bool = option(False, "recompute activations in the backward pass (less memory)")
    attention_implementation: str = option("", "attention kernel ('': XLA's default)", choices=("", "xla", "cudnn"))
    mask_time_prob: float = option(-1.0, "SpecAugment time-mask probability; -1: the model config's value",
                                   **FRACTION, also=(-1,))
    ctc_implementation: str = option("optax", "ctc task: the loss (optax.ctc_loss, or "
                                     "flax_data2vec.ctc.ctc_nll_unrolled)", choices=("optax", "unrolled"))
    # data2vec pre-training overrides
    top_k: int = option(0, "pre-training: teacher layers averaged into the target; 0: the modality's default", low=0)
    ema_anneal_steps: int = option(0, "pre-training: steps of the teacher's EMA decay ramp; 0: the default", low=0)
    mask_prob: float = option(-1.0, "pre-training: mask probability; -1: the modality's default", **FRACTION,
                              also=(-1,))
    tokens_per_sample: int = option(0, "pretrain-text: packed block length; 0: the recipe's 512", low=0)
    teacher_input: str = option("", "pretrain-text: what the teacher sees (unmasked: the paper; masked: fairseq's "
                                "released code; '': unmasked)", choices=("", "unmasked", "masked"))
    clone_batch: int = option(0, "pretrain2-*: masked copies of each sample per teacher pass; 0: the recipe's 8",
                              low=0)
    # devices
    parallel: str = option("jit", "device layout (jit: one Mesh with shardings; pmap: replicated state)",
                           choices=("jit", "pmap"))
    fsdp: int = option(1, "size of the mesh's fsdp axis: params and optimizer state sharded over it (jit only)",
                       **POSITIVE)
    # bookkeeping
    seed: int = option(0, "initialisation, dropout and data order", low=0)
    output_dir: str = option("outputs/run", "where checkpoints, metrics.jsonl, train_config.json and model/ go",
                             resume_free=True)
    log_every: int = option(10, "steps between logged training metrics", **POSITIVE, resume_free=True)
    eval_every: int = option(100, "steps between evaluations", **POSITIVE, resume_free=True)
    save_every: int = option(100, "steps between checkpoints", **POSITIVE, resume_free=True)
    keep_checkpoints: int = option(2, "latest checkpoints kept (plus the best by the eval metric)", **POSITIVE,
                                   resume_free=True)
    resume: bool = option(True, "continue from the output directory's latest checkpoint if there is one",
                          resume_free=True)
    allow_config_change: bool = option(False, "resume even though options changed that are not marked 'may change on "
                                       "resume' (the new ones go to train_config.resume-STEP.json)", resume_free=True)
    async_checkpointing: bool = option(True, "write checkpoints in the background", resume_free=True)
    progress: bool = option(True, "show a progress bar", resume_free=True)
    benchmark: bool = option(False, "time steady-state steps (and transformers' step) instead of training",
                             resume_free=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, tuple):
                if not isinstance(value, tuple):
                    raise ConfigError(f.name, value, "must be a list of numbers")
                for v in value:
                    _check_value(f.name, float, f.metadata, v)
            else:
                _check_value(f.name, type(f.default), f.metadata, value)
        if self.batch_size % self.grad_accum:
            raise ConfigError("batch_size", self.batch_size, f"must be a multiple of --grad-accum {self.grad_accum}")
        if self.tri_stage_ratios and (len(self.tri_stage_ratios) != 3 or abs(sum(self.tri_stage_ratios) - 1) > 1e-6):
            raise ConfigError("tri_stage_ratios", " ".join(map(str, self.tri_stage_ratios)),
                              "must be 3 fractions summing to 1")
        if self.fsdp != 1 and self.parallel == "pmap":
            raise ConfigError("fsdp", self.fsdp, "needs --parallel jit (pmap replicates the parameters)")
        if self.model_config:
            try:
                overrides = json.loads(self.model_config)
            except json.JSONDecodeError as e:
                raise ConfigError("model_config", self.model_config, f"is not valid JSON ({e})") from None
            if not isinstance(overrides, dict):
                raise ConfigError("model_config", self.model_config, "must be a JSON object of model-config fields")

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
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError("config", path, "no such file") from None
        except (OSError, ValueError) as e:
            raise ConfigError("config", path, f"cannot read a JSON object of options ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError("config", path, "must hold a JSON object of options")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError("config", path, f"unknown option {unknown[0]!r}{_did_you_mean(unknown[0], names)}")
        d.update(overrides)
        if "tri_stage_ratios" in d:
            d["tri_stage_ratios"] = tuple(d["tri_stage_ratios"])
        return cls(**d)


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_value(name: str, kind: type, m: dict, value: Any) -> None:
    """A field's type, choices and range, from its `option` metadata."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(name, value, f"must be {_KIND_NAMES[kind]}, not a {type(value).__name__}")
    if m["choices"] and value not in m["choices"]:
        listed = ", ".join(repr(c) if c == "" else c for c in m["choices"])
        raise ConfigError(name, value, f"must be one of {listed}{_did_you_mean(value, m['choices'])}")
    if kind in (int, float) and value not in m["also"]:
        if kind is float and not math.isfinite(value):
            raise ConfigError(name, value, "must be a finite number")
        rule = _range_text(m)
        low_ok = (m["low"] is None or value >= m["low"]) and (m["above"] is None or value > m["above"])
        high_ok = (m["high"] is None or value <= m["high"]) and (m["below"] is None or value < m["below"])
        if not (low_ok and high_ok):
            raise ConfigError(name, value, f"must be {rule}")


def _range_text(m: dict) -> str:
    """'in [0, 1]', '>= 1', '> 0', ... with the sentinel values allowed besides."""
    left = f"[{m['low']}" if m["low"] is not None else f"({m['above']}" if m["above"] is not None else None
    right = f"{m['high']}]" if m["high"] is not None else f"{m['below']})" if m["below"] is not None else None
    if left and right:
        text = f"in {left}, {right}"
    elif left:
        text = f">= {m['low']}" if m["low"] is not None else f"> {m['above']}"
    else:
        text = f"<= {m['high']}" if m["high"] is not None else f"< {m['below']}"
    return text + "".join(f", or {a}" for a in m["also"])


# ---------------------------------------------------------------------------------------------------------------
# checks that look outside the config: files, model names, --model-config keys, devices
def check_inputs(cfg: TrainConfig) -> None:
    """Local files exist, `--model` names something loadable, `--model-config` names fields of its config."""
    for name in ("train_data", "eval_data"):
        path = getattr(cfg, name)
        if path and not path.startswith("hf:") and not os.path.exists(path):
            raise ConfigError(name, path, "no such file (give a local file or hf:NAME[:CONFIG][@SPLIT])")
    if cfg.tokenizer and _looks_like_path(cfg.tokenizer) and not os.path.isdir(cfg.tokenizer):
        raise ConfigError("tokenizer", cfg.tokenizer, "no such directory")
    config_class = _model_config_class(cfg)
    overrides = cfg.model_overrides
    if config_class is not None and overrides:
        fields = [f.name for f in dataclasses.fields(config_class) if f.name != "extra"]
        for key in overrides:
            if key not in fields:
                raise ConfigError("model_config", cfg.model_config, f"{key!r} is not a {config_class.__name__} "
                                  f"field{_did_you_mean(key, fields)}")
        if cfg.model in PRESETS:
            presets = {"audio": AUDIO_PRESETS, "text": TEXT_PRESETS, "audio2": AUDIO2_PRESETS,
                       "text2": TEXT2_PRESETS}[TASKS[cfg.task].modality]
            try:
                config_class(**{**presets[cfg.model], **overrides})
            except (TypeError, ValueError) as e:
                raise ConfigError("model_config", cfg.model_config, str(e)) from None


def _looks_like_path(name: str) -> bool:
    return os.sep in name or name.startswith((".", "~")) or os.path.lexists(os.path.expanduser(name))


def _model_config_class(cfg: TrainConfig):
    """The model-config class `--model` stands for (None where it cannot be told cheaply: a fairseq file);
    raises for a name that is no preset, short name, hub repo id or existing path."""
    from .. import config as v1
    from .. import data2vec2_config as v2
    from ..names import REPO_ID, SHORT_NAMES
    by_modality = {"audio": v1.Data2VecAudioConfig, "text": v1.Data2VecTextConfig,
                   "audio2": v2.Data2Vec2AudioConfig, "text2": v2.Data2Vec2TextConfig}
    name, path = cfg.model, os.path.expanduser(cfg.model)
    if name in PRESETS or name in SHORT_NAMES:
        return by_modality[TASKS[cfg.task].modality]
    if name.endswith(".pt"):
        if not os.path.isfile(path):
            raise ConfigError("model", name, "no such fairseq checkpoint file")
        return None
    if os.path.isdir(path):
        for config in (os.path.join(path, "config.json"), os.path.join(path, "model", "config.json")):
            if os.path.isfile(config):
                try:
                    with open(config) as f:
                        model_type = json.load(f).get("model_type")
                except (OSError, ValueError, AttributeError):
                    return None  # the loader names what is wrong with it
                classes = (v1.Data2VecAudioConfig, v1.Data2VecTextConfig, v2.Data2Vec2AudioConfig,
                           v2.Data2Vec2TextConfig)
                return {c.model_type: c for c in classes}.get(model_type)
        return None  # an interrupted training run, an Orbax directory: the loader checks it
    if REPO_ID.fullmatch(name) and not os.path.lexists(path):
        return by_modality[TASKS[cfg.task].modality]
    if _looks_like_path(name):
        raise ConfigError("model", name, "no such directory")
    known = [*PRESETS, *SHORT_NAMES]
    raise ConfigError("model", name, f"unknown model{_did_you_mean(name, known)}; give a preset "
                      f"({', '.join(PRESETS)}), a short name ({', '.join(SHORT_NAMES)}), a hub repo id (owner/name) "
                      "or a local directory")


def check_devices(cfg: TrainConfig, device_count: int, process_count: int) -> None:
    """The global batch splits evenly over hosts, devices and micro-batches; fsdp divides the devices."""
    need = device_count * cfg.grad_accum
    if cfg.batch_size % need:
        raise ConfigError("batch_size", cfg.batch_size, f"must be a multiple of {need} ({device_count} device(s) x "
                          f"--grad-accum {cfg.grad_accum}, over {process_count} host(s))")
    if device_count % cfg.fsdp:
        raise ConfigError("fsdp", cfg.fsdp, f"must divide the {device_count} devices")


def resume_changes(saved: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(changes that need --allow-config-change, bookkeeping changes), each as 'field: old -> new', between the
    `train_config.json` of a run and `cfg`; fields the saved file lacks count as their defaults."""
    current = json.loads(json.dumps(cfg.to_dict()))
    guarded, free = [], []
    for f in dataclasses.fields(TrainConfig):
        old = saved.get(f.name, json.loads(json.dumps(f.default)))
        if old != current[f.name]:
            (free if f.metadata["resume_free"] else guarded).append(f"{f.name}: {old!r} -> {current[f.name]!r}")
    return guarded, free


def read_saved(path: str) -> dict | None:
    """A run's saved train_config.json, or None where there is none."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError("output_dir", os.path.dirname(path), f"its train_config.json cannot be read ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# the command line
def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_parse_bool.__name__ = "boolean"  # argparse names the type in its message: "invalid boolean value: 'maybe'"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one `error:` line (exit status 2) like every other failure of the tool."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def _help(f: dataclasses.Field) -> str:
    m = f.metadata
    text = m["doc"]
    if m["choices"]:
        text += "; one of: " + ", ".join(repr(c) if c == "" else c for c in m["choices"])
    if m["resume_free"]:
        text += "; may change on resume"
    default = f.default
    if default == "" or default == ():
        return text
    if isinstance(default, bool):
        default = str(default).lower()
    return f"{text} [default: {default}]"


def build_parser():
    """An argparse parser with one flag per TrainConfig field: its help, choices and default from the field."""
    parser = _Parser(
        prog="train_tpu.py",
        description="Fine-tune or pre-train Data2Vec on one device, many devices or a TPU pod. With no "
                    "arguments: CTC fine-tuning of a tiny model on the speech data shipped in data/.")
    parser.add_argument("--config", default="", metavar="FILE", help="JSON file of options (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        kind = type(f.default)
        common = dict(default=None, help=_help(f), dest=f.name)
        if kind is bool:
            parser.add_argument(flag(f.name), type=_parse_bool, nargs="?", const=True, metavar="BOOL", **common)
        elif kind is tuple:
            parser.add_argument(flag(f.name), type=float, nargs=3, metavar=("WARM", "HOLD", "DECAY"), **common)
        else:
            metavar = "NAME" if f.metadata["choices"] else {int: "N", float: "X"}.get(kind, "TEXT")
            parser.add_argument(flag(f.name), type=kind, metavar=metavar, **common)
    return parser


def parse_args(argv=None) -> TrainConfig:
    """Command line -> a checked TrainConfig (file given by --config first, then flags). Raises ConfigError."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None}
    cfg = TrainConfig.load(path, **overrides) if path else TrainConfig(**overrides)
    check_inputs(cfg)
    return cfg
