#!/usr/bin/env python3
"""Fine-tune or pre-train Data2Vec with JAX on one device, many devices or a TPU pod.

    python train_tpu.py                      # CTC fine-tuning of a tiny model on the shipped speech data
    python train_tpu.py --task pretrain-audio
    python train_tpu.py --help               # every option, its allowed values and default

On a pod, run the same command on every host (see README.md); each host feeds its slice of the batch.
Every option is checked before any data is read or anything compiles; a failure is one `error:` line
(exit status 2), and nothing is written to the output directory.
"""

import os
import sys


def main(argv=None) -> int:
    from flax_data2vec.train.config import ConfigError, check_devices, parse_args  # no JAX yet: checks are quick
    try:
        cfg = parse_args(argv)
        from flax_data2vec.train import parallel  # JAX, for the device count; no model, no data yet
        parallel.maybe_initialize_distributed()
        import jax
        check_devices(cfg, jax.device_count(), jax.process_count())
    except ConfigError as e:
        return _fail(e)
    if cfg.benchmark:
        from flax_data2vec.train.benchmark import benchmark
        benchmark(cfg)
        return 0
    from flax_data2vec.train.loop import train
    try:
        summary = train(cfg)
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:  # ConfigError, SaveFailed, bad data
        return _fail(e)
    if jax.process_index() == 0:
        print(_summary_line(cfg, summary), flush=True)
    return 0


def _summary_line(cfg, summary: dict) -> str:
    """The run's last metrics, where the model is and the command that uses it."""
    from flax_data2vec.train.logs import format_metrics
    from flax_data2vec.train.tasks import TASKS
    keys = ("loss", "eval_loss", "eval_cer", "eval_wer", "eval_accuracy", "eval_f1", "eval_eer", "eval_exact_match",
            "eval_perplexity", "skipped_steps")
    metrics = format_metrics({k: summary[k] for k in keys if k in summary})
    if summary.get("stopped"):
        return f"summary: {metrics}; stopped: rerun the same command to resume"
    model = summary["model"]
    return f"summary: {metrics}; model: {model}; next: {TASKS[cfg.task].usage.format(model=model)}"


def _fail(error: Exception) -> int:
    """One `error:` line; late tracebacks of native threads (TensorStore, asyncio) go to /dev/null, not after it."""
    print(f"error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr, flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    return 2


if __name__ == "__main__":
    sys.exit(main())
