"""data2vec 2.0 vs v1 pre-training: one update each on the same input samples, in one run, and where it goes.

Both are the real `train_tpu.py` steps (student forward/backward, teacher forward, targets, AdamW; the EMA
update is `after_update`, timed with the step): `pretrain-audio` (v1: the student on every frame of B masked
clips) against `pretrain2-audio` (2.0: the teacher once on B clips, the student on the ~50 % kept frames of
M = 8 clones each, the conv decoder). Throughput counts masked-target predictions (the positions a loss
scores) per second; peak memory is XLA's plan for the compiled step (arguments + outputs + temporaries), and
on GPU also the allocator's peak. The parts (the loss's forward pass alone, the teacher forward + targets,
2.0's decoder forward + backward) are jitted and timed separately in the same interleaved rounds.

    python -m benchmarks.pretrain2 [--quick] [--seconds 4] [--batch 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import Row, base_parser, report, setup, time_interleaved, xla_flops
from flax_data2vec import pretrain2_models as v2_models
from flax_data2vec import pretrain_models as v1_models
from flax_data2vec.audio import conv_output_lengths
from flax_data2vec.train.config import TrainConfig
from flax_data2vec.train.loop import make_train_step
from flax_data2vec.train.optim import TrainState
from flax_data2vec.train.tasks import make_task
from flax_data2vec.train.tasks.pretrain import span_masks
from flax_data2vec.train.tasks.pretrain2 import clone_masks

V1, V2 = "v1 (pretrain-audio)", "2.0 M=8 (pretrain2-audio)"


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


def parts(task, version: int, state: TrainState, batch: dict, frames: int) -> dict:
    """name -> (jitted fn, args) of the pieces of one update: the loss's forward pass alone, the teacher forward +
    targets on B clips, and (2.0) the decoder forward + backward on the B M clones."""
    module, p = task.module, task.module.pretrain
    rng = jax.random.PRNGKey(1)
    out = {"loss forward only": (jax.jit(lambda s, b: task.loss(s.params, s.extra, b, rng, True)[0]), (state, batch))}
    n = batch["input_values"].shape[0]
    if version == 1:
        c = module.config
        local = jnp.asarray(np.random.default_rng(1).normal(size=(n, frames, c.hidden_size)), jnp.float32)
        out["teacher forward + targets"] = (jax.jit(lambda t, x: v1_models.audio_targets(
            c, module.options, p, t, x, None)), (state.extra["teacher"], local))
        return out
    d = module.config.embed_dim
    local = jnp.asarray(np.random.default_rng(1).normal(size=(n, frames, d)), jnp.float32)
    out["teacher forward + targets"] = (jax.jit(lambda t, x: v2_models.targets(module, t, x, None, p)),
                                        (state.extra["teacher"], local))
    decoder = v2_models.Decoder1d(p, d, module.dtype, module.param_dtype)
    full = jnp.asarray(np.random.default_rng(2).normal(size=(batch["ids_keep"].shape[0], frames, d)), jnp.float32)

    def decoder_loss(params, x, positions):
        return jnp.sum(decoder.apply({"params": params}, x, positions) ** 2)
    out["decoder forward + backward"] = (jax.jit(jax.grad(decoder_loss, argnums=(0, 1))),
                                         (state.params["decoder"], full, batch["ids_masked"]))
    return out


def cpu_timed(compiled, fn_args, seconds: list):
    """A synced call of `compiled` that also appends this process's CPU seconds for it (fair under load)."""
    def run():
        t0 = os.times()
        jax.block_until_ready(compiled(*fn_args))
        t1 = os.times()
        seconds.append(t1.user + t1.system - t0.user - t0.system)
    return run


