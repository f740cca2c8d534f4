#!/usr/bin/env python3
"""Fine-tune or pre-train Data2Vec with JAX on one device, many devices or a TPU pod.

    python train_tpu.py                      # CTC fine-tuning of a tiny model on the shipped speech data
    python train_tpu.py --task pretrain-audio
    python train_tpu.py --help               # every option with its default

On a pod, run the same command on every host (see README.md); each host feeds its slice of the batch.
"""

import sys

from flax_data2vec.train.config import parse_args


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.benchmark:
        from flax_data2vec.train.benchmark import benchmark
        benchmark(cfg)
        return 0
    from flax_data2vec.train.loop import train
    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = [k for k in ("loss", "eval_loss", "eval_cer", "eval_wer", "eval_accuracy", "eval_f1", "eval_perplexity",
                        "skipped_steps") if k in summary]
    print("summary: " + ", ".join(f"{k}={summary[k]:.4f}" for k in keys), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
