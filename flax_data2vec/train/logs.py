"""What a run writes down: metrics.jsonl and TensorBoard on the main host; how metrics print (counts as integers)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np


class Logger:
    """metrics.jsonl + TensorBoard (tensorboardX) on the main host, from step `start` on: rows of later steps that
    a resumed run left behind (it was killed after its last checkpoint) are dropped, so no step appears twice.
    `on_log(row)` sees each row as it is written (live plots in a notebook)."""

    def __init__(self, output_dir: str, enabled: bool, start: int = 0, on_log: Callable[[dict], None] | None = None):
        self.enabled = enabled
        self.on_log = on_log
        self.writer = None
        if enabled:
            path = os.path.join(output_dir, "metrics.jsonl")
            _drop_rows_after(path, start)
            self.file = open(path, "a")
            try:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start + 1)
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                pass

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and not isinstance(v, str):
                    self.writer.add_scalar(k, v, step)
        if self.on_log is not None:
            self.on_log(row)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrite `path` (atomically: temp file + rename) without the rows of steps after `step`."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _row_step(line) <= step]
    if kept == lines:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _row_step(line: str) -> float:
    """A metrics.jsonl row's step; a line torn by a kill mid-write counts as after every step (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def plain(value: Any) -> int | float | str:
    """A metric as JSON wants it: integer counts stay integers (eval_count=100, not 100.0)."""
    if isinstance(value, (str, bool, int, float)):
        return int(value) if isinstance(value, bool) else value
    value = np.asarray(value)
    return int(value) if np.issubdtype(value.dtype, np.integer) else float(value)


def format_metrics(metrics: dict) -> str:
    """`k=v, ...`: floats to 4 decimals, counts as integers."""
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
