"""A linear-regression training task: a real loss and the real optimizer, without a Data2Vec model to compile.

For tests of the loop's bookkeeping (checkpoint failures), where compiling a transformer would only cost time.
Run `python tests/linear_task.py ARGS` to run train_tpu.py's main with this task in place of `--task`'s.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from flax_data2vec.train.optim import make_optimizer, make_schedule
from flax_data2vec.train.task import Task

WIDTH = 512  # params of 1 MiB: each checkpoint (params and two Adam moments) takes about 3 MiB


class Batches:
    """Endless fixed-shape batches with the resumable-iterator interface the loop uses."""

    buckets = [WIDTH]

    def __init__(self, batch_size: int):
        self.batch_size, self.position = batch_size, 0

    def __next__(self) -> dict:
        rng = np.random.default_rng(self.position)
        self.position += 1
        x = rng.standard_normal((self.batch_size, WIDTH), dtype=np.float32)
        return {"x": x, "y": x[:, ::-1].copy()}

    def state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = state["position"]

    def close(self) -> None:
        pass


def make_linear(cfg, shard_index: int = 0, num_shards: int = 1) -> Task:
    def loss(params, extra, batch, rng, train=True):
        err = batch["x"] @ params["w"] - batch["y"]
        return jnp.sum(err ** 2), jnp.asarray(err.size, jnp.float32), {}

    def optimizer(params):
        schedule = make_schedule(cfg, 1e-3, "constant")
        return make_optimizer(cfg, schedule, params), schedule

    w = jax.random.normal(jax.random.PRNGKey(cfg.seed), (WIDTH, WIDTH)) / WIDTH
    return Task(name="linear", architecture="linear", module=None, init=lambda: {"w": w}, optimizer=optimizer,
                loss=loss, eval_step=lambda p, e, b: {"sum": loss(p, e, b, None)[0]},
                eval_metrics=lambda outs: {"eval_loss": float(sum(o["sum"] for o in outs))},
                train_data=lambda: Batches(cfg.batch_size), eval_data=lambda: [next(Batches(cfg.batch_size))],
                export=lambda params: (None, params), identity={"task": "linear", "width": WIDTH},
                throughput=lambda batch: ("samples", float(len(batch["x"]))))


if __name__ == "__main__":
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from flax_data2vec.train import loop
    loop.make_task = make_linear
    import train_tpu
    sys.exit(train_tpu.main(sys.argv[1:]))
