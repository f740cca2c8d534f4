"""The training loop: devices -> task (data checked first) -> state -> jitted steps -> logs, evals, checkpoints.

One code path for every task. A step is one optimizer update over the global batch (split into
`grad_accum` micro-batches inside the jitted step); losses are sums divided by the global count,
so 1 device, a (data, fsdp) mesh and pmap give the same numbers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from . import parallel
from .checkpointing import TrainCheckpointer, abstract_like
from .config import TrainConfig
from .optim import TrainState, skipped_steps
from .task import Task
from .tasks import make_task


class StopRequested(Exception):
    """Raised inside the loop after SIGTERM/SIGINT, once the checkpoint is written."""


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule, grad_accum: int,
                    axis_name: str | None = None):
    """state, batch -> state, metrics. With `axis_name` (pmap), sums are psum'd across devices."""

    def micro(params, extra, batch, rng):
        num, den, stats = task.loss(params, extra, batch, rng, train=True)
        return num, (den, stats)

    grad_fn = jax.value_and_grad(micro, has_aux=True)

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        if grad_accum == 1:
            (num, (den, stats)), grads = grad_fn(state.params, state.extra, batch, rng)
        else:
            micro_batches = jax.tree_util.tree_map(
                lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

            def body(carry, xs):
                mb, i = xs
                (n, (d, s)), g = grad_fn(state.params, state.extra, mb, jax.random.fold_in(rng, i))
                acc_n, acc_d, acc_g, acc_s = carry
                return (acc_n + n, acc_d + d, jax.tree_util.tree_map(jnp.add, acc_g, g),
                        jax.tree_util.tree_map(jnp.add, acc_s, s)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            (_, (_, stats0)) = jax.eval_shape(micro, state.params, state.extra,
                                              jax.tree_util.tree_map(lambda x: x[0], micro_batches), rng)
            init = (jnp.zeros(()), jnp.zeros(()), zeros, jax.tree_util.tree_map(jnp.zeros_like, stats0))
            (num, den, grads, stats), _ = jax.lax.scan(body, init, (micro_batches, jnp.arange(grad_accum)))
            stats = jax.tree_util.tree_map(lambda s: s / grad_accum, stats)
        if axis_name is not None:
            num, den, grads = jax.lax.psum((num, den, grads), axis_name)
            stats = jax.lax.pmean(stats, axis_name)
        den = jnp.maximum(den, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / den, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = task.after_update(state.extra, params, state.step)
        metrics = {"loss": num / den, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step),
                   "skipped_steps": skipped_steps(opt_state), **task.step_metrics(state.step), **stats}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra), metrics

    return step


class Logger:
    """metrics.jsonl + TensorBoard (tensorboardX) on the main host; `on_log(row)` sees each row as written."""

    def __init__(self, output_dir: str, enabled: bool, on_log: Callable[[dict], None] | None = None):
        self.enabled = enabled
        self.on_log = on_log
        self.writer = None
        if enabled:
            self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                pass

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: (v if isinstance(v, str) else float(v)) for k, v in metrics.items()}}
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


