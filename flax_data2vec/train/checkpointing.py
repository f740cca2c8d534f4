"""Training checkpoints: Orbax `CheckpointManager` over (train state, JSON metadata).

Keeps the latest `keep` checkpoints plus the best by the eval metric; saves asynchronously where
Orbax can. The metadata holds the data-iterator position and an identity of the model (task and
config) so a run never resumes from another model's checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from .. import publish


class SaveFailed(OSError):
    """A checkpoint could not be written: the run stops; what failed is named, the last good checkpoint kept."""

    def __str__(self) -> str:
        return self.strerror


class TrainCheckpointer:
    """Save/restore of `TrainState` + metadata under `<output_dir>/checkpoints/<step>`."""

    def __init__(self, output_dir: str, keep: int = 2, best_metric: str | None = None, best_mode: str = "min",
                 async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(output_dir, "checkpoints"))
        policies: list = [pp.LatestN(keep)]
        if best_metric:
            policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies), enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.best_metric = best_metric
        logging.getLogger("absl").addFilter(_quiet_orbax_errors)
        _quiet_closed_loop_callbacks()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None, force: bool = True) -> None:
        """Start writing checkpoint `step` (in the background where async); a failure, now or of the previous
        background write, raises SaveFailed."""
        metrics = {k: float(v) for k, v in (metrics or {}).items() if not isinstance(v, str)} if metrics else None
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        self.wait()  # the previous background write first, so that its failure is reported as its own
        self.pending = step
        with self._failures():
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)),
                              metrics=metrics, force=force)

    def check(self) -> None:
        """SaveFailed if a background write has failed (cheap: no wait)."""
        with self._failures():
            self.manager.check_for_errors()

    @contextlib.contextmanager
    def _failures(self):
        """Any error of a checkpoint write -> SaveFailed naming the cause, after removing the write's temp files."""
        try:
            yield
        except SaveFailed:
            raise
        except Exception as e:
            step = getattr(self, "pending", None)
            self.remove_partial(step)
            kept = self.latest_step()
            last = f"the last good checkpoint, step {kept}, is intact" if kept is not None else "no earlier checkpoint"
            raise SaveFailed(errno_of(e), f"checkpoint {step} could not be written to {self.directory}: "
                             f"{failure_cause(e)}; {last}") from e

    def remove_partial(self, step: int) -> list[str]:
        """Delete the temp directories a failed write of `step` left (Orbax names them `<step>.orbax-...-tmp-*`)."""
        if not os.path.isdir(self.directory):
            return []
        partial = [os.path.join(self.directory, e) for e in os.listdir(self.directory)
                   if e.startswith(f"{step}.") and "tmp" in e]
        for path in partial:
            publish.remove_tree(path)
        return partial

    def read_meta(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state (into `abstract_state`'s shapes, dtypes and shardings) and metadata at `step`."""
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        with self._failures():
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _quiet_orbax_errors(record: logging.LogRecord) -> bool:
    """Orbax logs each failed background write with tracebacks from several threads; SaveFailed reports it once."""
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _quiet_closed_loop_callbacks() -> None:
    """Leave out the 'Event loop is closed' errors that TensorStore's callbacks report (as unraisable exceptions,
    or through PyErr_Print) when a failed write's remaining futures complete after Orbax closed their loop."""
    if getattr(sys.unraisablehook, "closed_loop_filter", False):
        return
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def is_closed_loop(error) -> bool:
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

    def quiet_unraisable(info):
        if not is_closed_loop(info.exc_value):
            unraisable(info)

    def quiet_except(kind, error, tb):
        if not is_closed_loop(error):
            excepthook(kind, error, tb)
    quiet_unraisable.closed_loop_filter = True
    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_except


def errno_of(e: BaseException | None) -> int:
    while e is not None:
        if getattr(e, "errno", None):
            return e.errno
        e = e.__cause__ or e.__context__
    return errno.EIO


def failure_cause(e: BaseException) -> str:
    """What a failed write ran into, in a few words: disk full, permissions, or the first line of the error."""
    if publish.is_disk_full(e):
        return "no space left on device"
    code, text = errno_of(e), str(e)
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        return "permission denied"
    if code == errno.EROFS or "Read-only file system" in text:
        return "read-only file system"
    return (text.strip().splitlines() or [type(e).__name__])[0]


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete pytree, as a restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
