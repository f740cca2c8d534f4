"""What every pipeline shares: model resolution, bucketed shapes, one compiled forward per shape on a data
mesh of all local devices (jit, or pmap where asked), host work in background threads, and compile time counted
apart from run time."""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass
class Stats:
    """Compiled programs (one per bucketed shape), seconds spent compiling, and seconds spent running."""

    compiles: int = 0
    compile_s: float = 0.0
    run_s: float = 0.0
    batches: int = 0


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def bucket(length: int, minimum: int, multiple: int, maximum: int | None = None) -> int:
    """The padded length for `length`: the first of minimum·{1, 1.25, 1.5, 1.75}·2^k (rounded up to `multiple`)
    that holds it, capped at `maximum`. Four sizes an octave (at most 25 % padding), a few dozen from `minimum`
    to hours; the octaves keep round sizes exact (128 or 512 tokens, 10 s or 20 s of audio from a 0.25-s minimum)."""
    octave = 1
    while True:
        for quarters in (4, 5, 6, 7):
            size = round_up(-(-minimum * octave * quarters // 4), multiple)
            if size >= length:
                return size if maximum is None else min(size, maximum)
        octave *= 2


def make_mesh(devices: Sequence[jax.Device] | None = None, mesh: Mesh | None = None) -> Mesh:
    """A one-axis ('data') mesh over `devices` (default: all local devices), unless a mesh is given."""
    if mesh is not None:
        if "data" not in mesh.axis_names:
            raise ValueError(f"mesh must have a 'data' axis to shard the batch over, got axes {mesh.axis_names}")
        return mesh
    return Mesh(np.array(list(devices or jax.local_devices())), ("data",))


def check_parallel(parallel: str) -> str:
    if parallel not in ("jit", "pmap"):
        raise ValueError(f"parallel must be 'jit' or 'pmap', got {parallel!r}")
    return parallel


class Forward:
    """`fn(params, *batch)` compiled once per input shape (ahead of time, so compiling is timed on its own),
    params replicated and the batch split over the mesh's 'data' axis: by `jax.jit` with shardings, or by
    `jax.pmap` over the mesh's devices (each device gets batch / devices rows)."""

    def __init__(self, fn: Callable, params, mesh: Mesh, parallel: str = "jit"):
        if check_parallel(parallel) == "pmap" and mesh.devices.size != mesh.shape["data"]:
            raise ValueError(f"parallel='pmap' splits the batch over devices only; got a mesh {dict(mesh.shape)}")
        self.mesh, self.parallel = mesh, parallel
        self.data_size = mesh.shape["data"]
        self.params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        if parallel == "pmap":
            self._jit = jax.pmap(lambda batch, p: fn(p, *batch), in_axes=(0, None), devices=list(mesh.devices.flat))
        else:
            self._jit = jax.jit(lambda batch, p: fn(p, *batch))
        self._compiled: dict[tuple, Any] = {}
        self.stats = Stats()

    def __call__(self, *arrays: np.ndarray):
        """Device outputs (dispatched, not waited for) of one host batch; its size must divide by the mesh.
        Read them with `fetch`."""
        key = tuple((a.shape, a.dtype.str) for a in arrays)
        if self.parallel == "pmap":  # (batch, ...) -> (devices, batch / devices, ...)
            arrays = tuple(a.reshape(self.data_size, -1, *a.shape[1:]) for a in arrays)
        args = jax.device_put(arrays, self.batch_sharding)
        compiled = self._compiled.get(key)
        if compiled is None:
            t0 = time.perf_counter()
            compiled = self._compiled[key] = self._jit.lower(args, self.params).compile()
            self.stats.compile_s += time.perf_counter() - t0
            self.stats.compiles += 1
        self.stats.batches += 1
        return compiled(args, self.params)

    def fetch(self, out):
        """The outputs of `__call__` as numpy arrays of (batch, ...), waiting for the device."""
        out = jax.tree_util.tree_map(np.asarray, jax.device_get(out))
        if self.parallel == "pmap":
            out = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), out)
        return out


