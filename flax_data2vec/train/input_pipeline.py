"""The training input pipeline: our length-bucket plan as the sampler, Grain underneath.

`BatchPlan` decides, per (seed, epoch), which examples form each global batch and at which padded (or
cropped) length, so batches come in a few fixed shapes and every host of a multi-host run agrees on them.
Grain (`grain.MapDataset` over the flat, epoch-repeated sequence of planned batches) runs the loading,
collation and an optional per-batch host transform, in spawned worker processes when `num_workers > 0`,
and prefetches. `BatchIterator` wraps it with a two-number position that the training loop checkpoints.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import grain
import numpy as np

IGNORE_INDEX = -100  # label padding, as in transformers' CTC and classification losses


# ----------------------------------------------------------------------------- bucket lengths

def _round_up(n: float, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


def bucket_lengths(max_len: int, n_buckets: int, multiple: int = 1) -> list[int]:
    """Up to `n_buckets` evenly spaced lengths, rounded up to multiples of `multiple`, ending at max_len."""
    if max_len < 1 or n_buckets < 1 or multiple < 1:
        raise ValueError(f"bucket_lengths needs positive arguments, got {max_len}, {n_buckets}, {multiple}")
    return sorted({_round_up(max_len * k / n_buckets, multiple) for k in range(1, n_buckets + 1)})


def crop_bucket_lengths(min_len: int, max_len: int, n_buckets: int, multiple: int = 1) -> list[int]:
    """Up to `n_buckets` evenly spaced lengths from min_len to max_len, rounded *down* to multiples of
    `multiple`: crop targets, so the smallest must not exceed the shortest example."""
    if min_len < multiple or max_len < min_len or n_buckets < 1:
        raise ValueError(f"crop_bucket_lengths needs multiple {multiple} <= min_len {min_len} <= max_len "
                         f"{max_len} and n_buckets {n_buckets} >= 1")
    steps = [min_len + (max_len - min_len) * k / max(n_buckets - 1, 1) for k in range(n_buckets)]
    return sorted({int(s // multiple) * multiple for s in steps})


# ----------------------------------------------------------------------------- the plan (sampler)

class PlannedBatch(NamedTuple):
    """One global batch as this host loads it: its position, its rows (-1 = padding) and its shape."""

    epoch: int
    index: int
    rows: np.ndarray  # this host's slice of the global batch
    fallback: int  # a real example of the global batch, repeated in padding rows
    length: int  # padded length, or (crop_to_shortest) the length every row is cropped to
    label_width: int | None  # CTC label width of this bucket


class BatchPlan:
    """Global batches of example indices per epoch, deterministic in (seed, epoch), and their lengths.

    Each epoch's order is a permutation drawn from (seed, epoch); with `group_by_length`, windows of
    `window` batches are sorted by length before being cut into batches (less padding or cropping), and
    batch order is shuffled again. A last partial batch is dropped (drop_remainder) or filled with -1 rows.
    Host `shard_index` of `num_shards` loads rows [shard_index*b, (shard_index+1)*b), b = batch_size //
    num_shards. A batch's length is the smallest bucket holding its longest member (padding) or, with
    `crop_to_shortest`, the largest bucket not longer than its shortest member, over the *global* batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, label_lengths: Sequence[int] | None = None,
                 buckets: Sequence[int] | None = None, n_buckets: int = 4, multiple: int = 8,
                 label_multiple: int = 8, seed: int = 0, shuffle: bool = True, drop_remainder: bool = True,
                 group_by_length: bool = True, window: int = 16, shard_index: int = 0, num_shards: int = 1,
                 crop_to_shortest: bool = False):
        if batch_size % num_shards:
            raise ValueError(f"batch_size {batch_size} is not divisible by num_shards {num_shards}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} is outside [0, {num_shards})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.shuffle, self.drop_remainder = batch_size, seed, shuffle, drop_remainder
        self.group_by_length, self.window, self.crop_to_shortest = group_by_length, window, crop_to_shortest
        self.shard_index, self.per_host = shard_index, batch_size // num_shards
        n = len(self.lengths)
        self.batches_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {n} examples gives no batch of size {batch_size} (drop_remainder)")
        shortest, longest = int(self.lengths.min()), int(self.lengths.max())
        if crop_to_shortest:
            if label_lengths is not None:
                raise ValueError("crop_to_shortest would cut label sequences (CTC): use it for pre-training")
            self.buckets = sorted(buckets) if buckets else crop_bucket_lengths(shortest, longest, n_buckets,
                                                                                multiple)
            if self.buckets[0] > shortest:
                raise ValueError(f"crop_to_shortest needs a bucket <= the shortest example ({shortest}); "
                                 f"smallest bucket is {self.buckets[0]}")
            # index of the largest bucket <= length: the crop target of a batch whose shortest row it is
            self.bucket_of = np.searchsorted(self.buckets, self.lengths, side="right") - 1
        else:
            self.buckets = sorted(buckets) if buckets else bucket_lengths(longest, n_buckets, multiple)
            self.bucket_of = np.searchsorted(self.buckets, self.lengths)  # smallest bucket >= length
            if self.bucket_of.max() >= len(self.buckets):
                raise ValueError(f"an example of length {longest} exceeds the largest bucket {self.buckets[-1]}")
        self.label_widths = None
        if label_lengths is not None:  # CTC: widest label up to each bucket, so one label width per bucket
            label_lengths = np.asarray(label_lengths)
            widest = [int(label_lengths[self.bucket_of <= k].max(initial=1)) for k in range(len(self.buckets))]
            self.label_widths = [_round_up(w, label_multiple) for w in np.maximum.accumulate(widest)]
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches of example indices (-1 marks a padding row); the last one is cached."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._make(epoch))
        return self._cached[1]

    def _make(self, epoch: int) -> list[np.ndarray]:
        n, bs = len(self.lengths), self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            span = bs * self.window
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                    for c in np.array_split(order, max(1, -(-n // span)))])
        batches = [order[i:i + bs] for i in range(0, n, bs)]
        if len(batches[-1]) < bs:
            if self.drop_remainder:
                batches.pop()
            else:
                batches[-1] = np.concatenate([batches[-1], np.full(bs - len(batches[-1]), -1)])
        if self.shuffle and self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __getitem__(self, position: int) -> PlannedBatch:
        """Batch number `position` of the flat sequence epoch 0, epoch 1, ..."""
        epoch, index = divmod(int(position), self.batches_per_epoch)
        batch = self.epoch(epoch)[index]
        real = batch[batch >= 0]
        k = int(self.bucket_of[real].min() if self.crop_to_shortest else self.bucket_of[real].max())
        rows = batch[self.shard_index * self.per_host:(self.shard_index + 1) * self.per_host]
        width = self.label_widths[k] if self.label_widths is not None else None
        return PlannedBatch(epoch, index, rows, int(real[0]), self.buckets[k], width)


# ----------------------------------------------------------------------------- loading and collation

def collate(examples: list[dict | None], seq_len: int, label_len: int | None, pad_value: float,
            fallback: dict) -> dict[str, np.ndarray]:
    """Pads examples to (B, seq_len); None rows repeat `fallback` with example_mask 0.

    Padding rows copy a real example rather than being all-masked so that every model output
    (pooling, CTC, attention) stays finite; weight losses and metrics by `example_mask`.
    """
    key = "input_values" if "input_values" in fallback else "input_ids"
    dtype = np.float32 if key == "input_values" else np.int32
    b = len(examples)
    inputs = np.full((b, seq_len), pad_value, dtype)
    mask = np.zeros((b, seq_len), np.int32)
    example_mask = np.zeros((b,), np.float32)
    has_labels = "labels" in fallback
    labels = (np.full((b, label_len), IGNORE_INDEX, np.int32) if label_len is not None
              else np.zeros((b,), np.int32)) if has_labels else None
    for r, ex in enumerate(examples):
        if ex is not None:
            example_mask[r] = 1.0
        ex = ex if ex is not None else fallback
        n = len(ex[key])
        inputs[r, :n], mask[r, :n] = ex[key], 1
        if has_labels:
            if label_len is None:
                labels[r] = ex["labels"]
            else:
                labels[r, :len(ex["labels"])] = ex["labels"]
    out = {key: inputs, "attention_mask": mask, "example_mask": example_mask}
    if has_labels:
        out["labels"] = labels
    return out


class _LoadBatch:
    """Grain map: a flat batch position -> (PlannedBatch, collated batch). Runs in the workers."""

    def __init__(self, dataset, plan: BatchPlan):
        self.dataset, self.plan = dataset, plan

    def _load(self, i: int, planned: PlannedBatch) -> dict:
        rng = np.random.default_rng([self.plan.seed, planned.epoch, i])  # independent of worker count
        if self.plan.crop_to_shortest:
            return self.dataset.load(i, rng, length=planned.length)
        return self.dataset.load(i, rng)

    def __call__(self, position: int) -> tuple[PlannedBatch, dict]:
        planned = self.plan[position]
        examples = [self._load(int(i), planned) if i >= 0 else None for i in planned.rows]
        fallback = next((e for e in examples if e is not None), None)
        if fallback is None:  # this host's slice is all padding: repeat a real example of the global batch
            fallback = self._load(planned.fallback, planned)
        return planned, collate(examples, planned.length, planned.label_width, self.dataset.pad_value, fallback)


class _Transform:
    """Grain map: applies transform(batch, rng), rng = default_rng([seed, epoch, index]) with (epoch, index)
    the iterator's `state()` right after this batch (as the training loop drew it), then drops the plan."""

    def __init__(self, transform: Callable[[dict, np.random.Generator], dict] | None, seed: int):
        self.transform, self.seed = transform, seed

    def __call__(self, item: tuple[PlannedBatch, dict]) -> dict:
        planned, batch = item
        if self.transform is None:
            return batch
        return self.transform(batch, np.random.default_rng([self.seed, planned.epoch, planned.index + 1]))


GROUP_BATCHES = 4  # batches a worker process sends in one message


class _LoadGroup:
    """Grain map run in a worker: group g -> the packed batches at positions start + g*GROUP_BATCHES onwards
    (before `end`), each loaded and transformed exactly as in-process, so batches do not depend on grouping."""

    def __init__(self, load: _LoadBatch, transform: _Transform, start: int, end: int):
        self.load, self.transform, self.start, self.end = load, transform, start, end

    def __call__(self, group: int) -> list[dict]:
        first = self.start + group * GROUP_BATCHES
        return [_pack(self.transform(self.load(p))) for p in range(first, min(first + GROUP_BATCHES, self.end))]


def _listed(batch: dict) -> list[dict]:
    return [batch]


def _exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
    """Grain worker start-up: exit once the training process is gone (spawned workers of a SIGKILLed
    parent would otherwise poll their full queues forever)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


LENGTHS = "_attention_lengths"  # what a worker sends instead of a prefix attention_mask
MIN_SHM_BYTES = 64 * 1024  # smaller arrays travel pickled in the queue message, not in a shared-memory segment


def _pack(batch: dict) -> dict:
    """Worker side: an attention_mask that is 1 on a prefix of each row travels as the row lengths (int32),
    so a batch crosses between processes as its inputs and a few small arrays."""
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return batch
    lengths = mask.sum(1, dtype=np.int32)
    if not np.array_equal(mask, _prefix_mask(lengths, mask.shape[1], mask.dtype)):
        return batch
    return {**{k: v for k, v in batch.items() if k != "attention_mask"},
            LENGTHS: (lengths, mask.dtype.str, mask.shape[1])}


def _prefix_mask(lengths: np.ndarray, width: int, dtype) -> np.ndarray:
    return (np.arange(width) < np.asarray(lengths)[:, None]).astype(dtype)


def _unpack(batch: dict) -> dict:
    """Consumer side: plain numpy copies of arrays that came in shared memory (freed once dropped), and the
    attention_mask rebuilt from the lengths `_pack` sent (the same array, bit for bit)."""
    batch = {k: np.array(v) if isinstance(v, np.ndarray) and type(v) is not np.ndarray else v
             for k, v in batch.items()}
    if LENGTHS in batch:
        lengths, dtype, width = batch.pop(LENGTHS)
        batch["attention_mask"] = _prefix_mask(lengths, width, np.dtype(dtype))
    return batch


# ----------------------------------------------------------------------------- the iterator

class BatchIterator:
    """Deterministic, resumable iterator of fixed-shape, bucketed batches (dicts with `example_mask`).

    The plan is `BatchPlan`'s (same arguments). Grain loads and collates each batch and applies
    `transform(batch, rng)` (host work such as mask sampling; rng seeded by (seed, epoch, index), so
    batches do not depend on the worker count), in `num_workers` spawned processes or, with 0, in one
    background thread (`prefetch` = 0: in the caller's thread). Workers unpickle the dataset and the
    transform (cloudpickle): keep them numpy-only, JAX must not run there. `state()` / `set_state()`
    give and take {"epoch": e, "index": i}, the position after the last batch *consumed* (JSON, the
    same for any worker count); `num_epochs=None` repeats forever. `close()` stops the workers.
    """

    def __init__(self, dataset, batch_size: int, *, buckets: Sequence[int] | None = None,
                 n_buckets: int = 4, multiple: int = 8, label_multiple: int = 8, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
                 group_by_length: bool = True, window: int = 16, shard_index: int = 0,
                 num_shards: int = 1, num_workers: int = 0, prefetch: int = 4,
                 transform: Callable[[dict, np.random.Generator], dict] | None = None,
                 crop_to_shortest: bool = False):
        if crop_to_shortest and not getattr(dataset, "croppable", False):
            raise ValueError(f"crop_to_shortest needs a dataset that crops on load (AudioDataset), "
                             f"not {type(dataset).__name__}")
        if num_workers < 0 or prefetch < 0:
            raise ValueError(f"num_workers ({num_workers}) and prefetch ({prefetch}) must be >= 0")
        self.plan = BatchPlan(dataset.lengths, batch_size, label_lengths=getattr(dataset, "label_lengths", None),
                              buckets=buckets, n_buckets=n_buckets, multiple=multiple,
                              label_multiple=label_multiple, seed=seed, shuffle=shuffle,
                              drop_remainder=drop_remainder, group_by_length=group_by_length, window=window,
                              shard_index=shard_index, num_shards=num_shards, crop_to_shortest=crop_to_shortest)
        self.dataset, self.seed, self.transform = dataset, seed, transform
        self.num_workers, self.prefetch = num_workers, prefetch
        self.buckets, self.label_widths = self.plan.buckets, self.plan.label_widths
        self._end = sys.maxsize if num_epochs is None else num_epochs * self.plan.batches_per_epoch
        if num_workers and transform is not None:
            _check_picklable(transform)
        self.epoch, self.index = 0, 0
        self._pending = collections.deque()  # batches of the iterator's last element not yet returned

    _iterator = None  # the live Grain iterator, started by the first __next__ after construction or set_state

    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def _position(self) -> int:
        return self.epoch * self.plan.batches_per_epoch + self.index

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0:
            raise ValueError(f"data position {state} is negative")
        self.close()  # the next batch comes from a pipeline started at the new position
        self.epoch, self.index = epoch, index

    def _start(self) -> grain.DatasetIterator:
        """A Grain iterator of lists of consecutive batches from the current position: one batch per element
        in-process, GROUP_BATCHES per message from worker processes (fewer hand-offs per batch)."""
        start, load, transform = min(self._position(), self._end), _LoadBatch(self.dataset, self.plan), \
            _Transform(self.transform, self.seed)
        if not self.num_workers:
            ds = grain.MapDataset.range(start, self._end).map(load).map(transform).map(_listed)
            threads = 1 if self.prefetch else 0
            return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self.prefetch)))
        _absl_flags_parsed()
        groups = -(-(self._end - start) // GROUP_BATCHES)
        ds = grain.MapDataset.range(groups).map(_LoadGroup(load, transform, start, self._end))
        ds = grain.experimental.WithOptionsIterDataset(
            ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
            grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES))
        buffer = max(1, -(-self.prefetch // (self.num_workers * GROUP_BATCHES)))
        options = grain.MultiprocessingOptions(num_workers=self.num_workers, per_worker_buffer_size=buffer)
        return iter(ds.mp_prefetch(options, worker_init_fn=functools.partial(_exit_with_parent, os.getpid())))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start()
        if not self._pending:
            try:
                self._pending.extend(next(self._iterator))
            except StopIteration:
                self.close()
                raise
        batch = self._pending.popleft()
        self.epoch, index = divmod(self._position(), self.plan.batches_per_epoch)
        self.index = index + 1  # "after batch `index`": the state the training loop checkpoints
        return _unpack(batch)

    def close(self) -> None:
        self._pending = collections.deque()
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __del__(self) -> None:
        self.close()


def _check_picklable(transform: Callable) -> None:
    import cloudpickle  # Grain's own serialiser for what it sends to workers
    try:
        cloudpickle.dumps(transform)
    except Exception as e:  # noqa: BLE001 - any pickling failure means the same thing here
        raise ValueError(f"transform {transform!r} cannot be sent to worker processes ({e}); pass a module-level "
                         f"function or functools.partial, or num_workers=0") from None


def _absl_flags_parsed() -> None:
    """Grain 0.2.18 reads an absl flag when it starts workers; programs that never parse flags would fail."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
