"""What the teacher and the EMA cost: a data2vec pre-training step vs the same step without them.

Both variants run the real `train_tpu.py` step (student forward/backward, AdamW) on the same model and
batch; the data2vec one adds the teacher's forward pass on the unmasked input, the targets and the EMA
update of the teacher. The ratio is the overhead of the objective.

    python -m benchmarks.pretrain_overhead [--only audio|text] [--quick] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from benchmarks.common import Row, base_parser, compile_jit, report, setup, time_interleaved, xla_flops
from flax_data2vec import pretrain as d2v
from flax_data2vec.train.config import TrainConfig
from flax_data2vec.train.loop import make_train_step
from flax_data2vec.train.optim import TrainState
from flax_data2vec.train.task import keep_extra
from flax_data2vec.train.tasks import make_task


def _without_teacher(task, kind: str, p: d2v.Data2VecPretrainConfig):
    """The same task whose loss regresses zeros instead of the teacher's targets, and has no EMA."""
    def loss(params, extra, batch, rng, train):
        rngs = {"dropout": rng} if train else None
        if kind == "audio":
            pred, _, _ = task.module.apply({"params": params}, batch["input_values"], batch["attention_mask"],
                                           batch["mask"], deterministic=not train, rngs=rngs)
        else:
            pred = task.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                     deterministic=not train, rngs=rngs)
        _, n, stats = d2v.data2vec_loss(pred, jnp.zeros_like(pred), batch["mask"], p.loss_beta, p.loss_scale)
        return stats["loss_sum"], n, {}
    return dataclasses.replace(task, loss=loss, after_update=keep_extra)


def bench(kind: str, args, rows: list) -> None:
    quick = args.quick
    model = "tiny" if quick else "base"
    gpu = args.device == "gpu"
    batch = 2 if quick else (8 if kind == "text" or gpu else 2)
    cfg = TrainConfig(task=f"pretrain-{kind}", model=model, batch_size=batch, n_buckets=1,
                      max_audio_seconds=2.0 if quick else (15.0 if gpu else 5.0),
                      max_text_tokens=64 if quick else (512 if gpu else 128), output_dir="/tmp/unused", progress=False,
                      dtype="bfloat16" if gpu else "float32")
    task = make_task(cfg)
    batch = {k: jnp.asarray(v) for k, v in next(task.train_data()).items()}
    work = (float(batch["attention_mask"].sum()) / 16000.0) if kind == "audio" else float(batch["attention_mask"].sum())
    unit = "audio-s" if kind == "audio" else "tokens"
    fns, compile_s, flops = {}, {}, {}
    p = task.module.pretrain
    for name, t in (("data2vec step", task), ("plain step", _without_teacher(task, kind, p))):
        params = t.init()
        tx, sched = t.optimizer(params)
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0),
                           t.init_extra(params))
        step = jax.jit(make_train_step(t, tx, sched, 1))
        compiled, compile_s[name] = compile_jit(step, state, batch)
        flops[name] = xla_flops(compiled)

        def run(compiled=compiled, state=state):
            jax.block_until_ready(compiled(state, batch))
        fns[name] = run
    timings = time_interleaved(fns, args.warmup, args.repeats, compile_s)
    shape = {k: tuple(v.shape) for k, v in batch.items() if k in ("input_values", "input_ids")}
    for name in fns:
        rows.append(Row(f"{kind} {model} pre-training {shape}", name, timings[name], work, unit,
                        baseline="plain step" if name != "plain step" else None, flops=flops[name]))
    ratio = timings["data2vec step"].median / timings["plain step"].median
    print(f"# {kind}: data2vec step / plain step = {ratio:.2f}x")


def main(argv=None) -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    info = setup(args)
    rows: list[Row] = []
    for kind in ("audio", "text"):
        if args.only in (None, kind):
            bench(kind, args, rows)
    report(rows, info, args)


if __name__ == "__main__":
    main()