class Trainer:
    """Owns the run: builds everything in `__init__` (errors before any compile), trains in `run()`.

    on_log: called on the main host with each metrics.jsonl row (a dict with "step") as it is written, e.g. to
    draw live plots in a notebook.
    """

    def __init__(self, cfg: TrainConfig, on_log: Callable[[dict], None] | None = None):
        parallel.maybe_initialize_distributed()
        self.cfg = cfg
        self.is_main = jax.process_index() == 0
        self.task = make_task(cfg, shard_index=jax.process_index(), num_shards=jax.process_count())
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.checkpointer = TrainCheckpointer(cfg.output_dir, cfg.keep_checkpoints, self.task.best_metric,
                                              self.task.best_mode, cfg.async_checkpointing)
        self._check_resumable()
        params = self.task.init()
        self.tx, self.schedule = self.task.optimizer(params)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                           rng=jax.random.PRNGKey(cfg.seed), extra=self.task.init_extra(params))
        self._build_steps(state)
        self.logger = Logger(cfg.output_dir, self.is_main, on_log)
        if self.is_main:
            cfg.save(os.path.join(cfg.output_dir, "train_config.json"))

    # -- set-up -------------------------------------------------------------------------------
    def _check_resumable(self) -> None:
        step = self.checkpointer.latest_step()
        if step is None or not self.cfg.resume:
            if step is not None:
                raise ValueError(f"{self.cfg.output_dir} already holds checkpoints (step {step}); "
                                 f"pass --resume or choose another --output-dir")
            return
        meta = self.checkpointer.read_meta(step)
        mine = json.loads(json.dumps(self.task.identity))
        theirs = meta.get("identity")
        if theirs != mine:
            diff = _first_difference(theirs, mine)
            raise ValueError(f"{self.cfg.output_dir} holds a checkpoint of another model ({diff}); "
                             f"choose another --output-dir")

    def _build_steps(self, state: TrainState) -> None:
        cfg = self.cfg
        self.mesh = parallel.make_mesh(cfg.fsdp) if cfg.parallel == "jit" else None
        if cfg.parallel == "jit":
            shardings = parallel.state_shardings(jax.eval_shape(lambda: state), self.mesh)
            self.state = jax.device_put(state, shardings)
            step = make_train_step(self.task, self.tx, self.schedule, cfg.grad_accum)
            self.train_step = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(self.mesh)),
                                      out_shardings=(shardings, None), donate_argnums=0)
            self.eval_step = jax.jit(lambda s, b: self.task.eval_step(s.params, s.extra, b))
            self.to_device = lambda b: parallel.global_batch(b, self.mesh)
        else:
            if cfg.fsdp != 1:
                raise ValueError("--fsdp needs --parallel jit (pmap replicates the parameters)")
            self.state = parallel.replicate(state)
            step = make_train_step(self.task, self.tx, self.schedule, cfg.grad_accum, axis_name="batch")
            self.train_step = jax.pmap(step, axis_name="batch", donate_argnums=0)
            eval_p = jax.pmap(lambda s, b: self.task.eval_step(s.params, s.extra, b), axis_name="batch")
            self.eval_step = lambda s, b: jax.tree_util.tree_map(
                lambda x: x.reshape((-1,) + x.shape[2:]) if x.ndim > 1 else x.sum(0), eval_p(s, b))
            self.to_device = parallel.split_for_pmap

    def host_state(self) -> TrainState:
        return parallel.unreplicate(self.state) if self.cfg.parallel == "pmap" else self.state

    # -- running ------------------------------------------------------------------------------
    def _restore(self, train_iter) -> None:
        step = self.checkpointer.latest_step()
        if step is None or not self.cfg.resume:
            return
        host = self.host_state()
        restored, meta = self.checkpointer.restore(abstract_like(host), step)
        self.state = parallel.replicate(restored) if self.cfg.parallel == "pmap" else restored
        train_iter.set_state(meta["data"])
        self._print(f"resumed from step {step} ({self.checkpointer.directory})")

    def save(self, metrics: dict | None = None) -> None:
        host = self.host_state()
        step = int(host.step)
        meta = {"identity": self.task.identity, "data": self.data_position, "step": step}
        self.checkpointer.save(step, host, meta, metrics)

    def evaluate(self) -> dict:
        outputs = []
        for batch in self.task.eval_data():
            out = self.eval_step(self.state, self.to_device(batch))
            if jax.process_count() > 1:  # batch-sharded outputs span hosts: gather them everywhere
                from jax.experimental import multihost_utils
                out = multihost_utils.process_allgather(out, tiled=True)
            outputs.append(jax.device_get(out))
        return self.task.eval_metrics(outputs)

    def run(self) -> dict:
        cfg = self.cfg
        self.train_iter = self.task.train_data()
        self._restore(self.train_iter)
        stop = {"signal": None}

        def on_signal(signum, frame):
            stop["signal"] = signum

        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        start_step = int(self.host_state().step)
        self._print(f"task {cfg.task} ({self.task.architecture}); {jax.device_count()} device(s) "
                    f"({jax.devices()[0].platform}), {jax.process_count()} host(s), parallel={cfg.parallel}, "
                    f"fsdp={cfg.fsdp}; padded lengths {self.train_iter.buckets} "
                    f"(at most {len(self.train_iter.buckets)} compiled step shapes)")
        for note in self.task.notes:
            self._print(note)
        summary: dict[str, Any] = {}
        bar = _progress(cfg.max_steps, start_step, cfg.progress and self.is_main)
        # the iterator loads ahead (Grain: a background thread, or worker processes with --num-workers) and
        # applies the task's host-side masks there; state() is the position after the last batch taken
        self.data_position = self.train_iter.state()
        t0, units, unit_name, n_steps, window = time.perf_counter(), 0.0, "", 0, None
        try:
            for step in range(start_step, cfg.max_steps):
                batch = next(self.train_iter)
                self.data_position = self.train_iter.state()
                unit_name, amount = self.task.throughput(batch)
                self.state, metrics = self.train_step(self.state, self.to_device(batch))
                if cfg.parallel == "pmap":
                    metrics = parallel.unreplicate(metrics)
                # running sums stay on device (no sync per step); logged values are interval means
                window = metrics if n_steps == 0 else jax.tree_util.tree_map(jnp.add, window, metrics)
                units, n_steps = units + amount, n_steps + 1
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    m = {k: float(v) / n_steps for k, v in jax.device_get(window).items()}
                    for k in ("learning_rate", "skipped_steps", "ema_decay"):  # point values, not means
                        if k in last:
                            m[k] = last[k]
                    elapsed = time.perf_counter() - t0
                    m[f"{unit_name}_per_s"] = units / elapsed
                    m["samples_per_s"] = n_steps * cfg.batch_size / elapsed
                    t0, units, n_steps = time.perf_counter(), 0.0, 0
                    self.logger.log(done, m)
                    self.task.check_health(m, done)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['learning_rate']:.2e}",
                                    **{unit_name + "/s": f"{m[unit_name + '_per_s']:.0f}"})
                    summary.update(m)
                eval_metrics = None
                if done % cfg.eval_every == 0 or done == cfg.max_steps:
                    eval_metrics = self.evaluate()
                    self.logger.log(done, eval_metrics)
                    self._print(f"step {done}: " + ", ".join(
                        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in eval_metrics.items()))
                    summary.update(eval_metrics)
                if done % cfg.save_every == 0 or done == cfg.max_steps or stop["signal"] is not None:
                    self.save(eval_metrics)
                bar.update(1)
                if stop["signal"] is not None:
                    raise StopRequested
        except StopRequested:
            self.checkpointer.wait()
            self._print(f"stopped by signal {stop['signal']} at step {int(self.host_state().step)}; "
                        f"checkpoint saved, rerun the same command to resume")
            summary["stopped"] = True
        finally:
            bar.close()
            self.train_iter.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            self.checkpointer.wait()
        if not summary.get("stopped"):
            self.export()
        self.checkpointer.close()
        self.logger.close()
        return summary

    def export(self) -> str:
        """Write the final model where `flax_data2vec.load(output_dir)` finds it."""
        from ..checkpoint import save as save_model
        module, params = self.task.export(jax.device_get(self.host_state().params))
        directory = os.path.join(self.cfg.output_dir, "model")
        if self.is_main:
            from ..processors import complete_export

            def assets(tmp: str) -> None:  # inside the checksummed, atomically published directory
                self.task.save_assets(tmp)  # tokenizer / vocabulary
                complete_export(tmp, module, params)  # model.safetensors + processor files for transformers
            save_model(directory, module, params, overwrite=True, assets=assets)
            self._print(f"final model written to {directory} (flax_data2vec.load({self.cfg.output_dir!r}))")
        return directory

    def _print(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)


def _first_difference(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path}: checkpoint has {a!r}, this run has {b!r}"


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train")


def train(cfg: TrainConfig, on_log: Callable[[dict], None] | None = None) -> dict:
    """Run training as configured; returns the last logged and eval metrics. on_log: see `Trainer`."""
    return Trainer(cfg, on_log).run()
