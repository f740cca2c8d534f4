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
import numpy as np
import optax

from .. import checkpoint
from . import parallel
from .checkpointing import TrainCheckpointer, abstract_like
from .config import ConfigError, TrainConfig, check_devices, read_saved, resume_changes
from .logs import Logger, format_metrics, plain
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


class Trainer:
    """Owns the run: builds everything in `__init__` (errors before any compile), trains in `run()`.

    on_log: called on the main host with each metrics.jsonl row (a dict with "step") as it is written, e.g. to
    draw live plots in a notebook.
    """

    def __init__(self, cfg: TrainConfig, on_log: Callable[[dict], None] | None = None):
        parallel.maybe_initialize_distributed()
        check_devices(cfg, jax.device_count(), jax.process_count())
        self.cfg = cfg
        self.is_main = jax.process_index() == 0
        self.config_record = self._check_config_change()
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
        if self.is_main and self.config_record:
            cfg.save(self.config_record)
        self.on_log = on_log

    # -- set-up -------------------------------------------------------------------------------
    def _check_config_change(self) -> str | None:
        """Where to record this run's config: `train_config.json` for a new run; for a resumed run with changed
        options `train_config.resume-<step>.json` (the original is kept), None if nothing changed. Options not
        marked `resume_free` may change only with --allow-config-change."""
        cfg = self.cfg
        original = os.path.join(cfg.output_dir, "train_config.json")
        step_dir = checkpoint.latest_training_step(cfg.output_dir)
        saved = read_saved(original) if step_dir and cfg.resume else None
        if saved is None:
            return original
        guarded, free = resume_changes(saved, cfg)
        step = os.path.basename(step_dir)
        if guarded and not cfg.allow_config_change:
            raise ConfigError("output_dir", cfg.output_dir, f"holds a run (checkpoint at step {step}) with other "
                              f"options: {'; '.join(guarded)}. Pass --allow-config-change to resume with the new "
                              "ones, or choose another --output-dir")
        if guarded:
            self._print(f"resuming with changed options ({'; '.join(guarded)}), as --allow-config-change asks")
        return os.path.join(cfg.output_dir, f"train_config.resume-{step}.json") if guarded or free else None

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

    def _step(self, batch: dict, compiled: set, bar) -> tuple[Any, bool]:
        """One train step. The first batch of each shape compiles: that step is announced, timed and blocked on,
        and reported as a compile (True) so that neither the bar's ETA nor the throughput counts it."""
        shape = _shape_text(batch)
        if shape in compiled:
            self.state, metrics = self.train_step(self.state, self.to_device(batch))
            return metrics, False
        compiled.add(shape)
        if bar is None:
            self._print(f"compiling the train step for shape {shape} ...", end="")
        else:
            bar.set_description_str(f"compiling {shape}")
        start = time.perf_counter()
        self.state, metrics = self.train_step(self.state, self.to_device(batch))
        jax.block_until_ready(metrics)
        took = f"({time.perf_counter() - start:.1f} s)"
        if bar is None:
            self._print(f" {took}")
        else:
            bar.set_description_str("train")
            if self.is_main:
                bar.write(f"compiled the train step for shape {shape} {took}")
            bar.unpause()  # the compile's wall time is left out of the bar's rate and ETA
        return metrics, True

    def run(self) -> dict:
        cfg = self.cfg
        self.train_iter = self.task.train_data()
        self._restore(self.train_iter)
        stop = {"signal": None}

        def on_signal(signum, frame):
            stop["signal"] = signum

        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        start_step = int(self.host_state().step)
        self.logger = Logger(cfg.output_dir, self.is_main, start_step, self.on_log)
        self._print(f"task {cfg.task} ({self.task.architecture}); {jax.device_count()} device(s) "
                    f"({jax.devices()[0].platform}), {jax.process_count()} host(s), parallel={cfg.parallel}, "
                    f"fsdp={cfg.fsdp}; padded lengths {self.train_iter.buckets} "
                    f"(at most {len(self.train_iter.buckets)} compiled step shapes)")
        for note in self.task.notes:
            self._print(note)
        summary: dict[str, Any] = {}
        bar, compiled = None, set()
        # the iterator loads ahead (Grain: a background thread, or worker processes with --num-workers) and
        # applies the task's host-side masks there; state() is the position after the last batch taken
        self.data_position = self.train_iter.state()
        interval = _Interval()
        try:
            for step in range(start_step, cfg.max_steps):
                batch = next(self.train_iter)
                self.data_position = self.train_iter.state()
                unit_name, amount = self.task.throughput(batch)
                metrics, compiling = self._step(batch, compiled, bar)
                if bar is None:  # started after the first compile, so its rate never includes one
                    bar = _progress(cfg.max_steps, step, cfg.progress and self.is_main)
                if cfg.parallel == "pmap":
                    metrics = parallel.unreplicate(metrics)
                interval.add(metrics, amount, timed=not compiling)
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    m = interval.flush(metrics, unit_name, cfg.batch_size)
                    self.logger.log(done, m)
                    self.task.check_health(m, done)
                    postfix = {"loss": f"{m['loss']:.4f}", "lr": f"{m['learning_rate']:.2e}"}
                    if f"{unit_name}_per_s" in m:
                        postfix[unit_name + "/s"] = f"{m[unit_name + '_per_s']:.0f}"
                    bar.set_postfix(**postfix)
                    summary.update(m)
                eval_metrics = None
                if done % cfg.eval_every == 0 or done == cfg.max_steps:
                    eval_metrics = self.evaluate()
                    self.logger.log(done, eval_metrics)
                    self._print(f"step {done}: " + format_metrics(eval_metrics), bar)
                    summary.update(eval_metrics)
                if done % cfg.save_every == 0 or done == cfg.max_steps or stop["signal"] is not None:
                    self.save(eval_metrics)
                self.checkpointer.check()  # a background save that failed stops the run now
                bar.update(1)
                if stop["signal"] is not None:
                    raise StopRequested
            self.checkpointer.wait()
        except StopRequested:
            self.checkpointer.wait()
            self._print(f"stopped by signal {stop['signal']} at step {int(self.host_state().step)}; "
                        f"checkpoint saved, rerun the same command to resume")
            summary["stopped"] = True
        finally:
            if bar is not None:
                bar.close()
            self.train_iter.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            self.logger.close()
        if not summary.get("stopped"):
            summary["model"] = self.export()
        self.checkpointer.close()
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
                complete_export(tmp, module, params, label=directory)  # model.safetensors + processor files
            save_model(directory, module, params, overwrite=True, assets=assets)
        return directory

    def _print(self, text: str, bar=None, end: str = "\n") -> None:
        if not self.is_main:
            return
        if bar is not None:
            bar.write(text)
        else:
            print(text, end=end, flush=True)