def run_overlapped(batches: Iterable, prepare: Callable, compute: Callable, finish: Callable,
                   stats: Stats | None = None, workers: int = 2) -> list:
    """finish(prepared, compute(prepared)) for each batch, with `prepare` of the next batch and `finish` of the
    last (tokenising, feature extraction, device_get, decoding) on host threads while the device computes."""
    results, pending = [], collections.deque()
    it = iter(batches)
    t0 = time.perf_counter()
    compile_before = stats.compile_s if stats else 0.0
    with ThreadPoolExecutor(workers) as pool:
        for item in [next(it, None) for _ in range(2)]:
            if item is not None:
                pending.append(pool.submit(prepare, item))
        while pending:
            prepared = pending.popleft().result()
            following = next(it, None)
            if following is not None:
                pending.append(pool.submit(prepare, following))
            results.append(pool.submit(finish, prepared, compute(prepared)))
        out = [r.result() for r in results]
    if stats is not None:
        stats.run_s += time.perf_counter() - t0 - (stats.compile_s - compile_before)
    return out


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so little padding is computed."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_rows(rows: Sequence[np.ndarray], width: int, rows_total: int, value=0) -> np.ndarray:
    """Stack 1-D rows right-padded with `value` to `width`, plus all-`value` rows up to `rows_total`."""
    first = np.asarray(rows[0])
    out = np.full((rows_total, width, *first.shape[1:]), value, dtype=first.dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def apply_function(logits: np.ndarray, function) -> np.ndarray:
    """Scores from logits by transformers' `function_to_apply`: 'softmax', 'sigmoid' or 'none' (any case, or
    its ClassificationFunction enum)."""
    function = str(getattr(function, "value", function)).lower()
    if function not in ("softmax", "sigmoid", "none"):
        raise ValueError(f"function_to_apply must be 'softmax', 'sigmoid' or 'none', got {function!r}")
    if function == "softmax":
        return softmax(logits)
    return 1 / (1 + np.exp(-logits)) if function == "sigmoid" else logits


@dataclasses.dataclass
class Model:
    """A resolved model: the module, its params, and where its processor files live (None if unknown)."""

    module: Any
    params: Any
    directory: str | None

    @property
    def architecture(self) -> str:
        return type(self.module).__name__


def resolve_model(model, architecture: str | None = None, dtype=None) -> Model:
    """Anything `fd.load` takes, a `Model`, or a `(module, params)` pair -> Model.

    architecture: the class the task needs; "base" loads the checkpoint's bare encoder (its head dropped).
    """
    if isinstance(model, Model):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        module, params = model
        if architecture not in (None, "base") and type(module).__name__ != architecture:
            raise ValueError(f"this task needs a {architecture}, got a {type(module).__name__}")
        if dtype is not None:
            module = module.clone(dtype=dtype)
        return Model(module, params, None)
    from .. import hub
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a path or a (module, params) pair, got {type(model).__name__}")
    source = hub.resolve(model)
    if source.kind == "orbax":
        stored = hub.checkpoint.read_metadata(source.directory)["architecture"]
    else:
        stored = hub.choose_architecture(hub.read_config(source.directory), None, source.label)
    if architecture == "base":
        architecture = "Data2VecAudioModel" if stored.startswith("Data2VecAudio") else "Data2VecTextModel"
    if architecture is not None and not _fits(stored, architecture):
        raise ValueError(f"{source.label} is a {stored} checkpoint; this task needs {architecture}")
    module, params = hub.load(model, architecture=architecture, dtype=dtype)
    # a hub repo's processor files are fetched by transformers from the repo id itself
    directory = source.directory if os.path.isdir(os.fspath(model)) else os.fspath(model)
    return Model(module, params, directory)


def _fits(stored: str, wanted: str) -> bool:
    """A head checkpoint serves its own task; any checkpoint serves its modality's base model (features)."""
    base = wanted in ("Data2VecAudioModel", "Data2VecTextModel")
    return stored == wanted or base and stored.startswith(wanted[:-len("Model")])  # Data2VecAudio / Data2VecText


class Pipeline:
    """Base: `__call__` takes one input or a list and returns one output or a list, as transformers does."""

    task: str = ""
    architectures: tuple[str, ...] = ()

    def __init__(self, model: Model, *, batch_size: int = 8, devices=None, mesh: Mesh | None = None,
                 parallel: str = "jit", **defaults):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.architectures and model.architecture not in self.architectures:
            raise ValueError(f"task {self.task!r} needs a {' or '.join(self.architectures)} checkpoint, got "
                             f"{model.architecture}")
        self.model, self.module, self.config = model, model.module, model.module.config
        self.mesh = make_mesh(devices, mesh)
        self.batch_size = round_up(batch_size, self.mesh.shape["data"])  # every device gets whole rows
        self.defaults = defaults
        self.parallel = parallel
        self.forward = Forward(self.forward_fn, model.params, self.mesh, parallel)

    @property
    def stats(self) -> Stats:
        return self.forward.stats

    def forward_fn(self, params, *batch):
        raise NotImplementedError

    def options(self, overrides: dict) -> dict:
        return {**self.defaults, **overrides}

    def __call__(self, inputs, **options):
        single = not isinstance(inputs, (list, tuple)) and not _is_column(inputs)
        items = [inputs] if single else list(inputs)
        outputs = self.run(items, self.options(options)) if items else []
        return outputs[0] if single else outputs

    def run(self, items: list, options: dict) -> list:
        raise NotImplementedError


def _is_column(x) -> bool:
    """A `datasets` column (or Dataset) of audio dicts: iterable, not a dict, not an array."""
    return type(x).__module__.startswith("datasets")
