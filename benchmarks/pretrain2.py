"""data2vec 2.0 vs v1 pre-training: one update each on the same input samples, in one run.

Both are the real `train_tpu.py` steps (student forward/backward, teacher forward, targets, AdamW; the EMA
update is `after_update`, timed with the step): `pretrain-audio` (v1: the student on every frame of B masked
clips) against `pretrain2-audio` (2.0: the teacher once on B clips, the student on the ~50 % kept frames of
M = 8 clones each, the conv decoder). Throughput counts masked-target predictions (the positions a loss
scores) per second; peak memory is XLA's plan for the compiled step (arguments + outputs + temporaries), and
on GPU also the allocator's peak.

    python -m benchmarks.pretrain2 [--quick] [--seconds 4] [--batch 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import Row, base_parser, compile_jit, report, setup, time_interleaved, xla_flops
from flax_data2vec.train.config import TrainConfig
from flax_data2vec.train.loop import make_train_step
from flax_data2vec.train.optim import TrainState
from flax_data2vec.train.tasks import make_task
from flax_data2vec.train.tasks.pretrain import span_masks
from flax_data2vec.train.tasks.pretrain2 import clone_masks


def synthetic_batch(task, version: int, batch: int, samples: int) -> tuple[dict, int]:
    """(device batch of `batch` random clips of `samples` samples with the task's own host masks, masked count)."""
    rng = np.random.default_rng(0)
    host = {"input_values": rng.normal(size=(batch, samples)).astype(np.float32),
            "attention_mask": np.ones((batch, samples), np.int32), "example_mask": np.ones(batch, np.float32)}
    module = task.module
    if version == 1:
        host = span_masks(module.config, module.pretrain)(host, rng)
        masked = int(host["mask"].sum())
    else:
        from flax_data2vec.audio import conv_output_lengths
        host = clone_masks(module.pretrain, lambda b: int(conv_output_lengths(module.config, samples)))(host, rng)
        masked = int(host["ids_masked"].size)
    return {k: jnp.asarray(v) for k, v in host.items()}, masked


def memory(compiled) -> float | None:
    """XLA's planned bytes for one call: arguments + outputs + temporaries (minus aliased), in GiB."""
    try:
        m = compiled.memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes) / 2 ** 30
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length (every clip the same)")
    parser.add_argument("--batch", type=int, default=0, help="input clips per update (0: 2 on CPU, 8 on GPU)")
    args = parser.parse_args(argv)
    info = setup(args)
    gpu = args.device == "gpu"
    model = "tiny" if args.quick else "base"
    batch = args.batch or (8 if gpu else 2)
    samples = int((1.0 if args.quick else args.seconds) * 16000)
    fns, compile_s, flops, work, mem, notes = {}, {}, {}, {}, {}, {}
    for version, name in ((1, "v1 (pretrain-audio)"), (2, "2.0 M=8 (pretrain2-audio)")):
        cfg = TrainConfig(task="pretrain-audio" if version == 1 else "pretrain2-audio", model=model,
                          batch_size=batch, n_buckets=1, output_dir="/tmp/unused", progress=False,
                          dtype="bfloat16" if gpu else "float32", max_steps=400_000)
        task = make_task(cfg)
        device_batch, work[name] = synthetic_batch(task, version, batch, samples)
        params = task.init()
        tx, sched = task.optimizer(params)
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0),
                           task.init_extra(params))
        step = jax.jit(make_train_step(task, tx, sched, 1))
        compiled, compile_s[name] = compile_jit(step, state, device_batch)
        flops[name], mem[name] = xla_flops(compiled), memory(compiled)
        notes[name] = f"{work[name]} masked targets/update; XLA plan {mem[name] or float('nan'):.2f} GiB"

        def run(compiled=compiled, state=state, b=device_batch):
            jax.block_until_ready(compiled(state, b))
        fns[name] = run
    timings = time_interleaved(fns, args.warmup, args.repeats, compile_s)
    rows = []
    workload = f"audio {model} pre-training update, {batch} clips x {samples / 16000:.1f} s"
    for name in fns:
        rows.append(Row(workload, name, timings[name], work[name], "masked-targets",
                        baseline="v1 (pretrain-audio)" if name.startswith("2.0") else None, flops=flops[name],
                        note=notes[name]))
    v1, v2 = fns  # names in order
    t1, t2 = timings[v1].median, timings[v2].median
    print(f"# update time: 2.0 / v1 = {t2 / t1:.2f}x; masked-target predictions/s: 2.0 / v1 = "
          f"{(work[v2] / t2) / (work[v1] / t1):.2f}x (target >= 1.5x)")
    extra = {"peak_gib_xla_plan": mem, "masked_targets_per_update": work}
    if gpu:
        stats = jax.devices()[0].memory_stats() or {}
        extra["gpu_peak_bytes_in_use_all"] = stats.get("peak_bytes_in_use")
    report(rows, info, args, extra)


if __name__ == "__main__":
    main()