class _Interval:
    """Metrics summed on device between two log lines (no sync per step), and the throughput of the timed steps
    (compiling steps are left out)."""

    def __init__(self):
        self.sums, self.steps, self.timed_steps, self.units, self.start = None, 0, 0, 0.0, time.perf_counter()

    def add(self, metrics: dict, amount: float, timed: bool) -> None:
        self.sums = metrics if self.sums is None else jax.tree_util.tree_map(jnp.add, self.sums, metrics)
        self.steps += 1
        if timed:
            self.timed_steps, self.units = self.timed_steps + 1, self.units + amount
        else:  # the clock restarts after a compile
            self.timed_steps, self.units, self.start = 0, 0.0, time.perf_counter()

    def flush(self, last: dict, unit_name: str, batch_size: int) -> dict:
        """Interval means; point values for the schedule, the EMA decay and integer counts (skipped_steps)."""
        last = {k: plain(v) for k, v in jax.device_get(last).items()}
        m = {k: float(v) / self.steps for k, v in jax.device_get(self.sums).items()}
        m.update({k: v for k, v in last.items() if k in ("learning_rate", "ema_decay") or isinstance(v, int)})
        elapsed = time.perf_counter() - self.start
        if self.timed_steps:
            m[f"{unit_name}_per_s"] = self.units / elapsed
            m["samples_per_s"] = self.timed_steps * batch_size / elapsed
        self.__init__()
        return m


def _shape_text(batch: dict) -> str:
    """The shape of the batch's largest array, named: what a new compile is for."""
    key = max(batch, key=lambda k: np.size(batch[k]))
    return f"{key} {tuple(np.shape(batch[key]))}"


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
