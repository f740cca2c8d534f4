"""Training checkpoints: Orbax `CheckpointManager` over (train state, JSON metadata).

Keeps the latest `keep` checkpoints plus the best by the eval metric; saves asynchronously where
Orbax can. The metadata holds the data-iterator position and an identity of the model (task and
config) so a run never resumes from another model's checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None, force: bool = True) -> None:
        metrics = {k: float(v) for k, v in (metrics or {}).items() if not isinstance(v, str)} if metrics else None
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=force)

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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete pytree, as a restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
