"""What a training task is: a frozen record of pure functions. The loop reads these fields and nothing else.

    params = task.init()                                   # initial params (a checkpoint's encoder merged in)
    tx, schedule = task.optimizer(params)                  # optax transformation and its learning rate
    extra = task.init_extra(params)                        # non-optimised state (the EMA teacher), or None
    sum, count, stats = task.loss(params, extra, batch, rng, train=True)    # jitted; the step is sum / count
    extra = task.after_update(extra, params, step)         # jitted, after each optimizer update
    outputs = task.eval_step(params, extra, batch)         # jitted; host-side task.eval_metrics(list of them)
    batches = task.train_data()                            # resumable iterator of host batches (state/set_state)
    module, params = task.export(params)                   # what `flax_data2vec.load(output_dir)` returns

Each task is made by one `make_<task>(cfg, shard_index, num_shards)` in `train/tasks/` and registered in
`tasks.TASKS`; "How to add a task" in the README walks through one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np


def no_extra(params) -> None:
    return None


def keep_extra(extra, params, step):
    return extra


def no_step_metrics(step) -> dict:
    return {}


def no_health_check(metrics: dict, step: int) -> None:
    return None


def no_assets(directory: str) -> None:
    return None


def audio_or_tokens(batch: dict) -> tuple[str, float]:
    """Throughput unit of a batch: seconds of real audio (16 kHz) or real tokens."""
    if "input_values" in batch:
        return "audio-s", float(np.asarray(batch["attention_mask"]).sum()) / 16000.0
    return "tokens", float(np.asarray(batch["attention_mask"]).sum())


@dataclasses.dataclass(frozen=True)
class Task:
    """One training task. `loss` returns (sum, count, stats) so devices and micro-batches add up exactly."""

    name: str
    architecture: str                      # the class `module` is (for logs, the benchmark's PyTorch peer)
    module: Any                            # the flax module `loss` applies
    init: Callable[[], Any]
    optimizer: Callable[[Any], tuple[Any, Callable]]
    loss: Callable[..., tuple[jax.Array, jax.Array, dict]]
    eval_step: Callable[[Any, Any, dict], dict]
    eval_metrics: Callable[[list[dict]], dict]
    train_data: Callable[[], Iterator[dict]]
    eval_data: Callable[[], Iterable[dict]]
    export: Callable[[Any], tuple[Any, Any]]
    identity: dict                         # what must match for a checkpoint in the output dir to be resumed
    best_metric: str = "eval_loss"
    best_mode: str = "min"
    notes: tuple[str, ...] = ()            # log lines: where the model and the data come from
    save_assets: Callable[[str], None] = no_assets   # tokenizer / vocabulary files beside the exported model
    init_extra: Callable[[Any], Any] = no_extra
    after_update: Callable[[Any, Any, jax.Array], Any] = keep_extra
    step_metrics: Callable[[jax.Array], dict] = no_step_metrics
    check_health: Callable[[dict, int], None] = no_health_check  # host side; raises to stop (collapse guard)
    throughput: Callable[[dict], tuple[str, float]] = audio_or_tokens
