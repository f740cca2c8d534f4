"""`train_tpu.py --benchmark`: steady-state step time, throughput and MFU of the configured job, compile
time apart, and the same training step of transformers' PyTorch model on the same machine."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from .config import TrainConfig
from .loop import Trainer

# dense bf16 peak FLOP/s per chip (REFERENCE.md performance anchors §4)
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "TPU v3": 123e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def device_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak * jax.device_count()
    return None


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def benchmark(cfg: TrainConfig, repeats: int = 5, warmup: int = 2) -> dict:
    """Time the configured training step (flax) and, where transformers has the class, PyTorch's."""
    cfg = TrainConfig(**{**cfg.to_dict(), "benchmark": False, "async_checkpointing": False})
    trainer = Trainer(cfg)
    batch = next(trainer.task.train_data())
    device_batch = trainer.to_device(batch)
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.state, device_batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state = trainer.state

    def step():
        nonlocal state
        state, metrics = compiled(state, device_batch)
        jax.block_until_ready(metrics)

    _time(step, warmup)
    times = _time(step, repeats)
    unit, amount = trainer.task.throughput(batch)
    ms = statistics.median(times) * 1e3
    result = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "task": cfg.task,
              "batch": {k: tuple(v.shape) for k, v in batch.items()}, "compile_s": compile_s, "step_ms": ms,
              f"{unit}_per_s": amount / (ms / 1e3), "tflops_per_step": flops / 1e12}
    peak = device_peak()
    if peak and flops:
        result["mfu"] = flops / (ms / 1e3) / peak
    torch_ms = _torch_step_ms(trainer, batch, repeats, warmup)
    if torch_ms is not None:
        result["torch_step_ms"] = torch_ms
        result["speedup_vs_torch"] = torch_ms / ms
    for k, v in result.items():
        print(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}")
    return result


def _torch_step_ms(trainer: Trainer, batch: dict, repeats: int, warmup: int) -> float | None:
    """transformers' eager PyTorch step (AdamW) for the same architecture, config and batch, or None."""
    try:
        import torch
        import transformers
    except ImportError:
        print("(torch not installed: no PyTorch comparison)")
        return None
    arch = trainer.task.architecture
    if type(trainer.task.module).__name__ != arch or not hasattr(transformers, arch):
        print(f"(no transformers class for task {trainer.cfg.task}: no PyTorch comparison)")
        return None
    config_cls = getattr(transformers, arch.replace("For", "Config#").split("Config#")[0].replace("Model", "")
                         + "Config")
    model = getattr(transformers, arch)(config_cls(**trainer.task.module.config.to_dict())).train()
    if getattr(trainer.task.module, "freeze_feature_encoder", False):
        model.freeze_feature_encoder()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    key = "input_values" if "input_values" in batch else "input_ids"
    labels = np.asarray(batch["labels"])
    if "positions" in batch:  # MLM: (batch, k) targets at masked positions -> transformers' (batch, T), -100 elsewhere
        full = np.full(batch[key].shape, -100, np.int64)
        rows = np.arange(labels.shape[0])[:, None]
        keep = labels >= 0
        full[np.broadcast_to(rows, labels.shape)[keep], np.asarray(batch["positions"])[keep]] = labels[keep]
        labels = full
    inputs = {key: torch.tensor(batch[key]), "attention_mask": torch.tensor(batch["attention_mask"]),
              "labels": torch.tensor(labels).long()}

    def step():
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()

    _time(step, warmup)
    return statistics.median(_time(step, repeats)) * 1e3