def breakdown(lowered_flops: dict, kinds: dict, cpu: dict, skip: int) -> None:
    """Print each part's share of its update: XLA's FLOP count of the lowered programs, and the process CPU
    seconds per call (median after `skip` warm-ups) where it was timed."""
    print("# where the work goes (XLA FLOP count of the lowered program; process CPU s per call where timed):")
    for key, name in kinds.items():
        f, total = lowered_flops.get(key), lowered_flops.get(name)
        share = f"{f / total:.0%} of the update's FLOPs" if f and total else "-"
        secs = f"{statistics.median(cpu[key][skip:] or cpu[key]):.3f} CPU s" if cpu.get(key) else "not timed"
        print(f"#   {key}: {(f or 0) / 1e9:.2f} GFLOP ({share}); {secs}")


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length (every clip the same)")
    parser.add_argument("--batch", type=int, default=0, help="input clips per update (0: 2 on CPU, 8 on GPU)")
    parser.add_argument("--time-parts", action=argparse.BooleanOptionalAction, default=True,
                        help="compile and time the parts (off: only XLA's FLOP count of each part)")
    args = parser.parse_args(argv)
    info = setup(args)
    gpu = args.device == "gpu"
    model = "tiny" if args.quick else "base"
    batch = args.batch or (8 if gpu else 2)
    samples = int((1.0 if args.quick else args.seconds) * 16000)
    fns, compile_s, flops, work, mem, notes, kinds, cpu, part_flops = {}, {}, {}, {}, {}, {}, {}, {}, {}
    for version, name in ((1, V1), (2, V2)):
        cfg = TrainConfig(task="pretrain-audio" if version == 1 else "pretrain2-audio", model=model,
                          batch_size=batch, n_buckets=1, output_dir="/tmp/unused", progress=False,
                          dtype="bfloat16" if gpu else "float32", max_steps=400_000)
        task = make_task(cfg)
        device_batch, work[name] = synthetic_batch(task, version, batch, samples)
        params = task.init()
        tx, sched = task.optimizer(params)
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0),
                           task.init_extra(params))
        pieces = {name: (jax.jit(make_train_step(task, tx, sched, 1)), (state, device_batch))}
        frames = int(conv_output_lengths(task.module.config, samples))
        pieces.update({f"{name}: {k}": v for k, v in parts(task, version, state, device_batch, frames).items()})
        for key, (jitted, fn_args) in pieces.items():
            kinds[key] = name
            t0 = time.perf_counter()
            lowered = jitted.lower(*fn_args)
            part_flops[key] = xla_flops(lowered)  # before XLA's passes: the same count for every piece
            if key != name and not args.time_parts:
                continue
            compiled = lowered.compile()
            compile_s[key] = time.perf_counter() - t0
            flops[key], mem[key] = xla_flops(compiled), memory(compiled)
            fns[key] = cpu_timed(compiled, fn_args, cpu.setdefault(key, []))
        notes[name] = f"{work[name]} masked targets/update; XLA plan {mem[name] or float('nan'):.2f} GiB"
    timings = time_interleaved(fns, args.warmup, args.repeats, compile_s, retries=args.retries)
    workload = f"audio {model} pre-training update, {batch} clips x {samples / 16000:.1f} s"
    rows = []
    for key in fns:
        full = key in (V1, V2)
        rows.append(Row(workload, key, timings[key], work[key] if full else None, "masked-targets" if full else "",
                        baseline=V1 if key == V2 else None, flops=flops[key],
                        note=notes[key] if full else f"{timings[key].median / timings[kinds[key]].median:.0%} of "
                        "its update's time"))
    t1, t2 = timings[V1].median, timings[V2].median
    print(f"# update time: 2.0 / v1 = {t2 / t1:.2f}x; masked-target predictions/s: 2.0 / v1 = "
          f"{(work[V2] / t2) / (work[V1] / t1):.2f}x (target >= 1.5x)")
    c1, c2 = (statistics.median(cpu[v][args.warmup:] or cpu[v]) for v in (V1, V2))
    print(f"# process CPU s per update (fairer under load): v1 {c1:.3f}, 2.0 {c2:.3f}; 2.0 / v1 = {c2 / c1:.2f}x; "
          f"masked-target predictions per CPU s: 2.0 / v1 = {(work[V2] / c2) / (work[V1] / c1):.2f}x")
    breakdown(part_flops, kinds, cpu, args.warmup)
    extra = {"cpu_s_per_call": cpu, "peak_gib_xla_plan": {k: mem[k] for k in (V1, V2)},
             "masked_targets_per_update": work,
             "gflops_lowered": {k: (v or 0) / 1e9 for k, v in part_flops.items()}}
    if gpu:
        stats = jax.devices()[0].memory_stats() or {}
        extra["gpu_peak_bytes_in_use_all"] = stats.get("peak_bytes_in_use")
    report(rows, info, args, extra)


if __name__ == "__main__":
    main()
