"""Which model a task trains: a preset initialised from the seed, or a checkpoint's encoder merged into
the task's class. The task model is initialised once; the loaded encoder replaces its encoder in Flax
space, and the log says which parameters are new and which of the checkpoint's were dropped."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from .. import registry
from ..weights import merge_encoder, scan_params, unscan_params
from .config import TrainConfig
from .presets import AUDIO2_PRESETS, AUDIO_PRESETS, PRESETS, TEXT2_PRESETS, TEXT_PRESETS  # noqa: F401 - re-exported


@dataclasses.dataclass(frozen=True)
class TaskModel:
    """The module a task trains, its initial params, and one log line on where they came from."""

    module: Any
    params: Any
    note: str
    pretrained: bool  # a checkpoint's encoder was loaded (not a random preset)


def module_options(cfg: TrainConfig, audio: bool) -> dict:
    """The speed switches of the command line as module fields."""
    options = dict(dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32, scan_layers=cfg.scan_layers,
                   remat=cfg.remat, attention_implementation=cfg.attention_implementation or None)
    if audio and cfg.attention_implementation == "cudnn":
        options["frame_multiple"] = 128  # cuDNN flash attention needs the frame axis in multiples of 128
    return options


def preset_config(cfg: TrainConfig, architecture: str, changes: dict):
    """The model config of preset `cfg.model` with the task's and the command line's changes."""
    audio = registry.is_audio(architecture)
    if registry.is_data2vec2(architecture):
        presets = AUDIO2_PRESETS if audio else TEXT2_PRESETS
    else:
        presets = AUDIO_PRESETS if audio else TEXT_PRESETS
    return registry.config_class(architecture)(**{**presets[cfg.model], **changes})


def config_changes(cfg: TrainConfig, architecture: str, task_changes: dict) -> dict:
    """Task changes (vocabulary, labels), then --model-config, then --mask-time-prob."""
    changes = {**task_changes, **cfg.model_overrides}
    if registry.is_audio(architecture) and cfg.mask_time_prob >= 0:
        changes["mask_time_prob"] = cfg.mask_time_prob
    return changes


def build(cfg: TrainConfig, architecture: str, task_changes: dict, tokenizer_size: int | None = None,
          **extra_options) -> TaskModel:
    """The task's model: preset `cfg.model` from `cfg.seed`, or the checkpoint `cfg.model` names (anything
    `flax_data2vec.load` takes) with its encoder merged into a fresh init of `architecture`. tokenizer_size: text
    tasks' tokenizer length; a checkpoint must embed every id it gives (under jit a larger id reads garbage)."""
    audio = registry.is_audio(architecture)
    options = {**module_options(cfg, audio), **extra_options}
    changes = config_changes(cfg, architecture, task_changes)
    cls = registry.model_class(architecture)
    if cfg.model in PRESETS:
        module = cls(config=preset_config(cfg, architecture, changes), **options)
        return TaskModel(module, registry.init_params(module, cfg.seed), f"preset {cfg.model!r} (random init)",
                         False)
    from ..hub import load  # the one load path: whatever class the checkpoint holds, as it is stored
    stored, stored_params = load(cfg.model)
    architecture = data2vec2_peer(architecture, type(stored).__name__)
    cls = registry.model_class(architecture)
    if architecture.startswith("Data2Vec2") and "mask_time_prob" in changes:
        if changes.pop("mask_time_prob") > 0:  # 2.0 heads have no SpecAugment: refuse rather than ignore it
            raise ValueError(f"--mask-time-prob {cfg.mask_time_prob}: {cfg.model} is a data2vec 2.0 model, whose "
                             f"heads have no SpecAugment; leave --mask-time-prob unset (or 0)")
    config = stored.config.replace(**changes) if changes else stored.config
    if tokenizer_size is not None and tokenizer_size > config.vocab_size:
        raise ValueError(f"the tokenizer ({cfg.tokenizer or cfg.model}) has {tokenizer_size} tokens, but --model "
                         f"{cfg.model} embeds only {config.vocab_size} (vocab_size): ids >= {config.vocab_size} have "
                         f"no embedding; use the checkpoint's own tokenizer (leave --tokenizer empty)")
    if registry.is_audio(type(stored).__name__) != audio:
        raise ValueError(f"--model {cfg.model} is a {type(stored).__name__} checkpoint; task {cfg.task} "
                         f"needs a {'n audio' if audio else ' text'} model")
    module = cls(config=config.replace(architectures=(architecture,)), **options)
    fresh = registry.init_params(module.clone(scan_layers=False), cfg.seed)
    stored_params = unscan_params(stored_params)
    params, report = None, None
    if type(stored).__name__ == architecture:  # same class: keep its head too when the shapes still fit
        try:
            params, report = merge_encoder(fresh, stored_params, None, None)
        except ValueError:
            pass
    if params is None:
        params, report = merge_encoder(fresh, stored_params, registry.encoder_prefix(architecture),
                                       registry.encoder_prefix(type(stored).__name__))
    note = (f"{cfg.model} ({type(stored).__name__} checkpoint; encoder loaded into {architecture}; "
            f"new: {_listing(report.new)}; dropped: {_listing(report.dropped)})")
    return TaskModel(module, scan_params(params) if cfg.scan_layers else params, note, True)


def data2vec2_peer(architecture: str, stored: str) -> str:
    """A v1 task class turned into its data2vec 2.0 peer when the checkpoint is a 2.0 model (a 2.0 pre-training
    output fine-tuned with --task ctc picks Data2Vec2AudioForCTC); a clear error when there is none."""
    if not registry.is_data2vec2(stored) or registry.is_data2vec2(architecture):
        return architecture
    peer = architecture.replace("Data2Vec", "Data2Vec2", 1)
    if peer not in registry.data2vec2_classes():
        raise ValueError(f"--model holds a data2vec 2.0 {stored} checkpoint, and {architecture} has no 2.0 "
                         f"counterpart; 2.0 heads: {', '.join(sorted(registry.data2vec2_classes()))}")
    return peer


def _listing(paths: list[str], limit: int = 6) -> str:
    if not paths:
        return "none"
    tops = sorted({p.split("/")[0] if not p.startswith("data2vec_") else "/".join(p.split("/")[:2]) for p in paths})
    shown = ", ".join(tops[:limit]) + (" ..." if len(tops) > limit else "")
    return f"{len(paths)} params ({shown})"
